"""Image mode, set up at the end of prepare: pull the job's image and services, start the
services on a per-job network with GitLab's aliases, wait for them, start the build container.
A `docker:dind` service is served by the VM's own dockerd, or run privileged (core.dind).

A refused or missing image is the job's fault (JobRefused: a build failure with the reason);
a daemon that fails is a system failure. Registry credentials reach the daemon only inside the
pull request over TLS: never a file, an argv or a log line.
"""

from __future__ import annotations

import concurrent.futures
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from executor.adapters.guest_docker import ContainerSpec, GuestDocker, PullFailed, PullProgress
from executor.adapters.guest_ssh import GuestSSH
from executor.adapters.keys import generate_docker_tls
from executor.core import dind, images
from executor.core.images import ImageSpec, ServiceSpec
from executor.core.jobenv import Job, RegistryCredentials
from executor.core.settings import Settings
from executor.core.waiting import poll
from executor.errors import JobRefused, SystemFailure

SCRIPTS_DIR_IN_VM = "/run/lvx-scripts"  # tmpfs in the VM: stage scripts never touch a disk
SCRIPTS_DIR = "/lvx-scripts"  # where the build container sees it
DOCKER_SOCKET = "/var/run/docker.sock"
LABEL = "io.libvirt-executor.job"
PROGRESS_EVERY_S = 5.0
# Keeps the build container alive between stages (each stage is an exec into it); the image's
# own entrypoint runs first and is expected to exec its arguments, as with GitLab.
KEEPALIVE = ("sh", "-c", 'trap "exit 0" TERM; while :; do sleep 3600 & wait $!; done')
KEEPALIVE_PROCESS = "sleep 3600"  # in the container's processes once the keepalive runs
ENTRYPOINT_WAIT_S = 2.0  # how long an entrypoint that ignores its arguments takes to end the container


def build_container_name(vm: str) -> str:
    return f"{vm}-build"


def network_name(vm: str) -> str:
    return f"{vm}-net"


def job_image(settings: Settings, job: Job) -> ImageSpec | None:
    """The image the job's user stages run in, None for the VM's shell."""
    if job.containers.image is not None:
        return job.containers.image
    return ImageSpec(settings.docker.default_image) if settings.docker.default_image else None


@dataclass(frozen=True)
class Plan:
    image: ImageSpec
    services: tuple[ServiceSpec, ...]
    aliases: tuple[tuple[str, ...], ...]
    dind: tuple[dind.DindService, ...] = ()


def check(settings: Settings, job: Job) -> Plan | None:
    """What image mode will run, checked before anything is pulled: JobRefused if the job's
    image or services are unusable or not allowed here."""
    if job.containers_error:
        raise JobRefused(f"the job's image or services cannot be used: {job.containers_error}")
    image = job_image(settings, job)
    if image is None:
        if job.containers.services:
            raise JobRefused("the job has services but no image (set `image:`, or docker.default_image)")
        return None
    d = settings.docker
    if not images.allowed(image.name, d.allowed_images):
        raise JobRefused(
            f"the {image.name!r} image is not present on list of allowed images: {', '.join(d.allowed_images)}"
        )
    for service in job.containers.services:
        if not images.allowed(service.name, d.allowed_services):
            raise JobRefused(
                f"the {service.name!r} service is not present on list of allowed services: {', '.join(d.allowed_services)}"
            )
    if 0 <= d.services_limit < len(job.containers.services):
        raise JobRefused(
            f"the job has {len(job.containers.services)} services, more than services_limit {d.services_limit}"
        )
    aliases, _ = images.service_aliases(job.containers.services)
    try:
        daemons = dind.dind_services(job.containers.services, aliases, d.dind_images, job.public_variables)
    except dind.DindError as exc:
        raise JobRefused(str(exc)) from None
    return Plan(image, job.containers.services, tuple(aliases), tuple(daemons))


