"""The registry mirror: a pull-through cache on the host that every job VM's dockerd uses.

It is Debian's `docker-registry` (distribution 2.8) in proxy mode, listening only on the host's
VM-network address, so that a job reaches it and nothing else does. This module is the pure
part: the registry's config file, which mirror URLs a VM's daemon gets, the numbers `mirror
status` shows, which cached repositories to evict when the cache outgrows its cap, and which
listening sockets on the mirror's port are out of place.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from executor.core.settings import GIB, Settings
from executor.core.text import printable

RUN_AS = "docker-registry"  # the unprivileged user Debian's package creates
# distribution's debug server (expvar: /debug/vars) listens on loopback, same port: the hit and
# miss counters of `mirror status`, never reachable from a VM.
DEBUG_ADDRESS = "127.0.0.1"
# Evict down to this share of max_gib, so that a full cache is not pruned again at the next pull.
LOW_WATERMARK = 0.8
MODE_PROXY = "proxy"  # pulling through from the upstream
MODE_CACHE_ONLY = "cache-only"  # the upstream does not answer: serving what is cached, read-only
FAILED_PROBES_TO_SWITCH = 2


def listen_address(settings: Settings) -> str:
    return f"{settings.gateway}:{settings.mirror.port}"


def mirror_url(settings: Settings) -> str:
    """What a VM's dockerd gets in `registry-mirrors` (plain HTTP: the traffic never leaves the
    host's bridge, and dockerd honours the scheme of a mirror URL)."""
    return f"http://{listen_address(settings)}"


def registry_config(settings: Settings, data_dir: str, password: str | None, mode: str = MODE_PROXY) -> str:
    """distribution's config file for the mirror in `mode`. JSON is YAML, so no YAML writer is
    needed. `password` (the upstream's, when mirror.username is set) is the one secret in it:
    the file is written 0640 root:docker-registry.

    MODE_CACHE_ONLY is the same registry over the same storage without `proxy:` (it never
    calls the upstream, so it starts and answers while the upstream is down) and read-only
    (distribution's maintenance flag: it writes nothing, as the proxy accepts no push either)."""
    m = settings.mirror
    proxy: dict[str, str] = {"remoteurl": m.upstream.rstrip("/")}
    if m.username:
        proxy["username"] = m.username
        proxy["password"] = password or ""
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": data_dir},
            # Eviction deletes repositories, and garbage-collect needs deletes enabled to remove
            # what they referenced.
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {
            "addr": listen_address(settings),
            "debug": {"addr": f"{DEBUG_ADDRESS}:{m.port}"},
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if mode == MODE_CACHE_ONLY:
        config["storage"]["maintenance"] = {"readonly": {"enabled": True}}
    else:
        config["proxy"] = proxy
    return json.dumps(config, indent=2) + "\n"


@dataclass
class UpstreamWatch:
    """Which mode the mirror's registry runs in, from what the supervisor's probes of the
    upstream say: pulling through (MODE_PROXY) while it answers, serving the cache only
    (MODE_CACHE_ONLY) while it does not. A mirror starting without an upstream starts serving
    its cache at once (distribution's proxy would exit); a running one switches after
    FAILED_PROBES_TO_SWITCH failed probes in a row (one lost answer is no outage), and back
    at the first answer."""

    upstream: str = ""
    mode: str = MODE_PROXY
    since: float = 0.0  # when the current mode began (Unix seconds)
    reason: str = ""  # why the cache only: the upstream's last problem
    failed: int = 0

    def starting(self, problem: str | None, now: float) -> str:
        self.failed = 0 if problem is None else FAILED_PROBES_TO_SWITCH
        self._enter(MODE_PROXY if problem is None else MODE_CACHE_ONLY, problem, now)
        return self.mode

    def probed(self, problem: str | None, now: float) -> bool:
        """Record one probe; whether the mode changed (the registry must be restarted)."""
        self.failed = 0 if problem is None else self.failed + 1
        if self.mode == MODE_CACHE_ONLY:
            if problem is None:
                return self._enter(MODE_PROXY, None, now)
            self.reason = problem
            return False
        return self.failed >= FAILED_PROBES_TO_SWITCH and self._enter(MODE_CACHE_ONLY, problem, now)

    def proxy_exited(self, problem: str | None, now: float) -> bool:
        """The proxy registry exited by itself: serve the cache if the upstream is the cause."""
        if self.mode != MODE_PROXY or problem is None:
            return False
        self.failed = FAILED_PROBES_TO_SWITCH
        return self._enter(MODE_CACHE_ONLY, problem, now)

    def _enter(self, mode: str, problem: str | None, now: float) -> bool:
        changed = mode != self.mode or not self.since
        if changed:
            self.mode, self.since = mode, now
        self.reason = problem or ""
        return changed

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "since": self.since, "reason": self.reason, "upstream": self.upstream}


