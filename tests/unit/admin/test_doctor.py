"""`executor.admin.doctor` against libvirt's test driver, a fake base image and local HTTP servers."""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from executor import cli
from executor.adapters import hostinfo
from executor.adapters.hypervisor import Hypervisor
from executor.admin import doctor as doctor_module
from executor.admin.doctor import doctor
from executor.core.nwfilter_xml import build_job_filter

VIRTUAL = 4 * 1024**3


def fake_image(directory, *, virtual=VIRTUAL, lie_about_kernel=False):
    directory.mkdir(parents=True, exist_ok=True)
    header = (
        b"QFI\xfb"
        + (3).to_bytes(4, "big")
        + (0).to_bytes(8, "big")
        + (0).to_bytes(8, "big")
        + virtual.to_bytes(8, "big")
    )
    (directory / "disk.qcow2").write_bytes(header + b"\0" * 480)
    (directory / "vmlinuz").write_bytes(b"k" * 100)
    (directory / "initrd.img").write_bytes(b"i" * 50)
    manifest = {
        "disk": "disk.qcow2",
        "kernel": "vmlinuz",
        "initrd": "initrd.img",
        "cmdline": "console=ttyS0",
        "kernel_version": "6.1.0-test",
        "built_at": "2026-01-01T00:00:00+00:00",
        "sizes": {
            "disk_bytes": 512,
            "virtual_bytes": VIRTUAL,
            "kernel_bytes": 101 if lie_about_kernel else 100,
            "initrd_bytes": 50,
        },
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(autouse=True)
def policy_in_place(monkeypatch):
    """libvirt's test driver has no nwfilter support: stand in for our filter being defined, and
    for br_netfilter being on, unless a test says otherwise."""
    monkeypatch.setattr(Hypervisor, "nwfilter_xml", lambda self, name: build_job_filter(name))
    monkeypatch.setattr(hostinfo, "bridge_netfilter", lambda: True)


def write_config(
    tmp_path, *, mirrors=(), uri="test:///default", extra="", nwfilter="lvx-job", mirror="enabled = false\n"
):
    (tmp_path / "state").mkdir(mode=0o700, exist_ok=True)
    (tmp_path / "console").mkdir(exist_ok=True)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[libvirt]\nuri = "{uri}"\npool = "default-pool"\nnetwork = "default"\nnwfilter = "{nwfilter}"\n'
        f'[image]\ndir = "{tmp_path / "image"}"\n'
        f'[paths]\nstate_dir = "{tmp_path / "state"}"\nconsole_log_dir = "{tmp_path / "console"}"\n'
        f"[mirror]\n{mirror}"
        '[metrics]\nlisten = ""\n'  # the host's own agent may serve the default address
        f"[docker]\nregistry_mirrors = {json.dumps(list(mirrors))}\n{extra}"
    )
    return str(config)


def by_name(checks):
    return {c.name: c for c in checks}


def test_healthy_host_passes_every_check(hv, tmp_path):
    fake_image(tmp_path / "image")
    seen = []
    checks = doctor(write_config(tmp_path), out=seen.append)
    assert seen == checks
    kvm_device = ["kvm device"] if os.path.exists("/dev/kvm") else []  # checked only where there is one
    assert [c.name for c in checks] == [
        "config",
        "state dirs",
        "libvirt",
        "accelerator",
        *kvm_device,
        "storage pool",
        "disk space",
        "headroom",
        "network",
        "network policy",
        "base image",
        "gitlab-runner",
        "registry mirror",
    ]
    assert all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    assert by_name(checks)["accelerator"].detail.startswith("TCG")  # the test driver offers no KVM
    assert by_name(checks)["base image"].line().startswith("ok    base image    ")


