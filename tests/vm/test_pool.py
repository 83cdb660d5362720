"""The warm pool on real VMs: the host agent keeps idle VMs, prepare claims them, nothing leaks.

One agent process (the real `libvirt-executor agent`) keeps `pool.size = 1` for the module's
config; the tests run in file order and share it. At most two VMs exist at once: a job's VM
and the refill the agent boots beside it. The image is a copy of the host's (hard links), so
that "rebuilding" it does not touch the other tests' image.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from executor.adapters.hostfiles import load_settings
from executor.admin import pool as pool_admin
from executor.admin.reap import reap
from executor.core.waiting import poll
from executor.testing.registry import busybox_files, docker_cli_files, image_layout, running_registry
from tests.vm.conftest import write_test_config
from tests.vm.harness import Agent, RunnerSim

pytestmark = pytest.mark.vm

PREFIX = "lvxpool"
REGISTRY_PORT = 5003
MARKER = "from-the-prepulled-image"
BOOT_WAIT_S = 240  # one pool boot under TCG takes 15-30 s; a refill may follow a retirement


@pytest.fixture(scope="module")
def registry(host_settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("poolregistry")
    with running_registry(root / "registry", f"{host_settings.gateway}:{REGISTRY_PORT}") as reg:
        tools = image_layout(
            root / "tools",
            busybox_files({"etc/lvx-image-marker": MARKER.encode() + b"\n", **docker_cli_files(root / "cli")}),
            env=["PATH=/usr/local/bin:/usr/bin:/bin"],
        )
        yield {"tools": reg.push(tools, "lvx/pooltools:1", root), "address": reg.address}


@pytest.fixture(scope="module")
def image_copy(host_settings):
    """The host's base image, hard-linked beside it (QEMU's user must reach it, which it cannot
    under pytest's 0700 tmp dirs): the same files, a manifest of its own."""
    original = Path(host_settings.image.dir)
    copy = original.with_name(f"{PREFIX}-test-image")
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(mode=0o755)
    for item in original.iterdir():
        if item.name == "manifest.json":
            (copy / item.name).write_bytes(item.read_bytes())
        else:
            os.link(item, copy / item.name)
    yield copy
    shutil.rmtree(copy, ignore_errors=True)


def _config(host_settings, root: Path, registry, image_copy, size: int) -> Path:
    return write_test_config(
        host_settings,
        root,
        PREFIX,
        allow_host_ports=(REGISTRY_PORT,),
        docker=f'insecure_registries = ["{registry["address"]}"]\npull_policy = ["if-not-present"]\n',
        image_dir=str(image_copy),
        extra=f'\n[pool]\nsize = {size}\nprepull = ["{registry["tools"]}"]\n',
    )


@pytest.fixture(scope="module")
def pool(host_settings, tmp_path_factory, registry, image_copy, leftovers):
    root = tmp_path_factory.mktemp("pool")
    config = _config(host_settings, root / "cfg", registry, image_copy, size=1)
    agent = Agent(config, root / "agent.log")
    yield {"config": config, "root": root, "agent": agent}
    agent.stop()
    reap(load_settings(str(config)))
    assert leftovers(config) == {}


def status(config: Path) -> dict:
    return pool_admin.status(load_settings(str(config)))


def wait_idle(config: Path, timeout: float = BOOT_WAIT_S, other_than: set[str] = frozenset()) -> str:
    """The name of an idle VM (not one of `other_than`) once there is one."""

    def idle() -> str | None:
        names = [v["name"] for v in status(config)["vms"] if v["pool_state"] == "idle" and v["name"] not in other_than]
        return names[0] if names else None

    name = poll(idle, timeout, interval=1.0, max_interval=2.0)
    assert name, f"no idle pool VM within {timeout:.0f} s: {json.dumps(status(config), indent=1)}"
    return name


def vm_of(prepared) -> str:
    match = re.search(r"libvirt-executor: (\S+) ready at \S+ \((pool|cold), ", prepared.stdout)
    assert match, prepared.describe()
    return match.group(1)


def source_of(prepared) -> str:
    return re.search(r"ready at \S+ \((pool|cold), ", prepared.stdout).group(1)


