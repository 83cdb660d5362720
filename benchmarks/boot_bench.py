#!/usr/bin/env python3
"""Boot benchmark: our image through the real executor vs. a stock-Debian baseline, same run.

For N boots of each (alternating ours, baseline, ours, ... so load drifts hit both), measures
from the moment libvirt's domain create returns:

  (a) start -> SSH accepting our key, (b) start -> `docker` answering inside the VM,

and the per-clone overlay's allocated size once docker answers, plus both base images' sizes.

* ours: `RunnerSim(...).prepare()` (the executor's real prepare stage, in its own process, with a
  bench config: prefix `lvxbench`, state and console dirs in a temp dir); (a) and (b) are parsed
  from its timings line (boot-to-ssh, boot-to-ssh + ssh-to-docker); then `cleanup()`.
* baseline: the same Debian packages plus systemd-sysv, booted the stock way (systemd, DHCP by
  systemd-networkd, Debian's initramfs-tools initrd), built by
  `benchmarks/baseline_image.py` with the real image's build steps and cached like it. A qcow2
  overlay on it, a domain from the same `domain_xml.build_domain` (same vCPUs, memory, CPU and
  devices, minus the seed disk) on libvirt's `default` network (DHCP). The VM's address comes
  from the network's DHCP leases (the way GitLab's libvirt example finds it), then paramiko
  (`GuestSSH.connect`, the baseline's host key pinned) until SSH accepts, then
  dockerd's API `/_ping` over SSH (the probe `prepare` uses) until it answers.

Figures, not pass/fail. Run as root on a set-up host (see benchmarks/README.md):
    .venv/bin/python benchmarks/boot_bench.py --boots 3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import baseline_image  # beside this script
import libvirt

from executor.adapters.guest_ssh import GuestSSH, SSHNotReady
from executor.adapters.hostfiles import console_tail, load_base_image, load_settings
from executor.adapters.hypervisor import Hypervisor
from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core.domain_xml import JobRecord, VMSpec, build_domain, build_overlay_volume, parse_job_record
from executor.core.settings import PathSettings, Settings, config_path, settings_toml
from executor.core.waiting import wait_until
from executor.errors import SystemFailure
from executor.jobvm.accel import choose_accel
from executor.testing.runnersim import RunnerSim, kill_group

PREFIX = "lvxbench"
BASELINE_PREFIX = f"{PREFIX}-baseline-"
BASELINE_NETWORK = "default"
HOLD_OWNER = f"{PREFIX}-address-hold"  # reservations that keep our VMs off addresses others use
TIMINGS_RE = re.compile(
    r"ready at (?P<ip>\S+) \((?:cold|pool), (?P<accel>\w+)[^)]*\): clone (?P<clone>[\d.]+)s, boot-to-ssh (?P<ssh>[\d.]+)s, "
    r"ssh-to-docker (?P<docker>[\d.]+)s, total (?P<total>[\d.]+)s"
)
# The same probe prepare waits on for our image: the daemon's API answering on its socket.
# The baseline's dockerd has no TCP port: its API's /_ping over the socket, through SSH. (Ours
# is timed by prepare, which asks the same /_ping over the VM's TLS port.)
DOCKER_PROBE = "curl -sf --max-time 10 --unix-socket /var/run/docker.sock http://docker/_ping"
MIB = 1024**2


class BenchError(Exception):
    pass


@dataclass
class Boot:
    kind: str  # "ours" | "baseline"
    n: int
    ssh: float = 0.0  # domain start -> SSH accepting
    docker: float = 0.0  # domain start -> docker answering
    overlay_bytes: int = 0  # allocated bytes of the clone's overlay once docker answers
    ip: str = ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------ libvirt


class Libvirt:
    """A libvirt connection that outlives a libvirtd restart (shared hosts: tests restart it).
    A VM keeps running while libvirtd restarts, so the measurement goes on; only the call that
    hit the dead connection is repeated on a new one."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.conn: libvirt.virConnect | None = None
        self._open(deadline=time.monotonic() + 5)

    def _open(self, deadline: float) -> None:
        while True:
            try:
                self.conn = libvirt.open(self.uri)
                self.hv = Hypervisor(self.conn, naming.METADATA_NS)
                return
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def _alive(self) -> bool:
        try:
            return bool(self.conn.isAlive())
        except libvirt.libvirtError:
            return False

    def call(self, fn, attempts: int = 3):
        """fn(hv, conn), repeated on a fresh connection if libvirtd went away under it."""
        for attempt in range(attempts):
            try:
                return fn(self.hv, self.conn)
            except (SystemFailure, libvirt.libvirtError):
                if self._alive() or attempt == attempts - 1:
                    raise
                print("  (libvirtd connection lost: reconnecting)", file=sys.stderr)
                with contextlib.suppress(libvirt.libvirtError):
                    self.conn.close()
                self._open(deadline=time.monotonic() + 60)

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()


