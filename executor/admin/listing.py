"""`libvirt-executor list`, and the inventory of the host that `list` and `reap` both read.

`inventory` reads the host through the adapters (libvirt, the state directory, the console-log
directory); `core.reaping` decides what is ours, what is expired and what is orphaned.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from executor.adapters.hostfiles import console_log_vms
from executor.adapters.hypervisor import Hypervisor, connect
from executor.adapters.statedir import StateDir
from executor.agent import client as agent_client
from executor.core import naming, reaping
from executor.core.domain_xml import parse_job_record
from executor.core.layercache import size_text
from executor.core.settings import GIB, Settings
from executor.core.text import printable
from executor.core.waiting import poll
from executor.jobvm import layercache

# Cleanup returns once the VM is paused; its remover destroys and removes it within seconds.
REMOVAL_WAIT_S = 60.0


def inventory(
    settings: Settings,
    hv: Hypervisor | None = None,
    state: StateDir | None = None,
    *,
    only: str | None = None,
    probe_locks: bool = True,
) -> reaping.Inventory:
    """Everything on this host that could be ours. `only`: read just that VM's domain (reap's
    re-check under the VM's lock). `probe_locks=False` when the caller holds the lock itself."""
    if hv is None:
        with connect(settings.libvirt.uri, naming.METADATA_NS) as conn:
            return inventory(settings, conn, state, only=only, probe_locks=probe_locks)
    state = state or StateDir(settings.paths.state_dir)
    if only is None:
        infos = hv.domains()
    else:
        info = hv.domain(only)
        infos = [info] if info is not None else []
    domains = tuple(
        reaping.DomainEntry(i.name, i.state, parse_job_record(i.metadata) if i.metadata else None) for i in infos
    )
    lock_files = tuple(state.locked_vms())
    locked = frozenset(vm for vm in lock_files if probe_locks and state.lock_held(vm))
    return reaping.Inventory(
        prefix=settings.vm.name_prefix,
        domains=domains,
        volumes=tuple(hv.volume_names(settings.libvirt.pool)),
        reservations=state.reservations(),
        lock_files=lock_files,
        job_dirs=tuple(state.job_dir_vms()),
        console_logs=tuple(console_log_vms(settings)),
        locked=locked,
        claims=state.claims(),
        removing=frozenset(state.removing_vms()),
        agent_running=agent_client.service(settings, state).pid() is not None,
    )


def leftovers_once_removed(
    settings: Settings, vm: str | None = None, wait: float = REMOVAL_WAIT_S
) -> dict[str, list[str]]:
    """`leftovers`, once cleanup's detached removers had up to `wait` seconds to finish."""
    left: dict[str, list[str]] = {}

    def settled() -> bool:
        left.clear()
        left.update(leftovers(settings, vm))
        return not left

    poll(settled, wait, interval=0.2, max_interval=1.0)
    return left


def leftovers(settings: Settings, vm: str | None = None) -> dict[str, list[str]]:
    """Everything of this prefix (or of one VM) still on the host, per resource class, counted
    from the raw inventory rather than the reaper's rules. Empty means nothing is left."""
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        inv = inventory(settings, hv)
        disks = layercache.job_disks(hv, settings, StateDir(settings.paths.state_dir))
    if vm is None:

        def mine(name: str) -> bool:
            return reaping.is_our_name(inv.prefix, name)
    else:

        def mine(name: str) -> bool:
            return name == vm

    found = {
        "docker_disks": [v for vm_name, volumes in disks.items() if mine(vm_name) for v in volumes],
        "domains": [d.name for d in inv.domains if mine(d.name)],
        "volumes": [v for v in inv.volumes if mine(naming.vm_of_volume(inv.prefix, v) or "")],
        "ip_reservations": [ip for ip, owner in inv.reservations.items() if mine(owner)],
        "locks": [v for v in inv.lock_files if mine(v)],
        "job_dirs": [v for v in inv.job_dirs if mine(v)],
        "console_logs": [v for v in inv.console_logs if mine(v)],
        "claims": [job for job, target in inv.claims.items() if mine(target)],
    }
    return {k: sorted(v) for k, v in found.items() if v}


