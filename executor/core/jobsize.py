"""A job's VM size: what the job asks for (`LVX_VCPUS`, `LVX_MEMORY_MIB`, `LVX_DISK_GIB` among
its variables), within the operator's maxima (`[vm] max_vcpus`, `max_memory_mib`,
`max_disk_gib`; by default the normal size, so nobody gets more until the operator allows it).

Pure: the job's raw values in, its size or a JobSizeError (the job's own fault) out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from executor.core.settings import Settings, VMSettings
from executor.core.text import printable

VCPUS, MEMORY_MIB, DISK_GIB = "LVX_VCPUS", "LVX_MEMORY_MIB", "LVX_DISK_GIB"
VARIABLES = (VCPUS, MEMORY_MIB, DISK_GIB)
MIN_MEMORY_MIB = 512  # below this the VM's dockerd does not come up
_MAX_DIGITS = 7


class JobSizeError(ValueError):
    """The job asks for a size it may not have, or for no number at all."""


@dataclass(frozen=True)
class JobSize:
    vcpus: int
    memory_mib: int
    disk_gib: int

    @classmethod
    def normal(cls, vm: VMSettings) -> JobSize:
        return cls(vm.vcpus, vm.memory_mib, vm.disk_gib)

    def describe(self) -> str:
        return f"{self.vcpus} vCPU{'s' if self.vcpus != 1 else ''}, {self.memory_mib} MiB, {self.disk_gib} GiB disk"


def job_size(requested: Mapping[str, str], vm: VMSettings) -> JobSize:
    """The size the job gets: the normal one, changed by what it asks for within the maxima."""
    normal = JobSize.normal(vm)
    maxima = maximum_size(vm)
    values = {}
    for key, field, minimum, maximum, config_key in (
        (VCPUS, "vcpus", 1, maxima.vcpus, "vm.max_vcpus"),
        (MEMORY_MIB, "memory_mib", MIN_MEMORY_MIB, maxima.memory_mib, "vm.max_memory_mib"),
        (DISK_GIB, "disk_gib", 1, maxima.disk_gib, "vm.max_disk_gib"),
    ):
        raw = requested.get(key, "").strip()
        if not raw:
            values[field] = getattr(normal, field)
            continue
        if not (raw.isascii() and raw.isdigit() and len(raw) <= _MAX_DIGITS):
            raise JobSizeError(f"{key}={printable(raw, '?')[:20]!r} is not a whole number")
        value = int(raw)
        if value > maximum:
            raise JobSizeError(
                f"the job asks for {key}={value}, more than this runner allows ({config_key} = {maximum})"
            )
        if value < minimum:
            raise JobSizeError(f"the job asks for {key}={value}, less than a job VM needs (at least {minimum})")
        values[field] = value
    return JobSize(**values)


def maximum_size(vm: VMSettings) -> JobSize:
    """The operator's maxima; 0 (unset) is the normal size."""
    return JobSize(vm.max_vcpus or vm.vcpus, vm.max_memory_mib or vm.memory_mib, vm.max_disk_gib or vm.disk_gib)


def sized(settings: Settings, size: JobSize) -> Settings:
    """`settings` for a VM of `size`: what admission, the limits and the domain read."""
    vm = dataclasses.replace(settings.vm, vcpus=size.vcpus, memory_mib=size.memory_mib, disk_gib=size.disk_gib)
    return dataclasses.replace(settings, vm=vm)
