"""The per-project Docker layer cache: decisions only (jobvm.layercache does the work).

A job VM's /var/lib/docker can live on a disk of its own: a qcow2 overlay of its project's
*lineage* head, whose writes never touch the head. Each project has two lineages, GitLab's own
cache separation (`-protected` / `-non_protected` cache keys): jobs on protected refs read and
write the protected one; the project's other jobs write the unprotected one, and read it, or
the protected one while theirs does not exist. The project id and `git_info.protected` come from
the job payload, which a job cannot forge; never from a variable. Another project's lineage is
never named for a job.

When a job that may write ends successfully, its disk becomes the lineage's new head (the head's
file is never written again); a failed job's disk is deleted. A head is thus a chain of overlays,
which the host agent flattens into one volume once it is deeper than FLATTEN_DEPTH. Every volume
lives in the cache's own libvirt pool, named `<lineage>.<vm>.<token>.qcow2` (a job's disk) or
`<lineage>.flat-<token>.qcow2` (a flattened head).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DISK_SERIAL = "lvx-docker"  # how the guest finds the disk (/sys/block/vd*/serial)
GUEST_TOOL = "/usr/sbin/lvx-docker-disk"  # the image's script that mounts and releases it
FLATTEN_DEPTH = 3  # the agent flattens a head made of more overlays than this
MAX_DEPTH = 8  # without the agent, the remover flattens a head this deep itself
PROTECTED, UNPROTECTED = "protected", "unprotected"
FLAT_MARK = ".flat-"

_LINEAGE = re.compile(
    r"^(?P<prefix>[a-z][a-z0-9-]{0,15})-p(?P<project>[1-9][0-9]{0,17})-(?P<kind>protected|unprotected)$"
)
_VOLUME = re.compile(r"^(?P<lineage>[a-z0-9-]+)\.(?P<owner>[a-z0-9-]+)(\.[0-9a-f]{1,32})?\.qcow2$")


def lineage_name(prefix: str, project_id: int, protected: bool) -> str:
    return f"{prefix}-p{project_id}-{PROTECTED if protected else UNPROTECTED}"


def parse_lineage(name: str) -> tuple[str, int, bool] | None:
    """(name prefix, project id, protected) of a lineage name; None if it is not one."""
    m = _LINEAGE.match(name)
    if m is None:
        return None
    return m["prefix"], int(m["project"]), m["kind"] == PROTECTED


def job_volume_name(lineage: str, vm: str, token: str) -> str:
    """A job's disk; `token` (hex) tells a retried prepare's disk from its earlier attempt's."""
    return f"{lineage}.{vm}.{token}.qcow2"


def flat_volume_name(lineage: str, token: str) -> str:
    return f"{lineage}{FLAT_MARK}{token}.qcow2"


def volume_lineage(volume: str) -> str | None:
    """The lineage a volume of the cache pool belongs to; None for a file that is not ours."""
    m = _VOLUME.match(volume)
    return m["lineage"] if m and parse_lineage(m["lineage"]) else None


def volume_vm(volume: str) -> str | None:
    """The VM a job's disk was made for; None for a flattened head or a foreign file."""
    m = _VOLUME.match(volume)
    if m is None or parse_lineage(m["lineage"]) is None or m["owner"].startswith("flat-"):
        return None
    return m["owner"]


@dataclass(frozen=True)
class CachePlan:
    """What one job's Docker disk is: an overlay of `base` (a head of lineage `read`; both ""
    for an empty disk), written back as the head of `write` if the job succeeds."""

    read: str
    write: str
    base: str

    def describe(self) -> str:
        """The prepare line's words for it."""
        if not self.read:
            start = f"no cached layers yet for {_kind(self.write)} lineage {self.write}: an empty disk"
        elif self.read == self.write:
            start = f"the {_kind(self.read)} lineage {self.read}"
        else:
            start = f"the {_kind(self.read)} lineage {self.read} (read only: this job's own has no head yet)"
        return f"{start}; written back as {self.write}'s head if the job succeeds"


def _kind(lineage: str) -> str:
    parsed = parse_lineage(lineage)
    return PROTECTED if parsed and parsed[2] else UNPROTECTED


def plan(prefix: str, project_id: int | None, protected: bool, heads: Mapping[str, str]) -> CachePlan | None:
    """The job's Docker disk; None without a project id (nothing to key the cache by).
    `heads`: lineage name -> head volume, only for lineages made by the current image."""
    if project_id is None:
        return None
    own = lineage_name(prefix, project_id, protected)
    if heads.get(own):
        return CachePlan(read=own, write=own, base=heads[own])
    if not protected:
        trusted = lineage_name(prefix, project_id, True)
        if heads.get(trusted):
            return CachePlan(read=trusted, write=own, base=heads[trusted])
    return CachePlan(read="", write=own, base="")


