"""`libvirt-executor doctor`: check the host, one line per check with the fix."""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from executor.adapters import forwarder, hostinfo, registry_daemon
from executor.adapters.cachestore import CacheStore
from executor.adapters.hostfiles import load_base_image, load_settings, qcow2_header
from executor.adapters.hypervisor import Hypervisor, connect
from executor.adapters.prometheus import ask_health
from executor.adapters.statedir import StateDir
from executor.admin import mirror as mirror_admin
from executor.admin import pool as pool_admin
from executor.core import accel, mirror, naming, proxy
from executor.core.jobenv import Job
from executor.core.jsonvalues import object_at
from executor.core.nwfilter_xml import FILTER_NAME, build_job_filter, same_rules
from executor.core.settings import GIB, Settings, metrics_address
from executor.core.text import printable
from executor.errors import ConfigError, ExecutorError, SystemFailure, describe
from executor.jobvm import headroom, layercache, runnervolume
from executor.jobvm.accel import choose_accel
from executor.stages.cleanup import cleanup
from executor.stages.prepare import prepare
from executor.stages.run import run

MIN_HOST_FREE = 256 * 1024**2  # state and console-log filesystems
PROBE_JOB_ID_BASE = 999_999_999_000_000_000  # doctor --boot's VM: far above any real job id
PROXY_CHECK_TARGET = "registry-1.docker.io:443"  # what every job host reaches: Docker Hub over HTTPS


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: skipped, because something it needs failed
    detail: str
    fix: str = ""
    warning: bool = False  # passes, but something works less than it could (the fix says what)

    def line(self) -> str:
        status = "warn" if self.warning and self.ok else {True: "ok  ", False: "FAIL", None: "skip"}[self.ok]
        text = f"{status}  {self.name:<13} {self.detail}"
        if self.fix and (self.ok is False or self.warning):
            text += f"  -> fix: {self.fix}"
        return text


def _check_image(settings: Settings) -> Check:
    fix = "libvirt-executor image build"
    try:
        image = load_base_image(settings.image.dir)
    except ConfigError as exc:
        return Check("base image", False, str(exc), fix)
    problems = []
    sizes = object_at(image.manifest, "sizes")
    for path, key in ((image.disk, "disk_bytes"), (image.kernel, "kernel_bytes"), (image.initrd, "initrd_bytes")):
        want = sizes.get(key)
        have = path.stat().st_size
        if isinstance(want, int) and want != have:
            problems.append(f"{path.name} is {have} bytes, the manifest says {want}")
    try:
        virtual, backed = qcow2_header(image.disk)
        if backed:
            problems.append(f"{image.disk.name} has a backing file (the base must be self-contained)")
        if image.virtual_bytes and virtual != image.virtual_bytes:
            problems.append(f"{image.disk.name} has virtual size {virtual}, the manifest says {image.virtual_bytes}")
    except (OSError, ValueError) as exc:
        problems.append(str(exc))
    if problems:
        return Check("base image", False, f"{image.dir} does not match its manifest: " + "; ".join(problems), fix)
    built = image.manifest.get("built_at", "?")
    return Check(
        "base image",
        True,
        f"{image.dir} matches its manifest (kernel {image.manifest.get('kernel_version', '?')}, built {built})",
    )


def _check_mirror(url: str) -> Check:
    """One of the operator's own docker.registry_mirrors."""
    problem = registry_daemon.probe(url, timeout=5)
    if problem is None:
        return Check("mirror", True, f"{url} answers on /v2/")
    if problem.startswith("HTTP"):
        return Check(
            "mirror",
            False,
            f"{url}: {problem}",
            "point docker.registry_mirrors at a registry (distribution proxy cache)",
        )
    return Check(
        "mirror",
        False,
        f"{url} unreachable: {problem}",
        "start the mirror, or remove it from docker.registry_mirrors",
    )


