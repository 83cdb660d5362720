"""How much room this host has for job VMs now, measured for prepare's admission check and for
`doctor`."""

from __future__ import annotations

from executor.adapters import hostinfo
from executor.adapters.hypervisor import Hypervisor
from executor.core.admission import MIB, Headroom, still_to_grow
from executor.core.settings import GIB, Settings


def vm_disk_bytes(settings: Settings, image_virtual_bytes: int = 0) -> int:
    """The most a job's overlay can grow to: its virtual size (the image's, if that is larger)."""
    return max(settings.vm.disk_gib * GIB, image_virtual_bytes)


def measure(hv: Hypervisor, settings: Settings, vm_disk: int, vms: int = 1) -> Headroom:
    """The room for `vms` more VMs of this size (the pool keeper asks for two: its idle VM and
    a cold job after it, which must never wait for the pool's room)."""
    pool = settings.libvirt.pool
    return Headroom(
        pool_free=hv.pool_free_bytes(pool),
        pool_committed=still_to_grow(hv.pool_volume_sizes(pool)),
        vm_disk=vm_disk * vms,
        pool_margin=int(settings.admission.pool_margin_gib * GIB),
        memory_available=hostinfo.memory_available(),
        memory_committed=still_to_grow(hv.running_memory()),
        vm_memory=settings.vm.memory_mib * MIB * vms,
        memory_margin=settings.admission.memory_margin_mib * MIB,
    )
