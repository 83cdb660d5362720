"""What an operator sees without reading job logs: the recent jobs (`libvirt-executor jobs`)
and the metrics the host agent serves (`/metrics`; `libvirt-executor metrics` prints them).

Counters and histograms come from the job history the job processes write (jobvm.journal);
gauges from live state (libvirt's domains, the state dir, the mirror, the host's headroom).
A part that cannot be measured now (libvirtd restarting) is left out of that scrape and
counted in `libvirt_executor_collect_errors`, rather than failing the whole scrape.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from executor import __version__
from executor.adapters import registry_daemon
from executor.adapters.hostfiles import load_base_image
from executor.adapters.hypervisor import connect
from executor.admin import mirror as mirror_admin
from executor.admin.listing import inventory
from executor.core import history, mirror, naming, reaping
from executor.core.domain_xml import POOL_BOOTING, POOL_IDLE
from executor.core.history import JobRow
from executor.core.metrics import COUNTER, GAUGE, HISTOGRAM, INFO, Buckets, Family
from executor.core.settings import GIB, Settings
from executor.errors import ConfigError
from executor.jobvm import headroom, journal

log = logging.getLogger(__name__)

_COUNTERS = {
    journal.JOBS_TOTAL: ("Jobs that ended, by outcome (GitLab's words) and failure reason.", ("outcome", "reason")),
    journal.POOL_CLAIMS_TOTAL: (
        "Warm-pool claims by prepare: hit (an idle VM was handed out), miss (a cold boot), "
        "dead (an idle VM failed its check at the claim and was replaced).",
        ("result",),
    ),
    journal.ADMISSION_REFUSALS_TOTAL: ("Job VMs refused by admission control, by what ran short.", ("resource",)),
    journal.REAPED_TOTAL: ("VMs and orphaned pieces removed by reap, by reason.", ("reason",)),
}
_HISTOGRAMS = {
    journal.PREPARE_SECONDS: ("Prepare's duration (successful ones), by VM source and job mode.", ("source", "mode")),
    journal.STAGE_SECONDS: ("Each run stage's duration, by gitlab-runner stage.", ("stage",)),
    journal.CLEANUP_SECONDS: ("The cleanup stage's duration (what gitlab-runner waits for).", ()),
}


def recent_jobs(settings: Settings, since: float = 0.0) -> list[JobRow]:
    return journal.job_history(settings).jobs(since)


def families(settings: Settings, agent_status: Callable[[], dict[str, object]] | None = None) -> list[Family]:
    """Every metric family now. `agent_status`: the serving agent's own view (its last round)."""
    errors = Family("collect_errors", GAUGE, "Parts of this scrape that could not be measured (1).", ("part",))
    found: list[Family] = []
    parts: list[tuple[str, Callable[[], list[Family]]]] = [
        ("history", lambda: _from_history(settings)),
        ("vms", lambda: _vms(settings)),
        ("mirror", lambda: _mirror(settings)),
        ("image", lambda: _image(settings)),
    ]
    for part, measure in parts:
        try:
            found += measure()
        except Exception as exc:  # one part down (libvirtd restarting) must not fail the scrape
            log.warning("metrics: could not measure %s: %s", part, exc)
            errors.add(1, part=part)
    if agent_status is not None:
        found += _agent(agent_status())
    info = Family("build_info", INFO, "The executor's version.", ("version",))
    found += [info.add({"version": __version__}), errors]
    return found


def _from_history(settings: Settings) -> list[Family]:
    h = journal.job_history(settings)
    counters = {name: Family(name, COUNTER, text, labels) for name, (text, labels) in _COUNTERS.items()}
    lost = {"job": 0.0, "pool": 0.0}
    for metric, labels, value in h.counters():
        if metric == journal.UNRESPONSIVE_GUESTS_TOTAL:
            lost["pool"] += value
        elif metric in counters:
            counters[metric].add(value, **labels)
        if metric == journal.JOBS_TOTAL and labels.get("reason") == history.VM_LOST:
            lost["job"] += value
    unresponsive = Family(
        journal.UNRESPONSIVE_GUESTS_TOTAL,
        COUNTER,
        "Guests found dead or silent: during a job (its stage failed), or idle in the warm pool (replaced).",
        ("where",),
    )
    for where, value in lost.items():
        unresponsive.add(value, where=where)
    histograms = {name: Family(name, HISTOGRAM, text, labels) for name, (text, labels) in _HISTOGRAMS.items()}
    for metric, labels, cumulative, total, count in h.histograms():
        if metric in histograms:
            histograms[metric].add(Buckets(cumulative, total, count), **labels)
    open_jobs = Family("history_open_jobs", GAUGE, "Jobs in the history that have not ended (running or killed).")
    return [*counters.values(), unresponsive, *histograms.values(), open_jobs.add(len(h.open_jobs()))]


