"""The operator's configuration: TOML, loaded once into frozen dataclasses.

Every problem is collected and reported together, each with its key, so that an operator fixes a
config file in one pass. Unknown keys are errors too: a typo must not silently fall back to a
default. Pure: `parse_settings` takes text; `adapters.hostfiles.load_settings` reads the file.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from executor.core.dind import DEFAULT_DIND_IMAGES, DIND_MODES
from executor.core.imagerecipe import BUILDS_DIR, CACHE_DIR, JOB_USER
from executor.core.images import PULL_POLICIES, ImageSpecError, parse_reference
from executor.core.naming import USER_NAME
from executor.core.netpolicy import DEFAULT_BLOCKED_NETWORKS, DNS_PORT
from executor.core.nwfilter_xml import FILTER_NAME
from executor.errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/libvirt-executor/config.toml"
CONFIG_PATH_ENV = "LIBVIRT_EXECUTOR_CONFIG"
GIB = 1024**3
LIVENESS_PROBE_S = 5.0  # how often a waiting stage probes its VM over SSH (jobvm.record)
MIN_UNRESPONSIVE_S = 3 * LIVENESS_PROBE_S  # a healthy VM is never taken for dead between probes

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,15}$")
_BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


@dataclass(frozen=True)
class LibvirtSettings:
    uri: str = "qemu:///system"
    accel: str = "auto"  # auto | kvm | tcg
    pool: str = "libvirt-executor"
    pool_path: str = "/var/lib/libvirt-executor/pool"
    network: str = "libvirt-executor"
    bridge: str = "lvxbr0"
    subnet: str = "192.168.213.0/24"
    nwfilter: str = FILTER_NAME  # ours: clean-traffic + destination rules; "" disables (not recommended)


@dataclass(frozen=True)
class ImageSettings:
    dir: str = "/var/lib/libvirt-executor/image"


@dataclass(frozen=True)
class VMSettings:
    name_prefix: str = "lvx"
    vcpus: int = 2
    memory_mib: int = 2048
    disk_gib: int = 20
    # What a job may ask for (LVX_VCPUS, LVX_MEMORY_MIB, LVX_DISK_GIB); 0: the normal size.
    max_vcpus: int = 0
    max_memory_mib: int = 0
    max_disk_gib: int = 0
    # The image is built with these (core.imagerecipe); prepare refuses a config that differs.
    user: str = JOB_USER
    builds_dir: str = BUILDS_DIR
    cache_dir: str = CACHE_DIR


@dataclass(frozen=True)
class TimeoutSettings:
    """Seconds. Every wait in the executor has one of these as its deadline."""

    boot: float = 240.0  # domain start -> SSH accepting the job key (TCG hosts need ~60 s)
    docker: float = 180.0  # SSH up -> the VM's dockerd answering
    ssh_connect: float = 10.0  # one SSH connection attempt
    cleanup: float = 60.0  # the whole cleanup stage
    expiry_margin: float = 1800.0  # added to the job timeout to get the VM's expiry
    max_lifetime: float = 6 * 3600.0  # hard cap on a VM's expiry, whatever the job timeout
    # A VM that has answered no SSH probe for this long while a stage runs (or dockerd starts)
    # is dead: a system failure. A TCG guest under CPU, disk, memory or fork-bomb load answered
    # every probe within 0.3 s (benchmarks/liveness_bench.py): 60 s is a wide margin.
    unresponsive: float = 60.0


@dataclass(frozen=True)
class PathSettings:
    state_dir: str = "/var/lib/libvirt-executor/state"
    console_log_dir: str = "/var/log/libvirt-executor"


@dataclass(frozen=True)
class DockerSettings:
    registry_mirrors: tuple[str, ...] = ()
    insecure_registries: tuple[str, ...] = ()
    ca_file: str = ""  # PEM bundle of extra CAs trusted inside the VM
    # image mode (the job's `image:` and `services:`), as GitLab's docker executor
    default_image: str = ""  # for jobs without `image:`; "" runs them in the VM's shell
    allowed_images: tuple[str, ...] = ()  # globs, empty = all
    allowed_services: tuple[str, ...] = ()
    pull_policy: tuple[str, ...] = ("always",)  # tried in order
    allowed_pull_policies: tuple[str, ...] = ()  # what a job may ask for; empty = pull_policy
    wait_for_services_timeout: int = 30  # seconds; 0 = 30, negative = do not wait
    services_limit: int = -1  # at most this many services per job; negative = no limit
    volumes: tuple[str, ...] = ()  # extra binds for the build container: "/vm/path:/container/path[:ro]"
    # docker:dind services (core.dind): served by the VM's own dockerd, or run privileged in the VM
    dind: str = "vm-daemon"
    dind_images: tuple[str, ...] = DEFAULT_DIND_IMAGES


@dataclass(frozen=True)
class NetworkSettings:
    """What a job VM may reach besides the public internet (core.netpolicy has the rules)."""

    allow_host_ports: tuple[int, ...] = ()  # TCP ports on the host's VM-network address
    blocked_networks: tuple[str, ...] = DEFAULT_BLOCKED_NETWORKS  # plus every host address
    allowed_networks: tuple[str, ...] = ()  # exceptions to blocked_networks
    # The company's HTTP proxy (http://host:port, no credentials): VMs use it through a
    # forwarder on the host (core.proxy) that adds the credentials from proxy_credentials_file.
    proxy: str = ""
    proxy_credentials_file: str = ""  # root-only, one line "user:password"
    no_proxy: tuple[str, ...] = ()  # more hosts, domains or networks the VMs reach directly
    proxy_port: int = 3128  # the forwarder's, on the host's VM-network address


@dataclass(frozen=True)
class MirrorSettings:
    """The registry mirror on the host (core.mirror): a pull-through cache of `upstream` that
    every job VM's dockerd uses for Docker Hub names."""

    enabled: bool = True
    port: int = 5000  # on the host's VM-network address only
    upstream: str = "https://registry-1.docker.io"
    username: str = ""  # for the upstream; the password is read from password_file
    password_file: str = ""
    storage: str = "/var/lib/libvirt-executor/mirror"
    max_gib: float = 50.0  # cached data above this is evicted, least recently pulled first


