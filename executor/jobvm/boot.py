"""Boot a ready VM: address, keys, TLS certificates, seed, overlay, domain, start, SSH, dockerd,
the runner binary mounted. Nothing of a job is decided here: prepare boots one for its job
(cold), the host agent's pool keeper boots one before any job (jobvm.pool). Both pass the
metadata record and the network policy the VM starts with.

The caller removes what a failed boot made (jobvm.teardown): it holds the VM's lock and knows
whether anything is left to roll back.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executor.adapters import hostinfo, registry_daemon
from executor.adapters.guest_docker import DOCKER_TLS_PORT, DockerUnavailable, GuestDocker, TLSFiles
from executor.adapters.guest_ssh import GuestSSH, SSHNotReady
from executor.adapters.hostfiles import console_log
from executor.adapters.hypervisor import Hypervisor
from executor.adapters.keys import DockerTLS, generate_docker_tls, generate_ed25519
from executor.adapters.seed_iso import build_seed_iso
from executor.adapters.statedir import StateDir
from executor.core import accel, mirror, naming, netpolicy, proxy, runnerbinary
from executor.core.baseimage import BaseImage
from executor.core.domain_xml import (
    CPU_PERIOD_US,
    JobRecord,
    Limits,
    VMSpec,
    build_domain,
    build_overlay_volume,
    build_raw_volume,
)
from executor.core.seedspec import SeedSpec
from executor.core.settings import Settings
from executor.core.waiting import wait_until
from executor.errors import AdmissionRefused, ConfigError, SystemFailure
from executor.jobvm import headroom, runnervolume
from executor.jobvm.record import alive_and_answering, running_record, vm_alive

log = logging.getLogger(__name__)

DOCKER_TLS_DIR = "/etc/docker/tls"  # where the image's init puts the seed's TLS files
MIRROR_PROBE_S = 2.0  # the mirror is on this host: it answers in milliseconds or not at all
ADMISSION_LOCK_WAIT_S = 60.0  # held by others only for a check and a qcow2 creation each


@dataclass
class Timings:
    start: float = field(default_factory=time.monotonic)
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def between(self, a: str | None, b: str) -> float:
        return self.marks[b] - (self.marks[a] if a else self.start)


@dataclass
class ReadyVM:
    """A booted VM whose SSH and dockerd answer, with the connections to them."""

    vm: str
    ip: str
    record: JobRecord
    ssh: GuestSSH
    docker: GuestDocker
    answering: Callable[[], bool]  # False or SystemFailure once it stops answering

    def close(self) -> None:
        self.docker.close()
        self.ssh.close()

    def __enter__(self) -> ReadyVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class BootPlan:
    """What a VM boots with: its name, its metadata (ip, accel and host key are filled in
    here), the network policy, the registry mirrors, the runner volume, the accelerator."""

    vm: str
    record: JobRecord
    policy: netpolicy.Policy
    mirrors: list[str]
    runner_volume: str
    choice: accel.Choice
    tls_lifetime_s: float
    docker_disk: str = ""  # the job's Docker layer cache disk (jobvm.layercache), "" for none


def boot_ready_vm(
    hv: Hypervisor,
    settings: Settings,
    state: StateDir,
    image: BaseImage,
    plan: BootPlan,
    timings: Timings,
    alive: Callable[[], bool],
    out: Callable[[str], None],
    admit: Callable[[], None],
) -> ReadyVM:
    """Make and start the VM, wait for SSH and dockerd. `alive` raises SystemFailure when the
    boot must stop (e.g. prepare's runner died); `admit` raises when the host has no room for
    the VM's disk (called under the admission lock, right before the disk is made)."""
    vm = plan.vm
    ip = _create_vm(hv, settings, state, image, plan, timings, admit)
    ssh = _wait_for_ssh(hv, settings, state, vm, ip, timings, alive)
    try:
        # From here a guest that stops answering fails within timeouts.unresponsive.
        answering = alive_and_answering(hv, settings, vm, ssh)
        out(f"{vm} answers on SSH after {timings.between('started', 'ssh'):.1f}s, waiting for its dockerd")
        if plan.runner_volume:
            _mount_runner(ssh, vm)
        docker = _wait_for_docker(settings, state, vm, ip, timings, lambda: alive() and answering())
    except BaseException:
        ssh.close()
        raise
    return ReadyVM(vm, ip, running_record(hv, vm), ssh, docker, answering)


def admit(hv: Hypervisor, settings: Settings, image: BaseImage, vms: int = 1) -> None:
    """SystemFailure when this host cannot hold `vms` more VMs now: better than a VM that QEMU
    pauses on a full pool halfway through the job. No-op when admission control is off."""
    if not settings.admission.enabled:
        return
    room = headroom.measure(hv, settings, headroom.vm_disk_bytes(settings, image.virtual_bytes), vms)
    problems = room.problems()
    if problems:
        raise AdmissionRefused("not starting a job VM on this host now: " + "; ".join(problems), room.short_of())


def vm_limits(settings: Settings) -> Limits:
    """The domain's resource limits from `[limits]` (0 stays 0: no limit)."""
    lim = settings.limits
    return Limits(
        cpu_quota_us=lim.cpu_percent * settings.vm.vcpus * CPU_PERIOD_US // 100,
        disk_bytes_sec=lim.disk_mbps * 1000 * 1000,
        disk_iops_sec=lim.disk_iops,
        net_kib_sec=lim.net_mbit * 1000 * 1000 // 8 // 1024,
    )


def network_policy(settings: Settings, gitlab_host: str | None = None) -> netpolicy.Policy:
    """What a VM may reach: the configured policy, the host's addresses as they are now, and
    the job's GitLab server (None for a pool VM, which gets its job's server at the claim)."""
    net = settings.network
    server = None
    if gitlab_host:
        server = (gitlab_host, hostinfo.resolve_ipv4(gitlab_host))
    cache_servers = [(name, hostinfo.resolve_ipv4(name)) for name in _cache_server_hosts(settings)]
    return netpolicy.decide(
        settings.gateway,
        (*net.allow_host_ports, *mirror.host_ports(settings), *proxy.host_ports(settings)),
        net.allowed_networks,
        net.blocked_networks,
        hostinfo.local_ipv4_addresses(),
        server,
        cache_servers,
    )


def filter_parameters(settings: Settings, ip: str, policy: netpolicy.Policy) -> tuple[tuple[str, str], ...]:
    return tuple(netpolicy.filter_parameters(ip, str(settings.gateway), policy))


def _cache_server_hosts(settings: Settings) -> list[str]:
    """The host names of `cache.server_addresses` (host or host:port, validated by settings)."""
    return sorted(
        {address.rpartition(":")[0] if ":" in address else address for address in settings.cache.server_addresses}
    )


def registry_mirrors(settings: Settings, out: Callable[[str], None]) -> list[str]:
    """The VM daemon's `registry-mirrors`. Ours only if it answers now: a VM's dockerd would
    fall back to the upstream anyway, but the job log should say why its pulls are slow."""
    answers = False
    if settings.mirror.enabled:
        url = mirror.mirror_url(settings)
        problem = registry_daemon.probe(url, timeout=MIRROR_PROBE_S)
        answers = problem is None
        if problem is not None:
            out(
                f"the registry mirror {url} is not answering ({problem}): "
                "this job pulls Docker Hub images from Docker Hub directly"
            )
    return mirror.daemon_mirrors(settings, answers)


def proxy_note(settings: Settings) -> str | None:
    """The job log's line when the VM reaches the web through the company's proxy."""
    if not proxy.enabled(settings):
        return None
    return (
        f"HTTP and HTTPS go through the host's proxy forwarder {proxy.forwarder_url(settings)} to "
        f"{settings.network.proxy}" + (" (it adds the credentials)" if settings.network.proxy_credentials_file else "")
    )


def mirror_cache_only_note(settings: Settings) -> str | None:
    """The job log's line while our mirror serves its cache only (its upstream is down)."""
    if not settings.mirror.enabled:
        return None
    because = mirror.cache_only_because(registry_daemon.MirrorDir(settings.mirror.storage).read_mode())
    if because is None:
        return None
    return (
        f"the registry mirror {mirror.mirror_url(settings)} is serving its cache only: {because}; "
        "images it has cached come from it, others from their registry directly"
    )


def runner_volume(hv: Hypervisor, settings: Settings, state: StateDir, out: Callable[[str], None]) -> str:
    """The shared volume with the host's gitlab-runner binary; "" (said through `out`) when
    the host has none."""
    binary = runnervolume.host_binary(settings, state)
    if binary is None:
        out(
            "no gitlab-runner binary on this host (runner.binary, or PATH): "
            "artifacts, caches and dependencies are disabled for this job"
        )
        return ""
    return runnervolume.ensure_volume(hv, settings, state, binary)


def _mount_runner(ssh: GuestSSH, vm: str) -> None:
    result = ssh.capture(runnerbinary.mount_command(), timeout=30)
    if not result.succeeded:
        raise SystemFailure(f"cannot mount the gitlab-runner volume in {vm}: {result.stderr.strip()[:300]}")


def _create_vm(
    hv: Hypervisor,
    settings: Settings,
    state: StateDir,
    image: BaseImage,
    plan: BootPlan,
    timings: Timings,
    admit: Callable[[], None],
) -> str:
    """Reserve the address, make the keys, the seed and the overlay, define and start the
    domain; the VM's IP."""
    vm = plan.vm
    ip = state.allocate_ip(vm, naming.vm_addresses(settings.subnet))
    client_private, client_public = generate_ed25519(f"{vm}-client")
    host_private, host_public = generate_ed25519(vm)
    state.write_client_key(vm, client_private)
    tls = generate_docker_tls(vm, (ip,), ("localhost",), plan.tls_lifetime_s)
    state.write_docker_client(vm, tls.ca_cert, tls.client_cert, tls.client_key)
    seed_path = _write_seed(hv, settings, vm, ip, client_public, host_private, host_public, tls, plan.mirrors)
    log.debug("%s: seed written in %.1fs", vm, time.monotonic() - timings.start)

    capacity = headroom.vm_disk_bytes(settings, image.virtual_bytes)
    with state.admission_lock(ADMISSION_LOCK_WAIT_S):
        # Again, now that no other prepare can come between the check and this disk's creation
        # (from then on its room counts as promised).
        admit()
        overlay_path = hv.create_volume(
            settings.libvirt.pool, build_overlay_volume(naming.overlay_volume_name(vm), str(image.disk), capacity)
        )
    timings.mark("cloned")

    console = console_log(settings, vm)
    console.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = dataclasses.replace(plan.record, ip=ip, accel=plan.choice.accel, host_key=host_public)
    spec = _domain_spec(settings, image, plan, record, overlay_path, seed_path, str(console))
    timings.mark("defining")
    hv.define_and_start(build_domain(spec))
    timings.mark("started")
    log.debug("%s: domain defined and started in %.1fs", vm, timings.between("defining", "started"))
    return ip


def _domain_spec(
    settings: Settings,
    image: BaseImage,
    plan: BootPlan,
    record: JobRecord,
    overlay_path: str,
    seed_path: str,
    console: str,
) -> VMSpec:
    """The domain of the VM, with the metadata later stages and `reap` read."""
    return VMSpec(
        name=plan.vm,
        memory_mib=settings.vm.memory_mib,
        vcpus=settings.vm.vcpus,
        kernel=str(image.kernel),
        initrd=str(image.initrd),
        cmdline=image.cmdline,
        overlay_path=overlay_path,
        seed_path=seed_path,
        network=settings.libvirt.network,
        mac=naming.mac_for(ipaddress.IPv4Address(record.ip)),
        ip=record.ip,
        console_log=console,
        record=record,
        domain_type=plan.choice.domain_type,
        nwfilter=settings.libvirt.nwfilter,
        filter_parameters=filter_parameters(settings, record.ip, plan.policy),
        runner_volume=plan.runner_volume,
        limits=vm_limits(settings),
        docker_disk=plan.docker_disk,
        # A warm-pool VM gets its job's Docker disk plugged in at the claim.
        scsi_controller=settings.docker_cache.enabled and not record.job_id,
    )


def _write_seed(
    hv: Hypervisor,
    settings: Settings,
    vm: str,
    ip: str,
    client_public: str,
    host_private: str,
    host_public: str,
    tls: DockerTLS,
    mirrors: list[str],
) -> str:
    """The VM's seed ISO as a volume of the pool; its path."""
    seed = build_seed_iso(
        SeedSpec(
            hostname=vm,
            address=f"{ip}/{settings.subnet.prefixlen}",
            gateway=str(settings.gateway),
            dns=(str(settings.gateway),),
            mac=naming.mac_for(ipaddress.IPv4Address(ip)),
            user=settings.vm.user,
            authorized_key=client_public,
            host_key_private=host_private,
            host_key_public=host_public,
            daemon_json=daemon_json(settings, ip, mirrors),
            ca_certificates=extra_cas(settings),
            docker_tls=(tls.ca_cert, tls.server_cert, tls.server_key),
        )
    )
    name = naming.seed_volume_name(vm)
    path = hv.create_volume(settings.libvirt.pool, build_raw_volume(name, len(seed)))
    hv.upload_volume(settings.libvirt.pool, name, seed)
    return path


def daemon_json(settings: Settings, ip: str, mirrors: list[str]) -> dict[str, Any]:
    # The socket for the job, TCP with mutual TLS (per-VM CA) for the executor: no Docker port
    # without TLS is reachable from outside the VM.
    config: dict[str, Any] = {
        "hosts": ["unix:///var/run/docker.sock", f"tcp://{ip}:{DOCKER_TLS_PORT}"],
        "tls": True,
        "tlsverify": True,
        "tlscacert": f"{DOCKER_TLS_DIR}/ca.pem",
        "tlscert": f"{DOCKER_TLS_DIR}/cert.pem",
        "tlskey": f"{DOCKER_TLS_DIR}/key.pem",
    }
    if mirrors:
        config["registry-mirrors"] = mirrors
    if settings.docker.insecure_registries:
        config["insecure-registries"] = list(settings.docker.insecure_registries)
    if proxy.enabled(settings):
        config["proxies"] = proxy.daemon_proxies(settings)
    return config


def extra_cas(settings: Settings) -> str:
    if not settings.docker.ca_file:
        return ""
    try:
        return Path(settings.docker.ca_file).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"docker.ca_file: cannot read {settings.docker.ca_file}: {exc}") from None