def start(
    settings: Settings,
    job: Job,
    plan: Plan,
    docker: GuestDocker,
    ssh: GuestSSH,
    vm: str,
    credentials: RegistryCredentials,
    lifetime_s: float,
    out: Callable[[str], None],
    pulled: Callable[[], None] = lambda: None,
) -> None:
    """Pull, start the services (dind ones as `docker.dind` says) and wait for them, start the
    build container. `pulled` is called between the pulls and the rest."""
    _, warnings = images.service_aliases(plan.services)
    for warning in warnings:
        out(f"WARNING: {warning}")
    privileged = settings.docker.dind == "privileged"
    served = () if privileged else plan.dind  # by the VM's own dockerd: never started
    skipped = {d.index for d in served}
    _pull(settings, docker, plan.image.name, plan.image.pull_policies, credentials, out)
    for index, service in enumerate(plan.services):
        if index not in skipped:
            _pull(settings, docker, service.name, service.pull_policies, credentials, out)
    pulled()
    network = network_name(vm)
    docker.create_network(network, {LABEL: vm})
    hosts: dict[str, str] = {}
    if served:
        hosts = _serve_dind(served, docker, ssh, vm, network, lifetime_s, out)
    daemons = {d.index: d for d in plan.dind} if privileged else {}
    started = []
    for index, (service, aliases) in enumerate(zip(plan.services, plan.aliases, strict=True)):
        if index in skipped:
            continue
        daemon = daemons.get(index)
        if daemon is not None:
            out(
                f"Starting service {service.name} as {', '.join(aliases)}: a privileged container with its own "
                f'dockerd in the VM (docker.dind = "privileged")'
            )
        else:
            out(f"Starting service {service.name} as {', '.join(aliases)} ...")
        docker.run_container(
            ContainerSpec(
                name=service_container_name(vm, index),
                image=service.name,
                network=network,
                aliases=aliases,
                environment=_merged(job.public_variables, service.variables),
                entrypoint=service.entrypoint,
                command=service.command,
                labels=((LABEL, vm),),
                extra_hosts=tuple(hosts.items()),
                privileged=daemon is not None,
                binds=(f"{dind_volume(vm)}:{daemon.certdir}/client",) if daemon and daemon.certdir else (),
            )
        )
        started.append((index, service))
    if started and settings.docker.wait_for_services_timeout >= 0:
        _wait_for_services(settings, started, docker, ssh, vm, out)
    if served:
        cert_binds = tuple(f"{dind.DIR_IN_VM}/client:{d}/client:ro" for d in dind.certdirs(served))
    else:
        cert_binds = tuple(f"{dind_volume(vm)}:{d}/client" for d in dind.certdirs(plan.dind))
    _start_build_container(settings, job, plan.image, docker, vm, network, tuple(hosts.items()), cert_binds)


def service_container_name(vm: str, index: int) -> str:
    return f"{vm}-svc-{index}"


def dind_volume(vm: str) -> str:
    """The volume that shares a privileged dind's `$DOCKER_TLS_CERTDIR/client` with the build
    container (GitLab's documented `volumes = ["/certs/client"]`)."""
    return f"{vm}-dind-certs"


