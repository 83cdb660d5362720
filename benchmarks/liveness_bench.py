#!/usr/bin/env python3
"""liveness benchmark: how long a job VM goes without answering the executor's SSH probe (the
one `run` and prepare use to tell a dead guest from a slow one), idle as the baseline and then
under each kind of load a job can put on its VM, to choose `timeouts.unresponsive`.

One VM through the real executor (prepare, cleanup; the host config's vCPUs, memory and
[limits]). Per phase: the load starts as a `run` stage, ramps up for RAMP_S, then the probe runs
every PROBE_EVERY_S for --seconds; the figures are the probes' median and worst time to answer
and the longest gap between two answered probes (what `silent_for` measures). The fork bomb
comes last: it may leave the guest unusable, cleanup destroys it anyway. Figures, not
pass/fail. Run as root on a set-up host:
    .venv/bin/python benchmarks/liveness_bench.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchjob import bench_config, prepared_job  # beside this script

from executor.adapters.guest_ssh import GuestSSH
from executor.adapters.hostfiles import load_settings
from executor.adapters.hypervisor import connect
from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core.settings import config_path
from executor.jobvm.record import running_record
from executor.testing.runnersim import terminate_like_runner

PREFIX = "lvxlbench"
RAMP_S = 5.0
PROBE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 120.0
LOADS = {
    "idle (baseline)": "sleep 100000",
    # twice as many busy loops as any host gives a job VM vCPUs
    "cpu: 16 busy loops": "for i in $(seq 16); do (while :; do :; done) & done; wait",
    "disk: dd, direct I/O": "while :; do dd if=/dev/zero of=/builds/fill bs=1M count=2000 oflag=direct 2>/dev/null; done",
    "memory: fill RAM": "while :; do head -c 4G /dev/zero | tail > /dev/null; done",
    "fork bomb": "bomb() { bomb | bomb & }; bomb; wait",
}


def probe_phase(ssh: GuestSSH, seconds: float) -> tuple[list[float], int, float]:
    """Probe for `seconds`: the answer times, the probes unanswered, the longest silence."""
    answers: list[float] = []
    missed = 0
    last_answer = time.monotonic()
    longest = 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        took = ssh.probe(PROBE_TIMEOUT_S)
        now = time.monotonic()
        if took is None:
            missed += 1
        else:
            answers.append(took)
            longest = max(longest, now - last_answer)
            last_answer = now
        time.sleep(max(0.0, PROBE_EVERY_S - (time.monotonic() - now)))
    return answers, missed, max(longest, time.monotonic() - last_answer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=config_path(None, {}))
    ap.add_argument("--seconds", type=float, default=60.0, help="probing per phase")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lvx-liveness-bench-") as tmp:
        config = bench_config(args.config, Path(tmp) / "config.toml", PREFIX)
        settings = load_settings(str(config))
        rows = []
        with prepared_job(config, Path(tmp), 96001) as (sim, prepared):
            vm = naming.vm_name(PREFIX, sim.job_id)
            accel = "kvm" if ", kvm;" in prepared.stdout else "tcg"
            with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
                record = running_record(hv, vm)
            key = StateDir(settings.paths.state_dir).read_client_key(vm)
            with GuestSSH.connect(record.ip, settings.vm.user, key, record.host_key, 30) as ssh:
                for name, body in LOADS.items():
                    load = sim.start_run(body)
                    time.sleep(RAMP_S)
                    answers, missed, silence = probe_phase(ssh, args.seconds)
                    stopped = terminate_like_runner(load, graceful=60)
                    rows.append((name, answers, missed, silence, stopped))
                    print(f"  {name}: {len(answers)} answered, longest silence {silence:.1f} s", file=sys.stderr)
    limits = settings.limits
    print(
        f"\nliveness probe, {accel.upper()}, {settings.vm.vcpus} vCPUs, {settings.vm.memory_mib} MiB, "
        f"limits cpu {limits.cpu_percent}%/vCPU, disk {limits.disk_mbps} MB/s {limits.disk_iops} IOPS; "
        f"{args.seconds:.0f} s per phase, a probe every {PROBE_EVERY_S:.0f} s"
    )
    print(f"{'phase':<24} {'answered':>9} {'missed':>7} {'median':>8} {'worst':>8} {'longest silence':>16}")
    for name, answers, missed, silence, stopped in rows:
        median = f"{statistics.median(answers):.2f} s" if answers else "-"
        worst = f"{max(answers):.2f} s" if answers else "-"
        note = "" if stopped == "terminated" else "  (load had to be killed)"
        print(f"{name:<24} {len(answers):>9} {missed:>7} {median:>8} {worst:>8} {silence:>14.1f} s{note}")


if __name__ == "__main__":
    main()
