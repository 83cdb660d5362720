"""What `reap` removes and what `list` shows: a pure decision over an inventory of the host.

`admin.inventory` gathers the facts (domains with their parsed metadata, volumes of our pool,
IP reservations, lock files, per-job directories, console logs, which locks are held right now);
`select` decides. No I/O here, so every rule is unit-tested without a daemon.

The rules, in order of precedence:
* A name that is not `<prefix>-job-<id>` or `<prefix>-pool-<token>` (a warm-pool VM) is not
  ours: never touched, never listed.
* A domain with our name but without our metadata (or with metadata naming another VM) is not
  ours either, and neither is anything else carrying that name: a volume `<name>.qcow2` next to a
  foreign domain `<name>` is left alone.
* A VM whose lock is held is being worked on right now (prepare, cleanup, another reap): it is
  "busy", and neither it nor any of its pieces is touched, whatever its expiry says.
* Our domain is reaped when its expiry has passed (`expires <= now`), when it was created at least
  `older_than` seconds ago (an operator's explicit override), or when it is no longer running
  (shut off or crashed: nothing can use it, and prepare holds the lock while it boots one).
  A VM that cleanup stopped for good (marked "removing") goes too, if its detached remover
  did not finish. An unclaimed pool VM also goes when its boot was abandoned (it says "booting" but nobody
  holds its lock) or, once idle, when no host agent runs to keep it. Otherwise it is "live" and
  kept, even if its job has long finished: only cleanup or expiry end it.
* Pieces (volumes, IP reservations, lock file, job directory, console log, the claims naming a
  pool VM) of a VM name that has no domain at all are orphans, reaped at once.
* An IP reservation with no owner at all (a prepare killed between creating the reservation file
  and writing the VM name into it) is "unowned"; the reaper removes those under the allocation
  lock, where no allocation can be half-way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from executor.core import naming
from executor.core.domain_xml import POOL_BOOTING, POOL_IDLE, JobRecord
from executor.core.domainstate import is_active

REASON_EXPIRED = "expired"
REASON_OLDER_THAN = "older-than"
REASON_STOPPED = "stopped"
REASON_ORPHANED = "orphaned"
REASON_ABANDONED = "abandoned"  # a pool VM whose boot nobody finishes
REASON_AGENT_GONE = "agent-gone"  # an idle pool VM without a host agent to keep it
REASON_CLEANED_UP = "cleaned-up"  # cleanup stopped it, and its remover did not finish


@dataclass(frozen=True)
class DomainEntry:
    name: str
    state: str  # libvirt state name: running, paused, shutoff, crashed, ...
    record: JobRecord | None  # our parsed metadata, None if the domain carries none (not ours)

    @property
    def active(self) -> bool:
        return is_active(self.state)


@dataclass(frozen=True)
class Inventory:
    prefix: str
    domains: tuple[DomainEntry, ...] = ()
    volumes: tuple[str, ...] = ()  # volume names in our pool
    reservations: Mapping[str, str] = field(default_factory=dict)  # ip -> VM name ("" if unowned)
    lock_files: tuple[str, ...] = ()  # VM names with a lock file
    job_dirs: tuple[str, ...] = ()  # VM names with a per-job state directory
    console_logs: tuple[str, ...] = ()  # VM names with a console log
    locked: frozenset[str] = frozenset()  # VM names whose lock a live process holds now
    claims: Mapping[str, str] = field(default_factory=dict)  # job's cold VM name -> pool VM serving it
    agent_running: bool = False  # a host agent keeps this prefix's pool
    removing: frozenset[str] = frozenset()  # VM names that cleanup stopped for good


@dataclass(frozen=True)
class Pieces:
    """The host-side things named after one VM."""

    volumes: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    lock_file: bool = False
    job_dir: bool = False
    console_log: bool = False
    claims: tuple[str, ...] = ()  # the job VM names whose claim names this VM

    def describe(self) -> list[str]:
        parts = [f"volume {v}" for v in self.volumes] + [f"IP reservation {ip}" for ip in self.ips]
        parts += [f"claim of {job}" for job in self.claims]
        if self.job_dir:
            parts.append("job directory")
        if self.console_log:
            parts.append("console log")
        if self.lock_file:
            parts.append("lock file")
        return parts

    def __bool__(self) -> bool:
        return bool(self.volumes or self.ips or self.lock_file or self.job_dir or self.console_log or self.claims)


@dataclass(frozen=True)
class Target:
    vm: str
    reason: str  # one of the REASON_* constants
    domain: DomainEntry | None
    pieces: Pieces


@dataclass(frozen=True)
class Plan:
    reap: tuple[Target, ...]  # what to remove, sorted by VM name
    live: tuple[DomainEntry, ...]  # our domains that stay (not due yet)
    busy: tuple[str, ...]  # our VM names with something present whose lock is held
    not_ours: tuple[str, ...]  # domain names ignored (foreign, or our name without our metadata)
    unowned_ips: tuple[str, ...]  # reservations without any owner name

    def target(self, vm: str) -> Target | None:
        return next((t for t in self.reap if t.vm == vm), None)


def is_our_name(prefix: str, name: str) -> bool:
    return naming.is_vm_name(prefix, name)


def is_ours(prefix: str, domain: DomainEntry) -> bool:
    """Our name, our metadata, and the metadata names this very domain."""
    return is_our_name(prefix, domain.name) and domain.record is not None and domain.record.vm == domain.name


def pieces_of(inv: Inventory, vm: str) -> Pieces:
    return Pieces(
        volumes=tuple(sorted(v for v in inv.volumes if naming.vm_of_volume(inv.prefix, v) == vm)),
        ips=tuple(sorted(ip for ip, owner in inv.reservations.items() if owner == vm)),
        lock_file=vm in inv.lock_files,
        job_dir=vm in inv.job_dirs,
        console_log=vm in inv.console_logs,
        claims=tuple(sorted(job for job, target in inv.claims.items() if target == vm)),
    )


def _piece_owners(inv: Inventory) -> set[str]:
    names: set[str] = set()
    for volume in inv.volumes:
        vm = naming.vm_of_volume(inv.prefix, volume)
        if vm is not None:
            names.add(vm)
    names.update(inv.reservations.values())
    names.update(inv.lock_files)
    names.update(inv.job_dirs)
    names.update(inv.console_logs)
    names.update(inv.claims.values())
    return {n for n in names if is_our_name(inv.prefix, n)}


def _due(inv: Inventory, domain: DomainEntry, now: float, older_than: float | None) -> str | None:
    record = domain.record
    assert record is not None
    if domain.name in inv.removing:
        return REASON_CLEANED_UP
    if record.pool_state == POOL_BOOTING:
        return REASON_ABANDONED  # its booter holds the lock while it boots: a locked one is busy
    if record.pool_state == POOL_IDLE and not inv.agent_running:
        return REASON_AGENT_GONE
    if record.expires <= now:
        return REASON_EXPIRED
    if older_than is not None and record.created <= now - older_than:
        return REASON_OLDER_THAN
    if not domain.active:
        return REASON_STOPPED
    return None


def select(inv: Inventory, now: float, older_than: float | None = None) -> Plan:
    """Decide what `reap` removes at time `now` (Unix seconds)."""
    if older_than is not None and older_than < 0:
        raise ValueError("older_than must not be negative")
    reap: list[Target] = []
    live: list[DomainEntry] = []
    busy: set[str] = set()
    not_ours: list[str] = []
    domain_names = {d.name for d in inv.domains}

    for domain in inv.domains:
        if not is_ours(inv.prefix, domain):
            if is_our_name(inv.prefix, domain.name):
                not_ours.append(domain.name)
            continue
        if domain.name in inv.locked:
            busy.add(domain.name)
            live.append(domain)
            continue
        reason = _due(inv, domain, now, older_than)
        if reason is None:
            live.append(domain)
        else:
            reap.append(Target(domain.name, reason, domain, pieces_of(inv, domain.name)))

    for vm in _piece_owners(inv) - domain_names:
        if vm in inv.locked:
            busy.add(vm)
            continue
        reap.append(Target(vm, REASON_ORPHANED, None, pieces_of(inv, vm)))

    return Plan(
        reap=tuple(sorted(reap, key=lambda t: t.vm)),
        live=tuple(sorted(live, key=lambda d: d.name)),
        busy=tuple(sorted(busy)),
        not_ours=tuple(sorted(not_ours)),
        unowned_ips=tuple(sorted(ip for ip, owner in inv.reservations.items() if not owner)),
    )


def our_domains(inv: Inventory) -> list[DomainEntry]:
    return sorted((d for d in inv.domains if is_ours(inv.prefix, d)), key=lambda d: d.name)


def orphans(inv: Inventory) -> dict[str, Pieces]:
    """VM names of ours that have pieces but no domain (busy ones included: `list` shows them)."""
    names = _piece_owners(inv) - {d.name for d in inv.domains}
    return {vm: pieces_of(inv, vm) for vm in sorted(names)}


# --- durations ------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """'90s', '30m', '2h', '1d', '1h30m' (or a bare number of seconds) -> seconds."""
    value = text.strip().lower()
    if value.isdigit():
        return int(value)
    if not value or _DURATION_PART.sub("", value) != "":
        raise ValueError(f"not a duration: {text!r} (examples: 90s, 30m, 2h, 1d, 1h30m)")
    return sum(int(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(value))


def format_duration(seconds: float) -> str:
    """A short human form: 45s, 12m05s, 3h02m, 2d04h."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
