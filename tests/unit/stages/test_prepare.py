"""executor.stages.prepare on libvirt's test driver: a failed prepare leaves nothing behind.

The test driver cannot upload a volume or boot a guest; the first test lets prepare fail on the
real "not supported" upload error, the second stands in for the upload and for the SSH wait
(SIGTERM arriving while the VM boots) to fail after the domain was started.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from executor.adapters.hypervisor import Hypervisor
from executor.adapters.statedir import StateDir
from executor.core.domain_xml import Limits
from executor.core.jobenv import Job
from executor.core.settings import AdmissionSettings, ImageSettings, LimitSettings, RunnerSettings, Settings, VMSettings
from executor.core.waiting import poll
from executor.errors import ConfigError, Interrupted, JobRefused, SystemFailure
from executor.jobvm import boot
from executor.stages import prepare as prepare_stage
from tests.unit.conftest import make_driver_spec

VM = "lvx-job-4242"
POOL = "default-pool"
JOB = Job(job_id=4242, project_id=1, project="g/p", pipeline_id=2, runner_id=3, timeout_s=3600)


@pytest.fixture
def settings(tmp_settings, tmp_path) -> Settings:
    image = tmp_path / "image"
    image.mkdir()
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (image / name).write_bytes(b"x")
    manifest = {"disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img", "cmdline": "quiet", "user": "runner"}
    (image / "manifest.json").write_text(json.dumps(manifest))
    libvirt = dataclasses.replace(tmp_settings.libvirt, accel="tcg", nwfilter="")
    return dataclasses.replace(tmp_settings, libvirt=libvirt, image=ImageSettings(dir=str(image)))


def left_on_host(hv: Hypervisor, settings: Settings) -> dict[str, object]:
    state = StateDir(settings.paths.state_dir)
    found = {
        "domains": [d.name for d in hv.domains() if d.name == VM],
        "volumes": [v for v in hv.volume_names(POOL) if v.startswith(VM)],
        "ips": state.reservations(),
        "job_dirs": state.job_dir_vms(),
        "locks": state.locked_vms(),
    }
    return {k: v for k, v in found.items() if v}


def test_a_libvirt_failure_midway_rolls_back_everything_made_so_far(hv, settings, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no gitlab-runner
    printed: list[str] = []
    with pytest.raises(SystemFailure, match="uploading volume lvx-job-4242-seed.iso"):
        prepare_stage.prepare(settings, JOB, out=printed.append)
    assert left_on_host(hv, settings) == {}
    # the job log's one line: nothing else was said
    assert printed == [
        "libvirt-executor: no gitlab-runner binary on this host (runner.binary, or PATH): "
        "artifacts, caches and dependencies are disabled for this job"
    ]


def test_a_configured_runner_binary_that_is_missing_is_refused_before_anything_is_made(hv, settings, tmp_path):
    missing = dataclasses.replace(settings, runner=RunnerSettings(binary=str(tmp_path / "gitlab-runner")))
    with pytest.raises(ConfigError, match="runner.binary: .*/gitlab-runner is not an executable file"):
        prepare_stage.prepare(missing, JOB, out=lambda line: None)
    assert left_on_host(hv, missing) == {}


def test_sigterm_while_the_vm_boots_destroys_it_and_everything_else(hv, settings, monkeypatch):
    monkeypatch.setattr(Hypervisor, "upload_volume", lambda self, pool, name, data: None)
    # The test driver runs only its own domain type: the same spec, in the shape it accepts.
    real_spec = boot._domain_spec

    def driver_spec(*args):
        spec = real_spec(*args)
        return make_driver_spec(spec.record, overlay_path=spec.overlay_path, seed_path=spec.seed_path)

    seen = {}

    def sigterm_during_boot(hv_, settings_, state, vm, ip, timings, runner_alive):
        seen["running"] = [d.name for d in hv_.domains() if d.active]
        seen["left"] = left_on_host(hv_, settings_)
        raise Interrupted("SIGTERM")

    monkeypatch.setattr(boot, "_domain_spec", driver_spec)
    monkeypatch.setattr(boot, "_wait_for_ssh", sigterm_during_boot)
    with pytest.raises(Interrupted):
        prepare_stage.prepare(settings, JOB, out=lambda line: None)
    assert VM in seen["running"]  # the failure really came after the start
    assert set(seen["left"]) == {"domains", "volumes", "ips", "job_dirs", "locks"}
    assert left_on_host(hv, settings) == {}


def test_a_config_that_disagrees_with_the_image_is_refused_before_anything_is_made(hv, settings):
    other = dataclasses.replace(settings, vm=VMSettings(user="builder"))
    with pytest.raises(ConfigError, match="vm.user = 'builder', but the image .* was built with 'runner'"):
        prepare_stage.prepare(other, JOB)
    assert left_on_host(hv, other) == {}


def test_a_pool_too_small_for_the_job_disk_is_refused_before_anything_is_made(hv, settings):
    huge = dataclasses.replace(settings, vm=VMSettings(disk_gib=4096))
    with pytest.raises(SystemFailure) as refused:
        prepare_stage.prepare(huge, JOB, out=lambda line: None)
    assert str(refused.value).startswith(
        "not starting a job VM on this host now: the storage pool has 100.0 GiB free, "
        "the running jobs' disks may still grow by 0.0 GiB, and a new job's disk may grow to 4096.0 GiB"
    )
    assert left_on_host(hv, huge) == {}
    # With admission off the same job gets as far as the test driver lets it (the seed upload).
    unchecked = dataclasses.replace(huge, admission=AdmissionSettings(enabled=False))
    with pytest.raises(SystemFailure, match="uploading volume"):
        prepare_stage.prepare(unchecked, JOB, out=lambda line: None)
    assert left_on_host(hv, unchecked) == {}


def test_a_disk_made_by_a_concurrent_prepare_meanwhile_is_counted_at_the_second_check(hv, settings, monkeypatch):
    # The test pool has 100 GiB: room for one 50 GiB disk, so the early check passes. Another
    # job's prepare creates its disk while this one writes its seed (stands in for the race).
    sized = dataclasses.replace(settings, vm=VMSettings(disk_gib=50))
    other_disk = (
        "<volume><name>lvx-job-9-disk.qcow2</name><capacity unit='GiB'>50</capacity>"
        "<allocation unit='GiB'>1</allocation><target><format type='qcow2'/></target></volume>"
    )
    monkeypatch.setattr(
        Hypervisor, "upload_volume", lambda self, pool, name, data: hv.create_volume(POOL, other_disk) and None
    )

    def admitted(*args):
        raise AssertionError("admitted although the other job's disk left no room")

    monkeypatch.setattr(boot, "_wait_for_ssh", admitted)  # and never touch the network
    with pytest.raises(SystemFailure, match="the running jobs' disks may still grow by 49.0 GiB"):
        prepare_stage.prepare(sized, JOB, out=lambda line: None)
    assert left_on_host(hv, sized) == {}  # its seed, address and key were rolled back
    assert hv.volume_names(POOL) == ["lvx-job-9-disk.qcow2"]


def test_image_mode_lines_check_the_runner_and_the_vm_first():
    said: list[str] = []
    state = {"alive": True}

    def alive() -> bool:
        if state["alive"] is None:
            raise SystemFailure("the runner process that started this prepare (pid 7) is gone")
        return state["alive"]

    say = prepare_stage._checking(said.append, alive)
    say("Pulling docker image alpine ...")
    state["alive"] = False
    with pytest.raises(SystemFailure, match="the job's VM stopped while its images were being pulled"):
        say("alpine: Downloading 1/3")
    state["alive"] = None
    with pytest.raises(SystemFailure, match="pid 7"):
        say("alpine: Downloading 2/3")
    assert said == ["Pulling docker image alpine ..."]


def test_the_domain_limits_come_from_the_limits_section(settings):
    # defaults: each of the 2 vCPUs one core, 200 MB/s and 5000 IOPS each way, no network cap
    assert boot.vm_limits(settings) == Limits(200_000, 200_000_000, 5000, 0)
    custom = dataclasses.replace(
        settings,
        vm=VMSettings(vcpus=4),
        limits=LimitSettings(cpu_percent=50, disk_mbps=0, disk_iops=0, net_mbit=100),
    )
    assert boot.vm_limits(custom) == Limits(200_000, 0, 0, 12207)


ORPHAN = textwrap.dedent(
    """
    import sys, time
    from executor.errors import SystemFailure
    from executor.stages.prepare import _runner_watch
    runner_alive = _runner_watch()
    print("watching", flush=True)
    for _ in range(200):
        try:
            runner_alive()
        except SystemFailure as exc:
            print(exc, flush=True)
            sys.exit(0)
        time.sleep(0.1)
    print("never noticed", flush=True)
    """
)


def test_a_prepare_whose_runner_process_dies_notices(tmp_path):
    # A real process tree: "runner" starts "prepare" and is killed; prepare is re-parented.
    out = tmp_path / "prepare.out"
    runner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
            "stdout=open(sys.argv[2], 'w')); time.sleep(60)",
            ORPHAN,
            str(out),
        ]
    )
    lines = lambda: out.read_text().splitlines() if out.exists() else []  # noqa: E731
    try:
        assert poll(lambda: lines() == ["watching"], 10, interval=0.1)
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        assert poll(lambda: len(lines()) > 1, 10, interval=0.1)
    finally:
        runner.kill()
        runner.wait()
    said = lines()[1]
    assert said == (
        f"the runner process that started this prepare (pid {runner.pid}) is gone: "
        "nobody will use or clean up this job's VM, so it is removed now"
    )


def _loopback_mirror_settings(tmp_settings, port: int) -> Settings:
    """The mirror enabled on a subnet whose host address is 127.0.0.1, where a test server can
    answer (or nothing listens)."""
    libvirt = dataclasses.replace(tmp_settings.libvirt, subnet="127.0.0.0/24")
    docker = dataclasses.replace(tmp_settings.docker, registry_mirrors=("http://operators-own",))
    mirror = dataclasses.replace(tmp_settings.mirror, enabled=True, port=port)
    return dataclasses.replace(tmp_settings, libvirt=libvirt, docker=docker, mirror=mirror)


def test_a_mirror_that_does_not_answer_is_left_out_and_the_job_log_says_so_once(tmp_settings):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    lines: list[str] = []
    mirrors = boot.registry_mirrors(_loopback_mirror_settings(tmp_settings, port), lines.append)
    assert mirrors == ["http://operators-own"]
    assert len(lines) == 1
    assert f"the registry mirror http://127.0.0.1:{port} is not answering" in lines[0]
    assert "pulls Docker Hub images from Docker Hub directly" in lines[0]


def test_an_answering_mirror_comes_first_and_its_port_is_open_to_the_vm(tmp_settings):
    class Registry(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = _loopback_mirror_settings(tmp_settings, server.server_address[1])
        lines: list[str] = []
        mirrors = boot.registry_mirrors(settings, lines.append)
    finally:
        server.shutdown()
        server.server_close()
    assert mirrors == [f"http://127.0.0.1:{server.server_address[1]}", "http://operators-own"] and lines == []
    assert boot.daemon_json(settings, "127.0.0.10", mirrors)["registry-mirrors"] == mirrors
    policy = boot.network_policy(settings, JOB.gitlab_host)
    assert server.server_address[1] in policy.host_ports


def test_a_job_asking_for_more_than_the_maxima_is_its_failure_before_anything_is_made(hv, settings):
    asking = dataclasses.replace(JOB, size_request=(("LVX_VCPUS", "3"),))
    with pytest.raises(JobRefused, match=r"LVX_VCPUS=3, more than this runner allows \(vm.max_vcpus = 2\)"):
        prepare_stage.prepare(settings, asking, out=lambda line: None)
    assert left_on_host(hv, settings) == {}


def test_admission_counts_the_size_the_job_got(hv, settings):
    roomy = dataclasses.replace(settings, vm=VMSettings(max_disk_gib=4096))
    asking = dataclasses.replace(JOB, size_request=(("LVX_DISK_GIB", "4096"),))
    with pytest.raises(SystemFailure, match="and a new job's disk may grow to 4096.0 GiB"):
        prepare_stage.prepare(roomy, asking, out=lambda line: None)
    assert left_on_host(hv, roomy) == {}