# ------------------------------------------------------------------ config


def write_bench_config(host_config: str, workdir: Path) -> Path:
    """The host config with our own name prefix and state/console dirs under `workdir`."""
    host = load_settings(host_config)
    settings = dataclasses.replace(
        host,
        vm=dataclasses.replace(host.vm, name_prefix=PREFIX),
        paths=PathSettings(state_dir=str(workdir / "state"), console_log_dir=str(workdir / "console")),
    )
    path = workdir / "config.toml"
    path.write_text(settings_toml(settings))
    return path


def hold_addresses(settings: Settings, host: Settings, lv: Libvirt) -> str:
    """Reserve, in the bench state dir, every VM address except one nobody uses, so the executor
    (which allocates the first free one) picks that. Other executors and test runs on this host
    keep their reservations in their own state dirs; without this we would take .10 like them."""
    in_use = set(StateDir(host.paths.state_dir).reservations())
    for info in lv.call(lambda hv, _c: hv.domains()):
        record = parse_job_record(info.metadata) if info.metadata else None
        if record and record.ip:
            in_use.add(record.ip)
    candidates = [str(a) for a in naming.vm_addresses(settings.subnet)]
    free = [ip for ip in reversed(candidates) if ip not in in_use]
    if not free:
        raise BenchError("no unused VM address in the subnet")
    state = StateDir(settings.paths.state_dir)
    state.ensure()
    for ip in candidates:
        path = state.leases / ip
        if ip == free[0]:
            if path.exists() and path.read_text().strip() == HOLD_OWNER:
                path.unlink()
        elif not path.exists():
            path.write_text(HOLD_OWNER + "\n")
    return free[0]


# ------------------------------------------------------------------ ours


def boot_ours(config: Path, settings: Settings, lv: Libvirt, workdir: Path, n: int, host: Settings) -> Boot:
    expected_ip = hold_addresses(settings, host, lv)
    job_id = 900000 + (os.getpid() % 1000) * 100 + n
    vm = naming.vm_name(PREFIX, job_id)
    sim = RunnerSim(config, workdir / f"ours-{n}", job_id)
    boot = Boot("ours", n)
    started = time.monotonic()
    proc = sim.start("prepare")
    try:
        try:
            result = sim.finish(proc, started, timeout=settings.timeouts.boot + settings.timeouts.docker + 120)
        except BaseException:
            kill_group(proc, signal.SIGTERM)  # the executor rolls back on SIGTERM
            proc.wait(timeout=settings.timeouts.cleanup + 30)
            raise
        m = TIMINGS_RE.search(result.stdout)
        if result.rc != 0 or not m:
            raise BenchError(f"prepare of {vm} failed:\n{result.describe()}")
        boot.ssh = float(m["ssh"])
        boot.docker = float(m["ssh"]) + float(m["docker"])
        boot.ip = m["ip"]
        boot.extra = {"accel": m["accel"], "clone": float(m["clone"]), "prepare_total": float(m["total"])}
        if boot.ip != expected_ip:
            print(f"  note: {vm} got {boot.ip}, expected {expected_ip}", file=sys.stderr)
        overlay = lv.call(lambda hv, _c: hv.volume_path(settings.libvirt.pool, naming.overlay_volume_name(vm)))
        if overlay is None:
            raise BenchError(f"overlay volume of {vm} not found")
        boot.overlay_bytes = os.stat(overlay).st_blocks * 512
    finally:
        c = sim.cleanup()
        if c.rc != 0:
            print(f"  WARNING: cleanup of {vm} failed:\n{c.describe()}", file=sys.stderr)
    return boot


# ------------------------------------------------------------------ baseline


def baseline_domain_xml(spec: VMSpec) -> str:
    """Our domain XML (same vCPUs, memory, CPU, devices) minus the seed disk, retitled."""
    root = ET.fromstring(build_domain(spec))
    devices = root.find("devices")
    for disk in devices.findall("disk"):
        target = disk.find("target")
        if target is not None and target.get("dev") == "vdb":
            devices.remove(disk)
    root.find("title").text = "libvirt-executor boot benchmark baseline"
    return ET.tostring(root, encoding="unicode")


