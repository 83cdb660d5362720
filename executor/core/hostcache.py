"""The runner's local cache kept on the host between throwaway VMs (`[cache] mode = "host"`).

gitlab-runner's local cache is `<cache_dir>/<project dir>/<key>/cache.zip` inside the job's
environment, which dies with the VM. The executor copies a project's archives into the VM's
cache_dir before `restore_cache` and the new or changed ones back after `archive_cache`.

On the host, archives are filed under the project id from the job payload (which a job cannot
forge), each under a hash of its path in the VM: no job-controlled text ever becomes a host path,
and a job only ever gets its own project's archives. The paths themselves are job-controlled
(cache keys), so each is validated before it is used in the VM again.

Pure module: the decisions (what a listing from the VM says, what to copy back, what to evict);
`adapters.cachestore` keeps the files, `stages.hostcache` moves them.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ARCHIVE_NAME = "cache.zip"
MAX_ARCHIVES = 1000  # per listing from a VM; more is not a cache, it is an attack
MAX_PATH = 1024
MAX_DEPTH = 16


@dataclass(frozen=True)
class VMArchive:
    """A cache archive in the VM: its path below cache_dir, size and mtime (Unix seconds)."""

    path: str
    size: int
    mtime: int


@dataclass(frozen=True)
class StoredArchive:
    """A cache archive kept on the host."""

    project_id: int
    entry: str  # file name stem on the host: entry_name(path)
    path: str  # below the VM's cache_dir
    size: int
    mtime: int  # the archive's mtime in the VM, restored with it
    used: float  # when it was last stored or restored (host clock)


def valid_path(path: str) -> bool:
    """A relative path below cache_dir ending in cache.zip: no '..', '.', empty or hidden
    control characters in any component, and bounded in length and depth."""
    if not path or len(path) > MAX_PATH or path.startswith("/"):
        return False
    parts = path.split("/")
    if len(parts) < 2 or len(parts) > MAX_DEPTH or parts[-1] != ARCHIVE_NAME:
        return False
    for part in parts:
        if part in ("", ".", "..") or len(part.encode("utf-8", "surrogateescape")) > 255:
            return False
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in part):
            return False
    return True


def entry_name(path: str) -> str:
    return hashlib.sha256(path.encode("utf-8")).hexdigest()[:40]


def listing_command(cache_dir: str) -> str:
    """What lists the VM's archives: `<size> <mtime> <path>` records, NUL-terminated."""
    return (
        f"sudo -n find {shlex.quote(cache_dir)} -xdev -type f -name {ARCHIVE_NAME} "
        "-printf '%s %T@ %P\\0' 2>/dev/null; exit 0"
    )


def parse_listing(output: str) -> tuple[list[VMArchive], list[str]]:
    """The VM's archives from `listing_command`'s output, and what was wrong with the rest
    (the VM's word is hostile input: every record is checked, at most MAX_ARCHIVES kept)."""
    archives: list[VMArchive] = []
    rejected: list[str] = []
    for record in output.split("\0"):
        if not record:
            continue
        size_text, _, rest = record.partition(" ")
        mtime_text, _, path = rest.partition(" ")
        try:
            size, mtime = int(size_text), int(float(mtime_text))
        except ValueError:
            rejected.append(_printable(record))
            continue
        if size < 0 or mtime < 0 or not valid_path(path):
            rejected.append(_printable(path))
            continue
        if len(archives) >= MAX_ARCHIVES:
            rejected.append(f"{_printable(path)} (more than {MAX_ARCHIVES} archives)")
            continue
        archives.append(VMArchive(path, size, mtime))
    return archives, rejected


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:200]


def to_copy_back(
    archives: Iterable[VMArchive], stored: Mapping[str, StoredArchive], restored: Mapping[str, tuple[int, int]]
) -> list[VMArchive]:
    """The VM's archives that are new or changed: not what the host keeps for the same path, and
    not what the executor restored into this VM (an archive evicted from the host meanwhile is
    still in the VM, unchanged, and must not come back as if the job had written it)."""
    return [
        a
        for a in archives
        if (a.size, a.mtime) != restored.get(a.path)
        and ((s := stored.get(a.path)) is None or (s.size, s.mtime) != (a.size, a.mtime))
    ]


def evictions(
    stored: Iterable[StoredArchive], project_id: int, max_project_bytes: int, max_total_bytes: int
) -> list[StoredArchive]:
    """What to delete so that the project stays within its limit and all projects within the
    total, least recently used first."""
    oldest_first = sorted(stored, key=lambda a: (a.used, a.entry))
    chosen: list[StoredArchive] = []
    project_bytes = sum(a.size for a in oldest_first if a.project_id == project_id)
    for a in oldest_first:
        if project_bytes <= max_project_bytes:
            break
        if a.project_id == project_id:
            chosen.append(a)
            project_bytes -= a.size
    total = sum(a.size for a in oldest_first) - sum(a.size for a in chosen)
    for a in oldest_first:
        if total <= max_total_bytes:
            break
        if a not in chosen:
            chosen.append(a)
            total -= a.size
    return chosen


def mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB"
