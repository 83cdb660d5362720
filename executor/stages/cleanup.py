"""cleanup_exec: stop the job's VM (booted for it, or claimed from the warm pool) for good, then
remove everything it used.

gitlab-runner keeps the job's slot busy until cleanup returns, and nothing of the job can run
once its VM is destroyed: so cleanup destroys the VM (and stops the job's connection holder)
and returns, and a detached remover (`libvirt-executor remove-job JOB_ID`) removes the domain,
volumes, IP, keys and logs under the same locks. A remover that dies leaves a shut-off domain
of ours, which `reap` removes ("stopped"), as it always did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from executor.adapters.hostservice import start_detached, this_command
from executor.adapters.hypervisor import Hypervisor, connect
from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core.jobenv import Job
from executor.core.settings import Settings
from executor.core.waiting import signals_deferred, time_limit
from executor.jobvm import journal, layercache
from executor.jobvm.record import job_vm
from executor.jobvm.teardown import stop_for_good, teardown

log = logging.getLogger(__name__)

# A dying stage (SIGTERM'd run) may still hold nothing we need, but a concurrent prepare for the
# same job must finish its own rollback first; this bounds how long cleanup waits for it.
LOCK_WAIT_S = 30.0
REMOVE_COMMAND = "remove-job"


def cleanup(settings: Settings, job: Job, config_file: str | None = None) -> None:
    """Destroy the job's VM; then remove the rest, in a detached remover started with
    `config_file` (None: here, before returning). Ends the job's row in the job history."""
    started = time.monotonic()
    try:
        _cleanup(settings, job, config_file)
    finally:
        journal.job_ended(settings, job.job_id, time.monotonic() - started)


def _cleanup(settings: Settings, job: Job, config_file: str | None) -> None:
    with _job_vm_locked(settings, job.job_id) as (hv, state, vm):
        # While the VM runs: a job that may write its Docker layer cache lineage lets go of it.
        released = layercache.release(hv, settings, state, vm)
        if released:
            log.info("%s: %s", vm, released)
        if config_file is None:
            _remove_locked(hv, settings, state, vm, job.job_id)
            return
        stopped = stop_for_good(hv, state, vm)
        # Still with signals deferred: a stopped VM is not left without its remover. It waits for our locks.
        argv = [*this_command(), "--config", config_file, REMOVE_COMMAND, str(job.job_id)]
        start_detached(argv, Path(settings.paths.console_log_dir) / f"remover-{settings.vm.name_prefix}.log")
    log.info("%s: %s; the rest is removed in the background", vm, ", ".join(stopped) or "not running")


def remove(settings: Settings, job_id: int) -> None:
    """Remove everything of job `job_id`'s VM, under the job's lock (and the pool VM's)."""
    with _job_vm_locked(settings, job_id) as (hv, state, vm):
        _remove_locked(hv, settings, state, vm, job_id)


def _remove_locked(hv: Hypervisor, settings: Settings, state: StateDir, vm: str, job_id: int) -> None:
    removed = teardown(hv, settings, state, vm)
    for name in {vm, naming.vm_name(settings.vm.name_prefix, job_id)}:
        state.remove_lock_file(name)  # still held: nothing of the job is left
    log.info("cleaned up %s: %s", vm, ", ".join(removed) if removed else "nothing was left")


@contextmanager
def _job_vm_locked(settings: Settings, job_id: int) -> Iterator[tuple[Hypervisor, StateDir, str]]:
    """The job's VM (its cold one, or the pool VM it claimed) under the job's lock first
    (prepare holds it while it claims), then the VM's (reap's); signals deferred, time bounded."""
    cold = naming.vm_name(settings.vm.name_prefix, job_id)
    state = StateDir(settings.paths.state_dir)
    with signals_deferred(), time_limit(settings.timeouts.cleanup, f"cleanup of {cold}"):
        with connect(settings.libvirt.uri, naming.METADATA_NS) as hv, state.job_lock(cold, LOCK_WAIT_S):
            vm = job_vm(settings, state, job_id)
            with ExitStack() as locks:
                if vm != cold:
                    locks.enter_context(state.job_lock(vm, LOCK_WAIT_S))
                yield hv, state, vm
