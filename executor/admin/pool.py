"""`libvirt-executor pool status|drain|fill`: the warm pool as the operator sees it, from libvirt
(what is there now) and the host agent (whether it runs, what it last did)."""

from __future__ import annotations

import time
from typing import Any

from executor.adapters.hypervisor import connect
from executor.adapters.statedir import StateDir
from executor.agent import client as agent_client
from executor.core import naming, reaping
from executor.core.domain_xml import POOL_BOOTING, POOL_CLAIMED, POOL_IDLE, parse_job_record
from executor.core.settings import Settings
from executor.jobvm import pool


def status(settings: Settings) -> dict[str, Any]:
    """The pool now: counts by state (idle = ready to hand out), each pool VM, the agent."""
    state = StateDir(settings.paths.state_dir)
    now = int(time.time())
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        vms = pool.survey(hv, settings, state)
        records = {}
        for vm in vms:
            info = hv.domain(vm.name)
            records[vm.name] = parse_job_record(info.metadata) if info is not None and info.metadata else None
    pid = agent_client.service(settings, state).pid()
    report = agent_client.last_status(settings) if pid is not None else None
    listed = []
    for vm in sorted(vms, key=lambda v: v.name):
        record = records.get(vm.name)
        listed.append(
            {
                "name": vm.name,
                "pool_state": vm.pool_state,
                "state": vm.state,
                "job_id": record.job_id if record and record.job_id else None,
                "age_s": now - vm.created,
                "prepulled": list(record.prepulled) if record else [],
                "frozen": vm.frozen,
            }
        )
    return {
        "format": 1,
        "prefix": settings.vm.name_prefix,
        "size": settings.pool.size,
        "idle_mode": settings.pool.idle,
        "drained": state.pool_drained(settings.vm.name_prefix),
        "idle": sum(1 for vm in vms if vm.pool_state == POOL_IDLE and not vm.locked),
        "booting": sum(1 for vm in vms if vm.pool_state == POOL_BOOTING),
        "in_job": sum(1 for vm in vms if vm.pool_state == POOL_CLAIMED),
        "agent": {"running": pid is not None, "pid": pid if pid and pid > 0 else None, "last_round": report},
        "vms": listed,
    }


def format_status(st: dict[str, Any]) -> str:
    agent = st["agent"]
    report = agent["last_round"] or {}
    lines = [
        f"pool        size {st['size']} ({st['idle_mode']} when idle){', DRAINED (pool fill undoes it)' if st['drained'] else ''}",
        f"now         {st['idle']} idle (ready to hand out), {st['booting']} booting, {st['in_job']} in a job",
        "agent       "
        + (
            f"running (pid {agent['pid']})"
            if agent["running"]
            else "NOT running: jobs boot cold (libvirt-executor agent start)"
        ),
    ]
    if report:
        lines.append(
            f"boots       {report.get('boots', 0)} done, {report.get('boot_failures', 0)} failed"
            + (f"; last took {report['last_boot_s']:.1f}s" if report.get("last_boot_s") else "")
        )
        if report.get("last_error"):
            lines.append(f"last error  {report['last_error']}")
    for vm in st["vms"]:
        extra = f", job {vm['job_id']}" if vm["job_id"] else ""
        extra += ", FROZEN" if vm["frozen"] else ""
        extra += f", prepulled {', '.join(vm['prepulled'])}" if vm["prepulled"] else ""
        lines.append(
            f"  {vm['name']}  {vm['pool_state']} ({vm['state']}), age {reaping.format_duration(vm['age_s'])}{extra}"
        )
    return "\n".join(lines)


def drain(settings: Settings) -> list[str]:
    """Stop refilling (also across agent restarts) and remove every idle VM now; VMs in a job
    finish their job. What was done."""
    state = StateDir(settings.paths.state_dir)
    lines = []
    if state.set_pool_drained(settings.vm.name_prefix, True):
        lines.append("marked drained: the agent boots no pool VMs until `pool fill`")
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        lines += [f"removed {vm} ({was})" for vm, was in pool.retire_idle(hv, settings, state)]
        lines += [
            f"{vm.name} is in a job: it goes with the job's cleanup"
            for vm in pool.survey(hv, settings, state)
            if vm.pool_state == POOL_CLAIMED
        ]
    return lines or ["already drained: no idle VMs"]


def fill(settings: Settings) -> str:
    state = StateDir(settings.paths.state_dir)
    if not state.set_pool_drained(settings.vm.name_prefix, False):
        return "the pool is not drained"
    return f"no longer drained: the agent refills the pool to pool.size = {settings.pool.size}"
