"""The four stages gitlab-runner calls: config, prepare, run, cleanup.

Each stage is a separate process. What a later stage needs is in libvirt (the domain and its
metadata: IP, pinned host key, expiry) or in the job's state directory (its SSH client key),
both keyed by the VM name, which is derived from the job id in the job payload.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from executor import __version__, accel, naming
from executor.baseimage import BaseImage, load_base_image
from executor.domain_xml import (
    JobRecord,
    VMSpec,
    build_domain,
    build_overlay_volume,
    build_raw_volume,
    parse_job_record,
)
from executor.errors import BuildFailure, ConfigError, Interrupted, SystemFailure
from executor.guest_ssh import GuestSSH, SSHNotReady
from executor.hypervisor import Hypervisor, connect
from executor.jobenv import Job
from executor.jobstate import StateDir
from executor.keys import generate_ed25519
from executor.seed import SeedSpec, build_seed_iso
from executor.settings import Settings
from executor.waiting import signals_deferred, signals_raise_interrupted, time_limit, wait_until

log = logging.getLogger(__name__)

DRIVER_NAME = "libvirt-executor"
GIB = 1024**3
# A dying stage (SIGTERM'd run) may still hold nothing we need, but a concurrent prepare for the
# same job must finish its own rollback first; this bounds how long cleanup waits for it.
LOCK_WAIT_S = 30.0
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def config_json(settings: Settings, job: Job) -> dict:
    """What `config_exec` prints: where builds and caches live inside the VM, and who we are."""
    return {
        "builds_dir": settings.vm.builds_dir,
        "cache_dir": settings.vm.cache_dir,
        "builds_dir_is_shared": False,
        "hostname": naming.vm_name(settings.vm.name_prefix, job.job_id),
        "driver": {"name": DRIVER_NAME, "version": __version__},
    }


# --- prepare ------------------------------------------------------------------------------


@dataclass
class Timings:
    start: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def between(self, a: str | None, b: str) -> float:
        return self.marks[b] - (self.marks[a] if a else self.start)


def _console_log(settings: Settings, vm: str) -> Path:
    return Path(settings.paths.console_log_dir) / naming.console_log_name(vm)


def console_tail(path: Path, lines: int = 25, limit: int = 64 * 1024) -> str:
    """The end of a VM's serial console, with control characters removed (the guest wrote it)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    tail = data.splitlines()[-lines:]
    return "\n".join(_CONTROL.sub("", line) for line in tail)


def _daemon_json(settings: Settings) -> dict:
    config: dict = {}
    if settings.docker.registry_mirrors:
        config["registry-mirrors"] = list(settings.docker.registry_mirrors)
    if settings.docker.insecure_registries:
        config["insecure-registries"] = list(settings.docker.insecure_registries)
    return config


def _extra_cas(settings: Settings) -> str:
    if not settings.docker.ca_file:
        return ""
    try:
        return Path(settings.docker.ca_file).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"docker.ca_file: cannot read {settings.docker.ca_file}: {exc}") from None


def choose_accel(settings: Settings, hv: Hypervisor) -> accel.Choice:
    if settings.libvirt.accel == "tcg":
        return accel.decide("tcg", accel.host_facts(kvm_offered=False))
    return accel.decide(settings.libvirt.accel, accel.host_facts(hv.kvm_offered()))