# --- verdicts: may the job's disk become its lineage's head? ---------------------------------

VERDICT_OK = "ok"
VERDICT_FAILED = "failed"
RUNNING = "running "
# Its failure does not fail the job (GitLab ignores after_script errors by default).
NEUTRAL_STAGES = frozenset({"after_script", "cleanup_file_variables"})


def stage_started(verdict: str, stage: str) -> str:
    """The job's verdict once `stage` starts: a stage that never ends (killed) writes nothing."""
    if verdict == VERDICT_FAILED or stage in NEUTRAL_STAGES:
        return verdict
    return RUNNING + stage


def stage_ended(verdict: str, stage: str, succeeded: bool) -> str:
    if verdict == VERDICT_FAILED or stage in NEUTRAL_STAGES:
        return verdict
    return VERDICT_OK if succeeded else VERDICT_FAILED


def may_write(verdict: str) -> bool:
    """Whether the job got this far without a failure: every stage that started ended well."""
    return verdict == VERDICT_OK


# --- volumes: what is alive, what is evicted ------------------------------------------------


@dataclass(frozen=True)
class CacheVolume:
    name: str
    backing: str  # the volume (of the cache pool) it overlays; "" for none or a foreign file
    bytes: int  # allocated on the host


def chain(head: str, volumes: Mapping[str, CacheVolume]) -> list[str]:
    """`head` and the volumes below it, top first (a missing link or a loop ends it)."""
    names: list[str] = []
    name = head
    while name and name in volumes and name not in names:
        names.append(name)
        name = volumes[name].backing
    return names


def live_volumes(volumes: Mapping[str, CacheVolume], roots: Iterable[str]) -> set[str]:
    return {name for root in roots for name in chain(root, volumes)}


def garbage(volumes: Mapping[str, CacheVolume], roots: Iterable[str], flattening: bool) -> list[str]:
    """Volumes no head and no job's disk needs (`roots`: the heads and the disks of VMs that
    still exist). A flattened head still being written is not garbage while `flattening`."""
    live = live_volumes(volumes, roots)
    return sorted(name for name in volumes if name not in live and not (flattening and FLAT_MARK in name))


def chain_bytes(head: str, volumes: Mapping[str, CacheVolume]) -> int:
    return sum(volumes[name].bytes for name in chain(head, volumes))


@dataclass(frozen=True)
class Eviction:
    lineage: str
    bytes: int  # what its head's chain held
    why: str


def evictions(
    volumes: Mapping[str, CacheVolume],
    heads: Mapping[str, str],
    used: Mapping[str, float],
    in_use: Iterable[str],
    max_lineage_bytes: int,
    max_total_bytes: int,
) -> list[Eviction]:
    """Lineages to drop: every one whose chain holds more than `max_lineage_bytes`, then the
    least recently `used` until what stays alive (heads and `in_use` disks) fits in
    `max_total_bytes`. A disk in use stays until its job ends, so it counts but is not evicted."""
    out: list[Eviction] = []
    remaining = dict(heads)
    for lineage, head in sorted(heads.items()):
        size = chain_bytes(head, volumes)
        if size > max_lineage_bytes:
            out.append(
                Eviction(
                    lineage, size, f"{size_text(size)} is over docker_cache.max_gib ({size_text(max_lineage_bytes)})"
                )
            )
            del remaining[lineage]
    busy = list(in_use)

    def total() -> int:
        return sum(volumes[name].bytes for name in live_volumes(volumes, [*remaining.values(), *busy]))

    for lineage in sorted(remaining, key=lambda name: (used.get(name, 0.0), name)):
        current = total()
        if current <= max_total_bytes:
            break
        size = chain_bytes(remaining.pop(lineage), volumes)
        out.append(
            Eviction(
                lineage,
                size,
                f"least recently used while all lineages hold {size_text(current)}, over docker_cache.max_total_gib "
                f"({size_text(max_total_bytes)})",
            )
        )
    return out


def needs_flatten(head: str, volumes: Mapping[str, CacheVolume], depth: int = FLATTEN_DEPTH) -> bool:
    return len(chain(head, volumes)) > depth


def size_text(size: int) -> str:
    """Bytes for a log line: MiB below a GiB."""
    return f"{size / 1024**3:.2f} GiB" if size >= 1024**3 else f"{size / 1024**2:.1f} MiB"
