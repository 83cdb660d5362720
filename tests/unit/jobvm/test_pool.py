"""executor.jobvm.pool on libvirt's test driver: claims are atomic, a VM that fails its check
is removed and never handed out, and the keeper's round (agent.keeper) backs off and leaves
nothing when boots fail.

The test driver cannot boot a guest: where a claim would resume and check a real VM, `_wake`
is replaced by a stand-in that returns a ReadyVM without connections (or fails, as a frozen
or silent VM does); boots fail for real at the seed upload, which the driver does not support.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from contextlib import ExitStack
from types import SimpleNamespace

import pytest

from executor.adapters.statedir import StateDir
from executor.admin import pool as pool_admin
from executor.agent.keeper import Keeper
from executor.core import naming
from executor.core.domain_xml import build_domain, build_raw_volume, parse_job_record
from executor.core.settings import ImageSettings, PoolSettings, settings_toml
from executor.errors import SystemFailure
from executor.jobvm import boot, pool
from tests.unit.conftest import make_driver_spec, make_record

FP = "fingerprint-now"
POOL = "default-pool"


@pytest.fixture
def state(tmp_settings):
    s = StateDir(tmp_settings.paths.state_dir)
    s.ensure()
    return s


def idle_vm(hv, settings, state, token: str, *, fingerprint: str = FP, pool_state: str = "idle") -> str:
    """A pool VM as the keeper leaves it: domain with its record, volumes, address, key."""
    vm = naming.pool_vm_name("lvx", token)
    ip = state.allocate_ip(vm, naming.vm_addresses(settings.subnet))
    state.write_client_key(vm, "KEY")
    hv.create_volume(POOL, build_raw_volume(naming.overlay_volume_name(vm), 4096))
    hv.create_volume(POOL, build_raw_volume(naming.seed_volume_name(vm), 4096))
    now = int(time.time())
    record = make_record(
        vm=vm,
        job_id=0,
        project_id=None,
        project="",
        pipeline_id=None,
        runner_id=None,
        created=now - 30,
        expires=now + 3600,
        ip=ip,
        pool_state=pool_state,
        fingerprint=fingerprint,
    )
    hv.define_and_start(build_domain(make_driver_spec(record, name=vm)))
    return vm


def pieces_of(hv, state, vm: str) -> list[str]:
    found = []
    if hv.domain(vm) is not None:
        found.append("domain")
    found += [v for v in hv.volume_names(POOL) if v.startswith(vm)]
    found += [f"ip {ip}" for ip, owner in state.reservations().items() if owner == vm]
    if state.job_dir(vm).exists():
        found.append("job dir")
    if state.lock_path(vm).exists():
        found.append("lock")
    found += [f"claim {job}" for job, target in state.claims().items() if target == vm]
    return found


def for_job(record):
    return dataclasses.replace(record, job_id=77, project_id=5, project="g/p", expires=record.created + 99)


def woken(hv, settings, state, vm, record):
    """Stands in for resuming and checking a real VM (the test driver has no guest)."""
    return boot.ReadyVM(
        vm, record.ip, record, SimpleNamespace(close=lambda: None), SimpleNamespace(close=lambda: None), lambda: True
    )


def test_a_claim_takes_an_idle_vm_of_the_current_fingerprint_marks_it_and_holds_its_lock(
    hv, tmp_settings, state, monkeypatch
):
    monkeypatch.setattr(pool, "_wake", woken)
    stale = idle_vm(hv, tmp_settings, state, "0000000a", fingerprint="older")
    fit = idle_vm(hv, tmp_settings, state, "0000000b")
    said: list[str] = []
    with ExitStack() as held:
        ready = pool.claim(hv, tmp_settings, state, "lvx-job-77", FP, for_job, held, said.append)
        assert ready is not None and ready.vm == fit and said == []
        assert state.lock_held(fit) and not state.lock_held(stale)
        record = parse_job_record(hv.domain(fit).metadata)
        assert (record.pool_state, record.job_id, record.project) == ("claimed", 77, "g/p")
        assert state.claimed_vm("lvx-job-77") == fit
        # claimed now: nobody else gets it
        assert pool.claim(hv, tmp_settings, state, "lvx-job-78", FP, for_job, ExitStack(), said.append) is None
    assert not state.lock_held(fit)
    assert parse_job_record(hv.domain(stale).metadata).pool_state == "idle"  # never handed out


def test_a_vm_another_process_holds_is_skipped(hv, tmp_settings, state, monkeypatch):
    monkeypatch.setattr(pool, "_wake", woken)
    vm = idle_vm(hv, tmp_settings, state, "0000000c")
    with state.job_lock(vm, 0):  # the keeper retiring it, or another prepare claiming it
        assert pool.claim(hv, tmp_settings, state, "lvx-job-79", FP, for_job, ExitStack(), print) is None
    assert parse_job_record(hv.domain(vm).metadata).pool_state == "idle"


def test_racing_claims_for_one_idle_vm_give_it_to_exactly_one(hv, tmp_settings, state, monkeypatch):
    def slow_wake(*args):
        time.sleep(0.3)  # the resume and the checks: the window a second claim would use
        return woken(*args)

    monkeypatch.setattr(pool, "_wake", slow_wake)
    vm = idle_vm(hv, tmp_settings, state, "0000000d")
    got: dict[int, object] = {}
    stacks = [ExitStack() for _ in range(4)]
    barrier = threading.Barrier(4)

    def race(i: int) -> None:
        barrier.wait()
        got[i] = pool.claim(hv, tmp_settings, state, f"lvx-job-{90 + i}", FP, for_job, stacks[i], print)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for stack in stacks:
        stack.close()
    winners = [i for i, ready in got.items() if ready is not None]
    assert len(winners) == 1 and got[winners[0]].vm == vm
    assert list(state.claims()) == [f"lvx-job-{90 + winners[0]}"]


def test_a_vm_that_fails_its_check_is_removed_with_a_job_log_line_and_the_next_one_is_tried(
    hv, tmp_settings, state, monkeypatch
):
    frozen = idle_vm(hv, tmp_settings, state, "0000000e")
    good = idle_vm(hv, tmp_settings, state, "0000000f")

    def wake(hv_, settings, state_, vm, record):
        if vm == frozen:
            raise SystemFailure("its QEMU process is stopped (frozen)")
        return woken(hv_, settings, state_, vm, record)

    monkeypatch.setattr(pool, "_wake", wake)
    # both idle; the oldest (frozen) is tried first
    old = dataclasses.replace(parse_job_record(hv.domain(frozen).metadata), created=1)
    pool._write_record(hv, old)
    said: list[str] = []
    with ExitStack() as held:
        ready = pool.claim(hv, tmp_settings, state, "lvx-job-80", FP, for_job, held, said.append)
        assert ready is not None and ready.vm == good
    assert said == [
        f"the pool VM {frozen} failed its check before handout (its QEMU process is stopped (frozen)): "
        "removed, trying the next"
    ]
    assert pieces_of(hv, state, frozen) == []
    assert state.claimed_vm("lvx-job-80") == good


def _keeper_settings(tmp_settings, tmp_path, size: int):
    image = tmp_path / "image"
    image.mkdir(exist_ok=True)
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (image / name).write_bytes(b"x")
    manifest = {"disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "quiet", "built_at": "1"}
    (image / "manifest.json").write_text(json.dumps(manifest))
    libvirt = dataclasses.replace(tmp_settings.libvirt, accel="tcg", nwfilter="")
    settings = dataclasses.replace(
        tmp_settings, libvirt=libvirt, image=ImageSettings(dir=str(image)), pool=PoolSettings(size=size)
    )
    config = tmp_path / "config.toml"
    config.write_text(settings_toml(settings))
    return settings, config


def test_a_failing_boot_backs_off_and_leaves_nothing_and_an_unfit_idle_vm_is_retired(
    hv, tmp_settings, tmp_path, state, monkeypatch
):
    monkeypatch.setenv("PATH", "/nonexistent")  # no gitlab-runner binary
    settings, config = _keeper_settings(tmp_settings, tmp_path, size=1)
    stale = idle_vm(hv, settings, state, "00000001", fingerprint="made-from-an-older-image")
    said: list[str] = []
    keeper = Keeper(str(config), settings, said.append)
    keeper.round()
    assert said[0] == f"removed {stale}: it was made from another base image, runner binary or config"
    assert said[1].startswith("booting a pool VM failed: libvirt: uploading volume lvx-pool-")
    assert said[1].endswith("next try in 5 s")
    assert keeper.boot_failures == 1 and pieces_of(hv, state, stale) == []
    left = [d.name for d in hv.domains() if naming.is_pool_name("lvx", d.name)]
    assert left == [] and hv.volume_names(POOL) == [] and state.reservations() == {}
    keeper.round()  # within the backoff: no second boot
    assert keeper.boot_failures == 1 and len(said) == 2
    report = state.read_agent_status("lvx")
    assert report["boot_failures"] == 1 and report["idle"] == 0 and report["size"] == 1
    assert report["last_error"].startswith("libvirt: uploading volume")


def test_pool_status_drain_and_fill(hv, tmp_settings, state):
    settings = dataclasses.replace(tmp_settings, pool=PoolSettings(size=2))
    vm = idle_vm(hv, settings, state, "00000002")
    in_job = idle_vm(hv, settings, state, "00000003", pool_state="claimed")
    st = pool_admin.status(settings)
    assert (st["idle"], st["booting"], st["in_job"], st["size"], st["drained"]) == (1, 0, 1, 2, False)
    assert st["agent"]["running"] is False
    assert "NOT running: jobs boot cold" in pool_admin.format_status(st)
    said = pool_admin.drain(settings)
    assert said[0] == "marked drained: the agent boots no pool VMs until `pool fill`"
    assert sorted(said[1:]) == sorted([f"removed {vm} (idle)", f"{in_job} is in a job: it goes with the job's cleanup"])
    assert pieces_of(hv, state, vm) == [] and hv.domain(in_job) is not None
    assert pool_admin.status(settings)["drained"] is True
    assert pool_admin.fill(settings).startswith("no longer drained")
    assert pool_admin.fill(settings) == "the pool is not drained"


def test_sigterm_during_the_claims_check_removes_the_claimed_vm_and_stops(hv, tmp_settings, state, monkeypatch):
    from executor.errors import Interrupted

    vm = idle_vm(hv, tmp_settings, state, "00000004")

    def cancelled(*args):
        raise Interrupted("SIGTERM")

    monkeypatch.setattr(pool, "_wake", cancelled)
    said: list[str] = []
    with pytest.raises(Interrupted):
        pool.claim(hv, tmp_settings, state, "lvx-job-81", FP, for_job, ExitStack(), said.append)
    assert pieces_of(hv, state, vm) == [] and said == []  # claimed for a job that is gone: removed


def test_the_fingerprint_follows_what_shapes_a_booted_vm_not_what_a_job_reads(tmp_settings, tmp_path):
    settings, _ = _keeper_settings(tmp_settings, tmp_path, size=1)
    from executor.adapters.hostfiles import load_base_image
    from executor.core.settings import DockerSettings, VMSettings

    image = load_base_image(settings.image.dir)
    now = pool.current_fingerprint(settings, image, "")
    same = [
        dataclasses.replace(settings, pool=PoolSettings(size=5)),
        dataclasses.replace(settings, docker=DockerSettings(pull_policy=("if-not-present",), allowed_images=("a/*",))),
    ]
    different = [
        dataclasses.replace(settings, vm=VMSettings(vcpus=4)),
        dataclasses.replace(settings, docker=DockerSettings(insecure_registries=("reg.example:5000",))),
        dataclasses.replace(settings, pool=PoolSettings(size=1, prepull=("alpine:3",))),
    ]
    assert all(pool.current_fingerprint(s, image, "") == now for s in same)
    assert all(pool.current_fingerprint(s, image, "") != now for s in different)
    assert pool.current_fingerprint(settings, image, "lvx-runner-0123456789abcdef.iso") != now


def test_without_a_pool_the_keepers_round_looks_at_nothing_but_libvirt(hv, tmp_settings, tmp_path, state):
    settings = dataclasses.replace(tmp_settings, image=ImageSettings(dir=str(tmp_path / "no-image-built-yet")))
    config = tmp_path / "config.toml"
    config.write_text(settings_toml(settings))
    said: list[str] = []
    Keeper(str(config), settings, said.append).round()  # no ConfigError about the missing image
    assert said == [] and state.read_agent_status("lvx")["size"] == 0