@dataclass(frozen=True)
class RunnerSettings:
    """gitlab-runner's own binary, put into every job VM for artifacts, caches and dependencies
    (the helper commands must be the runner's version)."""

    binary: str = ""  # "" = `gitlab-runner` on PATH; none found: artifacts and caches are disabled


@dataclass(frozen=True)
class CacheSettings:
    """Where the runner's local cache (`cache:` without a distributed cache) survives the VM."""

    mode: str = "off"  # "host": the project's archives are kept on the host between jobs
    dir: str = "/var/lib/libvirt-executor/cache"
    max_gib: float = 5.0  # per project; the least recently used archives go first
    max_total_gib: float = 50.0  # all projects together
    # Distributed cache servers (gitlab-runner's [runners.cache.s3] ServerAddress, host:port)
    # that a job VM may reach although they are in a blocked network.
    server_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class DockerCacheSettings:
    """The per-project Docker layer cache (jobvm.layercache): the VM's /var/lib/docker on its
    own disk, a copy-on-write overlay of the project's lineage, kept when the job succeeds."""

    enabled: bool = False
    dir: str = "/var/lib/libvirt-executor/docker-cache"  # a libvirt dir pool of its own
    pool: str = "libvirt-executor-docker-cache"  # that pool's libvirt name
    max_gib: float = 10.0  # per lineage: a lineage grown beyond this is evicted, not written
    max_total_gib: float = 100.0  # all lineages: the least recently used are evicted first


@dataclass(frozen=True)
class LimitSettings:
    """What one job VM may take of the host, whatever runs inside it (libvirt enforces these in
    QEMU and the host's cgroups, outside the guest). 0 turns a limit off."""

    cpu_percent: int = 100  # of one host CPU per vCPU: 100 = each vCPU at most one full core
    disk_mbps: int = 200  # reads and writes of the job's disk, MB/s each
    disk_iops: int = 5000  # reads and writes of the job's disk, operations/s each
    net_mbit: int = 0  # in and out on the VM's interface (tc on the host; needs sfq and police)


@dataclass(frozen=True)
class AdmissionSettings:
    """Prepare refuses a job (a system failure: gitlab-runner retries prepare, then the job's
    `retry: when: runner_system_failure` may send it to another runner) when this host cannot
    hold one more VM, rather than starting one that QEMU would pause on a full pool later."""

    enabled: bool = True
    pool_margin_gib: float = 2.0  # free pool space kept beyond every VM's worst-case growth
    memory_margin_mib: int = 256  # available memory kept beyond the new VM's memory


POOL_IDLE_MODES = ("paused", "running")