def _serve_dind(
    served: Sequence[dind.DindService],
    docker: GuestDocker,
    ssh: GuestSSH,
    vm: str,
    network: str,
    lifetime_s: float,
    out: Callable[[str], None],
) -> dict[str, str]:
    """Point the dind services' aliases at the VM's own dockerd: proxies on the job network's
    gateway, 2375 plain and, for a job with DOCKER_TLS_CERTDIR, 2376 with per-job mutual TLS
    (certificates laid out as the dind image does). The /etc/hosts entries for every container."""
    gateway = docker.network_gateway(network)
    try:
        hosts = dind.host_entries(served, gateway or "")
    except ValueError:
        raise SystemFailure(f"the VM's dockerd gave network {network} no IPv4 gateway ({gateway!r})") from None
    address = next(iter(hosts.values()))
    tls = bool(dind.certdirs(served))
    if tls:
        material = generate_docker_tls(f"{vm}-dind", (address,), dind.tls_names(served), lifetime_s)
        archive = dind.cert_archive(
            material.ca_cert, material.server_cert, material.server_key, material.client_cert, material.client_key
        )
        unpack = f"umask 022; rm -rf {dind.DIR_IN_VM} && mkdir -p {dind.DIR_IN_VM} && tar -xf - -C {dind.DIR_IN_VM}"
        _vm_command(ssh, f"sudo -n sh -c {shlex.quote(unpack)}", "unpacking the dind certificates", stdin=archive)
    for argv in dind.proxy_commands(address, tls):
        _vm_command(ssh, f"sudo -n setsid -f {shlex.join(argv)} </dev/null >/dev/null 2>&1", "starting a dind proxy")
    ports = (dind.PLAIN_PORT, dind.TLS_PORT) if tls else (dind.PLAIN_PORT,)
    probe = " && ".join(f"timeout 1 bash -c 'exec 3<>/dev/tcp/{address}/{p}' 2>/dev/null" for p in ports)
    ready = f"for i in $(seq 50); do {{ {probe}; }} && exit 0; sleep 0.2; done; exit 1"
    _vm_command(ssh, ready, "waiting for the dind proxies")
    for service in served:
        endpoints = f"tcp://{service.aliases[0]}:{dind.PLAIN_PORT}"
        if service.certdir:
            endpoints += f" and tcp://{service.aliases[0]}:{dind.TLS_PORT} (TLS, client certificates in {service.certdir}/client)"
        out(
            f"Service {service.name} as {', '.join(service.aliases)}: served by this job's own dockerd in the VM "
            f'(docker.dind = "vm-daemon"): {endpoints}; no privileged container, no nested daemon'
        )
    return hosts


def _vm_command(ssh: GuestSSH, command: str, what: str, stdin: bytes = b"") -> None:
    result = ssh.capture(command, timeout=30, stdin=stdin)
    if result.rc != 0:
        raise SystemFailure(f"{what} in the VM failed (exit {result.rc}): {result.stderr.strip()[-500:]}")


