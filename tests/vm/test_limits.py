"""[limits] on real VMs: a runaway job stays inside its CPU quota and disk rate, and a second job
on the same host keeps going. Two VMs: the runaway one and its neighbour, whose fixed piece of
work (a shell loop and a 50 MB direct write) is timed alone and next to each kind of runaway.

The slowdown figures are printed, not asserted tightly: this host has 2 cores and runs both
guests under TCG. The network cap (`limits.net_mbit`) is not exercised here: libvirt shapes
with tc's sfq qdisc and police action, which this host's kernel lacks; the UDP flood phase
shows what an uncapped flood at the host costs the neighbour.
"""

from __future__ import annotations

import concurrent.futures
import re
import time

import libvirt
import pytest

from executor.core import naming
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim, StageResult, read_until, terminate_like_runner

pytestmark = pytest.mark.vm

PREFIX = "lvxlim"
# Under TCG a direct write here runs at about 20 MB/s unthrottled: the cap must be well below.
DISK_MBPS = 5
WRITE_MB = 100
NEIGHBOUR_WORK = (
    "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; "
    "dd if=/dev/zero of=/builds/neighbour bs=1M count=50 oflag=direct; rm -f /builds/neighbour"
)
DD_RATE = re.compile(r"^(\d+) bytes .* copied, ([\d.]+) s,", re.MULTILINE)


def _rate_mb_s(stderr: str) -> float:
    found = DD_RATE.search(stderr)
    assert found, stderr
    return int(found.group(1)) / float(found.group(2)) / 1e6


def test_a_runaway_job_stays_in_its_limits_and_its_neighbour_keeps_going(host_settings, tmp_path, leftovers):
    config = write_test_config(
        host_settings, tmp_path / "cfg", PREFIX, extra=f"[limits]\ncpu_percent = 100\ndisk_mbps = {DISK_MBPS}\n"
    )
    # The neighbour has the default limits: its dd is the unthrottled reference.
    default_limits = write_test_config(host_settings, tmp_path / "cfg-neighbour", PREFIX)
    runaway = RunnerSim(config, tmp_path / "a", 7201)
    neighbour = RunnerSim(default_limits, tmp_path / "b", 7202)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for prepared in pool.map(lambda sim: sim.prepare(), (runaway, neighbour)):
                assert prepared.rc == 0, prepared.describe()
        conn = libvirt.open(host_settings.libvirt.uri)
        try:
            dom = conn.lookupByName(naming.vm_name(PREFIX, runaway.job_id))
            # 1 vCPU at 100 %: the host's cgroup for the whole domain, QEMU's throttle for the disk
            assert dom.schedulerParameters()["global_quota"] == 100_000
            assert dom.blockIoTune("vda")["write_bytes_sec"] == DISK_MBPS * 1_000_000
        finally:
            conn.close()

        def neighbour_work(what: str) -> StageResult:
            result = neighbour.run(NEIGHBOUR_WORK, stage=f"neighbour_{what}")
            assert result.rc == 0, result.describe()
            return result

        first = neighbour_work("alone")
        alone, unthrottled = first.seconds, _rate_mb_s(first.stderr)  # the neighbour: 200 MB/s cap

        # The disk: a long direct write, as fast as the job can, while the neighbour works.
        writer_started = time.monotonic()
        writer = runaway.start_run(f"echo writing; dd if=/dev/zero of=/builds/fill bs=1M count={WRITE_MB} oflag=direct")
        read_until(writer, "writing")
        with_writer = neighbour_work("beside_dd").seconds
        written = runaway.finish(writer, writer_started, timeout=600)
        assert written.rc == 0, written.describe()
        rate = _rate_mb_s(written.stderr)

        # The CPU: a fork bomb as the job user, while the neighbour works.
        bomb = runaway.start_run("echo bombing; bomb() { bomb | bomb & }; bomb; wait")
        read_until(bomb, "bombing")
        with_bomb = neighbour_work("beside_fork_bomb").seconds
        terminate_like_runner(bomb, graceful=60)

        # The network: a tight UDP loop at the host's DNS port (the one host port a job may use).
        flood = runaway.start_run(
            f"echo flooding; while :; do cat /dev/zero > /dev/udp/{host_settings.gateway}/53; done"
        )
        read_until(flood, "flooding")
        with_flood = neighbour_work("beside_udp_flood").seconds
        terminate_like_runner(flood, graceful=60)

        print(
            f"\nrunaway job's dd: {rate:.1f} MB/s (limits.disk_mbps = {DISK_MBPS}); "
            f"the neighbour's, at the default 200: {unthrottled:.1f} MB/s"
            f"\nneighbour's stage: alone {alone:.1f} s, beside the dd {with_writer:.1f} s (x{with_writer / alone:.2f}), "
            f"beside the fork bomb {with_bomb:.1f} s (x{with_bomb / alone:.2f}), "
            f"beside the UDP flood {with_flood:.1f} s (x{with_flood / alone:.2f}; no network cap on this host)"
        )
        assert rate <= DISK_MBPS * 1.5 < unthrottled, written.describe()  # throttled, and only by the limit
        # The neighbour finished its work at all, and not orders of magnitude slower.
        assert max(with_writer, with_bomb, with_flood) < alone * 5
    finally:
        for sim in (runaway, neighbour):
            cleaned = sim.cleanup()
            assert cleaned.rc == 0, cleaned.describe()
    assert leftovers(config) == {}
