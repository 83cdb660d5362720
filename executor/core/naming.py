"""Names of everything the executor creates, derived from the job: no state file needed to find them.

Every libvirt object we create carries the configured prefix, and every domain also carries our
metadata namespace; cleanup and reap act only on objects that match both.
"""

from __future__ import annotations

import ipaddress
import re

METADATA_NS = "http://libvirt-executor.invalid/xmlns/job/1"
METADATA_KEY = "lvx"

_OVERLAY_SUFFIX = ".qcow2"
_SEED_SUFFIX = "-seed.iso"
CONSOLE_LOG_SUFFIX = ".console.log"

# A POSIX-portable login name (useradd's default rule), as the job user in the VM.
USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


POOL_TOKEN_HEX = 8  # a pool VM's name: <prefix>-pool-<8 hex digits>


def vm_name(prefix: str, job_id: int) -> str:
    """The name of a job's VM when prepare boots it for the job (cold); a VM from the warm pool
    keeps its pool name, and the job finds it through its claim (statedir)."""
    return f"{prefix}-job-{int(job_id)}"


def pool_vm_name(prefix: str, token: str) -> str:
    """A warm-pool VM: booted before any job is known, so named without one."""
    if not re.fullmatch(f"[0-9a-f]{{{POOL_TOKEN_HEX}}}", token):
        raise ValueError(f"not a pool token: {token!r}")
    return f"{prefix}-pool-{token}"


def is_pool_name(prefix: str, name: str) -> bool:
    return re.fullmatch(re.escape(prefix) + f"-pool-[0-9a-f]{{{POOL_TOKEN_HEX}}}", name) is not None


def is_vm_name(prefix: str, name: str) -> bool:
    """A name of ours: a job's cold VM or a pool VM."""
    return job_id_of(prefix, name) is not None or is_pool_name(prefix, name)


def overlay_volume_name(vm: str) -> str:
    return vm + _OVERLAY_SUFFIX


def seed_volume_name(vm: str) -> str:
    return vm + _SEED_SUFFIX


def console_log_name(vm: str) -> str:
    return vm + CONSOLE_LOG_SUFFIX


def job_id_of(prefix: str, name: str) -> int | None:
    """The job id in a VM name of ours, else None."""
    m = re.fullmatch(re.escape(prefix) + r"-job-([1-9][0-9]{0,17})", name)
    return int(m.group(1)) if m else None


def vm_of_volume(prefix: str, volume: str) -> str | None:
    """The VM a volume of ours belongs to, else None (not ours)."""
    for suffix in (_OVERLAY_SUFFIX, _SEED_SUFFIX):
        if volume.endswith(suffix):
            vm = volume[: -len(suffix)]
            return vm if is_vm_name(prefix, vm) else None
    return None


def mac_for(ip: ipaddress.IPv4Address) -> str:
    """A stable locally administered MAC (QEMU's OUI) derived from the VM's address.

    One address, one MAC: the MAC can never collide while the addresses don't.
    """
    low = int(ip) & 0xFFFFFF
    return f"52:54:00:{low >> 16:02x}:{(low >> 8) & 0xFF:02x}:{low & 0xFF:02x}"


def vm_addresses(network: ipaddress.IPv4Network) -> list[ipaddress.IPv4Address]:
    """Addresses handed to VMs: all hosts except the gateway (.1) and a few reserved ones."""
    hosts = list(network.hosts())
    return hosts[9:]  # .1 is the host bridge; .2-.9 are left for the operator (mirror, probes)
