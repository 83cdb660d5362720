#!/usr/bin/env python3
"""artifacts + cache benchmark: what the runner binary's volume and `[cache] mode = "host"` cost,
each next to its baseline from the same run, through the real executor.

- Making the runner volume for a 100 MB binary (hash, ISO, upload to the pool: once per binary),
  and finding it again (every prepare).
- prepare with the binary attached and mounted vs prepare without a runner binary (baseline; on
  a host with `gitlab-runner` on PATH the baseline has it too, so run this where there is none).
- restore_cache with a 50 MB archive kept on the host vs with nothing kept (baseline), and
  archive_cache copying a new 50 MB archive back vs finding nothing changed (baseline).
The binary is a shell script padded to 100 MB (it only needs to answer `--version`); the archive
is 50 MB of random bytes written where gitlab-runner's cache-archiver would put it. Figures,
not pass/fail. Run as root on a set-up host:
    .venv/bin/python benchmarks/cache_bench.py
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from benchjob import prepared_job  # beside this script

from executor.adapters.hostfiles import load_settings
from executor.adapters.hypervisor import connect
from executor.adapters.statedir import StateDir
from executor.core import naming, runnerbinary
from executor.core.nwfilter_xml import FILTER_NAME
from executor.core.settings import CacheSettings, MirrorSettings, RunnerSettings, Settings, config_path, settings_toml
from executor.jobvm import runnervolume

PREFIX = "lvxcbench"
ARCHIVE = "/cache/demo/project/bench-protected/cache.zip"
MAKE_ARCHIVE = f"sudo -n install -d -o runner -g runner $(dirname {ARCHIVE}) && head -c 50M /dev/urandom > {ARCHIVE}"
RESTORE = "mkdir -p /builds/demo/project && cd /builds/demo/project && gitlab-runner cache-extractor --file x"
ARCHIVE_STAGE = "cd /builds/demo/project && gitlab-runner cache-archiver --file x --path ."


def fake_binary(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.write(b"#!/bin/sh\necho 'Version: bench'\nexit 0\n")
        f.write(b"#" * (size - f.tell()))
    path.chmod(0o755)


def config(host: Settings, path: Path, binary: str, cache_dir: Path) -> Path:
    settings = dataclasses.replace(
        host,
        libvirt=dataclasses.replace(host.libvirt, nwfilter=FILTER_NAME),
        vm=dataclasses.replace(host.vm, name_prefix=PREFIX),
        paths=dataclasses.replace(host.paths, console_log_dir=str(path.parent / "console")),
        mirror=MirrorSettings(enabled=False),
        runner=RunnerSettings(binary=binary),
        cache=CacheSettings(mode="host", dir=str(cache_dir), max_gib=1.0, max_total_gib=2.0),
    )
    path.write_text(settings_toml(settings))
    return path


def stage(sim, body: str, name: str) -> float:
    result = sim.run(body, stage=name)
    if result.rc != 0:
        raise SystemExit(f"{name} failed:\n{result.describe()}")
    return result.seconds


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 0.1 else f"{value:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=config_path(None, {}))
    args = ap.parse_args()
    host = load_settings(args.config)
    rows: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="lvx-cbench-") as tmp:
        root = Path(tmp)
        binary = root / "gitlab-runner"
        fake_binary(binary, 100 * 1024**2)
        with_runner = config(host, root / "with.toml", str(binary), root / "hostcache")
        without = config(host, root / "without.toml", "", root / "hostcache-unused")
        settings = load_settings(str(with_runner))
        state = StateDir(settings.paths.state_dir)
        with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
            try:
                started = time.monotonic()
                found = runnervolume.host_binary(settings, state)
                assert found is not None
                runnervolume.ensure_volume(hv, settings, state, found)
                made = time.monotonic() - started
                started = time.monotonic()
                again = runnervolume.host_binary(settings, state)
                assert again is not None
                runnervolume.ensure_volume(hv, settings, state, again)
                rows["runner volume: find again (every prepare) / make (once per binary, 100 MB)"] = (
                    time.monotonic() - started,
                    made,
                )

                print("job without a runner binary ...", file=sys.stderr, flush=True)
                with prepared_job(without, root, 893_001) as (_, prepared):
                    baseline_prepare = prepared.seconds
                print("job with the runner volume and the host cache ...", file=sys.stderr, flush=True)
                with prepared_job(with_runner, root, 893_002) as (sim, prepared):
                    rows["prepare: without a runner binary / with its volume"] = (baseline_prepare, prepared.seconds)
                    empty = stage(sim, RESTORE, "restore_cache")
                    stage(sim, MAKE_ARCHIVE, "build_script")
                    copied = stage(sim, ARCHIVE_STAGE, "archive_cache")
                    unchanged = stage(sim, ARCHIVE_STAGE, "archive_cache")
                    restored = stage(sim, RESTORE, "restore_cache")
                    rows["restore_cache: nothing kept / 50 MB restored"] = (empty, restored)
                    rows["archive_cache: nothing changed / 50 MB copied back"] = (unchanged, copied)
            finally:
                for name in hv.volume_names(settings.libvirt.pool):
                    if runnerbinary.is_volume_name(PREFIX, name):
                        hv.delete_volume(settings.libvirt.pool, name)
                        state.remove_runner_record(name)
    print(f"artifacts + cache, one run, {host.vm.vcpus} vCPU")
    print("| | baseline | measured | ratio |")
    print("|---|---|---|---|")
    for what, (base, measured) in rows.items():
        print(f"| {what} | {_seconds(base)} | {_seconds(measured)} | {measured / base:.1f} |")


if __name__ == "__main__":
    main()
