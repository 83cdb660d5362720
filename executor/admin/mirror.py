"""`libvirt-executor mirror ...`: the registry mirror on this host, and its part of `setup`.

The mirror is Debian's docker-registry as a pull-through cache of `[mirror] upstream`, listening
only on the host's VM-network address, run as the package's unprivileged user and supervised by
`mirror serve` (under systemd: our unit runs it; without: `mirror start` detaches it). The
supervisor also keeps the cache within `max_gib`: every few minutes it measures the cache, and
when it is over the cap it stops the registry, deletes the least recently pulled repositories,
garbage-collects the blobs nothing references any more and starts the registry again. Jobs
pull from the upstream directly meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

from executor.adapters import hostinfo, hostservice, registry_daemon
from executor.adapters.hostfiles import read_secret
from executor.adapters.registry_daemon import MirrorDir
from executor.core import mirror
from executor.core.settings import GIB, Settings
from executor.core.waiting import poll

CHECK_EVERY_S = 300.0  # how often the supervisor measures the cache against max_gib
ANSWER_WAIT_S = 20.0  # how long `mirror start` waits for the registry to answer
UPSTREAM_PROBE_TIMEOUT_S = 5.0


def mirror_dir(settings: Settings) -> MirrorDir:
    return MirrorDir(settings.mirror.storage)


def config_text(settings: Settings, mode: str | None = None) -> str:
    """The registry's config for `mode` (None: the mode the running supervisor is in)."""
    password = None
    if settings.mirror.username:
        password = read_secret(settings.mirror.password_file, "mirror.password_file")
    return mirror.registry_config(settings, str(mirror_dir(settings).data), password, mode or current_mode(settings))


def mode_state(settings: Settings) -> dict[str, object] | None:
    """The running supervisor's mode file (pulling through or cache only, since when); None
    when no supervisor runs."""
    return mirror_dir(settings).read_mode() if supervisor(settings).pid() is not None else None


def current_mode(settings: Settings) -> str:
    state = mode_state(settings)
    return mirror.MODE_CACHE_ONLY if state and state.get("mode") == mirror.MODE_CACHE_ONLY else mirror.MODE_PROXY


def supervisor(settings: Settings) -> hostservice.Service:
    mdir = mirror_dir(settings)
    return hostservice.Service(mdir.lock, mdir.log, "the mirror supervisor")


def _serve_command(config_file: str) -> list[str]:
    """`mirror serve` with this config, runnable from anywhere (systemd's unit, a detached start)."""
    return [*hostservice.this_command(), "--config", os.path.abspath(config_file), "mirror", "serve"]


def unit_text(config_file: str) -> str:
    return hostservice.unit_text(
        "libvirt-executor registry mirror (pull-through cache for job VMs)",
        _serve_command(config_file),
        after="network-online.target libvirtd.service",
    )


def set_up(settings: Settings, config_file: str) -> list[str]:
    """Make the mirror's directories and config and have it running (or stopped, when the
    config disables it); what changed."""
    mdir = mirror_dir(settings)
    if not settings.mirror.enabled:
        stopped = "registry mirror stopped (mirror.enabled = false)"
        if hostservice.systemd_running():
            if not hostservice.unit_active(registry_daemon.SYSTEMD_UNIT):
                return []
            hostservice.systemctl("disable", "--now", registry_daemon.SYSTEMD_UNIT)
            return [stopped]
        return [] if supervisor(settings).stop() is None else [stopped]
    changes = mdir.ensure(mirror.RUN_AS)
    if mdir.write_config(config_text(settings), mirror.RUN_AS):
        changes.append(f"wrote the mirror's registry config {mdir.config}")
    restart = bool(changes)
    if hostservice.systemd_running():
        if hostservice.unit_active(registry_daemon.DEBIAN_UNIT):
            hostservice.systemctl("disable", "--now", registry_daemon.DEBIAN_UNIT)
            changes.append(f"stopped and disabled Debian's {registry_daemon.DEBIAN_UNIT} (it listens everywhere)")
        if hostservice.install_unit(registry_daemon.SYSTEMD_UNIT, unit_text(config_file)):
            changes.append(f"installed {hostservice.SYSTEMD_DIR / registry_daemon.SYSTEMD_UNIT}")
            restart = True
        if not hostservice.unit_active(registry_daemon.SYSTEMD_UNIT) or restart:
            hostservice.systemctl("enable", registry_daemon.SYSTEMD_UNIT)
            hostservice.systemctl("restart", registry_daemon.SYSTEMD_UNIT)
            changes.append(f"registry mirror (re)started: {_answer_summary(settings)}")
        return changes
    if restart:
        supervisor(settings).stop()
    if supervisor(settings).pid() is None:
        changes.append(f"registry mirror started: {start(settings, config_file)}")
    return changes