def prepare(settings: Settings, job: Job, out: Callable[[str], None] = print) -> None:
    """Create and boot the job's VM, wait until SSH and dockerd answer. On any failure, and on
    SIGTERM, tear down whatever was made and raise (a system failure)."""
    timings = Timings()
    vm = naming.vm_name(settings.vm.name_prefix, job.job_id)
    image = load_base_image(settings.image.dir)
    state = StateDir(settings.paths.state_dir)
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv, state.job_lock(vm, LOCK_WAIT_S):
        try:
            with signals_raise_interrupted():
                # A failed earlier attempt whose cleanup timed out may have left debris.
                teardown(hv, settings, state, vm)
                choice = choose_accel(settings, hv)
                log.info("preparing %s (%s: %s)", vm, choice.accel, choice.reason)
                ip = _create_vm(hv, settings, state, image, job, vm, choice, timings)
                ssh = _wait_for_ssh(hv, settings, state, vm, ip, timings)
                with ssh:
                    _wait_for_docker(hv, settings, vm, ssh, timings)
        except BaseException as exc:
            with signals_deferred():
                if not isinstance(exc, Interrupted):
                    tail = console_tail(_console_log(settings, vm))
                    if tail:
                        log.info("last lines of %s's console:\n%s", vm, tail)
                try:
                    # A fresh connection: the failure may have been libvirtd going away.
                    with time_limit(settings.timeouts.cleanup, "rollback"):
                        with connect(settings.libvirt.uri, naming.METADATA_NS) as fresh:
                            teardown(fresh, settings, state, vm)
                        state.remove_lock_file(vm)  # still held: nothing of the job is left
                except Exception as cleanup_exc:  # the original error matters more
                    log.warning("rollback of %s incomplete: %s", vm, cleanup_exc)
            raise
    out(
        f"{DRIVER_NAME}: {vm} ready at {ip} ({choice.accel}): "
        f"clone {timings.between(None, 'cloned'):.1f}s, "
        f"boot-to-ssh {timings.between('started', 'ssh'):.1f}s, "
        f"ssh-to-docker {timings.between('ssh', 'docker'):.1f}s, "
        f"total {timings.between(None, 'docker'):.1f}s"
    )


def _create_vm(
    hv: Hypervisor,
    settings: Settings,
    state: StateDir,
    image: BaseImage,
    job: Job,
    vm: str,
    choice: accel.Choice,
    timings: Timings,
) -> str:
    pool = settings.libvirt.pool
    ip = state.allocate_ip(vm, naming.vm_addresses(settings.network))
    client_private, client_public = generate_ed25519(f"{vm}-client")
    host_private, host_public = generate_ed25519(vm)
    state.write_client_key(vm, client_private)

    seed = build_seed_iso(
        SeedSpec(
            hostname=vm,
            address=f"{ip}/{settings.network.prefixlen}",
            gateway=str(settings.gateway),
            dns=(str(settings.gateway),),
            mac=naming.mac_for(ipaddress.IPv4Address(ip)),
            user=settings.vm.user,
            authorized_key=client_public,
            host_key_private=host_private,
            host_key_public=host_public,
            daemon_json=_daemon_json(settings),
            ca_certificates=_extra_cas(settings),
        )
    )
    seed_volume = naming.seed_volume_name(vm)
    seed_path = hv.create_volume(pool, build_raw_volume(seed_volume, len(seed)))
    hv.upload_volume(pool, seed_volume, seed)
    log.debug("%s: seed written in %.1fs", vm, time.monotonic() - timings.start)

    capacity = max(settings.vm.disk_gib * GIB, image.virtual_bytes)
    overlay_path = hv.create_volume(
        pool, build_overlay_volume(naming.overlay_volume_name(vm), str(image.disk), capacity)
    )
    timings.mark("cloned")

    now = int(time.time())
    lifetime = min(job.timeout_s + settings.timeouts.expiry_margin, settings.timeouts.max_lifetime)
    record = JobRecord(
        vm=vm,
        job_id=job.job_id,
        project_id=job.project_id,
        project=job.project,
        pipeline_id=job.pipeline_id,
        runner_id=job.runner_id,
        created=now,
        expires=now + int(lifetime),
        ip=ip,
        accel=choice.accel,
        host_key=host_public,
    )
    console = _console_log(settings, vm)
    console.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    spec = VMSpec(
        name=vm,
        memory_mib=settings.vm.memory_mib,
        vcpus=settings.vm.vcpus,
        kernel=str(image.kernel),
        initrd=str(image.initrd),
        cmdline=image.cmdline,
        overlay_path=overlay_path,
        seed_path=seed_path,
        network=settings.libvirt.network,
        mac=naming.mac_for(ipaddress.IPv4Address(ip)),
        ip=ip,
        console_log=str(console),
        record=record,
        domain_type=choice.domain_type,
        nwfilter=settings.libvirt.nwfilter,
    )
    timings.mark("defining")
    hv.define_and_start(build_domain(spec))
    timings.mark("started")
    log.debug("%s: domain defined and started in %.1fs", vm, timings.between("defining", "started"))
    return ip


def _vm_alive(hv: Hypervisor, vm: str) -> bool:
    """Whether the VM still runs; SystemFailure if QEMU paused it on a disk error, which it never
    recovers from by itself (a job would otherwise hang until its timeout)."""
    info = hv.domain(vm)
    if info is not None and info.io_error:
        raise _disk_error(vm)
    return info is not None and info.active