def _check_proxy(settings: Settings, target: str = PROXY_CHECK_TARGET) -> Check:
    """The forwarder answers where VMs reach it, and the company's proxy takes its credentials
    (a CONNECT through both, as a VM's HTTPS request goes)."""
    url = proxy.forwarder_url(settings)
    status, said = forwarder.connect_status(str(settings.gateway), settings.network.proxy_port, target)
    if status is None:
        return Check(
            "proxy",
            False,
            f"the proxy forwarder {url} does not answer ({said})",
            "the host agent runs it: `libvirt-executor agent start`; see its log (agent-<prefix>.log, proxy-<prefix>.log)",
        )
    if status in (401, 407):
        return Check(
            "proxy",
            False,
            f"{settings.network.proxy} refused the forwarder's credentials ({said})",
            "put the right user:password into network.proxy_credentials_file (the agent picks it up within seconds)",
        )
    if status != 200:
        return Check(
            "proxy",
            True,
            f"{url} -> {settings.network.proxy} answers and takes the credentials, but could not reach {target} ({said})",
            "check what the company's proxy allows (and this host's name resolution)",
            warning=True,
        )
    return Check("proxy", True, f"{url} -> {settings.network.proxy}: a CONNECT to {target} went through")


def _mirror_checks(settings: Settings) -> list[Check]:
    """Our registry mirror: running, answering where VMs reach it and nowhere else, its
    upstream reachable, its cache within the cap."""
    if not settings.mirror.enabled:
        return [
            Check("registry mirror", True, "disabled (mirror.enabled = false): every job pulls from the registries")
        ]
    st = mirror_admin.status(settings)
    checks = []
    if st.answering and st.cache_only_because:
        checks.append(
            Check(
                "registry mirror",
                True,
                f"{st.url} answers, serving its cache only ({len(st.repositories)} repositories, read-only): "
                f"{st.cache_only_because}. Jobs pull what it has from it, the rest from their registry directly",
                "nothing to do here if the upstream's outage is known: the mirror pulls through again by "
                "itself once it answers; else check the host's internet access (and mirror.upstream)",
                warning=True,
            )
        )
    elif st.answering:
        checks.append(
            Check(
                "registry mirror",
                True,
                f"{st.url} answers (port {settings.mirror.port} open to job VMs in the network policy); "
                f"{st.used_bytes / GIB:.2f} of {settings.mirror.max_gib} GiB, {len(st.repositories)} repositories",
            )
        )
    else:
        running = f"its supervisor runs (pid {st.supervisor_pid})" if st.supervisor_pid else "it is not running"
        checks.append(
            Check(
                "registry mirror",
                False,
                f"{st.url} does not answer ({st.problem}); {running}. Jobs still work, pulling directly",
                f"libvirt-executor mirror start; see {mirror_admin.mirror_dir(settings).log}",
            )
        )
    if st.foreign_listeners:
        checks.append(
            Check(
                "mirror listen",
                False,
                f"something also listens on port {settings.mirror.port} at {', '.join(st.foreign_listeners)} "
                "(the mirror must listen only on the VM network's host address)",
                "stop that service (Debian's docker-registry.service listens on every address)",
            )
        )
    else:
        checks.append(Check("mirror listen", True, f"port {settings.mirror.port} is bound only at {st.url}"))
    if st.upstream_problem:
        # Jobs still run (from the cache, or pulling directly): worth knowing, not a failure.
        checks.append(
            Check(
                "mirror upstream",
                True,
                f"{st.upstream} unreachable from this host: {st.upstream_problem}",
                "check the host's internet access (and mirror.upstream)",
                warning=True,
            )
        )
    else:
        checks.append(Check("mirror upstream", True, f"{st.upstream} answers"))
    return checks


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
        add(
            Check(
                "config",
                False,
                " ".join(str(exc).split()),
                f"edit {config_file} (see config.example.toml), or run libvirt-executor setup",
            )
        )
        for name in (
            "libvirt",
            "accelerator",
            "storage pool",
            "disk space",
            "headroom",
            "network",
            "network policy",
            "base image",
            "state dirs",
        ):
            add(Check(name, None, "needs a valid config"))
        return checks

    add(_check_state_dirs(settings))
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
            for name in ("accelerator", "storage pool", "disk space", "headroom", "network", "network policy"):
                add(Check(name, None, "needs libvirt"))
    image = add(_check_image(settings))
    add(_check_runner_binary(settings))
    if settings.cache.mode == "host":
        add(_check_host_cache(settings))
    for check in _mirror_checks(settings):
        add(check)
    for url in settings.docker.registry_mirrors:
        add(_check_mirror(url))
    if proxy.enabled(settings):
        add(_check_proxy(settings))
    if settings.pool.size > 0 and libvirt_ok:
        add(_check_pool_agent(settings))
    if settings.metrics.listen:
        add(_check_metrics(settings))
    if boot:
        if not libvirt_ok or not image.ok or any(c.ok is False for c in checks):
            add(Check("boot", None, "a probe VM needs every check above to pass"))
        else:
            for check in _boot_probe(settings):
                add(check)
    return checks


