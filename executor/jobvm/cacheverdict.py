"""Whether a job's Docker layer cache disk may become its lineage's head: kept by each `run`
stage in the job's state dir (core.layercache decides), read by cleanup. A light module: it
is on every stage's path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from executor.adapters.statedir import StateDir
from executor.core import layercache

DISK_RECORD = "docker-cache"  # the job's disk: plan, volume (jobvm.layercache writes it)
VERDICT_RECORD = "docker-cache-verdict"


def disk_record(state: StateDir, vm: str) -> dict[str, Any] | None:
    record = state.read_job_record(vm, DISK_RECORD)
    return record if isinstance(record, dict) and isinstance(record.get("volume"), str) else None


def verdict(state: StateDir, vm: str) -> str:
    value = state.read_job_record(vm, VERDICT_RECORD)
    return value if isinstance(value, str) else ""


@contextmanager
def stage_watched(state: StateDir, vm: str, stage: str, say: Callable[[str], None]) -> Iterator[None]:
    """Around one stage of a job with a Docker disk: a stage that starts and never ends, or
    fails, keeps the disk from its lineage (said once, in the job log)."""
    disk = disk_record(state, vm)
    if disk is None:
        yield
        return
    before = verdict(state, vm)
    state.write_job_record(vm, VERDICT_RECORD, layercache.stage_started(before, stage))
    try:
        yield
    except BaseException:
        after = layercache.stage_ended(before, stage, False)
        state.write_job_record(vm, VERDICT_RECORD, after)
        if after == layercache.VERDICT_FAILED and before != after:
            say(f"the {stage} stage failed: this job's Docker layers are not kept for {disk.get('write', '')}")
        raise
    state.write_job_record(vm, VERDICT_RECORD, layercache.stage_ended(before, stage, True))
