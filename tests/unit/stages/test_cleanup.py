"""executor.stages.cleanup for a job served from the warm pool, on libvirt's test driver."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from executor.adapters.hostservice import this_command
from executor.adapters.statedir import StateDir
from executor.admin.listing import format_table, list_vms
from executor.core.jobenv import Job
from executor.errors import SystemFailure
from executor.stages import cleanup as cleanup_stage
from executor.stages.cleanup import cleanup
from tests.unit.jobvm.test_pool import idle_vm, pieces_of
from tests.unit.jobvm.test_teardown import FOREIGN_XML


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


def test_cleanup_pauses_the_vm_stops_its_holder_and_leaves_the_rest_to_the_remover(hv, tmp_settings, monkeypatch):
    state = StateDir(tmp_settings.paths.state_dir)
    state.ensure()
    vm = idle_vm(hv, tmp_settings, state, "000000cc", pool_state="claimed")
    state.write_claim("lvx-job-56", vm)
    # A stand-in holder: a real process holding the holder's lock, as `hold-connection` does.
    holder_proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from executor.adapters.statedir import StateDir\n"
            "from executor.jobvm.teardown import holder_service\n"
            "with holder_service(StateDir(sys.argv[1]), sys.argv[2]).hold():\n"
            "    print('holding', flush=True)\n"
            "    time.sleep(60)\n",
            tmp_settings.paths.state_dir,
            vm,
        ],
        stdout=subprocess.PIPE,
    )
    assert holder_proc.stdout is not None and holder_proc.stdout.readline() == b"holding\n"
    spawned: list[list[str]] = []
    monkeypatch.setattr(cleanup_stage, "start_detached", lambda argv, log: spawned.append(argv))
    job = Job(job_id=56, project_id=1, project="g/p", pipeline_id=1, runner_id=1, timeout_s=60)

    cleanup_stage.cleanup(tmp_settings, job, config_file="/etc/lvx.toml")

    assert holder_proc.wait(5) == -signal.SIGTERM
    assert hv.domain(vm).state == "paused"
    assert spawned == [[*this_command(), "--config", "/etc/lvx.toml", "remove-job", "56"]]
    listed = {v["name"]: v for v in list_vms(tmp_settings)["vms"]}
    assert listed[vm]["removing"] is True and "being removed, paused" in format_table(list_vms(tmp_settings))
    cleanup_stage.remove(tmp_settings, 56)  # what the remover runs
    assert pieces_of(hv, state, vm) == [] and state.claims() == {}


def test_cleanup_refuses_a_domain_of_our_name_without_our_metadata(hv, tmp_settings, monkeypatch):
    hv.define_and_start(FOREIGN_XML.format(name="lvx-job-57", metadata=""))
    monkeypatch.setattr(cleanup_stage, "start_detached", lambda argv, log: None)
    job = Job(job_id=57, project_id=1, project="g/p", pipeline_id=1, runner_id=1, timeout_s=60)
    with pytest.raises(SystemFailure, match="without libvirt-executor metadata"):
        cleanup_stage.cleanup(tmp_settings, job, config_file="/etc/lvx.toml")
    assert hv.domain("lvx-job-57").state == "running"
