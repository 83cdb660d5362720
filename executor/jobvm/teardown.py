"""Remove everything of one job VM: the only code that deletes a job's resources."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

from executor.adapters.hostfiles import console_log, remove_file
from executor.adapters.hostinfo import qemu_stopped
from executor.adapters.hostservice import Service
from executor.adapters.hypervisor import DomainInfo, Hypervisor
from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core.domain_xml import parse_job_record
from executor.core.settings import Settings
from executor.errors import ConfigError, SystemFailure
from executor.jobvm import layercache


def stop_for_good(hv: Hypervisor, state: StateDir, vm: str) -> list[str]:
    """Make sure nothing of `vm`'s job runs any more, in milliseconds: its connection holder
    signalled, its vCPUs paused (a destroy waits seconds for QEMU to exit; `teardown` does it
    later), and the VM marked as being removed. A QEMU stopped by a signal runs nothing and
    would not answer a pause. What was done."""
    info = _check_ours(hv, vm)
    done = ["connection holder stopped"] if stop_holder(state, vm) else []
    if info is not None and info.state == "running":
        if qemu_stopped(vm):
            done.append("its QEMU is stopped (frozen)")
        else:
            try:
                hv.suspend(vm)
                done.append("domain paused")
            except SystemFailure:  # whatever libvirt had against pausing it, this stops it
                hv.destroy(vm)
                done.append("domain destroyed")
    state.mark_removing(vm)
    return done


def _check_ours(hv: Hypervisor, vm: str) -> DomainInfo | None:
    info = hv.domain(vm)
    if info is not None and (not info.metadata or parse_job_record(info.metadata) is None):
        raise SystemFailure(f"a domain named {vm} exists without libvirt-executor metadata: not touching it")
    return info


def teardown(hv: Hypervisor, settings: Settings, state: StateDir, vm: str) -> list[str]:
    """Remove everything of `vm`: domain (destroyed, never shut down), volumes, IP reservation,
    key, console log, the claim of the job it served from the warm pool. Idempotent; works on any half-built state. Each step runs even if an
    earlier one failed; SystemFailure at the end lists what could not be removed."""
    removed: list[str] = []
    failures: list[str] = []
    _check_ours(hv, vm)

    pool = settings.libvirt.pool
    steps: list[tuple[str, Callable[[], object]]] = [
        ("connection holder stopped", lambda: stop_holder(state, vm)),
        ("domain destroyed", lambda: hv.destroy(vm)),
        ("domain undefined", lambda: hv.undefine(vm)),
        ("domain removed after a late start", lambda: _remove_late_domain(hv, vm)),
        # Before the job dir goes: it says whether the Docker disk is kept.
        ("Docker disk settled", lambda: layercache.settle(hv, settings, state, vm)),
        ("overlay deleted", lambda: hv.delete_volume(pool, naming.overlay_volume_name(vm))),
        ("seed deleted", lambda: hv.delete_volume(pool, naming.seed_volume_name(vm))),
        ("IP released", lambda: state.release_ip(vm)),
        ("key removed", lambda: state.remove_job_dir(vm)),
        ("console log removed", lambda: remove_file(console_log(settings, vm))),
        ("claim released", lambda: state.release_claims(vm)),
    ]
    for what, step in steps:
        try:
            if step():
                removed.append(what)
        except (SystemFailure, ConfigError, OSError) as exc:
            failures.append(f"{what.split()[0]}: {exc}")
    if failures:
        raise SystemFailure(f"cleanup of {vm} incomplete: " + "; ".join(failures))
    return removed


def holder_service(state: StateDir, vm: str) -> Service:
    """The job's connection holder (`stages.holder`), known by its lock in the job's state dir."""
    return Service(state.holder_file(vm, "lock"), state.holder_file(vm, "log"), f"the connection holder of {vm}")


def stop_holder(state: StateDir, vm: str) -> bool:
    """SIGTERM `vm`'s connection holder, if one runs, without waiting: it ends by itself once the
    VM or the job's state dir is gone. Whether one ran."""
    pid = holder_service(state, vm).pid()
    if pid is None or pid <= 0:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    return True


def _remove_late_domain(hv: Hypervisor, vm: str) -> bool:
    """A killed prepare's start request can still complete inside libvirtd after our destroy;
    undefining a running domain only makes it transient, so look again and finish the job."""
    for _ in range(3):
        if hv.domain(vm) is None:
            return False
        hv.destroy(vm)
        hv.undefine(vm)
    if hv.domain(vm) is not None:
        raise SystemFailure(f"domain {vm} keeps coming back after destroy")
    return True
