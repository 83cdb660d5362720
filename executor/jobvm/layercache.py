"""The per-project Docker layer cache on this host (decisions in core.layercache).

- `make_disk`: prepare makes the job's Docker disk, an overlay of its lineage's head, before a
  cold VM boots with it, or before `plug` gives it to a claimed warm-pool VM.
- `release`: cleanup, while the VM still runs, has the guest let go of the disk cleanly when
  the job may write its lineage (every stage that started ended well: jobvm.cacheverdict).
- `settle`: teardown, once QEMU is gone, makes a released disk its lineage's head, or deletes it.
- `tidy`: evicts lineages over their bounds and deletes volumes nothing needs any more;
  `flatten_deep_heads` copies a deep head into one volume. The host agent runs both in the
  background; the remover and reap run `tidy` too, so that jobs never need the agent.

The lineages' heads are files in `<state_dir>/docker-cache/` (StateDir), changed only under its
lock; the volumes live in the cache's own libvirt pool. A head's file is never written again: a
job writes only its own overlay, so two jobs of one lineage at once each make a whole disk, and
the later one to finish becomes the head.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from executor.adapters.guest_docker import DockerUnavailable
from executor.adapters.guest_ssh import GuestSSH
from executor.adapters.hostfiles import sync_file
from executor.adapters.hypervisor import Hypervisor, VolumeInfo
from executor.adapters.statedir import StateDir
from executor.core import layercache
from executor.core.baseimage import BaseImage
from executor.core.domain_xml import build_dir_pool, build_overlay_volume, docker_disk_xml, volume_backing_path
from executor.core.jobenv import Job
from executor.core.settings import GIB, Settings
from executor.core.waiting import poll
from executor.errors import SystemFailure
from executor.jobvm import cacheverdict
from executor.jobvm.boot import ReadyVM, vm_limits
from executor.jobvm.record import running_record

log = logging.getLogger(__name__)

LOCK_WAIT_S = 60.0  # others hold the cache's lock for a head's read or swap and a few deletions
# The guest removes the job's containers, stops dockerd, trims and unmounts: within cleanup's
# own time limit, with room left for the rest of cleanup.
RELEASE_SHARE = 0.5


@dataclass(frozen=True)
class JobDisk:
    plan: layercache.CachePlan
    volume: str
    path: str


def ensure_pool(hv: Hypervisor, settings: Settings) -> bool:
    """Define and start the cache's pool if needed; whether anything changed."""
    c = settings.docker_cache
    return hv.ensure_pool(c.pool, build_dir_pool(c.pool, c.dir))


def _recipe(image: BaseImage) -> str:
    return str(image.manifest.get("recipe_hash", ""))


def _heads(lineages: dict[str, dict[str, Any]], recipe: str | None = None) -> dict[str, str]:
    """lineage -> head volume, of the lineages made by `recipe` (None: any image)."""
    return {
        name: record["head"]
        for name, record in lineages.items()
        if isinstance(record.get("head"), str) and record["head"] and (recipe is None or record.get("recipe") == recipe)
    }


def make_disk(
    hv: Hypervisor, settings: Settings, state: StateDir, image: BaseImage, job: Job, vm: str
) -> JobDisk | None:
    """The job's Docker disk for its VM `vm`, recorded in the job's state dir; None when the
    cache is off or the job has no project id."""
    if not settings.docker_cache.enabled:
        return None
    pool = settings.docker_cache.pool
    ensure_pool(hv, settings)
    with state.docker_cache_lock(LOCK_WAIT_S):
        lineages = state.read_lineages()
        heads = _heads(lineages, _recipe(image))
        plan = layercache.plan(settings.vm.name_prefix, job.project_id, job.protected, heads)
        if plan is None:
            return None
        base = hv.volume_info(pool, plan.base) if plan.base else None
        if plan.base and base is None:  # its file is gone (removed by hand): start that lineage again
            log.warning("the head %s of %s is missing: dropping the lineage", plan.base, plan.read)
            state.remove_lineage(plan.read)
            heads.pop(plan.read)
            plan = layercache.plan(settings.vm.name_prefix, job.project_id, job.protected, heads)
            assert plan is not None
            base = hv.volume_info(pool, plan.base) if plan.base else None
        name = layercache.job_volume_name(plan.write, vm, secrets.token_hex(4))
        state.write_job_record(
            vm,
            cacheverdict.DISK_RECORD,
            {"read": plan.read, "write": plan.write, "volume": name, "recipe": _recipe(image), "made": time.time()},
        )
        capacity = max(settings.vm.disk_gib * GIB, base.capacity if base else 0)
        path = hv.create_volume(pool, build_overlay_volume(name, base.path if base else "", capacity))
        if plan.read:
            state.write_lineage(plan.read, {**lineages[plan.read], "used": time.time()})
    return JobDisk(plan, name, path)


