"""Cheap stages and instant cleanup on real VMs: a job's stages through its connection holder
give what the direct path gives; the holder going away costs one stage at most and leaks
nothing; a frozen guest's job ends soon after the freeze is found; cleanup returns with the VM
stopped, and the rest goes a moment later.

Images are made here and pulled from a docker-registry on this host, as in test_image_mode.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import libvirt
import pytest

from executor.adapters.hostfiles import load_settings
from executor.adapters.statedir import StateDir
from executor.admin.listing import leftovers
from executor.core.waiting import poll
from executor.jobvm.record import job_vm
from executor.jobvm.teardown import holder_service, stop_holder
from executor.stages import holder
from executor.testing.registry import busybox_files, image_layout, running_registry
from executor.testing.runnersim import StageResult
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim, read_until

pytestmark = pytest.mark.vm

REGISTRY_PORT = 5006
QEMU_PIDS = Path("/run/libvirt/qemu")
NINE_STAGES = (
    "prepare_script",
    "get_sources",
    "restore_cache",
    "download_artifacts",
    "build_script",
    "after_script",
    "archive_cache",
    "upload_artifacts_on_failure",
    "cleanup_file_variables",
)


def _body(stage: str) -> str:
    """What each stage prints: its name, who and where it runs, output on both streams; the
    build script fails with 3, as a job's would."""
    body = f'echo "{stage} as $(id -u) in $(pwd)"; echo "{stage} on stderr" >&2; printf "no newline"'
    return body + ("; exit 3" if stage == "build_script" else "")


def _nine(sim: RunnerSim) -> list[tuple[str, int, str, str, str | None]]:
    results = []
    for stage in NINE_STAGES:
        r = sim.run(_body(stage), stage=stage)
        results.append((stage, r.rc, r.stdout, r.stderr, r.build_exit_code))
    return results


def _holder_pid(config: Path, sim: RunnerSim) -> int | None:
    """The job's holder's pid, once it runs (None if it does not within 30 s)."""
    settings = load_settings(str(config))
    state = StateDir(settings.paths.state_dir)
    return poll(lambda: holder_service(state, job_vm(settings, state, sim.job_id)).pid(), 30, interval=0.1)


def _stop_holder(config: Path, sim: RunnerSim) -> None:
    settings = load_settings(str(config))
    state = StateDir(settings.paths.state_dir)
    vm = job_vm(settings, state, sim.job_id)
    assert stop_holder(state, vm)
    assert poll(lambda: holder_service(state, vm).pid() is None, 30, interval=0.1)


def _same_through_the_holder_and_directly(config: Path, sim: RunnerSim) -> None:
    pid = _holder_pid(config, sim)
    assert pid is not None  # prepare started it
    held = _nine(sim)
    assert _holder_pid(config, sim) == pid
    settings = load_settings(str(config))
    state = StateDir(settings.paths.state_dir)
    holder_log = state.holder_file(job_vm(settings, state, sim.job_id), "log")

    def served_all() -> bool:  # the holder logs a stage once it has tidied up after answering
        served = holder_log.read_text()
        return all(f"libvirt-executor: {stage}: " in served for stage in NINE_STAGES)

    assert poll(served_all, 10, interval=0.2), holder_log.read_text()
    _stop_holder(config, sim)
    sim.build_exit_code_file.unlink()
    direct = _nine(sim)
    assert held == direct
    by_stage = {stage: (rc, out, err, code) for stage, rc, out, err, code in held}
    assert by_stage["build_script"][0] == 1 and by_stage["build_script"][3] == "3\n"
    assert by_stage["after_script"][0] == 0 and by_stage["after_script"][1].endswith("no newline")
    assert "after_script on stderr\n" in by_stage["after_script"][2]