def _merged(*lists: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    merged: dict[str, str] = {}
    for pairs in lists:
        merged.update(pairs)
    return tuple(merged.items())


def _pull(
    settings: Settings,
    docker: GuestDocker,
    name: str,
    job_policies: Sequence[str],
    credentials: RegistryCredentials,
    out: Callable[[str], None],
) -> None:
    try:
        policies = images.pull_policies(
            job_policies, settings.docker.pull_policy, settings.docker.allowed_pull_policies
        )
    except images.ImageSpecError as exc:
        raise JobRefused(str(exc)) from None
    ref = images.parse_reference(name)
    local = f"{ref.repository}@{ref.digest}" if ref.digest else f"{ref.repository}:{ref.pull_tag}"
    errors = []
    for policy in policies:
        if policy in ("never", "if-not-present") and docker.image_present(local):
            out(f"Using locally found image {name}")
            return
        if policy == "never":
            errors.append("it is not in the VM and pull_policy is never")
            continue
        auth = images.registry_auth(ref, list(credentials.credentials), credentials.docker_auth_config)
        out(f"Pulling docker image {name} ...{' (with credentials)' if auth else ''}")
        started = time.monotonic()
        try:
            docker.pull(ref.repository, ref.pull_tag, auth, _ProgressLines(name, out))
        except PullFailed as exc:
            errors.append(str(exc))
            continue
        out(f"Pulled {name} in {time.monotonic() - started:.1f}s")
        return
    raise JobRefused(f"failed to pull image {name!r}: {'; '.join(errors)}")


class _ProgressLines:
    """A pull's progress as a line every few seconds, not one per chunk."""

    def __init__(self, name: str, out: Callable[[str], None]) -> None:
        self.name, self.out, self.last = name, out, time.monotonic()

    def __call__(self, progress: PullProgress) -> None:
        if time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.last = time.monotonic()
            self.out(f"  {self.name}: {progress.line()}")


def _wait_for_services(
    settings: Settings,
    services: Sequence[tuple[int, ServiceSpec]],
    docker: GuestDocker,
    ssh: GuestSSH,
    vm: str,
    out: Callable[[str], None],
) -> None:
    """GitLab's wait: HEALTHCHECK_TCP_PORT or the exposed TCP ports, dialled from the VM every
    second until one answers; on timeout a warning with the service's last log lines."""
    timeout = settings.docker.wait_for_services_timeout or 30
    network = network_name(vm)

    def wait(index: int, service: ServiceSpec) -> str | None:
        name = service_container_name(vm, index)
        ports = [int(v) for k, v in service.variables if k.upper() == "HEALTHCHECK_TCP_PORT" and v.isdigit()]
        ports = ports or docker.exposed_tcp_ports(service.name)
        address = docker.container_address(name, network)
        if not ports or address is None:
            return _warning(service, docker.logs_tail(name))
        probe = " || ".join(f"timeout 1 bash -c 'exec 3<>/dev/tcp/{address}/{p}' 2>/dev/null" for p in ports)
        command = f"for i in $(seq {int(timeout)}); do {{ {probe}; }} && exit 0; sleep 1; done; exit 1"
        try:
            if ssh.capture(command, timeout=timeout + 15).rc == 0:
                return None
        except SystemFailure:
            pass
        return _warning(service, docker.logs_tail(name))

    with concurrent.futures.ThreadPoolExecutor(max(1, len(services))) as pool:
        results = list(pool.map(lambda pair: wait(*pair), services))
    for warning in results:
        if warning:
            out(warning)


def _warning(service: ServiceSpec, logs: str) -> str:
    tail = "\n".join(line for line in logs.splitlines()[-20:])
    return f"*** WARNING: Service {service.name} probably didn't start properly.\n\nService container logs:\n{tail}\n*********"


def _start_build_container(
    settings: Settings,
    job: Job,
    image: ImageSpec,
    docker: GuestDocker,
    vm: str,
    network: str,
    extra_hosts: tuple[tuple[str, str], ...],
    cert_binds: tuple[str, ...],
) -> None:
    name = build_container_name(vm)
    binds = (
        f"{settings.vm.builds_dir}:{settings.vm.builds_dir}",
        f"{settings.vm.cache_dir}:{settings.vm.cache_dir}",
        f"{DOCKER_SOCKET}:{DOCKER_SOCKET}",
        f"{SCRIPTS_DIR_IN_VM}:{SCRIPTS_DIR}",
        *cert_binds,
        *settings.docker.volumes,
    )
    docker.run_container(
        ContainerSpec(
            name=name,
            image=image.name,
            network=network,
            aliases=("build", name),
            environment=job.public_variables,
            entrypoint=image.entrypoint,
            command=KEEPALIVE,
            binds=binds,
            user=image.user,
            labels=((LABEL, vm),),
            extra_hosts=extra_hosts,
        )
    )

    # An entrypoint that does not exec its arguments ends the container at once. One that did
    # runs the keepalive: seen, there is nothing left to wait for.
    def settled() -> str | None:
        if not (docker.container_state(name) or {}).get("Running"):
            return "stopped"
        return "running" if any(KEEPALIVE_PROCESS in c for c in docker.container_commands(name)) else None

    if poll(settled, ENTRYPOINT_WAIT_S, interval=0.1, max_interval=0.5) == "stopped":
        state = docker.container_state(name) or {}
        raise JobRefused(
            f"the build container of {image.name} stopped right away (exit code {state.get('ExitCode')}): its "
            'entrypoint does not run the job\'s shell; set `image: entrypoint: [""]` in the job\n'
            + docker.logs_tail(name)
        )
