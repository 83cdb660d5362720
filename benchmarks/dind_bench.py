#!/usr/bin/env python3
"""dind benchmark: a `services: [docker:dind]` job's time to its first `docker info`, with
`docker.dind = "vm-daemon"` (the VM's own dockerd) vs `"privileged"` (a real dind container in
the VM), same run, through the real executor.

The job: `image:` a busybox + docker CLI image, one dind service aliased `docker`, the TLS
variables GitLab documents (DOCKER_HOST=tcp://docker:2376, DOCKER_TLS_CERTDIR=/certs, ...). The
privileged mode's image is the stand-in `executor.testing.registry.dind_image` (Debian's dockerd;
there is no Docker Hub here), pulled from a docker-registry on the host like the build image.
Measured: prepare's wall time (boot, pulls, the dind service and its wait, the build
container) plus the first `build_script` that runs `docker info` until it answers; and the two
parts apart. Rounds alternate the modes. Figures, not pass/fail. Run as root on a set-up host:
    .venv/bin/python benchmarks/dind_bench.py --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from benchjob import bench_config, prepared_job  # beside this script

from executor.adapters.hostfiles import load_settings
from executor.core.dind import DEFAULT_DIND_IMAGES
from executor.core.settings import MirrorSettings, config_path
from executor.testing.registry import busybox_files, dind_image, docker_cli_files, image_layout, running_registry

PORT = 5007
VARIABLES = {
    "DOCKER_HOST": "tcp://docker:2376",
    "DOCKER_TLS_CERTDIR": "/certs",
    "DOCKER_TLS_VERIFY": "1",
    "DOCKER_CERT_PATH": "/certs/client",
}
FIRST_INFO = "until docker info --format '{{.ServerVersion}}'; do sleep 0.5; done"


def one(config: Path, workdir: Path, job_id: int, payload: dict) -> dict[str, float]:
    with prepared_job(config, workdir, job_id, payload, VARIABLES) as (sim, prepared):
        info = sim.run(FIRST_INFO)
        if info.rc != 0:
            raise SystemExit(f"docker info failed:\n{info.describe()}")
        return {
            "prepare": prepared.seconds,
            "first docker info": info.seconds,
            "total": prepared.seconds + info.seconds,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", default=config_path(None, {}))
    args = ap.parse_args()
    host = load_settings(args.config)
    with tempfile.TemporaryDirectory(prefix="lvx-dbench-") as tmp:
        root = Path(tmp)
        with running_registry(root / "registry", f"{host.gateway}:{PORT}") as reg:
            tools = reg.push(
                image_layout(root / "tools", busybox_files(docker_cli_files(root / "cli"))), "bench/tools:1", root
            )
            dind = reg.push(dind_image(root / "dind", root / "debs"), "bench/docker:27-dind", root)
            payloads = {
                "vm-daemon": {"image": {"name": tools}, "services": [{"name": "docker:27-dind"}]},
                "privileged": {"image": {"name": tools}, "services": [{"name": dind, "alias": "docker"}]},
            }
            configs = {
                mode: bench_config(
                    args.config,
                    root / f"config-{mode}.toml",
                    "lvxdbench",
                    reg.address,
                    docker={
                        "dind": mode,
                        "dind_images": (*DEFAULT_DIND_IMAGES, "**/bench/docker:*dind*"),
                        "wait_for_services_timeout": 180,
                    },
                    mirror=MirrorSettings(enabled=False),  # the same for both modes: nothing from Docker Hub
                )
                for mode in payloads
            }
            rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in payloads}
            for n in range(args.rounds):
                for i, mode in enumerate(payloads):
                    print(f"round {n + 1}/{args.rounds}: {mode} ...", file=sys.stderr, flush=True)
                    rows[mode].append(one(configs[mode], root, 891_000 + 2 * n + i, payloads[mode]))
    print(f"dind job to its first `docker info` (TLS on 2376), {args.rounds} rounds, {host.vm.vcpus} vCPU")
    print("| | vm-daemon (median) | privileged (median) |")
    print("|---|---|---|")
    for key in ("prepare", "first docker info", "total"):
        daemon, privileged = (statistics.median(r[key] for r in rows[m]) for m in payloads)
        print(f"| {key} | {daemon:.1f} s | {privileged:.1f} s |")
    daemon, privileged = (statistics.median(r["total"] for r in rows[m]) for m in payloads)
    print(f"vm-daemon / privileged (total, medians): {daemon / privileged:.2f}")


if __name__ == "__main__":
    main()