def plug(hv: Hypervisor, settings: Settings, ready: ReadyVM, disk: JobDisk) -> None:
    """Give a claimed warm-pool VM its job's Docker disk: plugged in, mounted on
    /var/lib/docker, and dockerd restarted on it before the job uses it."""
    hv.attach_disk(ready.vm, docker_disk_xml(disk.path, vm_limits(settings)))
    result = ready.ssh.capture(f"sudo -n {layercache.GUEST_TOOL} attach", timeout=settings.timeouts.docker)
    if not result.succeeded:
        raise SystemFailure(f"{ready.vm} could not mount its Docker disk: {result.stderr.strip()[-300:]}")

    def answers() -> bool | None:
        ready.answering()
        try:
            return ready.docker.ping() or None
        except DockerUnavailable:
            return None

    if not poll(answers, settings.timeouts.docker, interval=0.2, max_interval=1.0):
        raise SystemFailure(
            f"dockerd in {ready.vm} did not answer within {settings.timeouts.docker:.0f} s on its Docker disk"
        )


def release(hv: Hypervisor, settings: Settings, state: StateDir, vm: str) -> str:
    """Cleanup's part, while the job's VM still runs: when the job may write its lineage, the
    guest removes the job's containers, volumes and networks (images and build cache stay),
    stops dockerd cleanly and unmounts the disk, which is then marked to be kept. What
    happened, for the log ("" for a job without a Docker disk)."""
    disk = cacheverdict.disk_record(state, vm)
    if disk is None:
        return ""
    lineage = disk.get("write", "")
    verdict = cacheverdict.verdict(state, vm)
    if not layercache.may_write(verdict):
        if verdict == layercache.VERDICT_FAILED:
            why = "the job failed"
        elif verdict.startswith(layercache.RUNNING):
            why = f"its {verdict[len(layercache.RUNNING) :]} stage never ended"
        else:
            why = "no stage of it ran"
        return f"Docker disk not kept for {lineage}: {why}"
    try:
        record = running_record(hv, vm)
        key = state.read_client_key(vm)
        with GuestSSH.connect(record.ip, settings.vm.user, key, record.host_key, settings.timeouts.ssh_connect) as ssh:
            result = ssh.capture(
                f"sudo -n {layercache.GUEST_TOOL} release", timeout=settings.timeouts.cleanup * RELEASE_SHARE
            )
    except SystemFailure as exc:
        return f"Docker disk not kept for {lineage}: {exc}"
    if not result.succeeded:
        return f"Docker disk not kept for {lineage}: the VM could not release it: {result.stderr.strip()[-300:]}"
    used = result.stdout.strip().rpartition("used ")[2]
    state.write_job_record(vm, cacheverdict.DISK_RECORD, {**disk, "keep": True})
    return f"Docker disk released for {lineage}" + (
        f" ({layercache.size_text(int(used))} used)" if used.isdigit() else ""
    )


def settle(hv: Hypervisor, settings: Settings, state: StateDir, vm: str) -> str:
    """Teardown's part, once the VM's QEMU is gone: a released disk becomes its lineage's
    head, any other is deleted; then `tidy`. What happened ("" if the VM had no Docker disk)."""
    disk = cacheverdict.disk_record(state, vm)
    if disk is None:
        return ""
    info = hv.domain(vm)
    if info is not None and info.active:
        raise SystemFailure(f"{vm} still runs: its Docker disk is left for later")
    pool = settings.docker_cache.pool
    volume, lineage = disk["volume"], str(disk.get("write", ""))
    with state.docker_cache_lock(LOCK_WAIT_S):
        path = hv.volume_path(pool, volume)
        before = state.read_lineages().get(lineage, {})
        pruned = float(before.get("pruned", 0.0)) >= float(disk.get("made", 0.0))
        if disk.get("keep") and not pruned and path is not None and layercache.volume_lineage(volume) == lineage:
            sync_file(path)
            state.write_lineage(
                lineage,
                {
                    "head": volume,
                    "recipe": disk.get("recipe", ""),
                    "used": time.time(),
                    "written": time.time(),
                    "writes": int(before.get("writes", 0)) + 1,
                },
            )
            outcome = f"{volume} is the head of {lineage} now"
        else:
            hv.delete_volume(pool, volume)
            outcome = f"{volume} deleted" + (
                f" ({lineage} was pruned while the job ran)" if pruned and disk.get("keep") else ""
            )
    log.info("Docker layer cache: %s", outcome)
    try:
        tidy(hv, settings, state, gone=vm)  # with an earlier attempt's disk of this VM
        # The host agent flattens heads early; without it, the remover does at MAX_DEPTH.
        flatten_deep_heads(hv, settings, state, layercache.MAX_DEPTH)
    except SystemFailure as exc:  # the disk is settled; the next tidy does the rest
        log.warning("Docker layer cache: tidying after %s failed: %s", vm, exc)
    return outcome