@dataclass(frozen=True)
class PoolSettings:
    """The warm pool (jobvm.pool), kept by the host agent: VMs booted and checked before their
    job arrives, each used by exactly one job and destroyed after it, like any job VM."""

    size: int = 0  # idle VMs kept ready; 0 = off (every job boots its VM when it starts)
    idle: str = "paused"  # "paused": no CPU while idle, resumed at the claim; or "running"
    max_idle: float = 3600.0  # seconds; an idle VM older than this is replaced
    prepull: tuple[str, ...] = ()  # images pulled into each idle VM (through the mirror)


@dataclass(frozen=True)
class HistorySettings:
    """The job history (`<state_dir>/history.sqlite3`): what `jobs` shows and the metrics count."""

    keep_days: float = 30.0  # rows of jobs that ended longer ago are dropped


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus metrics and /healthz, served by the host agent."""

    listen: str = "127.0.0.1:9253"  # address:port; "" = not served (gitlab-runner's own is 9252)


@dataclass(frozen=True)
class Settings:
    libvirt: LibvirtSettings = field(default_factory=LibvirtSettings)
    image: ImageSettings = field(default_factory=ImageSettings)
    vm: VMSettings = field(default_factory=VMSettings)
    timeouts: TimeoutSettings = field(default_factory=TimeoutSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    docker: DockerSettings = field(default_factory=DockerSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    mirror: MirrorSettings = field(default_factory=MirrorSettings)
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    docker_cache: DockerCacheSettings = field(default_factory=DockerCacheSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    history: HistorySettings = field(default_factory=HistorySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.libvirt.subnet)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The host's address on the VM bridge: the subnet's first address."""
        return self.subnet.network_address + 1


_SECTIONS: dict[str, type] = {
    "libvirt": LibvirtSettings,
    "image": ImageSettings,
    "vm": VMSettings,
    "timeouts": TimeoutSettings,
    "paths": PathSettings,
    "docker": DockerSettings,
    "network": NetworkSettings,
    "mirror": MirrorSettings,
    "runner": RunnerSettings,
    "cache": CacheSettings,
    "docker_cache": DockerCacheSettings,
    "limits": LimitSettings,
    "admission": AdmissionSettings,
    "pool": PoolSettings,
    "history": HistorySettings,
    "metrics": MetricsSettings,
}


def _coerce(section: str, name: str, kind: str, default: Any, value: Any, problems: list[str]) -> Any:
    key = f"{section}.{name}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        problems.append(f"{key}: expected true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{key}: expected an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        unit = " of seconds" if section == "timeouts" else ""
        problems.append(f"{key}: expected a number{unit}, got {value!r}")
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        problems.append(f"{key}: expected a string, got {value!r}")
    elif isinstance(default, tuple) and kind == "tuple[int, ...]":
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        problems.append(f"{key}: expected a list of integers, got {value!r}")
    elif isinstance(default, tuple):
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        problems.append(f"{key}: expected a list of strings, got {value!r}")
    return default


