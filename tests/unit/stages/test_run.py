"""executor.stages.run: what the remote shell's exit status means, and the stage around it.

The VM side is a fake of the two adapter classes run talks to (libvirt's Hypervisor and
GuestSSH); everything else (the job's state dir, the script file, the exit mapping) is real.
"""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from executor.adapters.hypervisor import DomainInfo
from executor.adapters.statedir import StateDir
from executor.core.domain_xml import metadata_xml
from executor.core.jobenv import Job
from executor.errors import BuildFailure, SystemFailure
from executor.stages import run as run_stage
from executor.stages import stage_exec
from tests.unit.conftest import make_record

VM = "lvx-job-4242"
JOB = Job(job_id=4242, project_id=1, project="g/p", pipeline_id=2, runner_id=3, timeout_s=3600)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(0, None), (1, 1), (3, 3), (137, 137), (None, 255)],
)
def test_script_outcome_maps_the_status_to_a_build_failure(status, outcome):
    result = run_stage.script_outcome(status)
    if outcome is None:
        assert result is None
    else:
        assert isinstance(result, BuildFailure) and result.exit_status == outcome


class FakeHypervisor:
    def __init__(self, state: str = "running", metadata: str | None = None) -> None:
        self.info = DomainInfo(VM, state, metadata if metadata is not None else metadata_xml(make_record(vm=VM)))

    def domain(self, name: str) -> DomainInfo | None:
        return self.info if name == VM else None


class FakeSSH:
    """The remote shell: records what it was asked to run, answers with `status` or `error`."""

    def __init__(self, status: int | None = 0, error: Exception | None = None, silent_for: float = 0.0) -> None:
        self.status, self.error, self.streams = status, error, []
        self.silence, self.watched = silent_for, []

    def watch(self, interval):
        self.watched.append(interval)

    def silent_for(self):
        return self.silence

    def stream(self, command, stdin, stdout, stderr, still_alive):
        self.streams.append((command, stdin))
        assert self.watched  # probing began before the script
        assert still_alive() is True
        if self.error:
            raise self.error
        stdout.write(b"script output\n")
        return self.status

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.fixture
def stage(tmp_settings, tmp_path, monkeypatch):
    """run() with a fake VM; returns (call, ssh-setter)."""
    StateDir(tmp_settings.paths.state_dir).write_client_key(VM, "the client key")
    script = tmp_path / "script"
    script.write_bytes(b"echo hi\n")
    hv = FakeHypervisor()
    ssh = {"fake": FakeSSH()}

    @contextmanager
    def fake_connect(uri, ns):
        yield hv

    def fake_ssh_connect(ip, user, key, host_key, timeout, port=22):
        assert key == "the client key" and ip == make_record().ip
        return ssh["fake"]

    monkeypatch.setattr(stage_exec, "connect", fake_connect)
    monkeypatch.setattr(stage_exec.GuestSSH, "connect", staticmethod(fake_ssh_connect))

    def call(err: io.BytesIO | None = None):
        out, err = io.BytesIO(), err or io.BytesIO()
        run_stage.run(tmp_settings, JOB, str(script), "build_script", out, err)
        return out.getvalue(), err.getvalue()

    return call, ssh, hv


def test_a_zero_status_is_success_and_the_script_is_the_stdin(stage):
    call, ssh, _ = stage
    out, _ = call()
    assert out == b"script output\n"
    command, stdin = ssh["fake"].streams[0]
    assert stdin == b"echo hi\n" and command.endswith("exec bash -s")


def test_a_non_zero_status_is_a_build_failure_with_it(stage):
    call, ssh, _ = stage
    ssh["fake"] = FakeSSH(status=3)
    with pytest.raises(BuildFailure) as info:
        call()
    assert info.value.exit_status == 3


def test_a_shell_killed_by_a_signal_is_a_build_failure_and_says_so(stage):
    call, ssh, _ = stage
    ssh["fake"] = FakeSSH(status=None)
    err = io.BytesIO()
    with pytest.raises(BuildFailure) as info:
        call(err)
    assert info.value.exit_status == 255
    assert b"the build_script shell was killed by a signal" in err.getvalue()