def qemu_pid(vm: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{vm}.pid").read_text().strip())


def test_pool_status_says_the_agent_runs_and_an_idle_vm_comes(pool):
    first = wait_idle(pool["config"])
    st = status(pool["config"])
    assert st["agent"]["running"] and st["agent"]["pid"] == pool["agent"].proc.pid
    assert st["idle"] == 1 and st["size"] == 1
    vm = next(v for v in st["vms"] if v["name"] == first)
    assert vm["state"] == "paused"  # pool.idle = "paused": no CPU while it waits
    assert vm["prepulled"] and vm["prepulled"][0].endswith("lvx/pooltools:1")
    assert f"{first} is ready and idle (paused)" in pool["agent"].text()


def test_two_jobs_in_a_row_come_from_the_pool_and_the_second_sees_nothing_of_the_first(pool):
    config = pool["config"]
    first_idle = wait_idle(config)
    one = RunnerSim(config, pool["root"] / "job1", 7101)
    prepared = one.prepare()
    assert prepared.rc == 0 and source_of(prepared) == "pool", prepared.describe()
    assert vm_of(prepared) == first_idle
    assert prepared.seconds < 10, prepared.describe()  # a claim, not a boot (TCG boots take 15 s+)
    wrote = one.run(
        "echo one > /builds/left-by-job-one; echo one > /tmp/left-by-job-one\n"
        "tar -C /bin -c busybox | docker import - left/by-job-one:1 >/dev/null\n"
        "docker create --name left-by-job-one left/by-job-one:1 /busybox true >/dev/null\n"
        "docker ps -a --format '{{.Names}}'\n"
    )
    assert wrote.rc == 0 and "left-by-job-one" in wrote.stdout, wrote.describe()
    assert one.cleanup().rc == 0

    second_idle = wait_idle(config, other_than={first_idle})
    paused_since = time.time()
    time.sleep(15)  # a paused TCG guest's clock stands still meanwhile: the claim must set it
    two = RunnerSim(config, pool["root"] / "job2", 7102)
    prepared = two.prepare()
    assert prepared.rc == 0 and source_of(prepared) == "pool", prepared.describe()
    assert vm_of(prepared) == second_idle != first_idle
    looked = two.run(
        "ls /builds /tmp; docker ps -a --format 'container {{.Names}}'; docker images --format 'image {{.Repository}}'\n"
        "echo guest-clock=$(date +%s)\n"
    )
    host_now = time.time()
    assert looked.rc == 0, looked.describe()
    assert "left-by-job-one" not in looked.stdout and "left/by-job-one" not in looked.stdout, looked.stdout
    guest = int(re.search(r"guest-clock=(\d+)", looked.stdout).group(1))
    assert abs(guest - host_now) < 5, f"guest clock {guest}, host {host_now:.0f}, paused at {paused_since:.0f}"
    assert two.cleanup().rc == 0


def test_image_mode_with_a_prepulled_image_starts_without_a_pull(pool, registry):
    config = pool["config"]
    wait_idle(config)
    job = RunnerSim(config, pool["root"] / "job3", 7103, payload_extra={"image": {"name": registry["tools"]}})
    prepared = job.prepare()
    try:
        assert prepared.rc == 0 and source_of(prepared) == "pool", prepared.describe()
        assert f"Using locally found image {registry['tools']}" in prepared.stdout, prepared.describe()
        assert "Pulling docker image" not in prepared.stdout
        result = job.run("cat /etc/lvx-image-marker")
        assert result.rc == 0 and MARKER in result.stdout, result.describe()
    finally:
        assert job.cleanup().rc == 0


def test_an_entrypoint_that_ends_the_build_container_is_the_jobs_fault(pool, registry):
    config = pool["config"]
    claimed = wait_idle(config)
    image = {"name": registry["tools"], "entrypoint": ["sh", "-c", "echo this-entrypoint-ignores-its-arguments"]}
    job = RunnerSim(config, pool["root"] / "job5", 7105, payload_extra={"image": image})
    prepared = job.prepare()
    assert prepared.rc == 1, prepared.describe()  # a build failure: the job asked for it
    assert "stopped right away (exit code 0): its entrypoint does not run the job's shell" in prepared.stderr
    assert "this-entrypoint-ignores-its-arguments" in prepared.stderr
    assert job.cleanup().rc == 0
    assert claimed not in [v["name"] for v in status(config)["vms"]]  # rolled back with the job


def test_a_claimed_vm_gets_its_jobs_network_allowances_on_its_running_filter(pool):
    # The job's GitLab server is in a blocked range: the job's VM must reach it, a pool VM
    # booted before the job could not know it. Only the filter is looked at: no packet is sent.
    config = pool["config"]
    idle = wait_idle(config)
    before = filter_parameters(idle)
    assert ("ALLOW_NET", "10.255.0.7") not in before
    job = RunnerSim(
        config, pool["root"] / "job4", 7104, payload_extra={"git_info": {"repo_url": "http://10.255.0.7/g/p.git"}}
    )
    prepared = job.prepare()
    try:
        assert prepared.rc == 0 and vm_of(prepared) == idle, prepared.describe()
        assert "allowing the job's GitLab server 10.255.0.7 (10.255.0.7)" in prepared.stdout
        after = filter_parameters(idle)
        assert ("ALLOW_NET", "10.255.0.7") in after and ("ALLOW_MASK", "32") in after
        assert [p for p in after if p[0] != "ALLOW_NET" and p[0] != "ALLOW_MASK"] == [
            p for p in before if p[0] != "ALLOW_NET" and p[0] != "ALLOW_MASK"
        ]
    finally:
        assert job.cleanup().rc == 0


def filter_parameters(vm: str) -> list[tuple[str, str]]:
    conn = libvirt.open("qemu:///system")
    try:
        root = ET.fromstring(conn.lookupByName(vm).XMLDesc(0))
    finally:
        conn.close()
    return [(p.get("name"), p.get("value")) for p in root.findall("./devices/interface/filterref/parameter")]


def test_a_rebuilt_base_image_retires_the_idle_vm(pool, image_copy):
    config = pool["config"]
    old = wait_idle(config)
    manifest = image_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    data["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())  # what a rebuild changes
    tmp = manifest.with_name(".manifest.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(manifest)
    new = wait_idle(config, other_than={old})
    assert old not in [v["name"] for v in status(config)["vms"]]
    assert f"removed {old}: it was made from another base image, runner binary or config" in pool["agent"].text()
    assert new != old


@pytest.mark.parametrize("kill", ["frozen", "killed"])
def test_an_idle_vm_whose_qemu_is_frozen_or_killed_is_replaced(pool, kill):
    config = pool["config"]
    victim = wait_idle(config)
    pid = qemu_pid(victim)
    os.kill(pid, signal.SIGSTOP if kill == "frozen" else signal.SIGKILL)
    try:
        replacement = wait_idle(config, other_than={victim})
    finally:
        if kill == "frozen":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert victim not in [v["name"] for v in status(config)["vms"]]
    why = "its QEMU process is stopped (frozen)" if kill == "frozen" else "its QEMU is gone"
    assert f"removed {victim}: {why}" in pool["agent"].text()
    assert replacement != victim


def test_racing_prepares_one_gets_the_idle_vm_the_other_boots_cold(pool, leftovers):
    config = pool["config"]
    idle = wait_idle(config)
    # No refill during the race (two VMs at most here): the agent dies as SIGKILL leaves it.
    pool["agent"].stop(signal.SIGKILL)
    sims = [RunnerSim(config, pool["root"] / f"race{i}", 7110 + i) for i in range(2)]
    procs = [(sim, sim.start("prepare"), time.monotonic()) for sim in sims]
    results = [sim.finish(proc, started, timeout=900) for sim, proc, started in procs]
    try:
        for result in results:
            assert result.rc == 0, result.describe()
        sources = sorted(source_of(r) for r in results)
        assert sources == ["cold", "pool"], [r.stdout for r in results]
        pooled = next(r for r in results if source_of(r) == "pool")
        assert vm_of(pooled) == idle
    finally:
        for sim in sims:
            assert sim.cleanup().rc == 0
    assert leftovers(config) == {}


def test_an_agent_killed_mid_boot_leaves_nothing_that_reap_does_not_remove(
    pool, host_settings, registry, image_copy, leftovers
):
    config = _config(host_settings, pool["root"] / "cfg2", registry, image_copy, size=2)
    agent = Agent(config, pool["root"] / "agent2.log")
    try:
        wait_idle(config)

        def one_booting() -> bool:
            return status(config)["booting"] == 1

        assert poll(one_booting, BOOT_WAIT_S, interval=0.5, max_interval=1.0), status(config)
    finally:
        agent.stop(signal.SIGKILL)
    st = status(config)
    assert not st["agent"]["running"] and st["idle"] == 1 and st["booting"] == 1
    result = reap(load_settings(str(config)))
    assert not result.failures, result.failures
    reasons = " ".join(result.actions)
    assert "an idle pool VM, and no host agent keeps the pool" in reasons
    assert "a pool VM whose boot was abandoned" in reasons
    assert leftovers(config) == {}
