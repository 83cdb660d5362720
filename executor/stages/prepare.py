"""prepare_exec: create and boot the job's VM, wait until SSH and dockerd answer.

On any failure, and on SIGTERM, whatever was made is torn down before the error propagates (a
system failure: gitlab-runner retries prepare).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executor.adapters import hostinfo, registry_daemon
from executor.adapters.guest_docker import DOCKER_TLS_PORT, DockerUnavailable, GuestDocker, TLSFiles
from executor.adapters.guest_ssh import GuestSSH, SSHNotReady
from executor.adapters.hostfiles import console_log, console_tail, load_base_image
from executor.adapters.hypervisor import Hypervisor, connect
from executor.adapters.keys import DockerTLS, generate_docker_tls, generate_ed25519
from executor.adapters.seed_iso import build_seed_iso
from executor.adapters.statedir import StateDir
from executor.core import accel, mirror, naming, netpolicy, runnerbinary
from executor.core.baseimage import BaseImage, config_disagreements
from executor.core.domain_xml import (
    CPU_PERIOD_US,
    JobRecord,
    Limits,
    VMSpec,
    build_domain,
    build_overlay_volume,
    build_raw_volume,
)
from executor.core.jobenv import Job, RegistryCredentials
from executor.core.seedspec import SeedSpec
from executor.core.settings import Settings
from executor.core.waiting import signals_deferred, signals_raise_interrupted, time_limit, wait_until
from executor.errors import ConfigError, Interrupted, SystemFailure
from executor.jobvm import headroom, runnervolume
from executor.jobvm.accel import choose_accel
from executor.jobvm.record import alive_and_answering, running_record, vm_alive
from executor.jobvm.teardown import teardown
from executor.stages import imagemode
from executor.stages.cleanup import LOCK_WAIT_S
from executor.stages.config import DRIVER_NAME

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


def prepare(
    settings: Settings,
    job: Job,
    out: Callable[[str], None] = print,
    credentials: Callable[[], RegistryCredentials] = RegistryCredentials,
) -> None:
    """Create and boot the job's VM, wait until SSH and dockerd answer, and in image mode start
    the job's services and build container. On any failure, and on SIGTERM, tear down whatever
    was made and raise (a system failure; JobRefused, a build failure, for an image the job may
    not or cannot use)."""
    timings = Timings()
    runner_alive = _runner_watch()
    plan = imagemode.check(settings, job)  # before anything is made: a refused image costs nothing
    vm = naming.vm_name(settings.vm.name_prefix, job.job_id)
    image = load_base_image(settings.image.dir)
    mismatch = config_disagreements(image, settings.vm.user, settings.vm.builds_dir, settings.vm.cache_dir)
    if mismatch:
        raise ConfigError("; ".join(mismatch) + " (fix the config, or rebuild the image)")
    state = StateDir(settings.paths.state_dir)
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv, state.job_lock(vm, LOCK_WAIT_S):
        try:
            with signals_raise_interrupted():
                # A failed earlier attempt whose cleanup timed out may have left debris.
                teardown(hv, settings, state, vm)
                _admit(hv, settings, image)  # early: a refusal costs nothing; again at the disk
                choice = choose_accel(settings, hv)
                log.info("preparing %s (%s: %s)", vm, choice.accel, choice.reason)
                policy = network_policy(settings, job)
                for note in policy.notes:
                    out(f"{DRIVER_NAME}: {note}")
                mirrors = registry_mirrors(settings, out)
                runner_volume = _runner_volume(hv, settings, state, out)
                ip = _create_vm(hv, settings, state, image, job, vm, choice, policy, mirrors, runner_volume, timings)
                with _wait_for_ssh(hv, settings, state, vm, ip, timings, runner_alive) as ssh:
                    # From here a guest that stops answering fails within timeouts.unresponsive.
                    answering = alive_and_answering(hv, settings, vm, ssh)
                    out(
                        f"{DRIVER_NAME}: {vm} answers on SSH after {timings.between('started', 'ssh'):.1f}s, "
                        "waiting for its dockerd"
                    )
                    if runner_volume:
                        _mount_runner(ssh, vm)
                    alive = lambda: runner_alive() and answering()  # noqa: E731
                    with _wait_for_docker(settings, state, vm, ip, timings, alive) as docker:
                        if plan is not None:
                            imagemode.start(
                                settings,
                                job,
                                plan,
                                docker,
                                ssh,
                                vm,
                                credentials(),
                                _lifetime(settings, job),
                                _checking(out, alive),
                            )
                            timings.mark("containers")
                    runner_alive()  # a VM handed to nobody would wait for reap
        except BaseException as exc:
            _roll_back(settings, state, vm, exc)
            raise
    out(
        f"{DRIVER_NAME}: {vm} ready at {ip} ({choice.accel}): "
        f"clone {timings.between(None, 'cloned'):.1f}s, "
        f"boot-to-ssh {timings.between('started', 'ssh'):.1f}s, "
        f"ssh-to-docker {timings.between('ssh', 'docker'):.1f}s, "
        + (f"containers {timings.between('docker', 'containers'):.1f}s, " if plan else "")
        + f"total {timings.between(None, 'containers' if plan else 'docker'):.1f}s"
    )


def _runner_watch() -> Callable[[], bool]:
    """A check that raises SystemFailure once the process that started this prepare is gone:
    gitlab-runner died, so no run or cleanup will ever come for the VM being booted."""
    parent = os.getppid()

    def runner_alive() -> bool:
        if parent > 1 and os.getppid() != parent:
            raise SystemFailure(
                f"the runner process that started this prepare (pid {parent}) is gone: "
                "nobody will use or clean up this job's VM, so it is removed now"
            )
        return True

    return runner_alive


def _checking(out: Callable[[str], None], alive: Callable[[], bool]) -> Callable[[str], None]:
    """`out` that first checks `alive`: image mode says something at every step and pull, so a
    dead runner or a silent VM ends a long pull at its next line."""

    def say(line: str) -> None:
        if not alive():
            raise SystemFailure("the job's VM stopped while its images were being pulled and started")
        out(line)

    return say


def _admit(hv: Hypervisor, settings: Settings, image: BaseImage) -> None:
    """SystemFailure (gitlab-runner retries prepare) when this host cannot hold one more VM now:
    better than a VM that QEMU pauses on a full pool halfway through the job."""
    if not settings.admission.enabled:
        return
    room = headroom.measure(hv, settings, headroom.vm_disk_bytes(settings, image.virtual_bytes))
    problems = room.problems()
    if problems:
        raise SystemFailure("not starting a job VM on this host now: " + "; ".join(problems))


def vm_limits(settings: Settings) -> Limits:
    """The domain's resource limits from `[limits]` (0 stays 0: no limit)."""
    lim = settings.limits
    return Limits(
        cpu_quota_us=lim.cpu_percent * settings.vm.vcpus * CPU_PERIOD_US // 100,
        disk_bytes_sec=lim.disk_mbps * 1000 * 1000,
        disk_iops_sec=lim.disk_iops,
        net_kib_sec=lim.net_mbit * 1000 * 1000 // 8 // 1024,
    )


