"""Operator commands: host set-up, list, reap and doctor.

`inventory` reads the host through the adapters (libvirt via `hypervisor`, the state directory via
`jobstate`, the console-log directory); `reaping.select` decides what is ours, what is expired
and what is orphaned; `reap` acts on that under each VM's lock, re-checking under the lock,
and removes a VM's pieces with the same `stages.teardown` cleanup uses.
"""

from __future__ import annotations

import fcntl
import grp
import ipaddress
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from executor import accel, naming, reaping, stages
from executor.domain_xml import build_dir_pool, build_nat_network, parse_job_record
from executor.errors import ConfigError, ExecutorError, SystemFailure
from executor.hypervisor import Hypervisor, connect
from executor.jobstate import StateDir
from executor.settings import Settings, load_settings
from executor.waiting import signals_deferred

log = logging.getLogger(__name__)

SOURCE_EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def setup_host(config_file: str, example: str | None = None) -> list[str]:
    """Create the config (if missing), directories, storage pool and network. Idempotent:
    returns what it changed, an empty list when the host was already set up."""
    changes: list[str] = []
    config = Path(config_file)
    if not config.exists():
        template = Path(example) if example else SOURCE_EXAMPLE
        if not template.is_file():
            raise ConfigError(f"{config} does not exist and no template found at {template} (pass --example)")
        config.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.copyfile(template, config)
        os.chmod(config, 0o644)
        changes.append(f"wrote {config} from {template}")
    settings = load_settings(str(config))

    for directory, mode in (
        (settings.paths.state_dir, 0o700),
        (settings.paths.console_log_dir, 0o700),
        (settings.image.dir, 0o755),
    ):
        path = Path(directory)
        if not path.is_dir():
            path.mkdir(mode=mode, parents=True)
            changes.append(f"created {path}")
    StateDir(settings.paths.state_dir).ensure()

    net = settings.network
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        if hv.ensure_pool(settings.libvirt.pool, build_dir_pool(settings.libvirt.pool, settings.libvirt.pool_path)):
            changes.append(f"storage pool {settings.libvirt.pool} at {settings.libvirt.pool_path} defined and started")
        network_xml = build_nat_network(
            settings.libvirt.network,
            settings.libvirt.bridge,
            str(settings.gateway),
            str(ipaddress.IPv4Network(net).netmask),
        )
        if hv.ensure_network(settings.libvirt.network, network_xml):
            changes.append(f"network {settings.libvirt.network} ({net}, bridge {settings.libvirt.bridge}) defined and started")
    return changes


# --- inventory ------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _lock_held(path: Path) -> bool:
    """Whether a live process holds the flock on an existing lock file (never creates one)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock at once
    return False


def _console_log_vms(settings: Settings) -> list[str]:
    directory = Path(settings.paths.console_log_dir)
    if not directory.is_dir():
        return []
    suffix = naming.CONSOLE_LOG_SUFFIX
    return sorted(p.name[: -len(suffix)] for p in directory.glob("*" + suffix))


def inventory(
    settings: Settings,
    hv: Hypervisor | None = None,
    state: StateDir | None = None,
    *,
    only: str | None = None,
    probe_locks: bool = True,
) -> reaping.Inventory:
    """Everything on this host that could be ours. `only`: read just that VM's domain (reap's
    re-check under the VM's lock). `probe_locks=False` when the caller holds the lock itself."""
    if hv is None:
        with connect(settings.libvirt.uri, naming.METADATA_NS) as conn:
            return inventory(settings, conn, state, only=only, probe_locks=probe_locks)
    state = state or StateDir(settings.paths.state_dir)
    if only is None:
        infos = hv.domains()
    else:
        info = hv.domain(only)
        infos = [info] if info is not None else []
    domains = tuple(
        reaping.DomainEntry(i.name, i.state, parse_job_record(i.metadata) if i.metadata else None) for i in infos
    )
    lock_files = tuple(state.locked_vms())
    locked = frozenset(vm for vm in lock_files if probe_locks and _lock_held(state.lock_path(vm)))
    return reaping.Inventory(
        prefix=settings.vm.name_prefix,
        domains=domains,
        volumes=tuple(hv.volume_names(settings.libvirt.pool)),
        reservations=state.reservations(),
        lock_files=lock_files,
        job_dirs=tuple(state.job_dir_vms()),
        console_logs=tuple(_console_log_vms(settings)),
        locked=locked,
    )