def test_gitlab_runner_missing_warns_configured_passes_and_the_host_cache_shows_its_use(hv, tmp_path, monkeypatch):
    fake_image(tmp_path / "image")
    monkeypatch.setenv("PATH", "/nonexistent")
    missing = by_name(doctor(write_config(tmp_path)))["gitlab-runner"]
    assert missing.ok and missing.warning
    assert missing.line().startswith("warn  gitlab-runner no gitlab-runner binary on PATH: jobs run, but artifacts")
    assert "-> fix: install gitlab-runner on this host, or set runner.binary" in missing.line()
    binary = tmp_path / "gitlab-runner"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    cache = tmp_path / "hostcache"
    extra = (
        f'[runner]\nbinary = "{binary}"\n[cache]\nmode = "host"\ndir = "{cache}"\nmax_gib = 0.1\nmax_total_gib = 0.5\n'
    )
    checks = by_name(doctor(write_config(tmp_path, extra=extra)))
    assert checks["gitlab-runner"].line().startswith(f"ok    gitlab-runner {binary} goes into every job VM")
    assert checks["host cache"].ok and f"{cache}: 0.00 of 0.5 GiB used" in checks["host cache"].detail
    binary.unlink()
    assert by_name(doctor(write_config(tmp_path, extra=extra)))["gitlab-runner"].ok is False


def test_missing_image_fails_with_the_fix(hv, tmp_path):
    check = by_name(doctor(write_config(tmp_path)))["base image"]
    assert check.ok is False
    assert "manifest.json is missing" in check.detail
    assert check.line().endswith("-> fix: libvirt-executor image build")


def test_image_not_matching_its_manifest_fails(hv, tmp_path):
    fake_image(tmp_path / "image", lie_about_kernel=True)
    check = by_name(doctor(write_config(tmp_path)))["base image"]
    assert check.ok is False and "vmlinuz is 100 bytes, the manifest says 101" in check.detail

    fake_image(tmp_path / "image", virtual=VIRTUAL * 2)
    check = by_name(doctor(write_config(tmp_path)))["base image"]
    assert check.ok is False and "virtual size" in check.detail

    (tmp_path / "image" / "disk.qcow2").write_bytes(b"\0" * 512)
    check = by_name(doctor(write_config(tmp_path)))["base image"]
    assert check.ok is False and "is not a qcow2 image" in check.detail


