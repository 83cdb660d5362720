"""A job's VM as a later stage finds it: its metadata record, and whether it still lives."""

from __future__ import annotations

from executor.adapters.hypervisor import Hypervisor
from executor.core.domain_xml import JobRecord, parse_job_record
from executor.errors import SystemFailure


def disk_error(vm: str) -> SystemFailure:
    return SystemFailure(f"the job's VM {vm} is paused on a disk I/O error (is the storage pool full?)")


def vm_alive(hv: Hypervisor, vm: str) -> bool:
    """Whether the VM still runs; SystemFailure if QEMU paused it on a disk error, which it never
    recovers from by itself (a job would otherwise hang until its timeout)."""
    info = hv.domain(vm)
    if info is not None and info.io_error:
        raise disk_error(vm)
    return info is not None and info.active


def running_record(hv: Hypervisor, vm: str) -> JobRecord:
    """The metadata of our running VM `vm`; SystemFailure saying why if there is none."""
    info = hv.domain(vm)
    if info is None:
        raise SystemFailure(f"the job's VM {vm} does not exist (prepare failed, or it was reaped)")
    record = parse_job_record(info.metadata) if info.metadata else None
    if record is None:
        raise SystemFailure(f"domain {vm} carries no libvirt-executor metadata: not ours")
    if info.io_error:
        raise disk_error(vm)
    if not info.active:
        raise SystemFailure(f"the job's VM {vm} is not running (state: {info.state})")
    return record