def leftovers(settings: Settings, vm: str | None = None) -> dict[str, list[str]]:
    """Everything of this prefix (or of one VM) still on the host, per resource class, counted
    from the raw inventory rather than the reaper's rules. Empty means nothing is left."""
    inv = inventory(settings)
    if vm is None:
        def mine(name: str) -> bool:
            return reaping.is_our_name(inv.prefix, name)
    else:
        def mine(name: str) -> bool:
            return name == vm
    found = {
        "domains": [d.name for d in inv.domains if mine(d.name)],
        "volumes": [v for v in inv.volumes if mine(naming.vm_of_volume(inv.prefix, v) or "")],
        "ip_reservations": [ip for ip, owner in inv.reservations.items() if mine(owner)],
        "locks": [v for v in inv.lock_files if mine(v)],
        "job_dirs": [v for v in inv.job_dirs if mine(v)],
        "console_logs": [v for v in inv.console_logs if mine(v)],
    }
    return {k: sorted(v) for k, v in found.items() if v}

# --- list -----------------------------------------------------------------------------------


def list_vms(settings: Settings, now: float | None = None) -> dict:
    """Our VMs and orphaned pieces, as the stable structure `list --json` prints."""
    now = int(time.time() if now is None else now)
    inv = inventory(settings)
    vms = []
    for d in reaping.our_domains(inv):
        r = d.record
        assert r is not None
        vms.append(
            {
                "name": d.name,
                "job_id": r.job_id,
                "project_id": r.project_id,
                "project": r.project,
                "pipeline_id": r.pipeline_id,
                "runner_id": r.runner_id,
                "state": d.state,
                "ip": r.ip,
                "accel": r.accel,
                "created": r.created,
                "expires": r.expires,
                "age_s": now - r.created,
                "expires_in_s": r.expires - now,
                "expired": r.expires <= now,
                "busy": d.name in inv.locked,
            }
        )
    orphans = [
        {
            "vm": vm,
            "volumes": list(p.volumes),
            "ip_reservations": list(p.ips),
            "lock_file": p.lock_file,
            "job_dir": p.job_dir,
            "console_log": p.console_log,
            "busy": vm in inv.locked,
        }
        for vm, p in reaping.orphans(inv).items()
    ]
    unowned = sorted(ip for ip, owner in inv.reservations.items() if not owner)
    return {
        "format": 1,
        "prefix": settings.vm.name_prefix,
        "now": now,
        "vms": vms,
        "orphans": orphans,
        "unowned_ip_reservations": unowned,
    }


def format_json(listing: dict) -> str:
    return json.dumps(listing, indent=2, sort_keys=True)


def _clean(text: object) -> str:
    return _CONTROL.sub("?", str(text)) if text is not None else "-"