def cache_only_because(state: Mapping[str, Any] | None) -> str | None:
    """ "upstream X unreachable since T (why)" when the supervisor's mode file `state` says the
    mirror serves its cache only; None when it pulls through (or nobody knows)."""
    if not state or state.get("mode") != MODE_CACHE_ONLY:
        return None
    since = state.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else "?"
    reason = printable(str(state.get("reason") or "no answer"), "?")[:200]
    return f"upstream {printable(str(state.get('upstream')), '?')} unreachable since {when} ({reason})"


def host_ports(settings: Settings) -> tuple[int, ...]:
    """The host port job VMs need open for the mirror (the network policy adds it)."""
    return (settings.mirror.port,) if settings.mirror.enabled else ()


def daemon_mirrors(settings: Settings, mirror_answers: bool) -> list[str]:
    """`registry-mirrors` for a VM's dockerd: ours first when it is enabled and answering (a
    mirror that is down is left out, so no pull waits for it), then the operator's own."""
    ours = [mirror_url(settings)] if settings.mirror.enabled and mirror_answers else []
    return ours + [url for url in settings.docker.registry_mirrors if url not in ours]


@dataclass(frozen=True)
class ProxyCounters:
    requests: int
    hits: int
    misses: int
    bytes_pulled: int  # from the upstream


@dataclass(frozen=True)
class ProxyStats:
    blobs: ProxyCounters
    manifests: ProxyCounters


def proxy_stats(expvars: Mapping[str, Any]) -> ProxyStats | None:
    """The proxy's counters from distribution's /debug/vars (registry.proxy.{blobs,manifests}),
    None when they are not there. They count since the registry last started."""
    try:
        proxy = expvars["registry"]["proxy"]
        return ProxyStats(*(_counters(proxy[kind]) for kind in ("blobs", "manifests")))
    except (KeyError, TypeError, ValueError):
        return None


def _counters(raw: Mapping[str, Any]) -> ProxyCounters:
    values = [raw[k] for k in ("Requests", "Hits", "Misses", "BytesPulled")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError("not a counter")
    return ProxyCounters(*values)


@dataclass(frozen=True)
class CachedRepository:
    name: str  # e.g. library/busybox
    last_used: float  # when it was last pulled (the newest tag or manifest link's mtime)
    size: int  # bytes of the blobs it references (blobs shared with others count in each)


def evictions(repositories: Iterable[CachedRepository], used: int, max_gib: float) -> list[CachedRepository]:
    """Which cached repositories to delete, least recently pulled first, so that `used` bytes
    come down to the low watermark of the cap; none while the cache is within its cap. Shared
    blobs make this an estimate: the caller garbage-collects, measures and asks again."""
    cap = max_gib * GIB
    if used <= cap:
        return []
    target = int(cap * LOW_WATERMARK)
    chosen = []
    for repo in sorted(repositories, key=lambda r: (r.last_used, r.name)):
        if used <= target:
            break
        chosen.append(repo)
        used -= repo.size
    return chosen


def foreign_listeners(
    listeners: Iterable[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]], settings: Settings
) -> list[str]:
    """Listening sockets on the mirror's port that are not the mirror's own address (nor its
    loopback debug server): a mirror or another service there is reachable from places it must
    not be. `listeners` are (address, port) of every listening TCP socket on the host."""
    port = settings.mirror.port
    allowed = {settings.gateway, ipaddress.IPv4Address(DEBUG_ADDRESS)}
    return sorted({f"{_bracketed(a)}:{p}" for a, p in listeners if p == port and a not in allowed})


def _bracketed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


def parse_proc_net_tcp(
    text: str, ipv6: bool = False
) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of each listening socket (state 0A) in the text of /proc/net/tcp (or
    tcp6 with `ipv6`): addresses are hex in host byte order, per 32-bit word."""
    found: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A":
            continue
        try:
            hex_address, hex_port = fields[1].split(":")
            words = [bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8)]
            packed = b"".join(words)
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = (
                ipaddress.IPv6Address(packed) if ipv6 else ipaddress.IPv4Address(packed)
            )
            found.append((address, int(hex_port, 16)))
        except ValueError:
            continue
    return found
