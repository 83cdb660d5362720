"""The registry mirror, for real: Debian's docker-registry as a pull-through cache started by
`libvirt-executor mirror start`, its upstream another docker-registry on loopback that stands in
for Docker Hub (there is none here), seeded with an image made here under a Docker Hub name.

The supervisor tests need no VM; the job tests boot two, one after the other: job 1 pulls
`busybox:test` through the mirror, the upstream goes away, job 2 pulls it again (served from
the cache) and tries to push through the mirror (refused).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from executor.testing.registry import busybox_files, image_layout, running_registry
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim

pytestmark = pytest.mark.vm

UPSTREAM = "127.0.0.1:5061"  # the stand-in for Docker Hub
MIRROR_PORT = 5062
MARKER = "served-through-the-mirror"


def cli(config, *args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "executor", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, f"{args}: rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def mirror_status(config):
    return json.loads(cli(config, "mirror", "status", "--json", check=False).stdout)


def registry_pids(storage: Path) -> list[int]:
    wanted = f"/usr/bin/docker-registry\0serve\0{storage / 'config.yml'}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().rstrip(b"\0") == wanted:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream")
    with running_registry(root / "registry", UPSTREAM) as reg:
        layout = image_layout(root / "busybox", busybox_files({"etc/lvx-marker": MARKER.encode() + b"\n"}), cmd=["sh"])
        reg.push(layout, "library/busybox:test", root)  # a Docker Hub name: busybox:test
        yield reg


@contextlib.contextmanager
def mirror_test_config(host_settings, directory: Path, prefix: str, upstream: str, port: int):
    """A test config whose mirror pulls through from `upstream` on `port`: (config, storage);
    its mirror is stopped and its storage removed afterwards."""
    # Under /var/lib, not the test's tmp dir: the registry runs as docker-registry, which must
    # reach its storage (pytest's tmp dirs are root-only).
    storage = Path(host_settings.image.dir).parent / f"test-{directory.name}-{os.getpid()}"
    config = write_test_config(
        host_settings,
        directory / "cfg",
        prefix,
        mirror=f'port = {port}\nupstream = "http://{upstream}"\nstorage = "{storage}"\nmax_gib = 1',
    )
    try:
        yield config, storage
    finally:
        cli(config, "mirror", "stop", check=False)
        shutil.rmtree(storage, ignore_errors=True)


@pytest.fixture(scope="module")
def mirror_config(host_settings, tmp_path_factory, upstream):
    with mirror_test_config(host_settings, tmp_path_factory.mktemp("mirror"), "lvxmir", UPSTREAM, MIRROR_PORT) as made:
        yield made


def test_start_supervises_one_registry_on_the_vm_network_address_only(mirror_config, host_settings):
    config, storage = mirror_config
    (storage).mkdir(parents=True, exist_ok=True)
    (storage / "supervisor.lock").write_text("1\n")  # a stale pid file must not look like a running mirror
    started = cli(config, "mirror", "start")
    assert f"answering at http://{host_settings.gateway}:{MIRROR_PORT}" in started.stdout, started.stdout
    again = cli(config, "mirror", "start")  # idempotent: the same supervisor
    supervisor = int(started.stdout.split("supervisor pid ")[1].split(";")[0])
    assert f"supervisor pid {supervisor};" in again.stdout
    assert len(registry_pids(storage)) == 1
    owner = os.stat(f"/proc/{registry_pids(storage)[0]}").st_uid
    assert owner != 0 and owner == os.stat(storage / "data").st_uid  # the unprivileged docker-registry user

    from executor.adapters.hostinfo import listening_tcp

    bound = sorted(str(address) for address, port in listening_tcp() if port == MIRROR_PORT)
    assert bound == ["127.0.0.1", str(host_settings.gateway)]  # the API on the bridge, debug vars on loopback
    status = mirror_status(config)
    assert status["answering"] and status["supervisor_pid"] == supervisor and status["foreign_listeners"] == []
    assert status["upstream_problem"] == ""


def test_a_killed_registry_is_restarted_by_its_supervisor(mirror_config, host_settings):
    config, storage = mirror_config
    (first,) = registry_pids(storage)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: registry_pids(storage) not in ([], [first]), 30, "a new registry process")
    wait_for(lambda: mirror_status(config)["answering"], 30, "the restarted mirror answering")


def test_job_1_pulls_a_docker_hub_name_through_the_mirror(mirror_config, tmp_path, leftovers):
    config, _ = mirror_config
    sim = RunnerSim(config, tmp_path / "runner", 5101, payload_extra={"image": {"name": "busybox:test"}})
    try:
        prepared = sim.prepare()
        assert prepared.rc == 0, prepared.describe()
        assert "Pulling docker image busybox:test" in prepared.stdout
        assert "not answering" not in prepared.stdout
        result = sim.run("cat /etc/lvx-marker")
        assert result.rc == 0, result.describe()
        assert MARKER in result.stdout
    finally:
        sim.cleanup()
    assert leftovers(config) == {}
    status = mirror_status(config)
    assert "library/busybox" in status["repositories"]
    assert status["manifest_misses"] >= 1  # it came from the upstream, through the cache


def test_doctor_checks_the_mirror_from_the_host_and_from_a_probe_vm(mirror_config, host_settings, leftovers):
    config, _ = mirror_config
    lines = cli(config, "doctor", "--boot", check=False).stdout.splitlines()
    names = ("registry mirror", "mirror listen", "mirror upstream", "boot", "mirror from VM")
    status = {name: line for name in names for line in lines if line[6:].startswith(name + " ")}
    url = f"http://{host_settings.gateway}:{MIRROR_PORT}"
    assert status["registry mirror"].startswith(f"ok    registry mirror {url} answers"), lines
    assert status["mirror listen"].startswith("ok"), lines
    assert status["mirror upstream"].startswith("ok"), lines
    assert status["boot"].startswith("ok"), lines
    assert status["mirror from VM"].startswith(
        f"ok    mirror from VM a job VM gets 'HTTP/1.0 200 OK' from {url}/v2/"
    ), lines
    assert leftovers(config) == {}


def test_job_2_is_served_from_the_cache_with_the_upstream_gone_and_cannot_push(
    mirror_config, upstream, tmp_path, host_settings, leftovers
):
    config, _ = mirror_config
    upstream.stop()
    sim = RunnerSim(config, tmp_path / "runner", 5102)  # shell mode: the VM's docker CLI
    mirror = f"{host_settings.gateway}:{MIRROR_PORT}"
    try:
        prepared = sim.prepare()
        assert prepared.rc == 0, prepared.describe()
        result = sim.run(
            "docker info --format '{{json .RegistryConfig.Mirrors}}'\n"
            "docker pull busybox:test\n"
            "docker run --rm busybox:test cat /etc/lvx-marker\n"
            # The first request of every push (docker push itself would retry it for a minute):
            f"exec 3<>/dev/tcp/{host_settings.gateway}/{MIRROR_PORT}\n"
            "printf 'POST /v2/library/pushed/blobs/uploads/ HTTP/1.0\\r\\nContent-Length: 0\\r\\n\\r\\n' >&3\n"
            "cat <&3\n"
        )
        assert result.rc == 0, result.describe()
        assert f'["http://{mirror}/"]' in result.stdout
        assert MARKER in result.stdout
        # Refused either way: by the proxy (UNSUPPORTED), or, once the supervisor found the
        # upstream gone and serves the cache only, by the read-only registry (GET and HEAD only).
        assert "HTTP/1.0 405 Method Not Allowed" in result.stdout
        assert '"code":"UNSUPPORTED"' in result.stdout or "Allow: GET, HEAD" in result.stdout
    finally:
        sim.cleanup()
    assert leftovers(config) == {}
    assert mirror_status(config)["upstream_problem"]  # it really was gone


def test_stop_leaves_no_registry_process(mirror_config):
    config, storage = mirror_config
    cli(config, "mirror", "stop")
    assert registry_pids(storage) == []
    status = cli(config, "mirror", "status", check=False)
    assert status.returncode == 2 and "NOT answering" in status.stdout