def format_table(listing: dict) -> str:
    lines: list[str] = []
    if listing["vms"]:
        header = ("NAME", "JOB", "PROJECT", "STATE", "IP", "AGE", "EXPIRES", "ACCEL")
        rows = [header]
        for vm in listing["vms"]:
            left = vm["expires_in_s"]
            expiry = f"in {reaping.format_duration(left)}" if left > 0 else f"{reaping.format_duration(left)} ago (due)"
            state = vm["state"] + (" (busy)" if vm["busy"] else "")
            rows.append(
                (
                    vm["name"],
                    str(vm["job_id"]),
                    _clean(vm["project"] or (f"#{vm['project_id']}" if vm["project_id"] else "-"))[:40],
                    state,
                    _clean(vm["ip"] or "-"),
                    reaping.format_duration(vm["age_s"]),
                    expiry,
                    _clean(vm["accel"] or "-"),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    else:
        lines.append(f"no VMs of this executor (prefix {listing['prefix']!r})")
    if listing["orphans"]:
        lines.append("")
        lines.append("pieces without a domain (`reap` removes them; busy = a stage is working on it now):")
        for o in listing["orphans"]:
            parts = [f"volume {v}" for v in o["volumes"]] + [f"IP {ip}" for ip in o["ip_reservations"]]
            parts += [what for what, present in (("job dir", o["job_dir"]), ("console log", o["console_log"]),
                                                  ("lock file", o["lock_file"])) if present]
            lines.append(f"  {o['vm']}{' (busy)' if o['busy'] else ''}: {', '.join(parts)}")
    if listing["unowned_ip_reservations"]:
        lines.append("")
        lines.append("IP reservations without an owner: " + ", ".join(listing["unowned_ip_reservations"]))
    return "\n".join(lines)


# --- reap -----------------------------------------------------------------------------------


@dataclass
class ReapResult:
    actions: list[str] = field(default_factory=list)  # one line per thing done (or, dry run, planned)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # busy VMs, or decisions that changed under the lock
    interrupted: bool = False


def _describe_target(target: reaping.Target, now: float) -> str:
    if target.reason == reaping.REASON_EXPIRED:
        assert target.domain is not None and target.domain.record is not None
        why = f"expired {reaping.format_duration(now - target.domain.record.expires)} ago"
    elif target.reason == reaping.REASON_OLDER_THAN:
        assert target.domain is not None and target.domain.record is not None
        why = f"created {reaping.format_duration(now - target.domain.record.created)} ago (--older-than)"
    elif target.reason == reaping.REASON_STOPPED:
        assert target.domain is not None
        why = f"not running ({target.domain.state})"
    else:
        why = "orphaned: " + ", ".join(target.pieces.describe())
    return f"{target.vm} ({why})"


def reap(
    settings: Settings,
    *,
    dry_run: bool = False,
    older_than: float | None = None,
    now: float | None = None,
) -> ReapResult:
    """Remove our expired VMs and every orphaned piece. Each VM is handled under its own lock
    (skipped if a stage holds it) and re-checked under the lock before anything is removed."""
    now = time.time() if now is None else now
    result = ReapResult()
    state = StateDir(settings.paths.state_dir)
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        plan = reaping.select(inventory(settings, hv, state), now, older_than)
        if dry_run:
            result.actions += [f"would remove {_describe_target(t, now)}" for t in plan.reap]
            result.actions += [f"would release unowned IP reservation {ip}" for ip in plan.unowned_ips]
            result.skipped += [f"{vm}: busy (a stage holds its lock)" for vm in plan.busy]
            return result
        for target in plan.reap:
            with signals_deferred() as received:
                _reap_one(hv, settings, state, target, now, older_than, result)
            if received:  # SIGTERM from a timer's stop: the VM in hand is done, stop here
                result.interrupted = True
                break
        if not result.interrupted:
            for ip in state.release_unowned_ips():
                result.actions.append(f"released unowned IP reservation {ip}")
    return result


def _reap_one(
    hv: Hypervisor,
    settings: Settings,
    state: StateDir,
    target: reaping.Target,
    now: float,
    older_than: float | None,
    result: ReapResult,
) -> None:
    vm = target.vm
    with state.lock_if_free(vm) as free:
        if not free:
            result.skipped.append(f"{vm}: busy (a stage took its lock meanwhile)")
            return
        # Under the lock nothing else can create or remove this VM's pieces: decide again.
        fresh = reaping.select(inventory(settings, hv, state, only=vm, probe_locks=False), now, older_than)
        current = fresh.target(vm)
        if current is None:
            result.skipped.append(f"{vm}: no longer due (it changed while the reaper looked)")
            return
        try:
            removed = stages.teardown(hv, settings, state, vm)
            state.remove_lock_file(vm)
        except (ExecutorError, OSError) as exc:
            result.failures.append(f"{vm}: {exc}")
            return
        done = ", ".join(removed + ["lock file removed"])
        result.actions.append(f"removed {_describe_target(current, now)}: {done}")


# --- doctor ---------------------------------------------------------------------------------

GIB = 1024**3
MIN_HOST_FREE = 256 * 1024**2  # state and console-log filesystems
PROBE_JOB_ID_BASE = 999_999_999_000_000_000  # doctor --boot's VM: far above any real job id
_QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: skipped, because something it needs failed
    detail: str
    fix: str = ""

    def line(self) -> str:
        status = {True: "ok  ", False: "FAIL", None: "skip"}[self.ok]
        text = f"{status}  {self.name:<13} {self.detail}"
        if self.fix and self.ok is False:
            text += f"  -> fix: {self.fix}"
        return text


def _qcow2_header(path: Path) -> tuple[int, bool]:
    """(virtual size, has a backing file) from a qcow2 header; ValueError if it is not qcow2."""
    with open(path, "rb") as f:
        header = f.read(32)
    if len(header) < 32 or header[:4] != _QCOW2_MAGIC:
        raise ValueError(f"{path} is not a qcow2 image")
    backing_offset = int.from_bytes(header[8:16], "big")
    return int.from_bytes(header[24:32], "big"), backing_offset != 0


def _check_image(settings: Settings) -> Check:
    from executor.baseimage import load_base_image

    fix = "libvirt-executor image build"
    try:
        image = load_base_image(settings.image.dir)
    except ConfigError as exc:
        return Check("base image", False, str(exc), fix)
    problems = []
    sizes = image.manifest.get("sizes") if isinstance(image.manifest.get("sizes"), dict) else {}
    for path, key in ((image.disk, "disk_bytes"), (image.kernel, "kernel_bytes"), (image.initrd, "initrd_bytes")):
        want = sizes.get(key)
        have = path.stat().st_size
        if isinstance(want, int) and want != have:
            problems.append(f"{path.name} is {have} bytes, the manifest says {want}")
    try:
        virtual, backed = _qcow2_header(image.disk)
        if backed:
            problems.append(f"{image.disk.name} has a backing file (the base must be self-contained)")
        if image.virtual_bytes and virtual != image.virtual_bytes:
            problems.append(f"{image.disk.name} has virtual size {virtual}, the manifest says {image.virtual_bytes}")
    except (OSError, ValueError) as exc:
        problems.append(str(exc))
    if problems:
        return Check("base image", False, f"{image.dir} does not match its manifest: " + "; ".join(problems), fix)
    built = image.manifest.get("built_at", "?")
    return Check("base image", True, f"{image.dir} matches its manifest (kernel {image.manifest.get('kernel_version', '?')}, built {built})")


def _check_mirror(url: str) -> Check:
    probe = url.rstrip("/") + "/v2/"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the mirror is local
    try:
        with opener.open(probe, timeout=5) as resp:
            return Check("mirror", True, f"{url} answers (HTTP {resp.status} on /v2/)")
    except urllib.error.HTTPError as exc:
        if exc.code == 401:  # a registry asking for auth is up
            return Check("mirror", True, f"{url} answers (HTTP 401 on /v2/)")
        return Check("mirror", False, f"{url}: HTTP {exc.code} on /v2/, not a registry API", "point docker.registry_mirrors at a registry (distribution proxy cache)")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Check("mirror", False, f"{url} unreachable: {reason}", "start the mirror, or remove it from docker.registry_mirrors")


def doctor(config_file: str, *, boot: bool = False, out: Callable[[Check], None] | None = None) -> list[Check]:
    """Check the host. Every check reports pass/fail with the fix; `out` gets each as it ends."""
    checks: list[Check] = []

    def add(check: Check) -> Check:
        checks.append(check)
        if out is not None:
            out(check)
        return check

    try:
        settings = load_settings(config_file)
        add(Check("config", True, f"{config_file} is valid"))
    except ConfigError as exc:
        add(Check("config", False, " ".join(str(exc).split()), f"edit {config_file} (see config.example.toml), or run libvirt-executor setup"))
        for name in ("libvirt", "accelerator", "storage pool", "disk space", "network", "base image", "state dirs"):
            add(Check(name, None, "needs a valid config"))
        return checks

    state_problems = []
    for directory in (settings.paths.state_dir, settings.paths.console_log_dir):
        path = Path(directory)
        if not path.is_dir():
            state_problems.append(f"{path} is missing")
            continue
        if shutil.disk_usage(path).free < MIN_HOST_FREE:
            state_problems.append(f"{path} has less than {MIN_HOST_FREE // 2**20} MiB free")
    mode = Path(settings.paths.state_dir).stat().st_mode & 0o777 if Path(settings.paths.state_dir).is_dir() else 0o700
    if mode & 0o077:
        state_problems.append(f"{settings.paths.state_dir} is mode {mode:o}, must be 0700 (it holds SSH keys)")
    if state_problems:
        add(Check("state dirs", False, "; ".join(state_problems), "libvirt-executor setup (and chmod 700 the state dir)"))
    else:
        add(Check("state dirs", True, f"{settings.paths.state_dir} and {settings.paths.console_log_dir} present"))

    libvirt_ok = False
    try:
        with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
            _libvirt_checks(settings, hv, add)
            libvirt_ok = True
    except SystemFailure as exc:
        if any(c.name == "libvirt" for c in checks):
            add(Check("libvirt", False, f"failed during the checks: {exc}", "check libvirtd's log"))
        else:
            add(Check("libvirt", False, str(exc), "start libvirtd (no systemd: `virtlogd -d; libvirtd -d`)"))
            for name in ("accelerator", "storage pool", "disk space", "network"):
                add(Check(name, None, "needs libvirt"))
    image = add(_check_image(settings))
    for mirror in settings.docker.registry_mirrors:
        add(_check_mirror(mirror))
    if boot:
        if not libvirt_ok or not image.ok or any(c.ok is False for c in checks):
            add(Check("boot", None, "a probe VM needs every check above to pass"))
        else:
            add(_boot_probe(settings))
    return checks


def _libvirt_checks(settings: Settings, hv: Hypervisor, add: Callable[[Check], Check]) -> None:
    domains = hv.domains()
    add(Check("libvirt", True, f"connected to {settings.libvirt.uri} ({len(domains)} domains)"))
    try:
        choice = stages.choose_accel(settings, hv)
        if choice.accel == "kvm":
            add(Check("accelerator", True, f"KVM ({choice.reason})"))
        else:
            add(Check("accelerator", True, f"TCG, software emulation, boots ~10x slower: {choice.reason}"))
    except ConfigError as exc:
        add(Check("accelerator", False, str(exc), 'load the kvm module, or set libvirt.accel = "auto" or "tcg"'))
    kvm_device = _check_kvm_device()
    if kvm_device is not None:
        add(kvm_device)
    pool = settings.libvirt.pool
    try:
        free = hv.pool_free_bytes(pool)
        add(Check("storage pool", True, f"{pool} active at {settings.libvirt.pool_path}"))
        need = settings.vm.disk_gib * GIB
        if free >= need:
            add(Check("disk space", True, f"{free / GIB:.1f} GiB free in pool {pool} (one job may use {settings.vm.disk_gib} GiB)"))
        else:
            add(Check("disk space", False, f"{free / GIB:.1f} GiB free in pool {pool}, less than one job's disk ({settings.vm.disk_gib} GiB)",
                      "free space on the pool's filesystem (`libvirt-executor reap`), or lower vm.disk_gib"))
    except (ConfigError, SystemFailure) as exc:
        add(Check("storage pool", False, str(exc), "libvirt-executor setup"))
        add(Check("disk space", None, "needs the storage pool"))
    network = settings.libvirt.network
    active = hv.network_active(network)
    if active is None:
        add(Check("network", False, f"network {network} does not exist", "libvirt-executor setup"))
    elif not active:
        add(Check("network", False, f"network {network} is not active", f"virsh net-start {network} (or libvirt-executor setup)"))
    elif settings.libvirt.nwfilter and not hv.nwfilter_exists(settings.libvirt.nwfilter):
        add(Check("network", False, f"nwfilter {settings.libvirt.nwfilter} does not exist",
                  'install libvirt\'s shipped nwfilters, or set libvirt.nwfilter = "" (not recommended)'))
    else:
        filt = f", nwfilter {settings.libvirt.nwfilter}" if settings.libvirt.nwfilter else ", no nwfilter"
        add(Check("network", True, f"{network} active ({settings.libvirt.subnet}{filt})"))


def _check_kvm_device(path: str = "/dev/kvm") -> Check | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None  # no KVM at all: the accelerator check says so
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    problem = accel.kvm_device_problem(st.st_mode, group)
    if problem is None:
        return Check("kvm device", True, f"{path} is {group}:{st.st_mode & 0o777:04o}")
    return Check("kvm device", False, problem, f"chgrp kvm {path} && chmod 0660 {path} (what udev does; scripts/setup.sh does it)")


def _boot_probe(settings: Settings) -> Check:
    """Boot one VM through prepare (SSH and dockerd answering), then clean it up."""
    from executor.jobenv import Job

    job = Job(job_id=PROBE_JOB_ID_BASE + os.getpid() % 1_000_000, project_id=None, project="doctor-probe",
              pipeline_id=None, runner_id=None, timeout_s=900)
    lines: list[str] = []
    started = time.monotonic()
    try:
        stages.prepare(settings, job, out=lines.append)
        ok, detail = True, (lines[-1] if lines else "probe VM ready")
    except ExecutorError as exc:
        ok, detail = False, f"probe VM failed after {time.monotonic() - started:.0f} s: {exc}"
    finally:
        try:
            stages.cleanup(settings, job)
        except ExecutorError as exc:
            ok, detail = False, f"{detail}; and its cleanup failed: {exc}"
    return Check("boot", ok, detail, "" if ok else "run with --debug; see the console log tail above")
