#!/usr/bin/env python3
"""Docker layer cache benchmark: the same multi-step `docker build`, cold (an empty lineage)
against warm (the next job of the lineage), same run, in shell mode and in an unchanged
`services: [docker:dind]` pipeline; and what the cache adds to prepare and cleanup, beside the
same job with `[docker_cache] enabled = false`.

The build: FROM scratch, the VM's static busybox, three RUN steps that compute for a few
seconds each (a build dominated by its RUN steps, as the issue asks). Shell mode builds with the
VM's docker CLI (legacy builder: the image has no buildx); the dind pipeline with Debian's docker
CLI in `bench/tools` (BuildKit, DOCKER_BUILDKIT=1) against the VM's dockerd. No Docker Hub: the
build image comes from a docker-registry on the host. Each round uses a new project id, so its
first job is cold. Measured: the build as the job times it (`date` around `docker build`), the
build stage, prepare and cleanup (cleanup: until the stage returns; the head is settled by the
detached remover afterwards, which the bench waits for before the warm job). Figures, not
pass/fail. Run as root on a set-up host:
    .venv/bin/python benchmarks/layer_cache_bench.py --rounds 1
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

from benchjob import bench_config  # beside this script

from executor.adapters.hostfiles import load_settings
from executor.admin.dockercache import prune
from executor.admin.listing import leftovers_once_removed
from executor.core.settings import DockerCacheSettings, MirrorSettings, config_path
from executor.testing.registry import busybox_files, docker_cli_files, image_layout, running_registry
from executor.testing.runnersim import RunnerSim

PORT = 5008
STEP = '["/bin/busybox", "sh", "-c", "/bin/busybox seq 1 {n} | /bin/busybox md5sum > /step{i}"]'
BUILD = """
set -e
mkdir -p /tmp/ctx && cp /bin/busybox /tmp/ctx/
cat > /tmp/ctx/Dockerfile <<EOF
FROM scratch
COPY busybox /bin/busybox
{runs}
EOF
start=$(tr -d . < /proc/uptime | cut -d" " -f1)  # centiseconds (busybox date has no %N)
{build} -t bench-cached:1 /tmp/ctx > /tmp/build.log 2>&1 || {{ cat /tmp/build.log; exit 1; }}
echo "build-ms $(( ($(tr -d . < /proc/uptime | cut -d" " -f1) - start) * 10 ))"
grep -c -e 'Using cache' -e ' CACHED' /tmp/build.log || true
"""
DIND_VARIABLES = {
    "DOCKER_HOST": "tcp://docker:2376",
    "DOCKER_TLS_CERTDIR": "/certs",
    "DOCKER_TLS_VERIFY": "1",
    "DOCKER_CERT_PATH": "/certs/client",
    "DOCKER_BUILDKIT": "1",
}


def script(mode: str, work: int) -> str:
    runs = "\n".join(f"RUN {STEP.format(n=work + i, i=i)}" for i in range(3))
    build = "DOCKER_BUILDKIT=0 docker build" if mode == "shell" else "docker build --progress=plain"
    return BUILD.format(runs=runs, build=build)


def one(config: Path, workdir: Path, job_id: int, project: int, payload: dict, variables: dict, body: str) -> dict:
    sim = RunnerSim(
        config,
        workdir / f"job{job_id}",
        job_id,
        payload_extra={
            **payload,
            "job_info": {"id": job_id, "project_id": project, "project_name": "bench"},
            "git_info": {"protected": True},
        },
        variables=variables,
    )
    try:
        prepared = sim.prepare()
        if prepared.rc != 0:
            raise SystemExit(f"prepare failed:\n{prepared.describe()}")
        built = sim.run(body)
        if built.rc != 0:
            raise SystemExit(f"the build failed:\n{built.describe()}")
    finally:
        cleaned = sim.cleanup()
    left = leftovers_once_removed(load_settings(str(config)))  # the head is settled now
    if left:
        raise SystemExit(f"left behind: {left}")
    numbers = re.findall(r"^(?:build-ms )?(\d+)$", built.stdout, re.M)
    return {
        "build": int(numbers[0]) / 1000,
        "cached steps": int(numbers[1]),
        "build stage": built.seconds,
        "prepare": prepared.seconds,
        "cleanup": cleaned.seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", type=int, default=300000, help="numbers each RUN step hashes (its length)")
    ap.add_argument("--config", default=config_path(None, {}))
    args = ap.parse_args()
    host = load_settings(args.config)
    rows: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="lvx-lcbench-") as tmp:
        root = Path(tmp)
        with running_registry(root / "registry", f"{host.gateway}:{PORT}") as reg:
            tools = reg.push(
                image_layout(root / "tools", busybox_files(docker_cli_files(root / "cli"))), "bench/tools:1", root
            )
            jobs = {
                "shell": ({}, {}),
                "dind": ({"image": {"name": tools}, "services": [{"name": "docker:dind"}]}, DIND_VARIABLES),
            }
            cache = DockerCacheSettings(
                enabled=True, pool="lvxlcbench-docker-cache", dir="/var/lib/libvirt-executor/lvxlcbench-docker-cache"
            )
            configs = {
                enabled: bench_config(
                    args.config,
                    root / f"config-{enabled}.toml",
                    "lvxlcbench",
                    reg.address,
                    docker={"wait_for_services_timeout": 180},
                    mirror=MirrorSettings(enabled=False),
                    docker_cache=cache if enabled else DockerCacheSettings(),
                )
                for enabled in (False, True)
            }
            job_id = 893_000
            try:
                for n in range(args.rounds):
                    for mode, (payload, variables) in jobs.items():
                        project = 893_000 + 10 * n + (mode == "dind")
                        for kind, cfg in (
                            ("no cache", configs[False]),
                            ("cold", configs[True]),
                            ("warm", configs[True]),
                        ):
                            print(f"round {n + 1}/{args.rounds}: {mode}, {kind} ...", file=sys.stderr, flush=True)
                            job_id += 1
                            body = script(mode, args.work)
                            rows.setdefault((mode, kind), []).append(
                                one(cfg, root, job_id, project, payload, variables, body)
                            )
            finally:
                prune(load_settings(str(configs[True])))
    print(
        f"same 3-RUN-step build (each hashes {args.work} numbers), {args.rounds} round(s), "
        f"{host.vm.vcpus} vCPU, medians"
    )
    for mode in ("shell", "dind"):
        print(f"\n{mode}:")
        print("| | no cache | cache, cold | cache, warm |")
        print("|---|---|---|---|")
        for key in ("build", "cached steps", "build stage", "prepare", "cleanup"):
            cells = [statistics.median(r[key] for r in rows[(mode, kind)]) for kind in ("no cache", "cold", "warm")]
            unit = "" if key == "cached steps" else " s"
            print(f"| {key} | " + " | ".join(f"{c:g}" if not unit else f"{c:.1f}{unit}" for c in cells) + " |")
        cold, warm = (statistics.median(r["build"] for r in rows[(mode, kind)]) for kind in ("cold", "warm"))
        print(f"warm build {cold / warm:.1f}x faster than cold (target: >= 5x)")


if __name__ == "__main__":
    main()
