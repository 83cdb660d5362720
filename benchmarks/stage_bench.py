#!/usr/bin/env python3
"""Stage benchmark: a trivial stage (`true`) through `run`, over the job's connection holder
against the direct path (a connection per stage, as before the holder), and cleanup, same run.

One cold job per mode (shell; image mode with a static-busybox image pushed to a docker-registry
on this host's VM-network address). In each, `--stages` stages of `true` through the holder,
then the holder is stopped (SIGTERM, as teardown does) and the same number through the direct
path, which `run` falls back to when no holder answers. In image mode both a user stage
(build_script, in the build container) and a helper stage (get_sources, bash in the VM as
root) are measured. Every stage is a process, started as gitlab-runner starts it; the figure is
its wall time. Then each job's cleanup: the time until it returns, and until `leftovers` is
empty; and, as the baseline, a third (shell) job removed the way cleanup did before
(`remove-job`: everything inline, returning when all is gone). Figures, not pass/fail. Run as
root on a set-up host:
    .venv/bin/python benchmarks/stage_bench.py --stages 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchjob import bench_config  # beside this script

from executor.adapters.hostfiles import load_settings
from executor.adapters.statedir import StateDir
from executor.admin.listing import leftovers
from executor.admin.reap import reap
from executor.core.settings import PoolSettings, config_path
from executor.core.waiting import poll
from executor.jobvm.record import job_vm
from executor.jobvm.teardown import holder_service, stop_holder
from executor.testing.registry import busybox_files, image_layout, running_registry
from executor.testing.runnersim import RunnerSim, StageResult

PORT = 5005


def stages(sim: RunnerSim, n: int, stage: str) -> list[float]:
    took = []
    for _ in range(n):
        result = sim.run("true", stage=stage)
        if result.rc != 0:
            raise SystemExit(f"a {stage} stage of `true` failed:\n{result.describe()}")
        took.append(result.seconds)
    return took


def without_holder(sim: RunnerSim, config: Path) -> None:
    settings = load_settings(str(config))
    state = StateDir(settings.paths.state_dir)
    vm = job_vm(settings, state, sim.job_id)
    if not stop_holder(state, vm) or not poll(lambda: holder_service(state, vm).pid() is None, 30, interval=0.1):
        raise SystemExit(f"the connection holder of {vm} was not running, or did not stop")


def cleaned(sim: RunnerSim, config: Path, command: str = "cleanup") -> tuple[float, float]:
    """Seconds until the cleanup process returned, and until nothing of the job was left."""
    started = time.monotonic()
    result: StageResult = sim.call(*([command] if command == "cleanup" else [command, str(sim.job_id)]), timeout=300)
    returned = time.monotonic() - started
    if result.rc != 0:
        raise SystemExit(f"{command} failed:\n{result.describe()}")
    settings = load_settings(str(config))
    if not poll(lambda: not leftovers(settings), 120, interval=0.05, max_interval=0.1):
        raise SystemExit(f"{command} left {leftovers(settings)}")
    return returned, time.monotonic() - started


def prepared(config: Path, workdir: Path, job_id: int, payload: dict | None = None) -> RunnerSim:
    sim = RunnerSim(config, workdir / f"job{job_id}", job_id, payload_extra=payload)
    result = sim.prepare()
    if result.rc != 0:
        raise SystemExit(f"prepare failed:\n{result.describe()}")
    return sim


def row(name: str, held: list[float], direct: list[float]) -> str:
    return (
        f"| {name} | {len(held)} | **{statistics.median(held):.3f} s** ({min(held):.3f}–{max(held):.3f}) "
        f"| {statistics.median(direct):.3f} s ({min(direct):.3f}–{max(direct):.3f}) |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=20)
    ap.add_argument("--config", default=config_path(None, {}))
    args = ap.parse_args()
    host = load_settings(args.config)
    figures: dict[str, tuple[list[float], list[float]]] = {}
    cleanups: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lvx-stagebench-") as tmp:
        root = Path(tmp)
        with running_registry(root / "registry", f"{host.gateway}:{PORT}") as reg:
            image = reg.push(image_layout(root / "img", busybox_files()), "bench/busybox:1", root)
            config = bench_config(args.config, root / "bench.toml", "lvxstageb", reg.address, pool=PoolSettings())
            try:
                print("shell mode ...", file=sys.stderr, flush=True)
                sim = prepared(config, root, 880_001)
                held = stages(sim, args.stages, "build_script")
                without_holder(sim, config)
                figures["shell mode, build_script"] = (held, stages(sim, args.stages, "build_script"))
                cleanups["shell-mode job, cleanup"] = cleaned(sim, config)

                print("image mode ...", file=sys.stderr, flush=True)
                sim = prepared(config, root, 880_002, {"image": {"name": image}})
                held_user = stages(sim, args.stages, "build_script")
                held_helper = stages(sim, args.stages, "get_sources")
                without_holder(sim, config)
                figures["image mode, build_script (build container)"] = (
                    held_user,
                    stages(sim, args.stages, "build_script"),
                )
                figures["image mode, get_sources (VM, root)"] = (held_helper, stages(sim, args.stages, "get_sources"))
                cleanups["image-mode job, cleanup"] = cleaned(sim, config)

                print("baseline cleanup ...", file=sys.stderr, flush=True)
                sim = prepared(config, root, 880_003)
                cleanups["shell-mode job, removed inline (before: remove-job)"] = cleaned(sim, config, "remove-job")
                settings = load_settings(str(config))
            finally:
                reap(load_settings(str(config)))
    print(
        f"stage bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.stages} stages of `true` each; "
        f"VMs {settings.vm.vcpus} vCPU / {settings.vm.memory_mib} MiB, cold"
    )
    print("| stage | n | through the holder, median (min–max) | direct path, same VM (min–max) |")
    print("|---|---|---|---|")
    for name, (held, direct) in figures.items():
        print(row(name, held, direct))
    print()
    print("| cleanup | returned after | nothing left after |")
    print("|---|---|---|")
    for name, (returned, gone) in cleanups.items():
        print(f"| {name} | {returned:.2f} s | {gone:.2f} s |")


if __name__ == "__main__":
    main()
