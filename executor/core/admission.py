"""Whether this host can hold one more job VM: free pool space against the disks' worst-case
growth, and available memory against the new VM's memory and what the running VMs have not
touched yet. Pure: the adapters measure."""

from __future__ import annotations

from dataclasses import dataclass

from executor.core.settings import GIB

MIB = 1024**2


@dataclass(frozen=True)
class Headroom:
    pool_free: int  # bytes free on the pool's filesystem now
    pool_committed: int  # bytes the disks already in the pool may still grow by
    vm_disk: int  # the new VM's worst case: its overlay's virtual size
    pool_margin: int
    memory_available: int | None  # the kernel's MemAvailable; None: unknown, not checked
    memory_committed: int  # what the running VMs' guests may still take beyond what they hold
    vm_memory: int
    memory_margin: int

    @property
    def pool_spare(self) -> int:
        """Pool space nobody has a claim on, after the margin."""
        return self.pool_free - self.pool_committed - self.pool_margin

    @property
    def memory_spare(self) -> int | None:
        if self.memory_available is None:
            return None
        return self.memory_available - self.memory_committed - self.memory_margin

    def short_of(self) -> tuple[str, ...]:
        """What one more VM does not fit in: "pool_disk", "memory" (the metrics' labels)."""
        memory_spare = self.memory_spare
        short = ["pool_disk"] if self.pool_spare < self.vm_disk else []
        return (*short, "memory") if memory_spare is not None and memory_spare < self.vm_memory else tuple(short)

    def problems(self) -> list[str]:
        """Why one more VM does not fit (in the order of `short_of`); empty when it does."""
        found = []
        if self.pool_spare < self.vm_disk:
            found.append(
                f"the storage pool has {self.pool_free / GIB:.1f} GiB free, the running jobs' disks may still "
                f"grow by {self.pool_committed / GIB:.1f} GiB, and a new job's disk may grow to "
                f"{self.vm_disk / GIB:.1f} GiB (+ {self.pool_margin / GIB:.1f} GiB admission.pool_margin_gib)"
            )
        memory_spare = self.memory_spare
        if memory_spare is not None and memory_spare < self.vm_memory:
            found.append(
                f"the host has {(self.memory_available or 0) / MIB:.0f} MiB of memory available, the running VMs "
                f"may still take {self.memory_committed / MIB:.0f} MiB of it, and a job VM needs "
                f"{self.vm_memory / MIB:.0f} MiB (+ {self.memory_margin / MIB:.0f} MiB admission.memory_margin_mib)"
            )
        return found

    def jobs_that_fit(self) -> int:
        """How many more VMs of this size the host can take now."""
        by_disk = self.pool_spare // self.vm_disk if self.vm_disk > 0 else 0
        if self.memory_spare is None or self.vm_memory <= 0:
            return max(0, by_disk)
        return max(0, min(by_disk, self.memory_spare // self.vm_memory))


def still_to_grow(sizes: list[tuple[int, int]]) -> int:
    """What things of a (most, now) size may still take together: a copy-on-write overlay grows
    to its virtual size as its guest writes, a QEMU to its guest's memory as the guest touches
    it (a QEMU above its guest's memory, by its own overhead, takes nothing more)."""
    return sum(max(0, most - now) for most, now in sizes)


def mem_available(meminfo: str) -> int | None:
    """MemAvailable from /proc/meminfo's text, in bytes; None if it is not there."""
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            fields = rest.split()
            if fields and fields[0].isdigit() and fields[1:] == ["kB"]:
                return int(fields[0]) * 1024
    return None