@dataclass(frozen=True)
class Tidied:
    evicted: list[layercache.Eviction]
    deleted: list[str]
    dropped: list[str]  # lineages whose head was gone or made by another image


def _own(settings: Settings, lineage: str | None) -> bool:
    """Whether a lineage is this executor's (instances on one host share the state dir, and
    may share the cache's pool)."""
    parsed = layercache.parse_lineage(lineage or "")
    return parsed is not None and parsed[0] == settings.vm.name_prefix


def _lineages(settings: Settings, state: StateDir) -> dict[str, dict[str, Any]]:
    return {name: record for name, record in state.read_lineages().items() if _own(settings, name)}


def _cache_volumes(settings: Settings, infos: list[VolumeInfo]) -> dict[str, layercache.CacheVolume]:
    by_path = {info.path: info.name for info in infos}
    return {
        info.name: layercache.CacheVolume(info.name, by_path.get(volume_backing_path(info.xml), ""), info.allocation)
        for info in infos
        if _own(settings, layercache.volume_lineage(info.name))
    }


def _in_use(hv: Hypervisor, state: StateDir, volumes: dict[str, layercache.CacheVolume], gone: str = "") -> list[str]:
    """Job disks whose VM still exists or is being worked on (its lock held); not those of
    `gone`, the VM whose teardown asks (it holds the lock, its domain is gone)."""
    return sorted(
        name
        for name in volumes
        if (vm := layercache.volume_vm(name)) and vm != gone and (state.lock_held(vm) or hv.domain(vm) is not None)
    )


def tidy(hv: Hypervisor, settings: Settings, state: StateDir, recipe: str | None = None, gone: str = "") -> Tidied:
    """Evict lineages over docker_cache.max_gib, then the least recently used while all of them
    hold more than max_total_gib, drop lineages whose head is gone (or, given the current image's
    `recipe`, that another image made), and delete every volume no head and no live job needs
    (`gone`: a VM being torn down, whose disks no job needs any more). Each eviction is logged."""
    c = settings.docker_cache
    if not hv.pool_exists(c.pool):
        return Tidied([], [], [])
    with state.docker_cache_flattening() as free:
        flattening = not free
    with state.docker_cache_lock(LOCK_WAIT_S):
        volumes = _cache_volumes(settings, hv.volumes(c.pool))
        lineages = _lineages(settings, state)
        heads = {name: head for name, head in _heads(lineages).items() if head in volumes}
        pruned_since = time.time() - settings.timeouts.max_lifetime  # no job that predates it still runs
        dropped = sorted(
            name
            for name, record in lineages.items()
            if (name not in heads and float(record.get("pruned", 0.0)) < pruned_since)
            or (name in heads and recipe is not None and record.get("recipe") != recipe)
        )
        for name in dropped:
            state.remove_lineage(name)
            heads.pop(name, None)
            log.info("Docker layer cache: dropped lineage %s (its head is gone, or another image made it)", name)
        in_use = _in_use(hv, state, volumes, gone)
        used = {name: float(lineages[name].get("used", 0.0)) for name in heads}
        evicted = layercache.evictions(volumes, heads, used, in_use, int(c.max_gib * GIB), int(c.max_total_gib * GIB))
        for eviction in evicted:
            state.remove_lineage(eviction.lineage)
            heads.pop(eviction.lineage)
            log.warning("Docker layer cache: evicted lineage %s: %s", eviction.lineage, eviction.why)
        deleted = layercache.garbage(volumes, [*heads.values(), *in_use], flattening)
        for name in deleted:
            hv.delete_volume(c.pool, name)
    return Tidied(evicted, deleted, dropped)