def _check_pool_agent(settings: Settings) -> Check:
    """With pool.size > 0 the agent must run, or every job boots cold."""
    st = pool_admin.status(settings)
    agent = st["agent"]
    if not agent["running"]:
        return Check(
            "warm pool",
            False,
            f"pool.size = {st['size']} but no host agent runs: every job boots cold",
            "libvirt-executor agent start",
        )
    report = agent["last_round"] or {}
    fresh = time.time() - float(report.get("updated") or 0) < 60
    detail = (
        f"agent pid {agent['pid']}: {st['idle']} of {st['size']} idle, {st['booting']} booting, {st['in_job']} in a job"
    )
    if st["drained"]:
        return Check("warm pool", True, detail + "; drained", "libvirt-executor pool fill", warning=True)
    if not fresh:
        return Check(
            "warm pool",
            False,
            detail + "; its last round is over a minute old (stuck?)",
            "libvirt-executor agent stop; libvirt-executor agent start",
        )
    if report.get("last_error") and st["idle"] < st["size"]:
        return Check(
            "warm pool", True, detail + f"; last error: {report['last_error']}", "see the agent's log", warning=True
        )
    return Check("warm pool", True, detail)


def _check_metrics(settings: Settings) -> Check:
    """The agent's /metrics and /healthz answer on [metrics] listen."""
    listen = settings.metrics.listen
    status, said = ask_health(*metrics_address(listen))
    if status is None:
        return Check(
            "metrics",
            True,
            f"nothing answers on {listen} ({said}): no metrics for Prometheus",
            "libvirt-executor agent start (its log says if the address is taken)",
            warning=True,
        )
    if status != 200:
        return Check(
            "metrics",
            False,
            f"the agent on {listen} says it is unhealthy: {printable(said.strip())[:300]}",
            "see the agent's log",
        )
    return Check("metrics", True, f"the agent serves http://{listen}/metrics, healthy")


def _check_runner_binary(settings: Settings) -> Check:
    try:
        path = runnervolume.find_binary(settings)
    except ConfigError as exc:
        return Check("gitlab-runner", False, str(exc), "point runner.binary at the runner's binary, or remove it")
    if path is None:
        return Check(
            "gitlab-runner",
            True,
            "no gitlab-runner binary on PATH: jobs run, but artifacts, caches and dependencies are disabled",
            "install gitlab-runner on this host, or set runner.binary",
            warning=True,
        )
    return Check("gitlab-runner", True, f"{path} goes into every job VM (read-only volume, one per binary hash)")


def _check_host_cache(settings: Settings) -> Check:
    root = Path(settings.cache.dir)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        used = sum(a.size for a in CacheStore(root).archives())
        free = hostinfo.free_bytes(str(root))
    except OSError as exc:
        return Check("host cache", False, f"{root}: {exc.strerror}", "libvirt-executor setup, or fix cache.dir")
    cap = settings.cache.max_total_gib * GIB
    detail = f"{root}: {used / GIB:.2f} of {settings.cache.max_total_gib:g} GiB used, {free / GIB:.1f} GiB free"
    if free < cap - used:
        return Check(
            "host cache",
            True,
            detail + " (less than the cap allows)",
            "free space, or lower cache.max_total_gib",
            warning=True,
        )
    return Check("host cache", True, detail)


