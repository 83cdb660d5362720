"""cleanup_exec: destroy the job's VM (booted for it, or claimed from the warm pool) and remove
everything it used."""

from __future__ import annotations

import logging

from executor.adapters.hypervisor import connect
from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core.jobenv import Job
from executor.core.settings import Settings
from executor.core.waiting import signals_deferred, time_limit
from executor.jobvm.record import job_vm
from executor.jobvm.teardown import teardown

log = logging.getLogger(__name__)

# A dying stage (SIGTERM'd run) may still hold nothing we need, but a concurrent prepare for the
# same job must finish its own rollback first; this bounds how long cleanup waits for it.
LOCK_WAIT_S = 30.0


def cleanup(settings: Settings, job: Job) -> None:
    cold = naming.vm_name(settings.vm.name_prefix, job.job_id)
    state = StateDir(settings.paths.state_dir)
    with signals_deferred(), time_limit(settings.timeouts.cleanup, f"cleanup of {cold}"):
        # The job's lock first (prepare holds it while it claims), then the VM's (reap's).
        with connect(settings.libvirt.uri, naming.METADATA_NS) as hv, state.job_lock(cold, LOCK_WAIT_S):
            vm = job_vm(settings, state, job.job_id)
            if vm == cold:
                removed = teardown(hv, settings, state, vm)
            else:
                with state.job_lock(vm, LOCK_WAIT_S):
                    removed = teardown(hv, settings, state, vm)
                    state.remove_lock_file(vm)
            state.remove_lock_file(cold)
    log.info("cleaned up %s: %s", vm, ", ".join(removed) if removed else "nothing was left")