def flatten_deep_heads(
    hv: Hypervisor, settings: Settings, state: StateDir, depth: int = layercache.FLATTEN_DEPTH
) -> list[str]:
    """Copy every head made of more than `depth` overlays into one volume, which becomes the
    head unless a job wrote a newer one meanwhile. Outside the cache's lock (a copy takes as long
    as the data); one process at a time. What was done, one line each."""
    pool = settings.docker_cache.pool
    if not hv.pool_exists(pool):
        return []
    done: list[str] = []
    with state.docker_cache_flattening() as free:
        if not free:
            return []
        with state.docker_cache_lock(LOCK_WAIT_S):
            volumes = _cache_volumes(settings, hv.volumes(pool))
            deep = {
                lineage: head
                for lineage, head in _heads(_lineages(settings, state)).items()
                if layercache.needs_flatten(head, volumes, depth)
            }
        for lineage, head in sorted(deep.items()):
            source = hv.volume_info(pool, head)
            if source is None:
                continue
            name = layercache.flat_volume_name(lineage, secrets.token_hex(4))
            started = time.monotonic()
            sync_file(hv.clone_volume(pool, build_overlay_volume(name, "", source.capacity), head))
            with state.docker_cache_lock(LOCK_WAIT_S):
                record = state.read_lineages().get(lineage)
                if record is None or record.get("head") != head:
                    hv.delete_volume(pool, name)  # written or evicted meanwhile
                    continue
                state.write_lineage(lineage, {**record, "head": name})
            depth_was = len(layercache.chain(head, volumes))
            done.append(f"flattened {lineage}: {depth_was} overlays into {name} in {time.monotonic() - started:.1f}s")
    for line in done:
        log.info("Docker layer cache: %s", line)
    if done:
        tidy(hv, settings, state)
    return done


@dataclass(frozen=True)
class LineageView:
    """One lineage as `list --json` shows it (times: Unix seconds)."""

    name: str
    project_id: int
    protected: bool
    head: str
    overlays: int  # the files its head is made of
    bytes: int
    used: int
    written: int
    writes: int


@dataclass(frozen=True)
class Inventory:
    lineages: list[LineageView]
    total_bytes: int  # every volume of the cache's pool
    in_use: int  # job disks of VMs that exist


def inventory(hv: Hypervisor, settings: Settings, state: StateDir) -> Inventory:
    """What `list`, `doctor` and the metrics show; empty when the cache's pool does not exist."""
    pool = settings.docker_cache.pool
    if not hv.pool_exists(pool):
        return Inventory([], 0, 0)
    volumes = _cache_volumes(settings, hv.volumes(pool))
    views = []
    for name, record in sorted(_lineages(settings, state).items()):
        parsed = layercache.parse_lineage(name)
        head = str(record.get("head", ""))
        if parsed is None or not head:
            continue  # a pruned lineage's tombstone
        views.append(
            LineageView(
                name=name,
                project_id=parsed[1],
                protected=parsed[2],
                head=head,
                overlays=len(layercache.chain(head, volumes)),
                bytes=layercache.chain_bytes(head, volumes),
                used=int(record.get("used", 0)),
                written=int(record.get("written", 0)),
                writes=int(record.get("writes", 0)),
            )
        )
    return Inventory(views, sum(v.bytes for v in volumes.values()), len(_in_use(hv, state, volumes)))


def job_disks(hv: Hypervisor, settings: Settings, state: StateDir) -> dict[str, list[str]]:
    """VM -> its job disks that no head is made of (what a job leaves until teardown)."""
    pool = settings.docker_cache.pool
    if not hv.pool_exists(pool):
        return {}
    volumes = _cache_volumes(settings, hv.volumes(pool))
    live = layercache.live_volumes(volumes, _heads(_lineages(settings, state)).values())
    found: dict[str, list[str]] = {}
    for name in volumes:
        vm = layercache.volume_vm(name)
        if vm and name not in live:
            found.setdefault(vm, []).append(name)
    return found


def prune(hv: Hypervisor, settings: Settings, state: StateDir, project_id: int | None = None) -> list[str]:
    """Drop every lineage of this name prefix (or of one project) and delete what no running
    job still reads; the lineages dropped."""
    with state.docker_cache_lock(LOCK_WAIT_S):
        dropped = []
        for name in sorted(_heads(_lineages(settings, state))):
            parsed = layercache.parse_lineage(name)
            if parsed and project_id in (None, parsed[1]):
                # A tombstone: a job that read the lineage before now cannot bring it back.
                state.write_lineage(name, {"pruned": time.time()})
                dropped.append(name)
    tidy(hv, settings, state)
    return dropped


def say_plan(disk: JobDisk | None, out: Callable[[str], None]) -> None:
    if disk is not None:
        out(f"Docker layer cache: {disk.plan.describe()}")