def _check_state_dirs(settings: Settings) -> Check:
    problems = []
    for directory in (settings.paths.state_dir, settings.paths.console_log_dir):
        path = Path(directory)
        if not path.is_dir():
            problems.append(f"{path} is missing")
            continue
        if hostinfo.free_bytes(str(path)) < MIN_HOST_FREE:
            problems.append(f"{path} has less than {MIN_HOST_FREE // 2**20} MiB free")
    mode = Path(settings.paths.state_dir).stat().st_mode & 0o777 if Path(settings.paths.state_dir).is_dir() else 0o700
    if mode & 0o077:
        problems.append(f"{settings.paths.state_dir} is mode {mode:o}, must be 0700 (it holds SSH keys)")
    if problems:
        return Check("state dirs", False, "; ".join(problems), "libvirt-executor setup (and chmod 700 the state dir)")
    return Check("state dirs", True, f"{settings.paths.state_dir} and {settings.paths.console_log_dir} present")


def _libvirt_checks(settings: Settings, hv: Hypervisor, add: Callable[[Check], Check]) -> None:
    domains = hv.domains()
    add(Check("libvirt", True, f"connected to {settings.libvirt.uri} ({len(domains)} domains)"))
    add(_check_accel(settings, hv))
    kvm_device = _check_kvm_device()
    if kvm_device is not None:
        add(kvm_device)
    for check in _check_pool(settings, hv):
        add(check)
    add(_check_headroom(settings, hv))
    add(_check_network(settings, hv))
    add(_check_network_policy(settings, hv))
    if settings.docker_cache.enabled:
        add(_check_docker_cache(settings, hv))


def _check_docker_cache(settings: Settings, hv: Hypervisor) -> Check:
    c = settings.docker_cache
    try:
        image = load_base_image(settings.image.dir)
    except ConfigError:
        image = None
    if image is not None and "e2fsprogs" not in object_at(image.manifest, "packages"):
        return Check(
            "docker cache",
            False,
            "the base image predates the Docker layer cache (no e2fsprogs)",
            "libvirt-executor image build",
        )
    if not hv.pool_exists(c.pool):
        return Check(
            "docker cache", True, f"pool {c.pool} is made at the first job", "libvirt-executor setup", warning=True
        )
    inv = layercache.inventory(hv, settings, StateDir(settings.paths.state_dir))
    free = hv.pool_free_bytes(c.pool)
    cap = c.max_total_gib * GIB
    detail = (
        f"{len(inv.lineages)} lineages, {inv.total_bytes / GIB:.2f} of {c.max_total_gib:g} GiB used "
        f"({c.max_gib:g} GiB per lineage) in {c.dir}, {free / GIB:.1f} GiB free"
    )
    if free < cap - inv.total_bytes:
        return Check(
            "docker cache",
            True,
            detail + " (less than the cap allows)",
            "free space, or lower docker_cache.max_total_gib",
            warning=True,
        )
    return Check("docker cache", True, detail)


def _check_accel(settings: Settings, hv: Hypervisor) -> Check:
    try:
        choice = choose_accel(settings, hv)
    except ConfigError as exc:
        return Check("accelerator", False, str(exc), 'load the kvm module, or set libvirt.accel = "auto" or "tcg"')
    if choice.accel == "kvm":
        return Check("accelerator", True, f"KVM ({choice.reason})")
    return Check("accelerator", True, f"TCG, software emulation, boots ~10x slower: {choice.reason}")


