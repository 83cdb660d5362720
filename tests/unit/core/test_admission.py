"""executor.core.admission: whether one more job VM fits on the host."""

from __future__ import annotations

import pytest

from executor.core.admission import MIB, Headroom, mem_available, still_to_grow
from executor.core.settings import GIB


def room(**overrides) -> Headroom:
    values = {
        "pool_free": 100 * GIB,
        "pool_committed": 0,
        "vm_disk": 20 * GIB,
        "pool_margin": 2 * GIB,
        "memory_available": 8192 * MIB,
        "memory_committed": 0,
        "vm_memory": 2048 * MIB,
        "memory_margin": 256 * MIB,
    }
    return Headroom(**{**values, **overrides})


def test_an_empty_host_admits_and_counts_how_many_jobs_fit():
    assert room().problems() == []
    # disk: (100 - 2) // 20 = 4; memory: (8192 - 256) // 2048 = 3
    assert room().jobs_that_fit() == 3


def test_the_pool_must_hold_the_new_disk_at_its_full_size_plus_the_margin():
    exactly = room(pool_free=22 * GIB)
    assert exactly.problems() == []
    short = room(pool_free=22 * GIB - 1)
    (problem,) = short.problems()
    assert problem.startswith("the storage pool has 22.0 GiB free")
    assert "a new job's disk may grow to 20.0 GiB (+ 2.0 GiB admission.pool_margin_gib)" in problem
    assert short.jobs_that_fit() == 0


def test_running_jobs_disks_may_still_grow_and_that_space_is_not_free():
    crowded = room(pool_free=50 * GIB, pool_committed=30 * GIB)
    (problem,) = crowded.problems()
    assert "the running jobs' disks may still grow by 30.0 GiB" in problem
    assert room(pool_free=52 * GIB, pool_committed=30 * GIB).problems() == []


def test_memory_below_the_vm_plus_the_margin_is_refused_and_both_problems_are_said():
    both = room(pool_free=GIB, memory_available=2048 * MIB)
    problems = both.problems()
    assert len(problems) == 2
    assert problems[1] == (
        "the host has 2048 MiB of memory available, the running VMs may still take 0 MiB of it, "
        "and a job VM needs 2048 MiB (+ 256 MiB admission.memory_margin_mib)"
    )
    assert room(memory_available=2304 * MIB).problems() == []


def test_unknown_memory_is_not_held_against_the_job():
    unknown = room(memory_available=None)
    assert unknown.problems() == []
    assert unknown.jobs_that_fit() == 4  # disk alone


def test_still_to_grow_is_what_each_disk_or_vm_may_still_take():
    # an overlay at 1 of 20 GiB, a full raw seed, and qcow2 metadata beyond the virtual size
    assert still_to_grow([(20 * GIB, GIB), (4096, 4096), (GIB, GIB + 65536)]) == 19 * GIB
    # a fresh VM's QEMU holding 300 MiB of 2 GiB; one above its guest's memory (TCG's code cache)
    assert still_to_grow([(2048 * MIB, 300 * MIB), (1024 * MIB, 1078 * MIB)]) == 1748 * MIB
    assert still_to_grow([]) == 0


def test_memory_the_running_vms_have_not_touched_yet_is_not_available():
    crowded = room(memory_available=6144 * MIB, memory_committed=4000 * MIB)
    (problem,) = crowded.problems()
    assert problem == (
        "the host has 6144 MiB of memory available, the running VMs may still take 4000 MiB of it, "
        "and a job VM needs 2048 MiB (+ 256 MiB admission.memory_margin_mib)"
    )
    assert room(memory_available=6304 * MIB, memory_committed=4000 * MIB).problems() == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   1000 kB\n", 1024000),
        ("MemTotal:       24000000 kB\n", None),  # kernels before 3.14
        ("MemAvailable:   lots kB\n", None),
        ("MemAvailable:   1000 MB\n", None),
        ("", None),
    ],
)
def test_mem_available_reads_the_kernels_estimate(text, expected):
    assert mem_available(text) == expected