def start(settings: Settings, config_file: str) -> str:
    """Start the supervisor unless it runs; how the mirror is doing afterwards."""
    if hostservice.systemd_running():
        hostservice.systemctl("start", registry_daemon.SYSTEMD_UNIT)
        return _answer_summary(settings)
    mdir = mirror_dir(settings)
    service = supervisor(settings)
    pid = service.pid()
    if pid is None:
        # `serve` writes it too; here a bad password_file fails this command, not a detached process.
        mdir.ensure(mirror.RUN_AS)
        mdir.write_config(config_text(settings), mirror.RUN_AS)
        pid = service.spawn(_serve_command(config_file))
    return f"supervisor pid {pid}; {_answer_summary(settings)}"


def _answer_summary(settings: Settings) -> str:
    """Wait a little for the registry to answer; say where it answers, or why it does not yet."""
    url = mirror.mirror_url(settings)
    last_problem: list[str] = []

    def answers() -> bool:
        problem = registry_daemon.probe(url, timeout=2)
        last_problem[:] = [problem] if problem else []
        return problem is None

    if poll(answers, ANSWER_WAIT_S, interval=0.5, max_interval=0.5):
        return f"answering at {url}"
    reason = last_problem[0]
    log = supervisor(settings)
    tail = log.log_tail(1, prefix="mirror: ") or log.log_tail(1)
    return f"not answering at {url} yet ({reason}); its supervisor keeps restarting it. Last log line: {tail}"


def stop(settings: Settings) -> str:
    if hostservice.systemd_running():
        hostservice.systemctl("stop", registry_daemon.SYSTEMD_UNIT)
        return f"stopped {registry_daemon.SYSTEMD_UNIT}"
    pid = supervisor(settings).stop()
    return "not running" if pid is None else f"stopped (supervisor pid {pid})"


def serve(settings: Settings, say: Callable[[str], None]) -> None:
    """The supervisor, in the foreground until SIGTERM: what systemd or `mirror start` runs."""
    mdir = mirror_dir(settings)
    mdir.ensure(mirror.RUN_AS)

    def maintain() -> None:
        for line in evict(settings):
            say(line)

    service = supervisor(settings)
    with service.hold():
        say(f"serving {mirror.mirror_url(settings)} as a cache of {settings.mirror.upstream}")
        registry_daemon.supervise(
            mdir,
            mirror.RUN_AS,
            config_for=lambda mode: config_text(settings, mode),
            upstream=mirror.UpstreamWatch(settings.mirror.upstream),
            upstream_problem=lambda: registry_daemon.probe(settings.mirror.upstream, timeout=UPSTREAM_PROBE_TIMEOUT_S),
            leftovers=hostinfo.processes_running(registry_daemon.serve_argv(mdir)),
            check_every=CHECK_EVERY_S,
            maintenance_due=lambda: over_cap(settings),
            maintain=maintain,
            say=say,
            rotate_log=service.rotate_log,
        )


def over_cap(settings: Settings) -> bool:
    return mirror_dir(settings).blob_bytes() > settings.mirror.max_gib * GIB


def evict(settings: Settings, rounds: int = 3) -> list[str]:
    """With the registry stopped: delete the least recently pulled repositories and garbage-
    collect until the cache is within its cap (shared blobs may take a second round)."""
    mdir = mirror_dir(settings)
    lines = []
    for _ in range(rounds):
        used = mdir.blob_bytes()
        chosen = mirror.evictions(mdir.cached_repositories(), used, settings.mirror.max_gib)
        if not chosen:
            break
        for repo in chosen:
            mdir.delete_repository(repo.name)
        removed = registry_daemon.garbage_collect(mdir, mirror.RUN_AS)
        lines.append(
            f"cache at {_size(used)}, over mirror.max_gib = {settings.mirror.max_gib:g}: evicted "
            f"{', '.join(r.name for r in chosen)}; garbage-collect removed {removed} blobs; now {_size(mdir.blob_bytes())}"
        )
    return lines


