"""One job VM driven through config/prepare/run/cleanup exactly as gitlab-runner drives it.

The tests in this module share one booted VM (a boot costs 30-70 s under TCG) and run in file
order: the last ones kill the VM and clean up. Each test still asserts one behaviour.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import libvirt
import pytest

from executor.adapters.guest_ssh import GuestSSH, SSHNotReady
from executor.adapters.hostfiles import load_settings
from executor.adapters.keys import generate_ed25519
from executor.adapters.statedir import StateDir
from executor.core.domain_xml import parse_job_record
from executor.errors import SystemFailure
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim, read_until, terminate_like_runner

pytestmark = pytest.mark.vm

JOB_ID = 4242


@pytest.fixture(scope="module")
def job(host_settings, tmp_path_factory, leftovers, git_server):
    root = tmp_path_factory.mktemp("lifecycle")
    config = write_test_config(host_settings, root / "cfg", "lvxlife", allow_host_ports=(git_server["port"],))
    # A job may set CI_JOB_ID to anything; the executor must ignore it (identity = payload id).
    sim = RunnerSim(config, root / "runner", JOB_ID, variables={"CI_JOB_ID": "1"})
    prepared = sim.prepare()
    yield {"sim": sim, "config": config, "prepared": prepared, "vm": f"lvxlife-job-{JOB_ID}"}
    sim.cleanup()  # safety net; test_cleanup_* below asserts the real outcome


def _domain_xml(vm: str) -> str:
    conn = libvirt.open("qemu:///system")
    try:
        return conn.lookupByName(vm).XMLDesc(0)
    finally:
        conn.close()


def _client_key_path(job) -> Path:
    settings = load_settings(str(job["config"]))
    return StateDir(settings.paths.state_dir).job_dir(job["vm"]) / "client_key"


def _record(vm: str):
    return parse_job_record(_domain_xml(vm))


def test_config_prints_only_json_with_vm_hostname(job):
    result = job["sim"].config()
    assert result.rc == 0, result.describe()
    data = json.loads(result.stdout)
    assert data["hostname"] == job["vm"]
    assert data["builds_dir"] == "/builds" and data["cache_dir"] == "/cache"
    assert data["driver"]["name"] == "libvirt-executor"


def test_prepare_succeeds_and_reports_timings(job):
    prepared = job["prepared"]
    assert prepared.rc == 0, prepared.describe()
    line = [out for out in prepared.stdout.splitlines() if "ready at" in out]
    assert line, prepared.describe()
    for part in ("clone", "boot-to-ssh", "ssh-to-docker", "total"):
        assert part in line[0]
    record = _record(job["vm"])
    assert record.job_id == JOB_ID  # from the payload, not the forged CUSTOM_ENV_CI_JOB_ID=1
    assert record.expires > record.created


def test_get_sources_clones_from_host_and_docker_runs_a_container(job, git_server):
    sim = job["sim"]
    sources = sim.run(
        "export GIT_TERMINAL_PROMPT=0\n"
        "git init -q /builds/demo/project\n"
        "cd /builds/demo/project\n"
        f"git remote add origin {git_server['url']}\n"
        "git fetch -q origin '+refs/heads/*:refs/remotes/origin/*'\n"
        f"git checkout -f -q {git_server['sha']}\n"
        "git log -1 --format=checked-out-%H\n",
        stage="get_sources",
    )
    assert sources.rc == 0, sources.describe()
    assert f"checked-out-{git_server['sha']}" in sources.stdout

    build = sim.run(
        "cd /builds/demo/project\n"
        "sh check.sh\n"
        "echo builds-owner=$(stat -c %U /builds)\n"
        "docker version --format 'docker-server-{{.Server.Version}}'\n"
        "mkdir -p /tmp/bb/bin && cp /bin/busybox /tmp/bb/bin/ && ln -sf busybox /tmp/bb/bin/sh\n"
        "tar -C /tmp/bb -c . | docker import - lvx/busybox:test >/dev/null\n"
        "docker run --rm lvx/busybox:test /bin/busybox echo hello-from-a-container\n"
    )
    assert build.rc == 0, build.describe()
    assert "repository-check-ok" in build.stdout
    assert "builds-owner=runner" in build.stdout
    assert "docker-server-" in build.stdout
    assert "hello-from-a-container" in build.stdout


def test_exit_42_is_a_build_failure_with_its_code(job):
    result = job["sim"].run("echo before; exit 42")
    assert result.rc == 1, result.describe()  # BUILD_FAILURE_EXIT_CODE
    assert result.build_exit_code == "42\n"
    assert "before" in result.stdout


def test_stderr_and_unknown_stage_names_are_passed_through(job):
    result = job["sim"].run("echo to-stdout; echo to-stderr >&2", stage="step_release")
    assert result.rc == 0, result.describe()
    assert "to-stdout" in result.stdout and "to-stderr" in result.stderr


def test_success_after_failure_leaves_exit_code_file_alone_and_exits_zero(job):
    result = job["sim"].run("true")
    assert result.rc == 0, result.describe()


def test_only_the_job_key_and_the_pinned_host_key_work(job):
    record = _record(job["vm"])
    state_key = _client_key_path(job).read_text()
    with GuestSSH.connect(record.ip, "runner", state_key, record.host_key, 10) as ssh:
        assert ssh.capture("id -un", 10).stdout.strip() == "runner"
    other_private, _ = generate_ed25519("intruder")
    with pytest.raises(SSHNotReady):  # authentication refused
        GuestSSH.connect(record.ip, "runner", other_private, record.host_key, 10)
    _, other_public = generate_ed25519("impostor")
    with pytest.raises(SystemFailure, match="host key"):
        GuestSSH.connect(record.ip, "runner", state_key, other_public, 10)


def test_no_secret_in_domain_xml_argv_or_logs(job):
    sim = job["sim"]
    token = sim.variables["CI_JOB_TOKEN"]
    client_key = _client_key_path(job).read_text()
    key_body = "".join(client_key.strip().splitlines()[1:-1])
    proc = sim.start_run("echo started; sleep 4")
    read_until(proc, "started")  # the stage is streaming: its processes are all alive now
    cmdlines = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                cmdlines.append(Path("/proc", pid, "cmdline").read_bytes().decode("utf-8", "replace"))
    result = sim.finish(proc, time.monotonic())
    assert result.rc == 0, result.describe()
    xml = _domain_xml(job["vm"])
    for secret in (token, key_body[:40]):
        assert secret not in xml
        assert not any(secret in c for c in cmdlines)
        assert secret not in job["prepared"].stdout + job["prepared"].stderr
        assert secret not in result.stderr
    assert "PRIVATE KEY" not in xml
    assert oct(os.stat(_client_key_path(job)).st_mode & 0o777) == "0o600"


def test_sigterm_stops_the_remote_process_group(job):
    sim = job["sim"]
    proc = sim.start_run("sleep 1000 & sleep 1001; echo never-printed")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        probe = sim.run("pgrep -x sleep >/dev/null && echo running || echo idle", stage="probe")
        if "running" in probe.stdout:
            break
        time.sleep(1)
    else:
        pytest.fail("the long-running script never started")
    started = time.monotonic()
    outcome = terminate_like_runner(proc, graceful=60)
    elapsed = time.monotonic() - started
    out = proc.stdout.read().decode()
    assert outcome == "terminated" and elapsed < 30, f"run took {elapsed:.1f}s to stop after SIGTERM"
    assert proc.returncode == 2  # system failure; the runner classifies cancel by its context anyway
    assert "never-printed" not in out
    probe = sim.run("pgrep -x sleep >/dev/null && echo still-running || echo all-gone", stage="probe")
    assert "all-gone" in probe.stdout, probe.describe()


def test_vm_killed_mid_job_is_a_system_failure(job):
    sim = job["sim"]
    proc = sim.start_run("echo started; sleep 600")
    read_until(proc, "started")
    conn = libvirt.open("qemu:///system")
    try:
        conn.lookupByName(job["vm"]).destroy()
    finally:
        conn.close()
    started = time.monotonic()
    result = sim.finish(proc, started, timeout=120)
    assert result.rc == 2, result.describe()  # SYSTEM_FAILURE_EXIT_CODE: not the user's fault
    assert time.monotonic() - started < 60


def test_cleanup_removes_everything_and_is_idempotent(job, leftovers):
    sim = job["sim"]
    first = sim.cleanup()
    assert first.rc == 0, first.describe()
    assert leftovers(job["config"]) == {}
    second = sim.cleanup()
    assert second.rc == 0, second.describe()
    assert leftovers(job["config"]) == {}


def test_cleanup_and_run_without_prepare(host_settings, tmp_path, leftovers):
    config = write_test_config(host_settings, tmp_path / "cfg", "lvxnoprep")
    sim = RunnerSim(config, tmp_path / "runner", 777)
    cleaned = sim.cleanup()
    assert cleaned.rc == 0, cleaned.describe()
    ran = sim.run("echo hi")
    assert ran.rc == 2, ran.describe()  # no VM: a system failure, never blamed on the script
    assert "does not exist" in ran.stderr
    assert leftovers(config) == {}
