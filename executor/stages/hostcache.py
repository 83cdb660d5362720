"""`[cache] mode = "host"`: the project's cache archives go into the VM before `restore_cache`
and the new or changed ones come back after `archive_cache` (core.hostcache has the rules).

A cache is an optimisation, as in GitLab: a problem here is said in the job log and the job goes
on, except a lost VM or connection, which is a system failure like anywhere else in `run`.
"""

from __future__ import annotations

import logging
import shlex
import tarfile
import time
from collections.abc import Callable
from typing import BinaryIO

from executor.adapters.cachestore import CacheStore
from executor.adapters.guest_ssh import GuestSSH
from executor.adapters.statedir import StateDir
from executor.core import hostcache
from executor.core.hostcache import StoredArchive, mib
from executor.core.jobenv import Job
from executor.core.settings import GIB, Settings

log = logging.getLogger(__name__)

RESTORE_STAGES = ("restore_cache",)
SAVE_STAGES = ("archive_cache", "archive_cache_on_failure")
MIN_COPY_BYTES_PER_S = 5 * 1024**2  # a copy slower than this (plus a minute) has hung
LISTING_TIMEOUT_S = 60.0
RESTORED_RECORD = "cache-restored"  # in the job's state dir


def enabled(settings: Settings) -> bool:
    return settings.cache.mode == "host"


def restore(settings: Settings, job: Job, vm: str, ssh: GuestSSH, say: Callable[[str], None]) -> None:
    """Copy the project's archives into the VM's cache_dir (owned by the job user, mtimes kept),
    and remember what went in, so that `save` can tell it from what the job writes."""
    if job.project_id is None:
        say("the job payload has no project id: the host cache is not used")
        return
    store = CacheStore(settings.cache.dir)
    archives = sorted(store.archives(job.project_id), key=lambda a: a.path)
    if not archives:
        say(f"no cached archives of project {job.project_id} on the host yet")
        return
    total = sum(a.size for a in archives)
    user = settings.vm.user
    command = (
        f"sudo -n install -d -o {shlex.quote(user)} -g {shlex.quote(user)} -m 0755 {shlex.quote(settings.vm.cache_dir)}"
        f" && sudo -n tar -x -f - -C {shlex.quote(settings.vm.cache_dir)}"
    )
    result = ssh.upload(command, lambda sink: _write_tar(store, archives, user, sink), _copy_timeout(total))
    if not result.succeeded:
        say(f"could not restore the cached archives into the VM: {result.stderr.strip()[:300]}")
        return
    for archive in archives:
        store.mark_used(archive)
    StateDir(settings.paths.state_dir).write_job_record(
        vm, RESTORED_RECORD, {a.path: [a.size, a.mtime] for a in archives}
    )
    say(f"restored {len(archives)} cached archive(s) of project {job.project_id} from the host ({mib(total)})")


def _write_tar(store: CacheStore, archives: list[StoredArchive], user: str, sink: BinaryIO) -> None:
    """A tar stream of the archives at their paths, every directory on the way owned by the job
    user (so that its cache-archiver can add keys beside them)."""
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        seen: set[str] = set()
        for archive in archives:
            parts = archive.path.split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in seen:
                    seen.add(directory)
                    tar.addfile(_tar_info(directory, tarfile.DIRTYPE, 0o755, 0, int(time.time()), user))
            with store.open_archive(archive) as data:
                tar.addfile(_tar_info(archive.path, tarfile.REGTYPE, 0o644, archive.size, archive.mtime, user), data)


def _tar_info(name: str, kind: bytes, mode: int, size: int, mtime: int, user: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, mtime
    info.uname = info.gname = user  # resolved by name in the VM (tar runs as root there)
    return info


def save(settings: Settings, job: Job, vm: str, ssh: GuestSSH, say: Callable[[str], None]) -> None:
    """Copy the VM's new or changed archives to the host, then evict what is over the limits."""
    if job.project_id is None:
        return
    listing = ssh.capture(hostcache.listing_command(settings.vm.cache_dir), timeout=LISTING_TIMEOUT_S)
    archives, rejected = hostcache.parse_listing(listing.stdout)
    for what in rejected[:5]:
        say(f"not keeping {what!r} from the VM's cache dir on the host: not a cache archive path")
    store = CacheStore(settings.cache.dir)
    known = {a.path: a for a in store.archives(job.project_id)}
    max_project = int(settings.cache.max_gib * GIB)
    for archive in hostcache.to_copy_back(archives, known, _restored(settings, vm)):
        if archive.size > max_project:
            say(
                f"cache {archive.path} is {mib(archive.size)}, above cache.max_gib "
                f"({settings.cache.max_gib:g} GiB per project): not kept on the host"
            )
            continue
        _copy_back(settings, store, job.project_id, archive, ssh, say)
    with store.locked():
        evicted = hostcache.evictions(
            store.archives(), job.project_id, max_project, int(settings.cache.max_total_gib * GIB)
        )
        for old in evicted:
            store.delete(old)
    for old in evicted:
        whose = "this project's" if old.project_id == job.project_id else f"project {old.project_id}'s"
        say(f"evicted {whose} least recently used cache {old.path} ({mib(old.size)}) to stay within the limits")


def _restored(settings: Settings, vm: str) -> dict[str, tuple[int, int]]:
    record = StateDir(settings.paths.state_dir).read_job_record(vm, RESTORED_RECORD)
    if not isinstance(record, dict):
        return {}
    return {
        path: (value[0], value[1])
        for path, value in record.items()
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)
    }


def _copy_back(
    settings: Settings,
    store: CacheStore,
    project_id: int,
    archive: hostcache.VMArchive,
    ssh: GuestSSH,
    say: Callable[[str], None],
) -> None:
    source = shlex.quote(f"{settings.vm.cache_dir.rstrip('/')}/{archive.path}")
    try:
        with store.receiving(project_id) as (sink, received):
            result = ssh.download(f"sudo -n cat -- {source}", sink, archive.size, _copy_timeout(archive.size))
            sink.flush()
            if result.overflow or not result.succeeded or result.received != archive.size:
                say(f"cache {archive.path} changed or could not be read while copying it to the host: not kept")
                return
            with store.locked():
                store.store(project_id, archive.path, archive.size, archive.mtime, received)
    except OSError as exc:  # the host's disk, not the job: the job goes on without this cache
        log.warning("cannot keep cache %s of project %s: %s", archive.path, project_id, exc)
        say(f"cache {archive.path} could not be kept on the host ({exc.strerror})")
        return
    say(f"kept cache {archive.path} ({mib(archive.size)}) of project {project_id} on the host")


def _copy_timeout(size: int) -> float:
    return 60.0 + size / MIN_COPY_BYTES_PER_S