def _vms(settings: Settings) -> list[Family]:
    now = time.time()
    try:
        image_bytes = load_base_image(settings.image.dir).virtual_bytes
    except ConfigError:  # no image yet: the configured disk size alone ("image" says what is wrong)
        image_bytes = 0
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        inv = inventory(settings, hv)
        room = headroom.measure(hv, settings, headroom.vm_disk_bytes(settings, image_bytes))
    states = {"idle": 0, "booting": 0, "job": 0, "removing": 0}
    for domain in reaping.our_domains(inv):
        record = domain.record
        assert record is not None
        if domain.name in inv.removing:
            states["removing"] += 1
        elif record.pool_state == POOL_IDLE:
            states["idle"] += 1
        elif record.pool_state == POOL_BOOTING:
            states["booting"] += 1
        else:
            states["job"] += 1
    vms = Family("vms", GAUGE, "Our VMs on this host by state.", ("state",))
    for state, n in states.items():
        vms.add(n, state=state)
    due = Family(
        "reapable",
        GAUGE,
        "VMs or orphaned pieces `reap` would remove now, by reason (a leak until reap runs).",
        ("reason",),
    )
    for reason, n in sorted(Counter(t.reason for t in reaping.select(inv, now).reap).items()):
        due.add(n, reason=reason)
    memory = Family("host_memory_available_bytes", GAUGE, "The host's MemAvailable.")
    if room.memory_available is not None:
        memory.add(room.memory_available)
    return [
        vms,
        due,
        Family("pool_target", GAUGE, "Idle VMs the warm pool keeps (pool.size).").add(settings.pool.size),
        memory,
        Family("host_memory_committed_bytes", GAUGE, "Memory the running VMs' guests may still take.").add(
            room.memory_committed
        ),
        Family("pool_disk_free_bytes", GAUGE, "Free space of the storage pool's filesystem.").add(room.pool_free),
        Family("pool_disk_committed_bytes", GAUGE, "How much the VMs' disks in the pool may still grow.").add(
            room.pool_committed
        ),
        Family("pool_disk_margin_bytes", GAUGE, "Space admission keeps free (admission.pool_margin_gib).").add(
            room.pool_margin
        ),
        Family("jobs_that_fit", GAUGE, "How many more job VMs of the normal size this host can take now.").add(
            room.jobs_that_fit()
        ),
    ]


def _mirror(settings: Settings) -> list[Family]:
    if not settings.mirror.enabled:
        return []
    url = mirror.mirror_url(settings)
    up = registry_daemon.probe(url) is None
    state = mirror_admin.mode_state(settings) or {}
    found = [
        Family("mirror_up", GAUGE, "Whether the registry mirror answers (1) or not (0).").add(1 if up else 0),
        Family(
            "mirror_cache_only", GAUGE, "1 while the mirror serves its cache only (its upstream is unreachable)."
        ).add(1 if mirror.cache_only_because(state) else 0),
        Family("mirror_size_bytes", GAUGE, "Blob bytes the mirror holds.").add(
            mirror_admin.mirror_dir(settings).blob_bytes()
        ),
        Family("mirror_max_bytes", GAUGE, "The mirror's size limit (mirror.max_gib).").add(
            int(settings.mirror.max_gib * GIB)
        ),
    ]
    expvars = registry_daemon.debug_vars(f"{mirror.DEBUG_ADDRESS}:{settings.mirror.port}") if up else None
    stats = mirror.proxy_stats(expvars) if expvars else None
    requests = Family(
        "mirror_requests_total",
        COUNTER,
        "The mirror's answers since it started, from its cache (hit) or its upstream (miss).",
        ("kind", "result"),
    )
    if stats is not None:
        for kind, counts in (("blob", stats.blobs), ("manifest", stats.manifests)):
            requests.add(counts.hits, kind=kind, result="hit").add(counts.misses, kind=kind, result="miss")
    return [*found, requests]


def _image(settings: Settings) -> list[Family]:
    image = load_base_image(settings.image.dir)
    manifest = image.manifest
    info = Family("image", INFO, "The base image job VMs are cloned from.", ("recipe", "built_at", "kernel"))
    return [
        info.add(
            {
                "recipe": str(manifest.get("recipe_hash", ""))[:12],
                "built_at": str(manifest.get("built_at", "")),
                "kernel": str(manifest.get("kernel_version", "")),
            }
        )
    ]


def _agent(status: dict[str, object]) -> list[Family]:
    def number(key: str) -> float:
        value = status.get(key)
        return float(value) if isinstance(value, (int, float)) else 0.0

    return [
        Family("agent_last_round_timestamp_seconds", GAUGE, "When the host agent last finished a round.").add(
            number("updated")
        ),
        Family("pool_boots_total", COUNTER, "Warm-pool VMs booted since the agent started.").add(number("boots")),
        Family("pool_boot_failures_total", COUNTER, "Warm-pool boots that failed since the agent started.").add(
            number("boot_failures")
        ),
    ]