def test_invalid_config_fails_and_skips_the_rest(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[vm]\nvcpus = 0\n")
    checks = doctor(str(config))
    assert checks[0].name == "config" and checks[0].ok is False and "vm.vcpus" in checks[0].detail
    assert all(c.ok is None for c in checks[1:]) and len(checks) > 5


def test_unreachable_libvirt_fails(tmp_path):
    fake_image(tmp_path / "image")
    checks = by_name(doctor(write_config(tmp_path, uri="qemu+unix:///system?socket=/nonexistent/sock")))
    assert checks["libvirt"].ok is False and "libvirtd -d" in checks["libvirt"].fix
    assert checks["network"].ok is None and checks["base image"].ok is True


def test_missing_pool_and_network_fail(hv, tmp_path):
    fake_image(tmp_path / "image")
    text = (
        Path(write_config(tmp_path))
        .read_text()
        .replace('"default-pool"', '"nopool"')
        .replace('network = "default"', 'network = "nonet"')
    )
    (tmp_path / "config.toml").write_text(text)
    checks = by_name(doctor(str(tmp_path / "config.toml")))
    assert checks["storage pool"].ok is False and checks["storage pool"].fix == "libvirt-executor setup"
    assert checks["disk space"].ok is None
    assert checks["headroom"].ok is None and "does not exist" in checks["headroom"].detail
    assert checks["network"].ok is False and "does not exist" in checks["network"].detail


def test_too_little_disk_space_fails(hv, tmp_path):
    fake_image(tmp_path / "image")
    checks = by_name(doctor(write_config(tmp_path, extra="[vm]\ndisk_gib = 4000\n")))
    assert checks["disk space"].ok is False and "less than one job's disk" in checks["disk space"].detail
    headroom = checks["headroom"]
    assert headroom.ok is False
    assert headroom.detail.startswith("prepare refuses jobs now: the storage pool has 100.0 GiB free")
    assert "a new job's disk may grow to 4000.0 GiB" in headroom.detail


def test_headroom_counts_the_jobs_that_fit_and_the_disks_already_in_the_pool(hv, tmp_path, monkeypatch):
    fake_image(tmp_path / "image")
    # The host's memory is what it is; stand in for a roomy one so that the pool decides.
    monkeypatch.setattr(hostinfo, "memory_available", lambda: 64 * 1024**3)
    checks = by_name(doctor(write_config(tmp_path)))
    # libvirt's test pool: 100 GiB free; (100 - 2) // 20
    assert checks["headroom"].ok is True
    assert checks["headroom"].detail.startswith("room for 4 more job VM(s) now: pool 100.0 GiB free, 0.0 GiB")
    overlay = (
        "<volume><name>lvx-job-1-disk.qcow2</name><capacity unit='GiB'>60</capacity>"
        "<allocation unit='GiB'>1</allocation><target><format type='qcow2'/></target></volume>"
    )
    hv.create_volume("default-pool", overlay)
    checks = by_name(doctor(write_config(tmp_path)))
    assert "room for 1 more job VM(s) now" in checks["headroom"].detail
    assert "59.0 GiB of it promised to existing disks" in checks["headroom"].detail


def test_too_little_memory_fails_headroom_unless_admission_is_off(hv, tmp_path, monkeypatch):
    fake_image(tmp_path / "image")
    monkeypatch.setattr(hostinfo, "memory_available", lambda: 1024 * 1024**2)  # a busy host
    checks = by_name(doctor(write_config(tmp_path)))
    assert checks["headroom"].ok is False
    assert "the host has 1024 MiB of memory available, the running VMs may still take" in checks["headroom"].detail
    assert "a job VM needs 2048 MiB" in checks["headroom"].detail
    off = by_name(doctor(write_config(tmp_path, extra="[admission]\nenabled = false\n")))
    assert off["headroom"].ok is True and "admission control is off" in off["headroom"].detail


class _Registry(http.server.BaseHTTPRequestHandler):
    status = 401

    def do_GET(self):
        self.send_response(self.status if self.path == "/v2/" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def registry():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_mirror_reachable_and_unreachable(hv, tmp_path, registry):
    fake_image(tmp_path / "image")
    dead = http.server.HTTPServer(("127.0.0.1", 0), _Registry)
    dead_url = f"http://127.0.0.1:{dead.server_address[1]}"
    dead.server_close()  # nothing listens there now
    checks = [c for c in doctor(write_config(tmp_path, mirrors=[registry, dead_url])) if c.name == "mirror"]
    assert [c.ok for c in checks] == [True, False]
    assert "answers on /v2/" in checks[0].detail and "unreachable" in checks[1].detail  # 401 (auth) is up


def loopback_mirror_config(tmp_path, upstream, port):
    """A config whose mirror is enabled on a subnet with 127.0.0.1 as the host's address, so that
    the mirror's URL is one a test server on loopback answers (the subnet is not used otherwise)."""
    keys = f'port = {port}\nupstream = "{upstream}"\nstorage = "{tmp_path / "mirror"}"\n'
    config = Path(write_config(tmp_path, mirror=keys))
    config.write_text(config.read_text().replace("[libvirt]\n", '[libvirt]\nsubnet = "127.0.0.0/24"\n'))
    return str(config)


def test_our_mirror_answering_listening_only_there_with_its_upstream(hv, tmp_path, registry):
    fake_image(tmp_path / "image")
    port = int(registry.rsplit(":", 1)[1])
    checks = by_name(doctor(loopback_mirror_config(tmp_path, registry, port)))
    assert checks["registry mirror"].ok, checks["registry mirror"].line()
    assert f"http://127.0.0.1:{port} answers (port {port} open to job VMs" in checks["registry mirror"].detail
    assert checks["mirror listen"].ok, checks["mirror listen"].line()
    assert checks["mirror upstream"].ok and registry in checks["mirror upstream"].detail


def test_our_mirror_down_and_another_listener_on_its_port(hv, tmp_path):
    fake_image(tmp_path / "image")
    other = socket.create_server(("127.0.0.2", 0))  # a service on the mirror's port, another address
    port = other.getsockname()[1]
    try:
        checks = by_name(doctor(loopback_mirror_config(tmp_path, "http://127.0.0.1:1", port)))
    finally:
        other.close()
    mirror = checks["registry mirror"]
    assert mirror.ok is False and "does not answer" in mirror.detail and "it is not running" in mirror.detail
    assert "mirror start" in mirror.fix
    assert checks["mirror listen"].ok is False and f"127.0.0.2:{port}" in checks["mirror listen"].detail
    upstream = checks["mirror upstream"]  # jobs still run: a warning
    assert upstream.ok and upstream.warning and "http://127.0.0.1:1 unreachable" in upstream.detail


def test_boot_probe_is_skipped_when_a_check_failed(hv, tmp_path):
    checks = doctor(write_config(tmp_path), boot=True)  # no image
    assert checks[-1].name == "boot" and checks[-1].ok is None


def test_cli_doctor_exit_codes(hv, tmp_path, capsys):
    config = write_config(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", config, "doctor"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "FAIL  base image" in captured.out and "1 check(s) failed: base image" in captured.err
    fake_image(tmp_path / "image")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", config, "doctor"])
    assert exit_info.value.code == 0
    assert "FAIL" not in capsys.readouterr().out


def test_kvm_device_check(tmp_path):
    assert doctor_module._check_kvm_device(str(tmp_path / "absent")) is None
    device = tmp_path / "kvm"
    device.write_text("")
    device.chmod(0o600)
    check = doctor_module._check_kvm_device(str(device))
    assert check.ok is False and "0600" in check.detail
    assert check.line().endswith(
        f"-> fix: chgrp kvm {device} && chmod 0660 {device} (what udev does; scripts/setup.sh does it)"
    )
    device.chmod(0o666)
    assert doctor_module._check_kvm_device(str(device)).ok is True


def test_boot_probe_reports_an_unexpected_prepare_error_and_a_failed_cleanup(tmp_settings, monkeypatch):
    # Before: a non-project error in prepare left `detail` unset, and a failing cleanup after it
    # then crashed doctor with UnboundLocalError instead of reporting the check.
    def prepare(settings, job, out):
        raise RuntimeError("disk on fire")

    def cleanup(settings, job):
        raise doctor_module.SystemFailure("cleanup of lvx-job-1 incomplete: overlay: busy")

    monkeypatch.setattr(doctor_module, "prepare", prepare)
    monkeypatch.setattr(doctor_module, "cleanup", cleanup)
    (check,) = doctor_module._boot_probe(tmp_settings)
    assert check.name == "boot" and check.ok is False
    assert "unexpected RuntimeError: disk on fire" in check.detail
    assert "its cleanup failed: cleanup of lvx-job-1 incomplete" in check.detail


def test_boot_probe_passes_with_prepare_s_timings_line(tmp_settings, monkeypatch):
    cleaned = []
    monkeypatch.setattr(doctor_module, "prepare", lambda settings, job, out: out("lvx-job-1 ready at 10.0.0.9"))
    monkeypatch.setattr(doctor_module, "cleanup", lambda settings, job: cleaned.append(job.job_id))
    (check,) = doctor_module._boot_probe(tmp_settings)  # the mirror is off in tmp_settings
    assert check.ok is True and check.detail == "lvx-job-1 ready at 10.0.0.9"
    assert cleaned and cleaned[0] >= doctor_module.PROBE_JOB_ID_BASE


def test_network_policy_check_passes_and_names_what_is_open(hv, tmp_path):
    fake_image(tmp_path / "image")
    check = by_name(doctor(write_config(tmp_path, extra="[network]\nallow_host_ports = [5000]\n")))["network policy"]
    assert check.ok is True and "host ports 53, 5000" in check.detail and "IPv6 dropped" in check.detail


@pytest.mark.parametrize(
    ("nwfilter", "defined", "bridged", "says", "fix"),
    [
        ("clean-traffic", "ours", True, "can reach the host's services", 'set libvirt.nwfilter = "lvx-job"'),
        ("", "ours", True, "no nwfilter: job VMs can reach", 'set libvirt.nwfilter = "lvx-job"'),
        ("lvx-job", None, True, "nwfilter lvx-job does not exist", "libvirt-executor setup"),
        ("lvx-job", "old", True, "differs from this version's rules", "libvirt-executor setup"),
        ("lvx-job", "ours", False, "bridge-nf-call-iptables = 0", "modprobe br_netfilter"),
        ("lvx-job", "ours", None, "br_netfilter is not loaded", "modprobe br_netfilter"),
    ],
)
def test_network_policy_check_fails_with_the_fix(hv, tmp_path, monkeypatch, nwfilter, defined, bridged, says, fix):
    xml = {
        "ours": build_job_filter("lvx-job"),
        "old": "<filter name='lvx-job' chain='root'><filterref filter='clean-traffic'/></filter>",
        None: None,
    }[defined]
    monkeypatch.setattr(Hypervisor, "nwfilter_xml", lambda self, name: xml)
    monkeypatch.setattr(hostinfo, "bridge_netfilter", lambda: bridged)
    fake_image(tmp_path / "image")
    check = by_name(doctor(write_config(tmp_path, nwfilter=nwfilter)))["network policy"]
    assert check.ok is False and says in check.detail and fix in check.fix


def test_a_pool_without_its_agent_fails_and_with_a_fresh_agent_passes(hv, tmp_path):
    from executor.adapters.hostfiles import load_settings
    from executor.adapters.statedir import StateDir
    from executor.agent import client

    fake_image(tmp_path / "image")
    config = write_config(tmp_path, extra="[pool]\nsize = 2\n")
    check = by_name(doctor(config))["warm pool"]
    assert check.ok is False and "pool.size = 2 but no host agent runs: every job boots cold" in check.detail
    assert check.line().endswith("-> fix: libvirt-executor agent start")
    settings = load_settings(config)
    StateDir(settings.paths.state_dir).write_agent_status(settings.vm.name_prefix, {"updated": int(time.time())})
    with client.service(settings).hold():
        check = by_name(doctor(config))["warm pool"]
    assert check.ok and check.detail == f"agent pid {os.getpid()}: 0 of 2 idle, 0 booting, 0 in a job"
    assert "warm pool" not in by_name(doctor(write_config(tmp_path)))  # no pool, no check


def test_our_mirror_serving_its_cache_only_is_a_warning_with_since_when_and_why(hv, tmp_path, registry):
    from executor.adapters.hostfiles import load_settings
    from executor.admin import mirror as mirror_admin

    fake_image(tmp_path / "image")
    port = int(registry.rsplit(":", 1)[1])
    config = loopback_mirror_config(tmp_path, "http://127.0.0.1:1", port)
    settings = load_settings(config)
    mdir = mirror_admin.mirror_dir(settings)
    mdir.root.mkdir(parents=True)
    mdir.write_mode(
        {"mode": "cache-only", "since": 1_800_000_000, "reason": "connection refused", "upstream": "http://127.0.0.1:1"}
    )
    with mirror_admin.supervisor(settings).hold():  # the supervisor that wrote it runs
        checks = by_name(doctor(config))
        status = mirror_admin.format_status(mirror_admin.status(settings))
    mirror = checks["registry mirror"]
    assert mirror.ok and mirror.warning, mirror.line()
    assert mirror.line().startswith("warn  registry mirror")
    because = "upstream http://127.0.0.1:1 unreachable since 2027-01-15 08:00:00 UTC (connection refused)"
    assert f"serving its cache only (0 repositories, read-only): {because}" in mirror.detail
    assert f"mode        serving its cache only, read-only: {because}; it pulls through again" in status
    # without a supervisor the file is a leftover and says nothing
    assert "serving its cache only" not in by_name(doctor(config))["registry mirror"].detail


def test_doctor_says_whether_the_agent_serves_healthy_metrics(tmp_settings):
    import dataclasses
    import socket

    from executor.adapters.prometheus import MetricsServer
    from executor.admin.doctor import _check_metrics
    from executor.core.settings import MetricsSettings

    healthy = {"ok": True}
    server = MetricsServer("127.0.0.1", 0, list, lambda: (healthy["ok"], {"last_error": "libvirtd\x1b[2J gone"}))
    try:
        settings = dataclasses.replace(tmp_settings, metrics=MetricsSettings(listen=f"127.0.0.1:{server.port}"))
        assert _check_metrics(settings).ok is True
        healthy["ok"] = False
        check = _check_metrics(settings)
        assert check.ok is False and "unhealthy" in check.detail and "\x1b" not in check.detail
    finally:
        server.close()
    with socket.socket() as unused:  # a loopback port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    check = _check_metrics(dataclasses.replace(tmp_settings, metrics=MetricsSettings(listen=f"127.0.0.1:{port}")))
    assert check.ok is True and check.warning and "nothing answers" in check.detail