def _disk_error(vm: str) -> SystemFailure:
    return SystemFailure(f"the job's VM {vm} is paused on a disk I/O error (is the storage pool full?)")


def _wait_for_ssh(
    hv: Hypervisor, settings: Settings, state: StateDir, vm: str, ip: str, timings: Timings
) -> GuestSSH:
    record = _record(hv, vm)
    key = state.read_client_key(vm)
    last_error: list[str] = []

    def attempt() -> GuestSSH | None:
        if not _vm_alive(hv, vm):
            raise SystemFailure(f"{vm} stopped while booting")
        try:
            return GuestSSH.connect(ip, settings.vm.user, key, record.host_key, settings.timeouts.ssh_connect)
        except SSHNotReady as exc:
            log.debug("%s", exc)
            last_error[:] = [str(exc)]
            return None

    try:
        ssh = wait_until(attempt, settings.timeouts.boot, f"SSH on {vm} ({ip})", interval=0.5, max_interval=1.0)
    except SystemFailure as exc:
        if last_error and "timed out" in str(exc):
            raise SystemFailure(f"{exc} (last error: {last_error[0]})") from None
        raise
    timings.mark("ssh")
    return ssh


DOCKER_PING = "curl -sf --max-time 10 --unix-socket /var/run/docker.sock http://docker/_ping"


def _wait_for_docker(hv: Hypervisor, settings: Settings, vm: str, ssh: GuestSSH, timings: Timings) -> None:
    def attempt() -> bool:
        if not _vm_alive(hv, vm):
            raise SystemFailure(f"{vm} stopped while dockerd was starting")
        try:
            # The API's /_ping over the socket, as the job user: cheaper than the docker CLI (a
            # large Go binary that takes seconds to start under TCG) and bounded if dockerd hangs.
            return ssh.capture(DOCKER_PING, timeout=15).stdout.strip() == "OK"
        except SystemFailure as exc:
            log.debug("dockerd in %s not ready: %s", vm, exc)
            return False

    wait_until(attempt, settings.timeouts.docker, f"dockerd in {vm}", interval=0.3, max_interval=1.0)
    timings.mark("docker")


def _record(hv: Hypervisor, vm: str) -> JobRecord:
    info = hv.domain(vm)
    if info is None:
        raise SystemFailure(f"the job's VM {vm} does not exist (prepare failed, or it was reaped)")
    record = parse_job_record(info.metadata) if info.metadata else None
    if record is None:
        raise SystemFailure(f"domain {vm} carries no libvirt-executor metadata: not ours")
    if info.io_error:
        raise _disk_error(vm)
    if not info.active:
        raise SystemFailure(f"the job's VM {vm} is not running (state: {info.state})")
    return record


# --- run ----------------------------------------------------------------------------------

RUN_CONNECT_ATTEMPTS = 3