def network_policy(settings: Settings, job: Job) -> netpolicy.Policy:
    """What this job's VM may reach: the configured policy, the host's addresses as they are
    now, and the job's GitLab server."""
    net = settings.network
    server = None
    if job.gitlab_host:
        server = (job.gitlab_host, hostinfo.resolve_ipv4(job.gitlab_host))
    cache_servers = [(name, hostinfo.resolve_ipv4(name)) for name in _cache_server_hosts(settings)]
    return netpolicy.decide(
        settings.gateway,
        (*net.allow_host_ports, *mirror.host_ports(settings)),
        net.allowed_networks,
        net.blocked_networks,
        hostinfo.local_ipv4_addresses(),
        server,
        cache_servers,
    )


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
                f"{DRIVER_NAME}: the registry mirror {url} is not answering ({problem}): "
                "this job pulls Docker Hub images from Docker Hub directly"
            )
    return mirror.daemon_mirrors(settings, answers)


def _runner_volume(hv: Hypervisor, settings: Settings, state: StateDir, out: Callable[[str], None]) -> str:
    """The shared volume with the host's gitlab-runner binary; "" (said in the job log) when
    the host has none."""
    binary = runnervolume.host_binary(settings, state)
    if binary is None:
        out(
            f"{DRIVER_NAME}: no gitlab-runner binary on this host (runner.binary, or PATH): "
            "artifacts, caches and dependencies are disabled for this job"
        )
        return ""
    return runnervolume.ensure_volume(hv, settings, state, binary)


def _mount_runner(ssh: GuestSSH, vm: str) -> None:
    result = ssh.capture(runnerbinary.mount_command(), timeout=30)
    if not result.succeeded:
        raise SystemFailure(f"cannot mount the gitlab-runner volume in {vm}: {result.stderr.strip()[:300]}")


def _roll_back(settings: Settings, state: StateDir, vm: str, exc: BaseException) -> None:
    """Remove what a failed prepare made. Never raises: the original error matters more."""
    with signals_deferred():
        if not isinstance(exc, Interrupted):
            tail = console_tail(console_log(settings, vm))
            if tail:
                log.info("last lines of %s's console:\n%s", vm, tail)
        try:
            # A fresh connection: the failure may have been libvirtd going away.
            with time_limit(settings.timeouts.cleanup, "rollback"):
                with connect(settings.libvirt.uri, naming.METADATA_NS) as fresh:
                    teardown(fresh, settings, state, vm)
                state.remove_lock_file(vm)  # still held: nothing of the job is left
        except Exception as cleanup_exc:
            log.warning("rollback of %s incomplete: %s", vm, cleanup_exc)