def random_mac() -> str:
    b = secrets.token_bytes(3)
    return f"52:54:00:{b[0]:02x}:{b[1]:02x}:{b[2]:02x}"


def remove_baseline_vm(lv: Libvirt, pool: str, name: str) -> None:
    lv.call(lambda hv, _c: hv.destroy(name))
    lv.call(lambda hv, _c: hv.undefine(name))
    lv.call(lambda hv, _c: hv.delete_volume(pool, name + ".qcow2"))


def boot_baseline(
    settings: Settings,
    lv: Libvirt,
    base: dict,
    base_dir: Path,
    choice,
    workdir: Path,
    n: int,
) -> Boot:
    name = f"{BASELINE_PREFIX}{n}"
    pool = settings.libvirt.pool
    mac = random_mac()
    boot = Boot("baseline", n)
    client_key = (base_dir / base["client_key"]).read_text()
    try:
        capacity = max(settings.vm.disk_gib * 1024**3, int(base["sizes"]["virtual_bytes"]))
        vol_xml = build_overlay_volume(name + ".qcow2", str(base_dir / base["disk"]), capacity)
        overlay = lv.call(lambda hv, _c: hv.create_volume(pool, vol_xml), attempts=1)
        now = int(time.time())
        record = JobRecord(
            vm=name,
            job_id=n,
            project_id=None,
            project="boot benchmark baseline",
            pipeline_id=None,
            runner_id=None,
            created=now,
            expires=now + 3600,
            ip="",
            accel=choice.accel,
            host_key=base["host_key"],
        )
        spec = VMSpec(
            name=name,
            memory_mib=settings.vm.memory_mib,
            vcpus=settings.vm.vcpus,
            kernel=str(base_dir / base["kernel"]),
            initrd=str(base_dir / base["initrd"]),
            cmdline=base["cmdline"],
            overlay_path=overlay,
            seed_path="",
            network=BASELINE_NETWORK,
            mac=mac,
            ip="",
            console_log=str(workdir / f"{name}.console.log"),
            record=record,
            domain_type=choice.domain_type,
            nwfilter="",
        )
        dom_xml = baseline_domain_xml(spec)
        lv.call(lambda hv, _c: hv.define_and_start(dom_xml), attempts=1)
        t0 = time.monotonic()

        def alive() -> None:
            info = lv.call(lambda hv, _c: hv.domain(name))
            if info is None or not info.active:
                raise BenchError(f"{name} stopped while booting")

        def lease() -> str | None:
            alive()
            leases = lv.call(lambda _hv, conn: conn.networkLookupByName(BASELINE_NETWORK).DHCPLeases(mac))
            for entry in leases:
                if entry.get("ipaddr") and entry.get("type", 0) == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                    return entry["ipaddr"]
            return None

        boot.ip = wait_until(lease, settings.timeouts.boot, f"a DHCP lease for {name}", interval=0.5, max_interval=0.5)
        boot.extra["lease"] = time.monotonic() - t0

        def ssh_up() -> GuestSSH | None:
            alive()
            try:
                return GuestSSH.connect(
                    boot.ip, base["user"], client_key, base["host_key"], settings.timeouts.ssh_connect
                )
            except SSHNotReady:
                return None

        left = settings.timeouts.boot - (time.monotonic() - t0)
        ssh = wait_until(ssh_up, left, f"SSH on {name} ({boot.ip})", interval=0.5, max_interval=1.0)
        boot.ssh = time.monotonic() - t0
        with ssh:

            def docker_up() -> bool:
                alive()
                try:
                    return ssh.capture(DOCKER_PROBE, timeout=15).succeeded
                except SystemFailure:
                    return False

            wait_until(docker_up, settings.timeouts.docker, f"docker in {name}", interval=0.3, max_interval=1.0)
            boot.docker = time.monotonic() - t0
        boot.overlay_bytes = os.stat(overlay).st_blocks * 512
        return boot
    except BaseException:
        tail = console_tail(workdir / f"{name}.console.log", lines=20, limit=16384)
        if tail:
            print(f"  last console lines of {name}:\n{tail}", file=sys.stderr)
        raise
    finally:
        remove_baseline_vm(lv, pool, name)


# ------------------------------------------------------------------ report


def _fmt_pair(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f} / {max(values):6.1f}"


def _ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):4.2f} / {max(a) / max(b):4.2f}"


def _mib(v: float) -> str:
    return f"{v / MIB:.1f} MiB"