def _check_pool(settings: Settings, hv: Hypervisor) -> list[Check]:
    pool = settings.libvirt.pool
    try:
        free = hv.pool_free_bytes(pool)
    except (ConfigError, SystemFailure) as exc:
        return [
            Check("storage pool", False, str(exc), "libvirt-executor setup"),
            Check("disk space", None, "needs the storage pool"),
        ]
    active = Check("storage pool", True, f"{pool} active at {settings.libvirt.pool_path}")
    disk = settings.vm.disk_gib
    if free >= disk * GIB:
        return [
            active,
            Check("disk space", True, f"{free / GIB:.1f} GiB free in pool {pool} (one job may use {disk} GiB)"),
        ]
    return [
        active,
        Check(
            "disk space",
            False,
            f"{free / GIB:.1f} GiB free in pool {pool}, less than one job's disk ({disk} GiB)",
            "free space on the pool's filesystem (`libvirt-executor reap`), or lower vm.disk_gib",
        ),
    ]


def _check_headroom(settings: Settings, hv: Hypervisor) -> Check:
    """What prepare's admission check would decide for a job now."""
    try:
        image_bytes = load_base_image(settings.image.dir).virtual_bytes
    except ConfigError:
        image_bytes = 0
    try:
        room = headroom.measure(hv, settings, headroom.vm_disk_bytes(settings, image_bytes))
    except (ConfigError, SystemFailure) as exc:
        return Check("headroom", None, f"cannot measure: {exc}")
    memory = (
        "unknown"
        if room.memory_available is None
        else f"{room.memory_available / 2**20:.0f} MiB, {room.memory_committed / 2**20:.0f} MiB of it promised to "
        "running VMs"
    )
    detail = (
        f"pool {room.pool_free / GIB:.1f} GiB free, {room.pool_committed / GIB:.1f} GiB of it promised to "
        f"existing disks; memory available {memory}"
    )
    problems = room.problems()
    if not settings.admission.enabled:
        return Check("headroom", True, f"{detail}; admission control is off (admission.enabled)")
    if problems:
        return Check(
            "headroom",
            False,
            "prepare refuses jobs now: " + "; ".join(problems),
            "free pool space or memory (`libvirt-executor reap`), or lower vm.disk_gib / vm.memory_mib",
        )
    return Check("headroom", True, f"room for {room.jobs_that_fit()} more job VM(s) now: {detail}")


def _check_network(settings: Settings, hv: Hypervisor) -> Check:
    network = settings.libvirt.network
    active = hv.network_active(network)
    if active is None:
        return Check("network", False, f"network {network} does not exist", "libvirt-executor setup")
    if not active:
        return Check(
            "network",
            False,
            f"network {network} is not active",
            f"virsh net-start {network} (or libvirt-executor setup)",
        )
    return Check("network", True, f"{network} active ({settings.libvirt.subnet})")


def _check_network_policy(settings: Settings, hv: Hypervisor) -> Check:
    """The nwfilter that keeps VMs off the host, the LAN and cloud metadata, and what it needs."""
    nwfilter = settings.libvirt.nwfilter
    if nwfilter != FILTER_NAME:
        what = f"libvirt.nwfilter = {nwfilter!r}" if nwfilter else "no nwfilter"
        return Check(
            "network policy",
            False,
            f"{what}: job VMs can reach the host's services, the LAN and cloud metadata",
            f'set libvirt.nwfilter = "{FILTER_NAME}" (libvirt-executor setup defines it)',
        )
    defined = hv.nwfilter_xml(nwfilter)
    if defined is None:
        return Check("network policy", False, f"nwfilter {nwfilter} does not exist", "libvirt-executor setup")
    if not same_rules(defined, build_job_filter(nwfilter)):
        return Check(
            "network policy", False, f"nwfilter {nwfilter} differs from this version's rules", "libvirt-executor setup"
        )
    bridged = hostinfo.bridge_netfilter()
    if not bridged:
        state = "not loaded" if bridged is None else "off (net.bridge.bridge-nf-call-iptables = 0)"
        return Check(
            "network policy",
            False,
            f"br_netfilter is {state}: the filter's IP rules never see the VMs' traffic",
            "modprobe br_netfilter && sysctl -w net.bridge.bridge-nf-call-iptables=1 (and make both persistent)",
        )
    net = settings.network
    ports = ", ".join(str(p) for p in sorted({53, *net.allow_host_ports, *mirror.host_ports(settings)}))
    return Check(
        "network policy",
        True,
        f"nwfilter {nwfilter}: host ports {ports}, {len(net.blocked_networks)} blocked networks + the host's "
        f"addresses, {len(net.allowed_networks)} allowed; IPv6 dropped",
    )


