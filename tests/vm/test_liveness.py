"""A guest that stops answering while libvirt still says "running", a runner that dies during
prepare, and a host too full for one more VM.

A wedged guest kernel is provoked for real: SIGSTOP to the VM's QEMU process. libvirt does not
notice (a suspend through libvirt would be known to it), the guest's TCP connections stay open
and nothing answers on them, which is what the job log of the issue showed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from executor.adapters.hostfiles import load_settings
from executor.adapters.hypervisor import connect
from executor.core import naming
from executor.core.waiting import poll
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim, read_until

pytestmark = pytest.mark.vm

PREFIX = "lvxlive"
QEMU_PIDS = Path("/var/run/libvirt/qemu")
UNRESPONSIVE_S = 20  # the test's limit; the issue asks for "under 2 minutes" with the default 60


def _config(host_settings, tmp_path, **kwargs):
    return write_test_config(
        host_settings, tmp_path / "cfg", PREFIX, timeouts=f"unresponsive = {UNRESPONSIVE_S}", **kwargs
    )


def _freeze(vm: str) -> int:
    """SIGSTOP the VM's QEMU: its guest stops dead, libvirt still says running. The pid."""
    pid = int((QEMU_PIDS / f"{vm}.pid").read_text().strip())
    os.kill(pid, signal.SIGSTOP)
    return pid


def _domain_state(config: Path, vm: str) -> str | None:
    settings = load_settings(str(config))
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        info = hv.domain(vm)
    return None if info is None else info.state


def test_a_frozen_guest_ends_the_running_stage_as_a_system_failure(host_settings, tmp_path, leftovers):
    config = write_test_config(host_settings, tmp_path / "cfg", PREFIX)  # the default 60 s
    sim = RunnerSim(config, tmp_path / "runner", 7101)
    vm = naming.vm_name(PREFIX, sim.job_id)
    try:
        prepared = sim.prepare()
        assert prepared.rc == 0, prepared.describe()
        proc = sim.start_run("echo job-started; sleep 900; echo job-finished")
        started = time.monotonic()
        read_until(proc, "job-started")
        _freeze(vm)
        frozen_at = time.monotonic()
        assert _domain_state(config, vm) == "running"  # libvirt cannot tell
        ran = sim.finish(proc, started, timeout=300)
        took = time.monotonic() - frozen_at
        print(f"\nfrozen guest: run ended {took:.1f} s after the freeze (timeouts.unresponsive = 60)")
        assert ran.rc == 2, ran.describe()  # SYSTEM_FAILURE_EXIT_CODE: retry: runner_system_failure
        assert ran.build_exit_code is None
        assert took < 120, ran.describe()
        assert f"the job's VM {vm} stopped responding: no answer over SSH for" in ran.stderr, ran.describe()
        assert "its console's last lines:" in ran.stderr, ran.describe()
        assert "job-finished" not in ran.stdout
    finally:
        cleaned = sim.cleanup()  # destroys the stopped QEMU
    assert cleaned.rc == 0, cleaned.describe()
    assert leftovers(config) == {}


def test_a_guest_that_freezes_before_dockerd_answers_fails_prepare_early(host_settings, tmp_path, leftovers):
    config = _config(host_settings, tmp_path)
    sim = RunnerSim(config, tmp_path / "runner", 7102)
    vm = naming.vm_name(PREFIX, sim.job_id)
    try:
        proc = sim.start("prepare")
        started = time.monotonic()
        read_until(proc, "waiting for its dockerd", timeout=600)
        _freeze(vm)
        frozen_at = time.monotonic()
        prepared = sim.finish(proc, started, timeout=600)
        took = time.monotonic() - frozen_at
        print(f"\nfrozen during prepare: ended {took:.1f} s after the freeze (unresponsive = {UNRESPONSIVE_S} s)")
        assert prepared.rc == 2, prepared.describe()
        assert "stopped responding" in prepared.stderr, prepared.describe()
        # caught by the probe, not by the docker timeout (240 s in this config)
        assert took < UNRESPONSIVE_S + 60, prepared.describe()
        assert _domain_state(config, vm) is None  # prepare's rollback destroyed it
    finally:
        cleaned = sim.cleanup()
    assert cleaned.rc == 0, cleaned.describe()
    assert leftovers(config) == {}


# The runner stand-in: gitlab-runner starts prepare (its own process group, like Setpgid) and
# then dies for good. It prints prepare's pid so that the test can wait for it.
RUNNER_STANDIN = """
import subprocess, sys, time
out = open(sys.argv[1], "wb")
child = subprocess.Popen(sys.argv[2:], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
print(child.pid, flush=True)
time.sleep(3600)
"""


def test_a_prepare_whose_runner_died_removes_the_vm_it_was_booting(host_settings, tmp_path, leftovers):
    config = _config(host_settings, tmp_path)
    sim = RunnerSim(config, tmp_path / "runner", 7103)
    vm = naming.vm_name(PREFIX, sim.job_id)
    log = tmp_path / "prepare.log"
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER_STANDIN, str(log), *sim.executable, "prepare"],
        cwd=sim.tmp,
        env=sim.env(),
        stdout=subprocess.PIPE,
    )
    prepare_pid = 0
    try:
        assert runner.stdout is not None
        prepare_pid = int(runner.stdout.readline())
        # Until the domain is running: the runner dies while its VM boots.
        assert poll(lambda: _domain_state(config, vm) == "running", 300, interval=0.5), log.read_text()
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        killed_at = time.monotonic()
        gone = poll(lambda: _domain_state(config, vm) is None, 60, interval=0.5)
        took = time.monotonic() - killed_at
        print(f"\norphaned prepare: its VM was gone {took:.1f} s after the runner died")
        assert gone, log.read_text()
        assert poll(lambda: not _alive(prepare_pid), 60, interval=0.5)
        said = log.read_text()
        assert f"the runner process that started this prepare (pid {runner.pid}) is gone" in said, said
    finally:
        runner.kill()
        runner.wait()
        if prepare_pid and _alive(prepare_pid):
            os.kill(prepare_pid, signal.SIGKILL)
        cleaned = sim.cleanup()
    assert cleaned.rc == 0, cleaned.describe()
    assert leftovers(config) == {}


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie nobody reaps counts as gone)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return False


def test_a_pool_that_cannot_hold_the_job_disk_is_refused_before_anything_is_defined(host_settings, tmp_path, leftovers):
    config = _config(host_settings, tmp_path, vm="disk_gib = 4096")
    sim = RunnerSim(config, tmp_path / "runner", 7104)
    prepared = sim.prepare()
    assert prepared.rc == 2, prepared.describe()
    assert "not starting a job VM on this host now: the storage pool has" in prepared.stderr, prepared.describe()
    assert "a new job's disk may grow to 4096.0 GiB" in prepared.stderr
    assert _domain_state(config, naming.vm_name(PREFIX, sim.job_id)) is None
    assert leftovers(config) == {}
    cleaned = sim.cleanup()
    assert cleaned.rc == 0, cleaned.describe()