def prune(settings: Settings, config_file: str) -> list[str]:
    """Enforce max_gib now: stop the mirror, evict, start it again if it was running."""
    mdir = mirror_dir(settings)
    was_running = supervisor(settings).pid() is not None
    if was_running:
        stop(settings)
    lines = evict(settings) or [
        f"cache within mirror.max_gib ({_size(mdir.blob_bytes())} of {settings.mirror.max_gib:g} GiB)"
    ]
    if was_running:
        lines.append(f"restarted: {start(settings, config_file)}")
    return lines


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class MirrorStatus:
    enabled: bool
    url: str
    supervisor_pid: int | None
    answering: bool
    problem: str  # why it does not answer, "" when it does
    upstream: str
    upstream_problem: str  # "" when the upstream answers from here
    mode: str | None  # proxy (pulling through) or cache-only; None when no supervisor runs
    mode_since: float | None
    cache_only_because: str  # "upstream ... unreachable since ..." in cache-only mode, else ""
    storage: str
    used_bytes: int
    max_bytes: int
    repositories: list[str]
    foreign_listeners: list[str]  # other sockets on the mirror's port (never wanted)
    blob_hits: int | None
    blob_misses: int | None
    manifest_hits: int | None
    manifest_misses: int | None


def status(settings: Settings) -> MirrorStatus:
    mdir = mirror_dir(settings)
    url = mirror.mirror_url(settings)
    problem = registry_daemon.probe(url) or ""
    upstream_problem = registry_daemon.probe(settings.mirror.upstream, timeout=5) or ""
    state = mode_state(settings) or {}
    mode, since = state.get("mode"), state.get("since")
    stats = None
    if not problem:
        expvars = registry_daemon.debug_vars(f"{mirror.DEBUG_ADDRESS}:{settings.mirror.port}")
        stats = mirror.proxy_stats(expvars) if expvars else None
    return MirrorStatus(
        enabled=settings.mirror.enabled,
        url=url,
        supervisor_pid=supervisor(settings).pid(),
        answering=not problem,
        problem=problem,
        upstream=settings.mirror.upstream,
        upstream_problem=upstream_problem,
        mode=mode if isinstance(mode, str) else None,
        mode_since=float(since) if isinstance(since, (int, float)) else None,
        cache_only_because=mirror.cache_only_because(state) or "",
        storage=str(mdir.root),
        used_bytes=mdir.blob_bytes(),
        max_bytes=int(settings.mirror.max_gib * GIB),
        repositories=sorted(r.name for r in mdir.cached_repositories()),
        foreign_listeners=mirror.foreign_listeners(hostinfo.listening_tcp(), settings),
        blob_hits=stats.blobs.hits if stats else None,
        blob_misses=stats.blobs.misses if stats else None,
        manifest_hits=stats.manifests.hits if stats else None,
        manifest_misses=stats.manifests.misses if stats else None,
    )


def status_dict(st: MirrorStatus) -> dict[str, object]:
    return asdict(st)


def format_status(st: MirrorStatus) -> str:
    lines = [
        f"mirror      {'enabled' if st.enabled else 'disabled (mirror.enabled = false)'}",
        f"serving     {st.url}: " + ("answering" if st.answering else f"NOT answering ({st.problem})"),
        "mode        "
        + (
            f"serving its cache only, read-only: {st.cache_only_because}; it pulls through again once the upstream answers"
            if st.cache_only_because
            else "pulling through from the upstream"
            if st.mode
            else "-"
        ),
        "supervisor  " + (f"pid {st.supervisor_pid}" if st.supervisor_pid else "not running"),
        f"upstream    {st.upstream}: "
        + ("reachable" if not st.upstream_problem else f"unreachable ({st.upstream_problem})"),
        f"disk        {_size(st.used_bytes)} of {_size(st.max_bytes)} in {st.storage}",
        f"cached      {len(st.repositories)} repositories"
        + (f": {', '.join(st.repositories[:10])}" if st.repositories else ""),
    ]
    if st.blob_hits is not None:
        lines.append(
            f"since start blobs {st.blob_hits} hits / {st.blob_misses} misses, "
            f"manifests {st.manifest_hits} hits / {st.manifest_misses} misses"
        )
    if st.foreign_listeners:
        lines.append(f"WARNING     also listening on the mirror's port: {', '.join(st.foreign_listeners)}")
    return "\n".join(lines)