def _wait_for_ssh(
    hv: Hypervisor,
    settings: Settings,
    state: StateDir,
    vm: str,
    ip: str,
    timings: Timings,
    alive: Callable[[], bool],
) -> GuestSSH:
    record = running_record(hv, vm)
    key = state.read_client_key(vm)
    last_error: list[str] = []

    def attempt() -> GuestSSH | None:
        alive()
        if not vm_alive(hv, vm):
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


def connect_docker(state: StateDir, vm: str, ip: str, timeout: float = 15) -> GuestDocker:
    """A client for the VM's dockerd over TCP + mutual TLS with the VM's own certificates."""
    ca, cert, key = state.docker_client_files(vm)
    return GuestDocker.connect(ip, TLSFiles(ca, cert, key), timeout=timeout)


def _wait_for_docker(
    settings: Settings, state: StateDir, vm: str, ip: str, timings: Timings, alive: Callable[[], bool]
) -> GuestDocker:
    """The VM's dockerd over TCP + mutual TLS once its API answers /_ping; SystemFailure early
    if `alive` raises or says the VM is gone."""
    docker = connect_docker(state, vm, ip)
    last_error: list[str] = []

    def attempt() -> bool:
        if not alive():
            raise SystemFailure(f"{vm} stopped while dockerd was starting")
        try:
            return docker.ping()
        except DockerUnavailable as exc:
            log.debug("dockerd in %s not ready: %s", vm, exc)
            last_error[:] = [str(exc)]
            return False

    try:
        wait_until(attempt, settings.timeouts.docker, f"dockerd in {vm}", interval=0.3, max_interval=1.0)
    except BaseException:
        docker.close()
        if last_error:
            log.info("last answer of dockerd in %s: %s", vm, last_error[0])
        raise
    timings.mark("docker")
    return docker