def _create_vm(
    hv: Hypervisor,
    settings: Settings,
    state: StateDir,
    image: BaseImage,
    job: Job,
    vm: str,
    choice: accel.Choice,
    policy: netpolicy.Policy,
    mirrors: list[str],
    runner_volume: str,
    timings: Timings,
) -> str:
    """Reserve the address, make the keys, the seed and the overlay, define and start the
    domain; the VM's IP."""
    ip = state.allocate_ip(vm, naming.vm_addresses(settings.subnet))
    client_private, client_public = generate_ed25519(f"{vm}-client")
    host_private, host_public = generate_ed25519(vm)
    state.write_client_key(vm, client_private)
    tls = generate_docker_tls(vm, (ip,), ("localhost",), _lifetime(settings, job))
    state.write_docker_client(vm, tls.ca_cert, tls.client_cert, tls.client_key)
    seed_path = _write_seed(hv, settings, vm, ip, client_public, host_private, host_public, tls, mirrors)
    log.debug("%s: seed written in %.1fs", vm, time.monotonic() - timings.start)

    capacity = headroom.vm_disk_bytes(settings, image.virtual_bytes)
    with state.admission_lock(ADMISSION_LOCK_WAIT_S):
        # Again, now that no other prepare can come between the check and this disk's creation
        # (from then on its room counts as promised).
        _admit(hv, settings, image)
        overlay_path = hv.create_volume(
            settings.libvirt.pool, build_overlay_volume(naming.overlay_volume_name(vm), str(image.disk), capacity)
        )
    timings.mark("cloned")

    console = console_log(settings, vm)
    console.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    spec = _domain_spec(
        settings, image, job, vm, ip, choice, host_public, overlay_path, seed_path, str(console), policy, runner_volume
    )
    timings.mark("defining")
    hv.define_and_start(build_domain(spec))
    timings.mark("started")
    log.debug("%s: domain defined and started in %.1fs", vm, timings.between("defining", "started"))
    return ip


def _domain_spec(
    settings: Settings,
    image: BaseImage,
    job: Job,
    vm: str,
    ip: str,
    choice: accel.Choice,
    host_public: str,
    overlay_path: str,
    seed_path: str,
    console: str,
    policy: netpolicy.Policy,
    runner_volume: str,
) -> VMSpec:
    """The domain of the job's VM, with the metadata later stages and `reap` read."""
    now = int(time.time())
    record = JobRecord(
        vm=vm,
        job_id=job.job_id,
        project_id=job.project_id,
        project=job.project,
        pipeline_id=job.pipeline_id,
        runner_id=job.runner_id,
        created=now,
        expires=now + int(_lifetime(settings, job)),
        ip=ip,
        accel=choice.accel,
        host_key=host_public,
    )
    return VMSpec(
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
        console_log=console,
        record=record,
        domain_type=choice.domain_type,
        nwfilter=settings.libvirt.nwfilter,
        filter_parameters=tuple(netpolicy.filter_parameters(ip, str(settings.gateway), policy)),
        runner_volume=runner_volume,
        limits=vm_limits(settings),
    )


def _lifetime(settings: Settings, job: Job) -> float:
    return min(job.timeout_s + settings.timeouts.expiry_margin, settings.timeouts.max_lifetime)


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
    """The job's seed ISO as a volume of the pool; its path."""
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
            ca_certificates=_extra_cas(settings),
            docker_tls=(tls.ca_cert, tls.server_cert, tls.server_key),
        )
    )
    name = naming.seed_volume_name(vm)
    path = hv.create_volume(settings.libvirt.pool, build_raw_volume(name, len(seed)))
    hv.upload_volume(settings.libvirt.pool, name, seed)
    return path


def daemon_json(settings: Settings, ip: str, mirrors: list[str]) -> dict[str, Any]:
    # The socket for the job, TCP with mutual TLS (per-job CA) for the executor: no Docker port
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
    return config


def _extra_cas(settings: Settings) -> str:
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
    runner_alive: Callable[[], bool],
) -> GuestSSH:
    record = running_record(hv, vm)
    key = state.read_client_key(vm)
    last_error: list[str] = []

    def attempt() -> GuestSSH | None:
        runner_alive()
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


def _wait_for_docker(
    settings: Settings, state: StateDir, vm: str, ip: str, timings: Timings, alive: Callable[[], bool]
) -> GuestDocker:
    """The VM's dockerd over TCP + mutual TLS once its API answers /_ping; SystemFailure early
    if `alive` raises or says the VM is gone."""
    ca, cert, key = state.docker_client_files(vm)
    docker = GuestDocker.connect(ip, TLSFiles(ca, cert, key), timeout=15)
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