def _check_kvm_device(path: str = hostinfo.KVM_DEVICE) -> Check | None:
    device = hostinfo.kvm_device(path)
    if device is None:
        return None  # no KVM at all: the accelerator check says so
    mode = device.mode & 0o777
    problem = accel.kvm_device_problem(device.mode, device.group)
    if problem is None:
        return Check("kvm device", True, f"{path} is {device.group}:{mode:04o}")
    return Check(
        "kvm device",
        False,
        problem,
        f"chgrp kvm {path} && chmod 0660 {path} (what udev does; scripts/setup.sh does it)",
    )


def _boot_probe(settings: Settings) -> list[Check]:
    """Boot one VM through prepare (SSH and dockerd answering), ask the registry mirror's API
    from inside it when the mirror is on, then clean it up."""
    job = Job(
        job_id=PROBE_JOB_ID_BASE + os.getpid() % 1_000_000,
        project_id=None,
        project="doctor-probe",
        pipeline_id=None,
        runner_id=None,
        timeout_s=900,
    )
    lines: list[str] = []
    started = time.monotonic()
    ok, detail = False, "probe VM did not finish"
    from_vm: Check | None = None
    try:
        prepare(settings, job, out=lines.append)
        ok, detail = True, (lines[-1] if lines else "probe VM ready")
        if settings.mirror.enabled:
            from_vm = _mirror_from_vm(settings, job)
    except Exception as exc:  # an unexpected error is a failed check too, never a crash of doctor
        detail = f"probe VM failed after {time.monotonic() - started:.0f} s: {describe(exc)}"
    finally:
        try:
            cleanup(settings, job)
        except ExecutorError as exc:
            ok, detail = False, f"{detail}; and its cleanup failed: {exc}"
    boot = Check("boot", ok, detail, "" if ok else "run with --debug; see the console log tail above")
    return [boot] if from_vm is None else [boot, from_vm]


def _mirror_from_vm(settings: Settings, job: Job) -> Check:
    """GET /v2/ of the mirror from the probe VM, the way its dockerd reaches it (bash's
    /dev/tcp: no HTTP client is needed in the image)."""
    address, port = str(settings.gateway), settings.mirror.port
    script = f"exec 3<>/dev/tcp/{address}/{port} || exit 3\nprintf 'GET /v2/ HTTP/1.0\\r\\n\\r\\n' >&3\nhead -n 1 <&3\n"
    output = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="lvx-doctor-") as tmp:
        path = Path(tmp, "probe.sh")
        path.write_text(script)
        try:
            run(settings, job, str(path), "build_script", stdout=output, stderr=output)
        except ExecutorError as exc:
            answer = output.getvalue().decode("utf-8", "replace").strip()
            return Check(
                "mirror from VM",
                False,
                f"the probe VM cannot reach {address}:{port}: {describe(exc)} {answer}".strip(),
                f"mirror.port {port} must be open in the network policy (libvirt-executor setup) and the mirror running",
            )
    status = output.getvalue().decode("utf-8", "replace").strip().splitlines()
    first = status[-1] if status else ""
    if " 200 " in first or " 401 " in first:
        return Check("mirror from VM", True, f"a job VM gets {first!r} from http://{address}:{port}/v2/")
    return Check("mirror from VM", False, f"http://{address}:{port}/v2/ answered {first!r} in the probe VM", "")