def test_a_lost_connection_is_a_system_failure_not_the_jobs(stage):
    call, ssh, _ = stage
    ssh["fake"] = FakeSSH(error=SystemFailure("ssh connection to the VM was lost"))
    with pytest.raises(SystemFailure) as info:
        call()
    assert not isinstance(info.value, BuildFailure)


def test_a_vm_that_is_not_running_is_a_system_failure_before_any_ssh(stage):
    call, ssh, hv = stage
    hv.info = DomainInfo(VM, "shutoff", hv.info.metadata)
    with pytest.raises(SystemFailure, match="not running"):
        call()
    assert ssh["fake"].streams == []


def test_a_guest_that_stops_answering_is_a_system_failure_with_its_console(stage, tmp_settings):
    call, ssh, _ = stage
    console = tmp_settings.paths.console_log_dir
    Path(console).mkdir(parents=True, exist_ok=True)
    (Path(console) / f"{VM}.console.log").write_bytes(b"boot\nrcu: rcu_preempt kthread starved\x1b[0m\n")
    ssh["fake"] = FakeSSH(silent_for=61.0)
    with pytest.raises(SystemFailure) as info:
        call()
    assert not isinstance(info.value, BuildFailure)
    assert str(info.value) == (
        f"the job's VM {VM} stopped responding: no answer over SSH for 61 s (timeouts.unresponsive = 60); "
        "its console's last lines:\nboot\nrcu: rcu_preempt kthread starved[0m"
    )


def test_a_slow_guest_within_the_limit_is_left_alone(stage):
    call, ssh, _ = stage
    ssh["fake"] = FakeSSH(silent_for=59.0)
    out, _ = call()
    assert out == b"script output\n"


def test_once_a_stage_found_the_guest_silent_the_jobs_later_stages_fail_at_once(stage, tmp_settings):
    call, ssh, _ = stage
    ssh["fake"] = FakeSSH(silent_for=61.0)
    with pytest.raises(SystemFailure, match="stopped responding"):
        call()
    ssh["fake"] = FakeSSH()  # would answer: it must not even be asked
    with pytest.raises(SystemFailure, match="found by an earlier stage of this job: not trying again") as info:
        call()
    assert "stopped responding: no answer over SSH for 61 s" in str(info.value)
    assert ssh["fake"].streams == [] and ssh["fake"].watched == []


def test_a_vm_that_stopped_during_a_stage_is_remembered_too(stage):
    call, ssh, hv = stage

    class StopsMidway(FakeSSH):
        def stream(self, command, stdin, stdout, stderr, still_alive):
            hv.info = DomainInfo(VM, "shutoff", hv.info.metadata)
            if not still_alive():
                raise SystemFailure("the job's VM stopped while the script was running")
            return 0

    ssh["fake"] = StopsMidway()
    with pytest.raises(SystemFailure, match="stopped while the script was running"):
        call()
    with pytest.raises(SystemFailure, match=f"the job's VM {VM} stopped \\(found by an earlier stage"):
        call()


def test_the_run_path_through_a_holder_imports_no_ssh_docker_or_libvirt_library():
    code = (
        "import sys, executor.cli, executor.stages.run\n"
        "print(sorted(m for m in ('paramiko', 'docker', 'libvirt', 'requests', 'cryptography') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_with_a_proxy_every_stage_gets_the_forwarder_before_the_runners_own_exports(stage, tmp_settings):
    import dataclasses

    from executor.core.settings import NetworkSettings

    _, ssh, _ = stage
    proxied = dataclasses.replace(tmp_settings, network=NetworkSettings(proxy="http://proxy.corp:8080"))
    out, err = io.BytesIO(), io.BytesIO()
    script = Path(tmp_settings.paths.state_dir).parent / "script"
    run_stage.run(proxied, dataclasses.replace(JOB, gitlab_host="gitlab.corp"), str(script), "build_script", out, err)
    _, stdin = ssh["fake"].streams[0]
    prelude, _, rest = stdin.partition(b"echo hi\n")
    assert rest == b"" and b"proxy.corp" not in prelude  # the VM sees the forwarder only
    assert b"export HTTPS_PROXY=http://192.168.213.1:3128\n" in prelude
    assert b"export no_proxy=localhost,127.0.0.1,192.168.213.0/24,192.168.213.1,gitlab.corp\n" in prelude