def list_vms(settings: Settings, now: float | None = None) -> dict[str, Any]:
    """Our VMs and orphaned pieces, as the stable structure `list --json` prints."""
    now = int(time.time() if now is None else now)
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        inv = inventory(settings, hv)
        cache = _docker_cache(settings, hv)
    vms = []
    for d in reaping.our_domains(inv):
        r = d.record
        assert r is not None
        vms.append(
            {
                "name": d.name,
                "job_id": r.job_id or None,
                "source": r.source,
                "pool_state": r.pool_state or None,
                "project_id": r.project_id,
                "project": r.project,
                "pipeline_id": r.pipeline_id,
                "runner_id": r.runner_id,
                "state": d.state,
                "ip": r.ip,
                "accel": r.accel,
                "created": r.created,
                "expires": r.expires,
                "age_s": now - r.created,
                "expires_in_s": r.expires - now,
                "expired": r.expires <= now,
                "busy": d.name in inv.locked,
                "removing": d.name in inv.removing,
            }
        )
    orphans = [
        {
            "vm": vm,
            "volumes": list(p.volumes),
            "ip_reservations": list(p.ips),
            "lock_file": p.lock_file,
            "job_dir": p.job_dir,
            "console_log": p.console_log,
            "claims": list(p.claims),
            "busy": vm in inv.locked,
        }
        for vm, p in reaping.orphans(inv).items()
    ]
    unowned = sorted(ip for ip, owner in inv.reservations.items() if not owner)
    return {
        "format": 1,
        "prefix": settings.vm.name_prefix,
        "now": now,
        "vms": vms,
        "orphans": orphans,
        "unowned_ip_reservations": unowned,
        "docker_cache": cache,
    }


def _docker_cache(settings: Settings, hv: Hypervisor) -> dict[str, Any]:
    c = settings.docker_cache
    inv = layercache.inventory(hv, settings, StateDir(settings.paths.state_dir))
    return {
        "enabled": c.enabled,
        "total_bytes": inv.total_bytes,
        "max_total_bytes": int(c.max_total_gib * GIB),
        "max_lineage_bytes": int(c.max_gib * GIB),
        "disks_in_use": inv.in_use,
        "lineages": [dataclasses.asdict(view) for view in inv.lineages],
    }


def format_json(listing: dict[str, Any]) -> str:
    return json.dumps(listing, indent=2, sort_keys=True)


def _clean(text: object) -> str:
    return printable(str(text), "?") if text is not None else "-"


def format_table(listing: dict[str, Any]) -> str:
    lines: list[str] = []
    if listing["vms"]:
        header = ("NAME", "JOB", "PROJECT", "STATE", "IP", "AGE", "EXPIRES", "ACCEL")
        rows = [header]
        for vm in listing["vms"]:
            left = vm["expires_in_s"]
            expiry = f"in {reaping.format_duration(left)}" if left > 0 else f"{reaping.format_duration(left)} ago (due)"
            state = vm["state"] + (" (busy)" if vm["busy"] else "")
            if vm.get("removing"):
                state = f"being removed, {vm['state']}"
            if vm["pool_state"] in ("idle", "booting"):
                state = f"pool {vm['pool_state']}, {state}"
            rows.append(
                (
                    vm["name"],
                    str(vm["job_id"] or "-"),
                    _clean(vm["project"] or (f"#{vm['project_id']}" if vm["project_id"] else "-"))[:40],
                    state,
                    _clean(vm["ip"] or "-"),
                    reaping.format_duration(vm["age_s"]),
                    expiry,
                    _clean(vm["accel"] or "-"),
                )
            )
        lines += _aligned(rows)
    else:
        lines.append(f"no VMs of this executor (prefix {listing['prefix']!r})")
    if listing["orphans"]:
        lines.append("")
        lines.append("pieces without a domain (`reap` removes them; busy = a stage is working on it now):")
        for o in listing["orphans"]:
            parts = [f"volume {v}" for v in o["volumes"]] + [f"IP {ip}" for ip in o["ip_reservations"]]
            parts += [
                what
                for what, present in (
                    ("job dir", o["job_dir"]),
                    ("console log", o["console_log"]),
                    ("lock file", o["lock_file"]),
                )
                if present
            ]
            parts += [f"claim of {job}" for job in o["claims"]]
            lines.append(f"  {o['vm']}{' (busy)' if o['busy'] else ''}: {', '.join(parts)}")
    if listing["unowned_ip_reservations"]:
        lines.append("")
        lines.append("IP reservations without an owner: " + ", ".join(listing["unowned_ip_reservations"]))
    lines += _docker_cache_table(listing["docker_cache"], listing["now"])
    return "\n".join(lines)


def _docker_cache_table(cache: dict[str, Any], now: int) -> list[str]:
    if not cache["enabled"] and not cache["lineages"]:
        return []
    lines = [
        "",
        f"Docker layer cache{'' if cache['enabled'] else ' (disabled)'}: {len(cache['lineages'])} lineages, "
        f"{cache['total_bytes'] / GIB:.2f} of {cache['max_total_bytes'] / GIB:g} GiB, "
        f"{cache['disks_in_use']} job disks in use",
    ]
    if not cache["lineages"]:
        return lines
    header = ("LINEAGE", "PROJECT", "REFS", "SIZE", "OVERLAYS", "WRITES", "LAST USED")
    rows = [header] + [
        (
            lineage["name"],
            str(lineage["project_id"]),
            "protected" if lineage["protected"] else "unprotected",
            size_text(lineage["bytes"]),
            str(lineage["overlays"]),
            str(lineage["writes"]),
            f"{reaping.format_duration(now - lineage['used'])} ago" if lineage["used"] else "-",
        )
        for lineage in cache["lineages"]
    ]
    return lines + _aligned(rows)


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as lines, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in rows]