def qemu_img_virtual(path: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "--force-share", "--output=json", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return int(json.loads(out)["virtual-size"])


def report(boots: list[Boot], images: dict[str, dict], meta: dict) -> str:
    ours = [b for b in boots if b.kind == "ours"]
    base = [b for b in boots if b.kind == "baseline"]
    o_ssh, b_ssh = [b.ssh for b in ours], [b.ssh for b in base]
    o_dock, b_dock = [b.docker for b in ours], [b.docker for b in base]
    o_ov, b_ov = [b.overlay_bytes for b in ours], [b.overlay_bytes for b in base]
    w = 34
    out = [
        f"libvirt-executor boot benchmark, {meta['date']}",
        f"host: {meta['host']}; accelerator: {meta['accel']} ({meta['accel_reason']})",
        f"VMs: {meta['vcpus']} vCPU, {meta['memory_mib']} MiB, one at a time, alternating ours/baseline; "
        f"{len(ours)}+{len(base)} boots",
        f"load average at start: {meta['load_start']}, at end: {meta['load_end']}",
        "",
        f"{'seconds from domain start':{w}} {'ours: median / max':>19} {'baseline: median / max':>23} "
        f"{'ours/baseline':>15}",
        f"{'  (a) SSH accepting':{w}} {_fmt_pair(o_ssh):>19} {_fmt_pair(b_ssh):>23} {_ratio(o_ssh, b_ssh):>15}",
        f"{'  (b) docker answering':{w}} {_fmt_pair(o_dock):>19} {_fmt_pair(b_dock):>23} {_ratio(o_dock, b_dock):>15}",
        f"{'  baseline: DHCP lease seen':{w}} {'(static IP)':>19} {_fmt_pair([b.extra['lease'] for b in base]):>23}",
        "",
        f"{'overlay allocated at docker-ready':{w}} {_mib(statistics.median(o_ov)) + ' / ' + _mib(max(o_ov)):>19} "
        f"{_mib(statistics.median(b_ov)) + ' / ' + _mib(max(b_ov)):>23}   (median / max)",
    ]
    for label, key in (
        ("base disk.qcow2 file size", "disk_bytes"),
        ("base disk virtual size", "virtual_bytes"),
        ("kernel + initrd", "boot_bytes"),
    ):
        fmt = (lambda v: f"{v / 1024**3:.1f} GiB") if key == "virtual_bytes" else _mib
        out.append(f"{label:{w}} {fmt(images['ours'][key]):>19} {fmt(images['baseline'][key]):>23}")
    out.append(f"{'init / network':{w}} {'lvx-init, static':>19} {'systemd, DHCP':>23}")
    ratio = statistics.median(o_dock) / statistics.median(b_dock)
    out += [
        "",
        f"goal docker-ready <= 0.5 x baseline: median ratio {ratio:.2f} -> {'met' if ratio <= 0.5 else 'NOT met'}",
        f"goal overlay < 50 MB at docker-ready: max {max(o_ov) / 1e6:.1f} MB -> "
        f"{'met' if max(o_ov) < 50e6 else 'NOT met'}",
        "",
        "per boot (seconds from domain start):",
    ]
    for b in boots:
        if b.kind == "ours":
            detail = f"prepare total {b.extra['prepare_total']:.1f} (clone {b.extra['clone']:.1f})"
        else:
            detail = f"DHCP lease {b.extra['lease']:.1f}"
        out.append(
            f"  {b.n}. {b.kind:8} ssh {b.ssh:5.1f}  docker {b.docker:5.1f}  overlay {_mib(b.overlay_bytes):>10}  "
            f"{b.ip:15}  {detail}"
        )
    return "\n".join(out)


def image_sizes(directory: Path, manifest: dict) -> dict:
    disk = directory / manifest["disk"]
    return {
        "disk_bytes": disk.stat().st_size,
        "virtual_bytes": qemu_img_virtual(disk),
        "boot_bytes": (directory / manifest["kernel"]).stat().st_size + (directory / manifest["initrd"]).stat().st_size,
    }


# ------------------------------------------------------------------ main


def cleanup_leftovers(lv: Libvirt, settings: Settings) -> None:
    """Remove baseline VMs/overlays a killed earlier run left (only `lvxbench-baseline-*`)."""
    pool = settings.libvirt.pool
    for info in lv.call(lambda hv, _c: hv.domains()):
        if info.name.startswith(BASELINE_PREFIX):
            print(f"removing leftover {info.name}", file=sys.stderr)
            remove_baseline_vm(lv, pool, info.name)
    for vol in lv.call(lambda hv, _c: hv.volume_names(pool)):
        if vol.startswith(BASELINE_PREFIX):
            print(f"removing leftover volume {vol}", file=sys.stderr)
            lv.call(lambda hv, _c, vol=vol: hv.delete_volume(pool, vol))


def _retry_once(boot):
    """One more try for a boot that failed for an outside reason (e.g. someone restarted libvirtd
    mid-prepare); the failed attempt is cleaned up and reported, not counted."""
    try:
        return boot()
    except (BenchError, SystemFailure) as exc:
        print(f"  boot failed, retrying once: {str(exc)[-2000:]}", file=sys.stderr)
        return boot()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=3, help="boots of each image (default 3)")
    ap.add_argument(
        "--config", help="executor config (default: $LIBVIRT_EXECUTOR_CONFIG or /etc/libvirt-executor/config.toml)"
    )
    ap.add_argument(
        "--baseline-dir",
        type=Path,
        default=baseline_image.OUTPUT,
        help=f"where the baseline image is built and cached (default {baseline_image.OUTPUT})",
    )
    ap.add_argument("--rebuild-baseline", action="store_true", help="rebuild the baseline even if it is up to date")
    ap.add_argument("--json", type=Path, help="also write the raw figures as JSON here")
    args = ap.parse_args(argv)
    if args.boots < 1:
        ap.error("--boots must be at least 1")

    # SIGTERM/SIGHUP end the run through the same path as Ctrl-C, so every finally cleans up.
    def _interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    host_config = config_path(args.config, os.environ)
    host = load_settings(host_config)
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())

    print(f"baseline image: {args.baseline_dir} (building if missing or out of date)", file=sys.stderr)
    t = time.monotonic()
    base = baseline_image.build_baseline(args.baseline_dir, force=args.rebuild_baseline)
    print(f"baseline image ready after {time.monotonic() - t:.0f} s", file=sys.stderr)
    ours_image = load_base_image(host.image.dir)

    workdir = Path(tempfile.mkdtemp(prefix="lvxbench-"))
    os.chmod(workdir, 0o755)  # virtlogd/qemu write the console logs here
    config = write_bench_config(host_config, workdir)
    settings = load_settings(str(config))
    boots: list[Boot] = []
    started_default = False
    lv = Libvirt(settings.libvirt.uri)
    try:
        cleanup_leftovers(lv, settings)
        net = lv.conn.networkLookupByName(BASELINE_NETWORK)
        if not net.isActive():
            net.create()
            started_default = True
        choice = choose_accel(settings, lv.hv)
        for n in range(1, args.boots + 1):
            print(f"boot {n}/{args.boots}: ours ...", file=sys.stderr, flush=True)
            boots.append(_retry_once(lambda n=n: boot_ours(config, settings, lv, workdir, n, host)))
            b = boots[-1]
            print(f"  ssh {b.ssh:.1f}s docker {b.docker:.1f}s overlay {_mib(b.overlay_bytes)}", file=sys.stderr)
            print(f"boot {n}/{args.boots}: baseline ...", file=sys.stderr, flush=True)
            boots.append(
                _retry_once(lambda n=n: boot_baseline(settings, lv, base, args.baseline_dir, choice, workdir, n))
            )
            b = boots[-1]
            print(
                f"  lease {b.extra['lease']:.1f}s ssh {b.ssh:.1f}s docker {b.docker:.1f}s "
                f"overlay {_mib(b.overlay_bytes)}",
                file=sys.stderr,
            )
    finally:
        if started_default:
            with contextlib.suppress(libvirt.libvirtError, SystemFailure):
                lv.call(lambda _hv, conn: conn.networkLookupByName(BASELINE_NETWORK).destroy())
        lv.close()

    accels = {b.extra["accel"] for b in boots if b.kind == "ours"}
    meta = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "host": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB, "
        f"{platform.system()} {platform.release()}",
        "accel": "/".join(sorted(accels)),
        "accel_reason": choice.reason,
        "vcpus": settings.vm.vcpus,
        "memory_mib": settings.vm.memory_mib,
        "load_start": load_start,
        "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    images = {
        "ours": image_sizes(ours_image.dir, ours_image.manifest),
        "baseline": image_sizes(args.baseline_dir, base),
    }
    print(report(boots, images, meta))
    if args.json:
        args.json.write_text(
            json.dumps({"meta": meta, "images": images, "boots": [b.__dict__ for b in boots]}, indent=2) + "\n"
        )
    subprocess.run(["rm", "-rf", str(workdir)], check=False)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}): VMs removed", file=sys.stderr)
        sys.exit(130)
    except (BenchError, SystemFailure) as exc:
        print(f"boot_bench: {exc}", file=sys.stderr)
        sys.exit(1)
