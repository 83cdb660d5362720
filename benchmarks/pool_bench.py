#!/usr/bin/env python3
"""Warm-pool benchmark: prepare served from the pool against a cold prepare, same run.

Starts the real host agent (`libvirt-executor agent`) for a bench config with `pool.size = 1`
and a ~50 MB image (static busybox, Debian's docker CLI) in `pool.prepull`, pushed to a
docker-registry on this host's VM-network address. Each round, in this order, and always with
the pool's refill finished first (a TCG boot beside a measured prepare would take one of the two
cores): a shell-mode job from the pool, a shell-mode job booted cold (a config without a pool),
an image-mode job from the pool with the prepulled image and pull_policy "if-not-present" (no
registry request), the same with "always" (GitLab's default: a manifest request, no layer), an
image-mode job booted cold (it pulls). Every job is cleaned up. Prints, per kind,
the median, min and max of the prepare stage's wall time (a process, as gitlab-runner starts it)
and of prepare's own total. Figures, not pass/fail. Run as root on a set-up host:
    .venv/bin/python benchmarks/pool_bench.py --rounds 5
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchjob import bench_config, prepared_job  # beside this script

from executor.adapters.hostfiles import load_settings
from executor.admin import pool as pool_admin
from executor.admin.reap import reap
from executor.core.settings import PoolSettings, config_path
from executor.core.waiting import poll
from executor.testing.registry import busybox_files, docker_cli_files, image_layout, running_registry

PORT = 5004
TOTAL = re.compile(r"total (?P<seconds>[\d.]+)s")
SOURCE = re.compile(r"ready at \S+ \((?P<source>pool|cold), ")


def settle(config: Path, timeout: float = 300) -> None:
    """Until the pool has its idle VM and boots nothing."""

    def settled() -> bool:
        st = pool_admin.status(load_settings(str(config)))
        return st["idle"] >= 1 and st["booting"] == 0

    if not poll(settled, timeout, interval=0.5, max_interval=1.0):
        raise SystemExit(
            f"the pool did not refill within {timeout:.0f} s: {pool_admin.status(load_settings(str(config)))}"
        )


def one(config: Path, workdir: Path, job_id: int, payload: dict | None, want: str) -> tuple[float, float]:
    with prepared_job(config, workdir, job_id, payload) as (_, prepared):
        line = next(out for out in prepared.stdout.splitlines() if "ready at" in out)
        source = SOURCE.search(line)
        if source is None or source["source"] != want:
            raise SystemExit(f"expected a {want} VM:\n{prepared.describe()}")
        total = TOTAL.search(line)
        return prepared.seconds, float(total["seconds"]) if total else float("nan")


def row(name: str, figures: list[tuple[float, float]]) -> str:
    walls = [w for w, _ in figures]
    totals = [t for _, t in figures]
    return (
        f"| {name} | {len(figures)} | {statistics.median(walls):.2f} s | {min(walls):.2f} / {max(walls):.2f} s "
        f"| {statistics.median(totals):.2f} s |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--config", default=config_path(None, {}))
    args = ap.parse_args()
    host = load_settings(args.config)
    with tempfile.TemporaryDirectory(prefix="lvx-poolbench-") as tmp:
        root = Path(tmp)
        with running_registry(root / "registry", f"{host.gateway}:{PORT}") as reg:
            layout = image_layout(root / "img", busybox_files(docker_cli_files(root / "cli")))
            image = reg.push(layout, "bench/pooltools:1", root)
            size = sum(f.stat().st_size for f in (layout / "blobs").rglob("*") if f.is_file())
            pooled = {
                policy: bench_config(
                    args.config,
                    root / f"pool-{policy}.toml",
                    "lvxpoolb",
                    reg.address,
                    docker={"pull_policy": (policy,)},
                    pool=PoolSettings(size=1, prepull=(image,)),
                )
                for policy in ("if-not-present", "always")
            }
            cold = bench_config(args.config, root / "cold.toml", "lvxcoldb", reg.address, pool=PoolSettings())
            settings = load_settings(str(pooled["always"]))
            agent = subprocess.Popen(
                [sys.executable, "-m", "executor", "--config", str(pooled["always"]), "agent"],
                stdout=open(root / "agent.log", "ab"),  # noqa: SIM115 (the process keeps it)
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            results: dict[str, list[tuple[float, float]]] = {
                k: []
                for k in ("shell pool", "shell cold", "image pool if-not-present", "image pool always", "image cold")
            }
            payload = {"image": {"name": image}}
            failures: list[str] = []
            try:
                for n in range(args.rounds):
                    base = 890_000 + 10 * n
                    print(f"round {n + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
                    for k, (kind, config, job_payload, source) in enumerate(
                        (
                            ("shell pool", pooled["always"], None, "pool"),
                            ("shell cold", cold, None, "cold"),
                            ("image pool if-not-present", pooled["if-not-present"], payload, "pool"),
                            ("image pool always", pooled["always"], payload, "pool"),
                            ("image cold", cold, payload, "cold"),
                        )
                    ):
                        settle(pooled["always"])
                        try:
                            results[kind].append(one(config, root, base + k, job_payload, source))
                        except SystemExit as failed:  # counted and shown, not hidden: the run goes on
                            failures.append(f"{kind}, job {base + k}: {str(failed)[-3000:]}")
                            print(f"FAILED {kind}: {str(failed)[-3000:]}", file=sys.stderr, flush=True)
            finally:
                agent.send_signal(signal.SIGTERM)
                agent.wait(timeout=180)
                for config in (*pooled.values(), cold):
                    reap(load_settings(str(config)))
    print(
        f"pool bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.rounds} rounds; "
        f"VMs {settings.vm.vcpus} vCPU / {settings.vm.memory_mib} MiB; image {image} ({size / 1e6:.1f} MB compressed), "
        f"prepulled into the pool VMs; pool.idle = {settings.pool.idle}"
    )
    print("| prepare | n | stage wall, median | min / max | prepare's own total, median |")
    print("|---|---|---|---|---|")
    for name, figures in results.items():
        if figures:
            print(row(name, figures))
    print(f"failed prepares: {len(failures)}")
    for failure in failures:
        print(f"  {failure.splitlines()[0]} ... {failure.splitlines()[-1]}")


if __name__ == "__main__":
    main()
