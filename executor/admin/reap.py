"""`libvirt-executor reap`: remove expired VMs and orphaned pieces, each under its VM's lock,
re-checked under the lock, with the same teardown cleanup uses."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from executor.adapters.hypervisor import Hypervisor, connect
from executor.adapters.statedir import StateDir
from executor.admin.listing import inventory
from executor.core import naming, reaping
from executor.core.settings import Settings
from executor.core.waiting import signals_deferred
from executor.errors import ExecutorError
from executor.jobvm import journal, layercache
from executor.jobvm.teardown import teardown


@dataclass
class ReapResult:
    actions: list[str] = field(default_factory=list)  # one line per thing done (or, dry run, planned)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # busy VMs, or decisions that changed under the lock
    interrupted: bool = False


def _describe_target(target: reaping.Target, now: float) -> str:
    if target.reason == reaping.REASON_EXPIRED:
        assert target.domain is not None and target.domain.record is not None
        why = f"expired {reaping.format_duration(now - target.domain.record.expires)} ago"
    elif target.reason == reaping.REASON_OLDER_THAN:
        assert target.domain is not None and target.domain.record is not None
        why = f"created {reaping.format_duration(now - target.domain.record.created)} ago (--older-than)"
    elif target.reason == reaping.REASON_ABANDONED:
        why = "a pool VM whose boot was abandoned"
    elif target.reason == reaping.REASON_AGENT_GONE:
        why = "an idle pool VM, and no host agent keeps the pool"
    elif target.reason == reaping.REASON_CLEANED_UP:
        why = "its job's cleanup stopped it, and the removal did not finish"
    elif target.reason == reaping.REASON_STOPPED:
        assert target.domain is not None
        why = f"not running ({target.domain.state})"
    else:
        why = "orphaned: " + ", ".join(target.pieces.describe())
    return f"{target.vm} ({why})"


def reap(
    settings: Settings,
    *,
    dry_run: bool = False,
    older_than: float | None = None,
    now: float | None = None,
) -> ReapResult:
    """Remove our expired VMs and every orphaned piece. Each VM is handled under its own lock
    (skipped if a stage holds it) and re-checked under the lock before anything is removed."""
    now = time.time() if now is None else now
    result = ReapResult()
    state = StateDir(settings.paths.state_dir)
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        plan = reaping.select(inventory(settings, hv, state), now, older_than)
        if dry_run:
            result.actions += [f"would remove {_describe_target(t, now)}" for t in plan.reap]
            result.actions += [f"would release unowned IP reservation {ip}" for ip in plan.unowned_ips]
            result.skipped += [f"{vm}: busy (a stage holds its lock)" for vm in plan.busy]
            return result
        for target in plan.reap:
            with signals_deferred() as received:
                _reap_one(hv, settings, state, target, now, older_than, result)
            if received:  # SIGTERM from a timer's stop: the VM in hand is done, stop here
                result.interrupted = True
                break
        if not result.interrupted:
            for ip in state.release_unowned_ips():
                result.actions.append(f"released unowned IP reservation {ip}")
            for job_id in journal.end_stale(settings, now):
                result.actions.append(f"ended job {job_id}'s row in the job history (no cleanup came)")
            _tidy_docker_cache(hv, settings, state, result)
    return result


def _tidy_docker_cache(hv: Hypervisor, settings: Settings, state: StateDir, result: ReapResult) -> None:
    """Volumes of the Docker layer cache that no head and no job needs (a job's disk whose VM is
    gone), and lineages over their bounds."""
    try:
        tidied = layercache.tidy(hv, settings, state)
    except ExecutorError as exc:
        result.failures.append(f"Docker layer cache: {exc}")
        return
    result.actions += [f"evicted Docker layer cache lineage {e.lineage}: {e.why}" for e in tidied.evicted]
    result.actions += [f"dropped Docker layer cache lineage {name} (its head is gone)" for name in tidied.dropped]
    result.actions += [f"deleted Docker layer cache volume {name} (nothing needs it)" for name in tidied.deleted]


def _reap_one(
    hv: Hypervisor,
    settings: Settings,
    state: StateDir,
    target: reaping.Target,
    now: float,
    older_than: float | None,
    result: ReapResult,
) -> None:
    vm = target.vm
    with state.lock_if_free(vm) as free:
        if not free:
            result.skipped.append(f"{vm}: busy (a stage took its lock meanwhile)")
            return
        # Under the lock nothing else can create or remove this VM's pieces: decide again.
        fresh = reaping.select(inventory(settings, hv, state, only=vm, probe_locks=False), now, older_than)
        current = fresh.target(vm)
        if current is None:
            result.skipped.append(f"{vm}: no longer due (it changed while the reaper looked)")
            return
        try:
            removed = teardown(hv, settings, state, vm)
            state.remove_lock_file(vm)
        except (ExecutorError, OSError) as exc:
            result.failures.append(f"{vm}: {exc}")
            return
        done = ", ".join([*removed, "lock file removed"])
        result.actions.append(f"removed {_describe_target(current, now)}: {done}")
    journal.count(settings, journal.REAPED_TOTAL, {"reason": current.reason})
    record = current.domain.record if current.domain is not None else None
    job_id = record.job_id if record is not None and record.job_id else naming.job_id_of(settings.vm.name_prefix, vm)
    if job_id:
        journal.job_ended(settings, job_id, None, cleaned_up=False)  # its cleanup never came
