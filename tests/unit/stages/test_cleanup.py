"""executor.stages.cleanup for a job served from the warm pool, on libvirt's test driver."""

from __future__ import annotations

from executor.adapters.statedir import StateDir
from executor.core.jobenv import Job
from executor.stages.cleanup import cleanup
from tests.unit.jobvm.test_pool import idle_vm, pieces_of


def test_cleanup_of_a_pool_served_job_removes_the_pool_vm_its_claim_and_the_jobs_lock(hv, tmp_settings):
    state = StateDir(tmp_settings.paths.state_dir)
    state.ensure()
    vm = idle_vm(hv, tmp_settings, state, "000000aa", pool_state="claimed")
    other = idle_vm(hv, tmp_settings, state, "000000bb")
    with state.job_lock("lvx-job-55", 0):  # prepare's, as it leaves it
        pass
    state.write_claim("lvx-job-55", vm)
    cleanup(tmp_settings, Job(job_id=55, project_id=1, project="g/p", pipeline_id=1, runner_id=1, timeout_s=60))
    assert pieces_of(hv, state, vm) == []
    assert not state.lock_path("lvx-job-55").exists() and state.claims() == {}
    assert hv.domain(other) is not None  # the other idle VM is not this job's
    cleanup(tmp_settings, Job(job_id=55, project_id=1, project="g/p", pipeline_id=1, runner_id=1, timeout_s=60))
