#!/usr/bin/env python3
"""Prepare benchmark: shell mode vs image mode, same run, through the real executor.

Alternates N prepares of a job without `image:` (boot, SSH, dockerd) with N of a job whose
`image:` is a ~50 MB image (static busybox plus Debian's docker CLI and its libraries) pulled
from a docker-registry on this host's VM-network address, with one service of the same image;
each followed by cleanup. Prints prepare's own timings (boot-to-ssh, ssh-to-docker, the
containers phase: pulls, service, build container) and the wall time of the stage. Figures, not
pass/fail. Run as root on a set-up host:
    .venv/bin/python benchmarks/prepare_bench.py --rounds 2
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

from benchjob import bench_config, prepared_job  # beside this script

from executor.adapters.hostfiles import load_settings
from executor.core.settings import config_path
from executor.testing.registry import busybox_files, docker_cli_files, image_layout, running_registry

PORT = 5003
TIMINGS = re.compile(r"(?P<name>[a-z-]+) (?P<seconds>[\d.]+)s")


def one(config: Path, workdir: Path, job_id: int, payload: dict | None) -> dict[str, float]:
    with prepared_job(config, workdir, job_id, payload) as (_, prepared):
        line = next(out for out in prepared.stdout.splitlines() if "ready at" in out)
        figures = {m["name"]: float(m["seconds"]) for m in TIMINGS.finditer(line.split("):", 1)[1])}
        figures["stage"] = prepared.seconds
        return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", default=config_path(None, {}))
    args = ap.parse_args()
    host = load_settings(args.config)
    with tempfile.TemporaryDirectory(prefix="lvx-pbench-") as tmp:
        root = Path(tmp)
        with running_registry(root / "registry", f"{host.gateway}:{PORT}") as reg:
            layout = image_layout(root / "img", busybox_files(docker_cli_files(root / "cli")))
            image = reg.push(layout, "bench/tools:1", root)
            size = sum(f.stat().st_size for f in (layout / "blobs").rglob("*") if f.is_file())
            config = bench_config(args.config, root / "config.toml", "lvxpbench", reg.address)
            payload = {
                "image": {"name": image},
                "services": [{"name": image, "alias": "svc", "command": ["sleep", "600"]}],
            }
            shell, imaged = [], []
            for n in range(args.rounds):
                print(f"round {n + 1}/{args.rounds}: shell mode ...", file=sys.stderr, flush=True)
                shell.append(one(config, root, 880_000 + 2 * n, None))
                print(f"round {n + 1}/{args.rounds}: image mode ...", file=sys.stderr, flush=True)
                imaged.append(one(config, root, 880_001 + 2 * n, payload))
    med = lambda rows, key: statistics.median(r.get(key, 0.0) for r in rows)  # noqa: E731
    print(f"image: {image} ({size / 1e6:.1f} MB compressed), one service of the same image; {args.rounds} rounds")
    print("| | shell mode (median) | image mode (median) |")
    print("|---|---|---|")
    for key in ("boot-to-ssh", "ssh-to-docker", "containers", "total", "stage"):
        print(f"| {key} | {med(shell, key):.1f} s | {med(imaged, key):.1f} s |")


if __name__ == "__main__":
    main()