@pytest.fixture(scope="module")
def shell_job(host_settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    config = write_test_config(host_settings, root / "cfg", "lvxstage")
    sim = RunnerSim(config, root / "runner", 5151)
    prepared = sim.prepare()
    assert prepared.rc == 0, prepared.describe()
    yield {"sim": sim, "config": config}
    sim.cleanup()


def test_nine_stages_give_the_same_output_and_exit_codes_through_the_holder_and_directly(shell_job):
    _same_through_the_holder_and_directly(shell_job["config"], shell_job["sim"])


def test_a_holder_killed_mid_stage_fails_that_stage_and_the_next_one_connects_by_itself(shell_job, monkeypatch):
    sim, config = shell_job["sim"], shell_job["config"]
    settings = load_settings(str(config))
    state = StateDir(settings.paths.state_dir)
    vm = job_vm(settings, state, sim.job_id)
    for key, value in sim.env().items():  # the job's environment, which prepare hands on
        monkeypatch.setenv(key, value)
    holder.start(settings, str(config), vm)  # a fresh one, as prepare starts it
    assert poll(lambda: holder_service(state, vm).pid(), 30, interval=0.1)
    proc = sim.start_run("echo started; sleep 600")
    read_until(proc, "started")
    os.kill(holder_service(state, vm).pid() or 0, signal.SIGKILL)
    failed = sim.finish(proc, time.monotonic(), timeout=60)
    assert failed.rc == 2, failed.describe()  # a system failure, not the job's
    assert "connection holder went away during the stage" in failed.stderr
    after = sim.run("echo still-here", stage="after_script")
    assert after.rc == 0 and after.stdout == "still-here\n", after.describe()


def test_cleanup_returns_with_the_vm_stopped_and_nothing_is_left_a_moment_later(shell_job):
    sim, config = shell_job["sim"], shell_job["config"]
    vm = f"lvxstage-job-{sim.job_id}"
    cleaned = sim.cleanup()
    assert cleaned.rc == 0, cleaned.describe()
    conn = libvirt.open("qemu:///system")
    try:
        state, _ = conn.lookupByName(vm).state()  # the census right after: paused or gone
    except libvirt.libvirtError:
        state = libvirt.VIR_DOMAIN_SHUTOFF
    finally:
        conn.close()
    assert state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_SHUTOFF)
    settings = load_settings(str(config))
    assert poll(lambda: not leftovers(settings), 60, interval=0.2), leftovers(settings)
    print(f"\ncleanup returned in {cleaned.seconds:.2f} s")


def test_a_frozen_guests_job_ends_soon_after_the_freeze(host_settings, tmp_path, leftovers):
    config = write_test_config(host_settings, tmp_path / "cfg", "lvxfrz", timeouts="unresponsive = 15")
    sim = RunnerSim(config, tmp_path / "runner", 5252)
    vm = f"lvxfrz-job-{sim.job_id}"
    try:
        prepared = sim.prepare()
        assert prepared.rc == 0, prepared.describe()
        proc = sim.start_run("echo started; sleep 600")
        read_until(proc, "started")
        os.kill(int((QEMU_PIDS / f"{vm}.pid").read_text()), signal.SIGSTOP)
        frozen_at = time.monotonic()
        ran = sim.finish(proc, frozen_at, timeout=120)
        later: list[StageResult] = [sim.run("true", stage=s) for s in ("after_script", "upload_artifacts_on_failure")]
        cleaned = sim.cleanup()
        ended = time.monotonic() - frozen_at
    finally:
        sim.cleanup()
    print(f"\nfrozen guest: stage failed after {ran.seconds:.1f} s, the job ended {ended:.1f} s after the freeze")
    assert ran.rc == 2 and "stopped responding" in ran.stderr, ran.describe()
    for r in later:
        assert r.rc == 2 and "found by an earlier stage of this job" in r.stderr, r.describe()
        assert r.seconds < 2, r.describe()
    assert cleaned.rc == 0 and cleaned.seconds < 2, cleaned.describe()
    assert ended < 15 + 20
    assert leftovers(config) == {}


@pytest.fixture(scope="module")
def image_job(host_settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("stagesimg")
    with running_registry(root / "registry", f"{host_settings.gateway}:{REGISTRY_PORT}") as reg:
        image = reg.push(image_layout(root / "img", busybox_files()), "lvx/stages:1", root)
        config = write_test_config(
            host_settings,
            root / "cfg",
            "lvxstagei",
            allow_host_ports=(REGISTRY_PORT,),
            docker=f'insecure_registries = ["{reg.address}"]\n',
        )
        sim = RunnerSim(config, root / "runner", 5353, payload_extra={"image": {"name": image}})
        prepared = sim.prepare()
        assert prepared.rc == 0, prepared.describe()
        yield {"sim": sim, "config": config}
        sim.cleanup()


def test_image_mode_nine_stages_give_the_same_through_the_holder_and_directly(image_job, leftovers):
    sim, config = image_job["sim"], image_job["config"]
    _same_through_the_holder_and_directly(config, sim)
    # the user stages ran in the build container, made of the image's static busybox
    build = sim.run("test -x /bin/busybox && ! test -e /usr/bin/sudo && echo busybox-image", stage="build_script")
    assert build.stdout == "busybox-image\n", build.describe()
    cleaned = sim.cleanup()
    assert cleaned.rc == 0, cleaned.describe()
    assert leftovers(config) == {}