def _check(s: Settings, problems: list[str]) -> None:
    lv = s.libvirt
    if lv.accel not in ("auto", "kvm", "tcg"):
        problems.append(f"libvirt.accel: must be auto, kvm or tcg, got {lv.accel!r}")
    names = [("libvirt.pool", lv.pool), ("libvirt.network", lv.network)]
    if lv.nwfilter:
        names.append(("libvirt.nwfilter", lv.nwfilter))
    for key, value in names:
        if not _NAME_RE.match(value):
            problems.append(f"{key}: {value!r} is not a valid libvirt object name")
    if not _BRIDGE_RE.match(lv.bridge):
        problems.append(f"libvirt.bridge: {lv.bridge!r} is not a valid interface name (max 15 chars)")
    try:
        net = ipaddress.IPv4Network(lv.subnet)
        if net.prefixlen > 28:
            problems.append(f"libvirt.subnet: {lv.subnet} is too small (need at most /28)")
        elif net.prefixlen < 16:  # every allocation walks the address list
            problems.append(f"libvirt.subnet: {lv.subnet} is too large (use /16 to /28)")
    except ValueError as exc:
        problems.append(f"libvirt.subnet: {exc}")
    for key, value in (
        ("libvirt.pool_path", lv.pool_path),
        ("image.dir", s.image.dir),
        ("paths.state_dir", s.paths.state_dir),
        ("paths.console_log_dir", s.paths.console_log_dir),
        ("vm.builds_dir", s.vm.builds_dir),
        ("vm.cache_dir", s.vm.cache_dir),
    ):
        if not value.startswith("/"):
            problems.append(f"{key}: must be an absolute path, got {value!r}")
    vm = s.vm
    if not _PREFIX_RE.match(vm.name_prefix):
        problems.append(
            f"vm.name_prefix: {vm.name_prefix!r} must be 1-16 chars of a-z, 0-9, '-', starting with a letter"
        )
    if not 1 <= vm.vcpus <= 64:
        problems.append(f"vm.vcpus: must be between 1 and 64, got {vm.vcpus}")
    if not 256 <= vm.memory_mib <= 262144:
        problems.append(f"vm.memory_mib: must be between 256 and 262144, got {vm.memory_mib}")
    if not 1 <= vm.disk_gib <= 4096:
        problems.append(f"vm.disk_gib: must be between 1 and 4096, got {vm.disk_gib}")
    for key, maximum, normal, ceiling in (
        ("max_vcpus", vm.max_vcpus, vm.vcpus, 64),
        ("max_memory_mib", vm.max_memory_mib, vm.memory_mib, 262144),
        ("max_disk_gib", vm.max_disk_gib, vm.disk_gib, 4096),
    ):
        if maximum and not normal <= maximum <= ceiling:
            problems.append(
                f"vm.{key}: must be 0 (the normal size) or between the normal size {normal} and {ceiling}, got {maximum}"
            )
    if not USER_NAME.match(vm.user) or vm.user == "root":
        problems.append(f"vm.user: {vm.user!r} must be a valid non-root user name")
    for f in fields(TimeoutSettings):
        value = getattr(s.timeouts, f.name)
        if not math.isfinite(value) or value <= 0:
            problems.append(f"timeouts.{f.name}: must be positive and finite, got {value}")
    for key, urls in (("docker.registry_mirrors", s.docker.registry_mirrors),):
        for url in urls:
            if not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+(/[^\s\"']*)?$", url):
                problems.append(f"{key}: {url!r} is not an http(s) URL")
    for reg in s.docker.insecure_registries:
        if not re.match(r"^[A-Za-z0-9.\-\[\]:/]+$", reg):
            problems.append(f"docker.insecure_registries: {reg!r} is not a host[:port] or CIDR")
    _check_network(s.network, problems)
    _check_docker(s.docker, problems)
    _check_mirror(s.mirror, problems)
    _check_runner_and_cache(s, problems)
    _check_docker_cache(s, problems)
    _check_limits(s, problems)
    _check_pool(s.pool, problems)
    _check_observability(s, problems)
    if math.isfinite(s.timeouts.unresponsive) and 0 < s.timeouts.unresponsive < MIN_UNRESPONSIVE_S:
        problems.append(
            f"timeouts.unresponsive: must be at least {MIN_UNRESPONSIVE_S:g} (the VM is probed every {LIVENESS_PROBE_S:g} s), "
            f"got {s.timeouts.unresponsive:g}"
        )


def metrics_address(listen: str) -> tuple[str, int]:
    """`[metrics] listen` ("127.0.0.1:9253", "[::1]:9253") as (host, port); ValueError if not one."""
    host, sep, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{listen!r} is not address:port, like 127.0.0.1:9253")
    ipaddress.ip_address(host)  # an address, not a name: it says exactly where we listen
    return host, int(port)


def _check_observability(s: Settings, problems: list[str]) -> None:
    if not math.isfinite(s.history.keep_days) or not 1 <= s.history.keep_days <= 3650:
        problems.append(f"history.keep_days: must be between 1 and 3650, got {s.history.keep_days:g}")
    if s.metrics.listen:
        try:
            metrics_address(s.metrics.listen)
        except ValueError as exc:
            problems.append(f"metrics.listen: {exc}")


def _check_limits(s: Settings, problems: list[str]) -> None:
    bounds = {"cpu_percent": 1000, "disk_mbps": 100000, "disk_iops": 10000000, "net_mbit": 100000}
    for name, most in bounds.items():
        value = getattr(s.limits, name)
        if not 0 <= value <= most:
            problems.append(f"limits.{name}: must be between 0 (no limit) and {most}, got {value}")
    if s.limits.cpu_percent and s.limits.cpu_percent < 10:
        problems.append(f"limits.cpu_percent: below 10 a VM cannot boot in time, got {s.limits.cpu_percent}")
    adm = s.admission
    if not math.isfinite(adm.pool_margin_gib) or not 0 <= adm.pool_margin_gib <= 4096:
        problems.append(f"admission.pool_margin_gib: must be between 0 and 4096, got {adm.pool_margin_gib}")
    if not 0 <= adm.memory_margin_mib <= 262144:
        problems.append(f"admission.memory_margin_mib: must be between 0 and 262144, got {adm.memory_margin_mib}")


def _check_pool(p: PoolSettings, problems: list[str]) -> None:
    if not 0 <= p.size <= 64:
        problems.append(f"pool.size: must be between 0 (no pool) and 64, got {p.size}")
    if p.idle not in POOL_IDLE_MODES:
        problems.append(f"pool.idle: must be {' or '.join(repr(m) for m in POOL_IDLE_MODES)}, got {p.idle!r}")
    if not math.isfinite(p.max_idle) or not 60 <= p.max_idle <= 7 * 86400:
        problems.append(f"pool.max_idle: must be between 60 and 604800 seconds, got {p.max_idle:g}")
    for image in p.prepull:
        try:
            parse_reference(image)
        except ImageSpecError as exc:
            problems.append(f"pool.prepull: {exc}")


def _check_mirror(m: MirrorSettings, problems: list[str]) -> None:
    if not 1 <= m.port <= 65535 or m.port == DNS_PORT:
        problems.append(f"mirror.port: {m.port} is not a free TCP port (1-65535, not 53)")
    if not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+/?$", m.upstream):
        problems.append(
            f"mirror.upstream: {m.upstream!r} must be a registry's root URL, like https://registry.example.com"
        )
    if bool(m.username) != bool(m.password_file):
        problems.append("mirror.username and mirror.password_file: set both (upstream credentials) or neither")
    if m.username and not re.match(r"^[^\s:]{1,255}$", m.username):
        problems.append("mirror.username: must be 1-255 characters without spaces or ':'")
    for key, value in (("mirror.storage", m.storage), ("mirror.password_file", m.password_file)):
        if value and not value.startswith("/"):
            problems.append(f"{key}: must be an absolute path, got {value!r}")
    if not 0 < m.max_gib <= 1_000_000:
        problems.append(f"mirror.max_gib: must be a positive number of GiB, got {m.max_gib}")


CACHE_MODES = ("off", "host")
_SERVER_ADDRESS = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(:[0-9]{1,5})?$")


def _check_runner_and_cache(s: Settings, problems: list[str]) -> None:
    c = s.cache
    if s.runner.binary and not s.runner.binary.startswith("/"):
        problems.append(f"runner.binary: must be an absolute path, got {s.runner.binary!r}")
    if c.mode not in CACHE_MODES:
        problems.append(f"cache.mode: must be {' or '.join(repr(m) for m in CACHE_MODES)}, got {c.mode!r}")
    if not c.dir.startswith("/"):
        problems.append(f"cache.dir: must be an absolute path, got {c.dir!r}")
    for key, value in (("cache.max_gib", c.max_gib), ("cache.max_total_gib", c.max_total_gib)):
        if not 0 < value <= 1_000_000:
            problems.append(f"{key}: must be a positive number of GiB, got {value}")
    if c.max_gib > c.max_total_gib:
        problems.append(
            f"cache.max_gib: {c.max_gib:g} GiB per project is above cache.max_total_gib ({c.max_total_gib:g})"
        )
    for address in c.server_addresses:
        port = address.rpartition(":")[2] if ":" in address else "443"
        if not _SERVER_ADDRESS.match(address) or not 1 <= int(port) <= 65535:
            problems.append(
                f"cache.server_addresses: {address!r} must be host or host:port, like minio.example.com:9000"
            )


def _check_docker_cache(s: Settings, problems: list[str]) -> None:
    c = s.docker_cache
    if c.pool == s.libvirt.pool or c.dir.rstrip("/") == s.libvirt.pool_path.rstrip("/"):
        problems.append("docker_cache.pool and docker_cache.dir: must differ from libvirt.pool and libvirt.pool_path")
    if not c.dir.startswith("/"):
        problems.append(f"docker_cache.dir: must be an absolute path, got {c.dir!r}")
    if not _NAME_RE.match(c.pool):
        problems.append(f"docker_cache.pool: {c.pool!r} is not a valid libvirt object name")
    for key, value in (("docker_cache.max_gib", c.max_gib), ("docker_cache.max_total_gib", c.max_total_gib)):
        if not math.isfinite(value) or not 0 < value <= 1_000_000:
            problems.append(f"{key}: must be a positive number of GiB, got {value:g}")
    if c.max_gib > c.max_total_gib:
        problems.append(
            f"docker_cache.max_gib: {c.max_gib:g} GiB per lineage is above docker_cache.max_total_gib ({c.max_total_gib:g})"
        )


def _check_docker(d: DockerSettings, problems: list[str]) -> None:
    for key, policies in (
        ("docker.pull_policy", d.pull_policy),
        ("docker.allowed_pull_policies", d.allowed_pull_policies),
    ):
        for policy in policies:
            if policy not in PULL_POLICIES:
                problems.append(f"{key}: {policy!r} is not one of {', '.join(PULL_POLICIES)}")
    if not d.pull_policy:
        problems.append("docker.pull_policy: must name at least one policy")
    if d.dind not in DIND_MODES:
        problems.append(f"docker.dind: must be {' or '.join(repr(m) for m in DIND_MODES)}, got {d.dind!r}")
    if d.default_image:
        try:
            parse_reference(d.default_image)
        except ImageSpecError as exc:
            problems.append(f"docker.default_image: {exc}")
    for volume in d.volumes:
        parts = volume.split(":")
        if (
            len(parts) not in (2, 3)
            or not all(p.startswith("/") for p in parts[:2])
            or parts[2:] not in ([], ["ro"], ["rw"])
        ):
            problems.append(f"docker.volumes: {volume!r} must be /path/in/vm:/path/in/container[:ro|:rw]")


def _check_network(n: NetworkSettings, problems: list[str]) -> None:
    for port in n.allow_host_ports:
        if not 1 <= port <= 65535:
            problems.append(f"network.allow_host_ports: {port} is not a TCP port (1-65535)")
    for key, networks in (
        ("network.blocked_networks", n.blocked_networks),
        ("network.allowed_networks", n.allowed_networks),
    ):
        for text in networks:
            try:
                ipaddress.IPv4Network(text)
            except ValueError as exc:
                problems.append(f"{key}: {text!r} is not an IPv4 network like 10.1.2.3/32 ({exc})")
    if not 1 <= n.proxy_port <= 65535:
        problems.append(f"network.proxy_port: {n.proxy_port} is not a TCP port (1-65535)")
    if n.proxy:
        parts = urllib.parse.urlsplit(n.proxy)
        try:
            proxy_port = parts.port
        except ValueError:
            proxy_port = None
        if parts.scheme != "http" or not parts.hostname or proxy_port is None or parts.path not in ("", "/"):
            problems.append(f"network.proxy: {n.proxy!r} is not a proxy URL like http://proxy.example.com:8080")
        elif parts.username or parts.password or parts.query or parts.fragment:
            problems.append(
                "network.proxy: give the URL without credentials (they go into network.proxy_credentials_file)"
            )
    elif n.proxy_credentials_file:
        problems.append("network.proxy_credentials_file: set without network.proxy")
    for entry in n.no_proxy:
        if not entry or any(c.isspace() or c == "," for c in entry):
            problems.append(f"network.no_proxy: {entry!r} is not a host, domain or network")


def parse_settings(text: str, source: str = "<config>") -> Settings:
    """Parse and validate config text; raise ConfigError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for section, value in raw.items():
        if section not in _SECTIONS:
            problems.append(f"{section}: unknown section (known: {', '.join(_SECTIONS)})")
            continue
        if not isinstance(value, dict):
            problems.append(f"{section}: must be a table")
            continue
        cls = _SECTIONS[section]
        defaults = cls()
        kinds = {f.name: str(f.type) for f in fields(cls)}
        known = set(kinds)
        kwargs = {}
        for name, item in value.items():
            if name not in known:
                problems.append(f"{section}.{name}: unknown key (known: {', '.join(sorted(known))})")
                continue
            kwargs[name] = _coerce(section, name, kinds[name], getattr(defaults, name), item, problems)
        sections[section] = cls(**kwargs)
    settings = Settings(**sections)
    _check(settings, problems)
    if problems:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(problems))
    return settings


def config_path(explicit: str | None, environ: Mapping[str, str]) -> str:
    return explicit or environ.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_PATH


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def settings_toml(settings: Settings) -> str:
    """`settings` as a config file that `parse_settings` reads back to the same settings (for a
    config derived from another, e.g. the demo's with its git server's port open)."""
    lines = []
    for section in _SECTIONS:
        lines.append(f"[{section}]")
        values = getattr(settings, section)
        lines += [f"{f.name} = {_toml_value(getattr(values, f.name))}" for f in fields(values)]
        lines.append("")
    return "\n".join(lines)