def run(
    settings: Settings,
    job: Job,
    script_path: str,
    stage: str,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> None:
    """Stream the stage script into bash in the VM. BuildFailure(status) if it exits non-zero."""
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    vm = naming.vm_name(settings.vm.name_prefix, job.job_id)
    try:
        script = Path(script_path).read_bytes()
    except OSError as exc:
        raise SystemFailure(f"cannot read the {stage} script {script_path}: {exc.strerror}") from None
    state = StateDir(settings.paths.state_dir)
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        record = _record(hv, vm)
        key = state.read_client_key(vm)
        ssh = _connect_for_run(settings, record, key)
        with ssh:
            # sshd starts each session command as a session and process-group leader, so $$ is
            # the group id of everything the script starts: that is what SIGTERM must reach.
            pidfile = f"/tmp/lvx-run-{secrets.token_hex(8)}.pid"
            command = f"echo $$ > {shlex.quote(pidfile)} && exec bash -s"
            try:
                with signals_raise_interrupted():
                    status = ssh.stream(command, script, stdout, stderr, lambda: _vm_alive(hv, vm))
            except Interrupted:
                with signals_deferred():
                    _stop_remote_group(ssh, pidfile)
                raise
    if status is None:
        # The remote shell died by a signal (OpenSSH sends exit-signal, no status). The VM and
        # the connection are fine (checked above), so it was something inside the job.
        stderr.write(f"{DRIVER_NAME}: the {stage} shell was killed by a signal\n".encode())
        stderr.flush()
        status = 255
    if status != 0:
        raise BuildFailure(status)


def _connect_for_run(settings: Settings, record: JobRecord, key: str) -> GuestSSH:
    last: SSHNotReady | None = None
    for attempt in range(RUN_CONNECT_ATTEMPTS):
        try:
            return GuestSSH.connect(record.ip, settings.vm.user, key, record.host_key, settings.timeouts.ssh_connect)
        except SSHNotReady as exc:
            last = exc
            time.sleep(1 + attempt)
    raise SystemFailure(f"cannot reach the job's VM over SSH: {last}")


def _stop_remote_group(ssh: GuestSSH, pidfile: str) -> None:
    """TERM the script's process group, then KILL what is left after a short grace."""
    q = shlex.quote(pidfile)
    command = (
        f"pg=$(cat {q} 2>/dev/null) || exit 0; "
        'sudo -n kill -TERM -- "-$pg" 2>/dev/null || kill -TERM -- "-$pg" 2>/dev/null; '
        "for i in 1 2 3 4 5 6 7 8 9 10; do "
        'kill -0 -- "-$pg" 2>/dev/null || sudo -n kill -0 -- "-$pg" 2>/dev/null || exit 0; sleep 0.3; done; '
        'sudo -n kill -KILL -- "-$pg" 2>/dev/null || kill -KILL -- "-$pg" 2>/dev/null; exit 0'
    )
    try:
        ssh.capture(command, timeout=10)
    except SystemFailure as exc:
        log.warning("could not stop the job's processes in the VM: %s", exc)


# --- cleanup ------------------------------------------------------------------------------


def cleanup(settings: Settings, job: Job) -> None:
    vm = naming.vm_name(settings.vm.name_prefix, job.job_id)
    state = StateDir(settings.paths.state_dir)
    with signals_deferred(), time_limit(settings.timeouts.cleanup, f"cleanup of {vm}"):
        with connect(settings.libvirt.uri, naming.METADATA_NS) as hv, state.job_lock(vm, LOCK_WAIT_S):
            removed = teardown(hv, settings, state, vm)
            state.remove_lock_file(vm)
    log.info("cleaned up %s: %s", vm, ", ".join(removed) if removed else "nothing was left")


def teardown(hv: Hypervisor, settings: Settings, state: StateDir, vm: str) -> list[str]:
    """Remove everything of `vm`: domain (destroyed, never shut down), volumes, IP reservation,
    key, console log. Idempotent; works on any half-built state. Each step runs even if an
    earlier one failed; SystemFailure at the end lists what could not be removed."""
    removed: list[str] = []
    failures: list[str] = []
    info = hv.domain(vm)
    if info is not None and (not info.metadata or parse_job_record(info.metadata) is None):
        raise SystemFailure(f"a domain named {vm} exists without libvirt-executor metadata: not touching it")

    steps: list[tuple[str, Callable[[], object]]] = [
        ("domain destroyed", lambda: hv.destroy(vm)),
        ("domain undefined", lambda: hv.undefine(vm)),
        ("domain removed after a late start", lambda: _remove_late_domain(hv, vm)),
        ("overlay deleted", lambda: hv.delete_volume(settings.libvirt.pool, naming.overlay_volume_name(vm))),
        ("seed deleted", lambda: hv.delete_volume(settings.libvirt.pool, naming.seed_volume_name(vm))),
        ("IP released", lambda: state.release_ip(vm)),
        ("key removed", lambda: state.remove_job_dir(vm)),
        ("console log removed", lambda: _remove_file(_console_log(settings, vm))),
    ]
    for what, step in steps:
        try:
            if step():
                removed.append(what)
        except (SystemFailure, ConfigError, OSError) as exc:
            failures.append(f"{what.split()[0]}: {exc}")
    if failures:
        raise SystemFailure(f"cleanup of {vm} incomplete: " + "; ".join(failures))
    return removed


def _remove_late_domain(hv: Hypervisor, vm: str) -> bool:
    """A killed prepare's start request can still complete inside libvirtd after our destroy;
    undefining a running domain only makes it transient, so look again and finish the job."""
    for _ in range(3):
        if hv.domain(vm) is None:
            return False
        hv.destroy(vm)
        hv.undefine(vm)
    if hv.domain(vm) is not None:
        raise SystemFailure(f"domain {vm} keeps coming back after destroy")
    return True


def _remove_file(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
