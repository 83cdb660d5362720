"""Per-job VM sizes on real VMs: a job asks for its size with LVX_VCPUS / LVX_MEMORY_MIB /
LVX_DISK_GIB and gets it within the operator's maxima; above them it fails before anything is
made; a size the host cannot hold is refused by admission control."""

from __future__ import annotations

import re

import pytest

from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim

pytestmark = pytest.mark.vm

MAXIMA = "max_vcpus = 2\nmax_memory_mib = 262144\nmax_disk_gib = 40"


@pytest.fixture
def config(host_settings, tmp_path):
    # The normal size 2 vCPUs / 2 GiB, so that a smaller job's VM shows the difference.
    return write_test_config(host_settings, tmp_path / "cfg", "lvxsize", vm=MAXIMA, vcpus=2, memory_mib=2048)


def test_a_job_gets_the_size_it_asks_for(config, tmp_path, leftovers):
    sim = RunnerSim(config, tmp_path / "runner", 6101, variables={"LVX_VCPUS": "1", "LVX_MEMORY_MIB": "1024"})
    try:
        prepared = sim.prepare()
        assert prepared.rc == 0, prepared.describe()
        assert "(cold, " in prepared.stdout and "; 1 vCPU, 1024 MiB, 20 GiB disk): " in prepared.stdout
        seen = sim.run("nproc; grep MemTotal /proc/meminfo")
        assert seen.rc == 0, seen.describe()
    finally:
        sim.cleanup()
    lines = seen.stdout.splitlines()
    assert lines[0] == "1"
    mem_kib = int(re.search(r"MemTotal:\s+(\d+) kB", seen.stdout).group(1))
    print(f"\nLVX_VCPUS=1 LVX_MEMORY_MIB=1024: nproc {lines[0]}, MemTotal {mem_kib // 1024} MiB")
    assert 800 * 1024 <= mem_kib <= 1024 * 1024  # about 1 GiB: the kernel keeps some for itself
    assert leftovers(config) == {}


def test_a_request_above_the_maximum_is_the_jobs_failure_and_makes_nothing(config, tmp_path, leftovers):
    sim = RunnerSim(config, tmp_path / "runner", 6102, variables={"LVX_VCPUS": "3"})
    prepared = sim.prepare()
    assert prepared.rc == 1, prepared.describe()  # BUILD_FAILURE_EXIT_CODE: the job asked for it
    assert "the job asks for LVX_VCPUS=3, more than this runner allows (vm.max_vcpus = 2)" in prepared.stderr
    assert prepared.seconds < 10, prepared.describe()  # nothing booted
    assert leftovers(config) == {}
    sim.cleanup()


def test_admission_refuses_a_size_the_host_cannot_hold(config, tmp_path, leftovers):
    sim = RunnerSim(config, tmp_path / "runner", 6103, variables={"LVX_MEMORY_MIB": "262144"})  # 256 GiB
    prepared = sim.prepare()
    assert prepared.rc == 2, prepared.describe()  # a system failure: another runner may hold it
    assert "not starting a job VM on this host now: " in prepared.stderr, prepared.describe()
    assert "and a job VM needs 262144 MiB" in prepared.stderr, prepared.describe()
    assert leftovers(config) == {}
    sim.cleanup()
