"""A job's VM as a later stage finds it: its metadata record, and whether it still lives."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from executor.adapters.hostfiles import console_log, console_tail
from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core.domain_xml import JobRecord, parse_job_record
from executor.core.settings import LIVENESS_PROBE_S, Settings
from executor.errors import SystemFailure

if TYPE_CHECKING:  # `run` finds its VM with `job_vm` and must not pay for paramiko or libvirt
    from executor.adapters.guest_ssh import GuestSSH
    from executor.adapters.hypervisor import Hypervisor


class VMLost(SystemFailure):
    """The job's VM is dead or silent (or paused on a disk error): nothing more of its job can
    run, and the job's later stages need not try."""

    reason = "vm_lost"


def job_vm(settings: Settings, state: StateDir, job_id: int) -> str:
    """The VM of job `job_id`: the pool VM it claimed, else the one prepare boots for it."""
    cold = naming.vm_name(settings.vm.name_prefix, job_id)
    return state.claimed_vm(cold) or cold


def disk_error(vm: str) -> SystemFailure:
    return VMLost(f"the job's VM {vm} is paused on a disk I/O error (is the storage pool full?)")


def vm_alive(hv: Hypervisor, vm: str) -> bool:
    """Whether the VM still runs; SystemFailure if QEMU paused it on a disk error, which it never
    recovers from by itself (a job would otherwise hang until its timeout)."""
    info = hv.domain(vm)
    if info is not None and info.io_error:
        raise disk_error(vm)
    return info is not None and info.active


def running_record(hv: Hypervisor, vm: str, job_id: int | None = None) -> JobRecord:
    """The metadata of our running VM `vm` (serving job `job_id`, when given); SystemFailure
    saying why if there is none."""
    info = hv.domain(vm)
    if info is None:
        raise SystemFailure(f"the job's VM {vm} does not exist (prepare failed, or it was reaped)")
    record = parse_job_record(info.metadata) if info.metadata else None
    if record is None:
        raise SystemFailure(f"domain {vm} carries no libvirt-executor metadata: not ours")
    if job_id is not None and record.job_id != job_id:
        raise SystemFailure(f"{vm} serves job {record.job_id or 'none (idle)'}, not job {job_id}")
    if info.io_error:
        raise disk_error(vm)
    if not info.active:
        raise SystemFailure(f"the job's VM {vm} is not running (state: {info.state})")
    return record


def alive_and_answering(hv: Hypervisor, settings: Settings, vm: str, ssh: GuestSSH) -> Callable[[], bool]:
    """A liveness check for a stage that waits on the VM: False once libvirt says it is gone;
    SystemFailure, with the console's last lines, once it has answered no SSH probe for
    `timeouts.unresponsive` seconds (libvirt still says "running" for a wedged guest kernel).
    Starts `ssh`'s background probe."""
    ssh.watch(LIVENESS_PROBE_S)  # a probe costs one channel open and close
    limit = settings.timeouts.unresponsive

    def alive() -> bool:
        if not vm_alive(hv, vm):
            return False
        silent = ssh.silent_for()
        if silent > limit:
            tail = console_tail(console_log(settings, vm))
            said = f"its console's last lines:\n{tail}" if tail else "its console shows nothing"
            raise VMLost(
                f"the job's VM {vm} stopped responding: no answer over SSH for {silent:.0f} s "
                f"(timeouts.unresponsive = {limit:g}); {said}"
            )
        return True

    return alive
