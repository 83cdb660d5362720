"""The job history as the job's own processes write it (prepare, each stage, cleanup, reap):
rows for `libvirt-executor jobs`, counters and histograms for the agent's metrics.

A history that cannot be written (a full disk, a locked file for longer than the busy timeout)
is logged and skipped: it never fails or slows down a job beyond that timeout. Imports only
the standard library's sqlite3 beyond the executor's light modules: `run` uses it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from executor.adapters.jobhistory import HistoryError, JobHistory, Observation
from executor.core import history
from executor.core.jobenv import Job
from executor.core.settings import Settings
from executor.errors import AdmissionRefused, BuildFailure

log = logging.getLogger(__name__)
T = TypeVar("T")

JOBS_TOTAL = "jobs_total"
PREPARE_SECONDS = "prepare_seconds"
STAGE_SECONDS = "stage_seconds"
CLEANUP_SECONDS = "cleanup_seconds"
POOL_CLAIMS_TOTAL = "pool_claims_total"
ADMISSION_REFUSALS_TOTAL = "admission_refusals_total"
UNRESPONSIVE_GUESTS_TOTAL = "unresponsive_guests_total"
REAPED_TOTAL = "reaped_total"


def job_history(settings: Settings) -> JobHistory:
    """This executor instance's history: `<state_dir>/history-<name_prefix>.sqlite3` (instances
    on one host share the state dir, for the IP reservations, but not their jobs)."""
    return JobHistory(Path(settings.paths.state_dir) / f"history-{settings.vm.name_prefix}.sqlite3")


def quietly(what: str, write: Callable[[], T]) -> T | None:
    """`write()`, or None with a warning if the history cannot be written now."""
    try:
        return write()
    except (HistoryError, OSError) as exc:
        log.warning("the job history was not updated (%s): %s", what, exc)
        return None


@dataclass
class PrepareFacts:
    """What prepare learns on its way, for the job's row."""

    vm: str = ""
    accel: str = ""
    source: str = ""  # pool | cold
    mode: str = ""  # shell | image | dind
    phases: dict[str, float] = field(default_factory=dict)
    claim: str = ""  # hit | miss; "" when the pool was not asked


@contextmanager
def _timed(ended: Callable[[float, BaseException | None], None]) -> Iterator[None]:
    """Run the block; then `ended(seconds, the exception it raised or None)`, and re-raise."""
    started = time.monotonic()
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        ended(time.monotonic() - started, error)


@contextmanager
def prepare_recorded(settings: Settings, job: Job) -> Iterator[PrepareFacts]:
    """Record one prepare attempt: its row when it starts (so a killed prepare still has one,
    which cleanup or reap ends), its outcome, phases and counters when it ends."""
    h = job_history(settings)
    facts = PrepareFacts()
    quietly("prepare started", lambda: h.prepare_started(job.job_id, job.project, job.project_id, time.time()))

    def ended(seconds: float, error: BaseException | None) -> None:
        outcome, reason = history.classify(error)
        observations: list[Observation] = []
        if facts.claim:
            observations.append(Observation(POOL_CLAIMS_TOTAL, {"result": facts.claim}))
        if isinstance(error, AdmissionRefused):
            observations += [Observation(ADMISSION_REFUSALS_TOTAL, {"resource": r}) for r in error.resources]
        if error is None:  # a failed prepare's time would skew the boot times
            labels = {"source": facts.source, "mode": facts.mode}
            observations.append(Observation(PREPARE_SECONDS, labels, seconds, history.PREPARE_BUCKETS))
        quietly(
            "prepare ended",
            lambda: h.prepare_ended(
                job.job_id,
                seconds,
                outcome,
                reason,
                str(error) if error is not None else "",
                vm=facts.vm,
                accel=facts.accel,
                source=facts.source,
                mode=facts.mode,
                phases=facts.phases,
                observations=observations,
            ),
        )

    with _timed(ended):
        yield facts


@contextmanager
def stage_recorded(settings: Settings, job: Job, stage: str) -> Iterator[None]:
    """Record one `run` stage: a row when it starts (a killed stage keeps it without an end),
    its duration and outcome when it ends."""
    h = job_history(settings)
    row = quietly("stage started", lambda: h.stage_started(job.job_id, stage, time.time()))

    def ended(seconds: float, error: BaseException | None) -> None:
        outcome, reason = history.classify(error)
        status = error.exit_status if isinstance(error, BuildFailure) else None
        observation = Observation(STAGE_SECONDS, {"stage": history.stage_kind(stage)}, seconds, history.STAGE_BUCKETS)
        if row is not None:
            quietly("stage ended", lambda: h.stage_ended(row, seconds, outcome, reason, status, [observation]))

    with _timed(ended):
        yield


def job_ended(settings: Settings, job_id: int, cleanup_seconds: float | None, cleaned_up: bool = True) -> None:
    """End the job's row with its outcome (cleanup; reap for a job cleanup never came to)."""
    h = job_history(settings)
    observations = []
    if cleanup_seconds is not None:
        observations.append(Observation(CLEANUP_SECONDS, {}, cleanup_seconds, history.CLEANUP_BUCKETS))
    quietly("job ended", lambda: h.job_ended(job_id, time.time(), cleanup_seconds, cleaned_up, observations))


def count(settings: Settings, metric: str, labels: dict[str, str] | None = None) -> None:
    """One more of a counter that is not about one job's row (reaped leftovers, dead pool VMs)."""
    h = job_history(settings)
    quietly(metric, lambda: h.record([Observation(metric, labels or {})]))


def prune(settings: Settings) -> int | None:
    """Drop the rows older than history.keep_days (the agent, now and then); how many jobs went."""
    h = job_history(settings)
    return quietly("pruning", lambda: h.prune(time.time(), settings.history.keep_days))


def end_stale(settings: Settings, now: float) -> list[int]:
    """End the rows of jobs that started longer ago than any job VM may live
    (timeouts.max_lifetime): their job is gone, without a cleanup or anything left to reap."""
    h = job_history(settings)
    stale = quietly("stale jobs", lambda: h.open_jobs(started_before=now - settings.timeouts.max_lifetime)) or []
    for job_id in stale:
        job_ended(settings, job_id, None, cleaned_up=False)
    return stale
