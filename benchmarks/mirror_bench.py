#!/usr/bin/env python3
"""Mirror benchmark: pulling a ~50 MB image in a job VM from the warm mirror vs from the
upstream directly, same run, same VM.

The upstream is a docker-registry on this host's VM-network address (the stand-in for Docker
Hub: there is none here) holding `library/bench-big:1`, one layer of 50 MB of random bytes (gzip
cannot shrink it). A mirror of that upstream is started with `libvirt-executor mirror start`
(its own port and storage, stopped and removed afterwards). One job VM (shell mode) then pulls:
  direct  `<upstream>/library/bench-big:1`, i.e. from the upstream without the mirror
  cold     `bench-big:1` through the mirror while its cache is empty (mirror fetches upstream)
  warm     `bench-big:1` through the mirror with the image cached
removing the image after each pull, alternating direct and warm for the remaining rounds. Both
registries are on this host, so this measures the mirror's own overhead, not the internet it
saves: against Docker Hub the direct pull also pays the internet and its rate limit. Figures,
not pass/fail. Run as root on a set-up host:
    .venv/bin/python benchmarks/mirror_bench.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchjob import bench_config, prepared_job  # beside this script

from executor.adapters.hostfiles import load_settings
from executor.core.settings import MirrorSettings, config_path
from executor.testing.registry import image_layout, running_registry

UPSTREAM_PORT = 5065
MIRROR_PORT = 5066
LAYER_BYTES = 50 * 1024**2
TIMED = re.compile(r"^PULL (?P<what>\w+) (?P<start>[\d.]+) (?P<end>[\d.]+)$", re.M)


def timed_pull(what: str, reference: str) -> str:
    """Bash lines that pull `reference`, print when it started and ended, and remove it again."""
    return (
        f"start=$EPOCHREALTIME; docker pull -q {reference} >/dev/null || exit 1\n"
        f'echo "PULL {what} $start $EPOCHREALTIME"\n'
        f"docker rmi -f {reference} >/dev/null\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", default=config_path(None, {}))
    args = ap.parse_args()
    host = load_settings(args.config)
    storage = Path(host.image.dir).parent / f"bench-mirror-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="lvx-mbench-") as tmp:
        root = Path(tmp)
        upstream_address = f"{host.gateway}:{UPSTREAM_PORT}"
        with running_registry(root / "registry", upstream_address) as upstream:
            layout = image_layout(root / "img", {"big.bin": (os.urandom(LAYER_BYTES), 0o644)})
            upstream.push(layout, "library/bench-big:1", root)
            size = sum(f.stat().st_size for f in (layout / "blobs").rglob("*") if f.is_file())
            mirror = MirrorSettings(port=MIRROR_PORT, upstream=f"http://{upstream_address}", storage=str(storage))
            config = bench_config(args.config, root / "config.toml", "lvxmbench", upstream_address, mirror=mirror)
            cli = [sys.executable, "-m", "executor", "--config", str(config), "mirror"]
            try:
                print(subprocess.run([*cli, "start"], check=True, capture_output=True, text=True).stdout.strip())
                script = timed_pull("direct", f"{upstream_address}/library/bench-big:1")
                script += timed_pull("cold", "bench-big:1")
                for _ in range(args.rounds):
                    script += timed_pull("warm", "bench-big:1")
                    script += timed_pull("direct", f"{upstream_address}/library/bench-big:1")
                with prepared_job(config, root, 890_001) as (sim, _):
                    result = sim.run(script)
                    if result.rc != 0:
                        raise SystemExit(f"the pulls failed:\n{result.describe()}")
            finally:
                subprocess.run([*cli, "stop"], check=False, capture_output=True)
                subprocess.run(["rm", "-rf", str(storage)], check=False)
    times: dict[str, list[float]] = {}
    for m in TIMED.finditer(result.stdout):
        times.setdefault(m["what"], []).append(float(m["end"]) - float(m["start"]))
    print(f"image: library/bench-big:1, {size / 1e6:.1f} MB compressed, one VM ({host.vm.vcpus} vCPU), pull + rmi each")
    print("| pull from | n | median | min | max |")
    print("|---|---|---|---|---|")
    for what in ("direct", "cold", "warm"):
        values = times.get(what, [])
        if values:
            print(
                f"| {what} | {len(values)} | {statistics.median(values):.1f} s | {min(values):.1f} s | {max(values):.1f} s |"
            )
    if times.get("direct") and times.get("warm"):
        print(
            f"warm mirror / direct (medians): {statistics.median(times['warm']) / statistics.median(times['direct']):.2f}"
        )


if __name__ == "__main__":
    main()
