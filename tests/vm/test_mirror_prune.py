"""The mirror's size cap, for real: two images pulled through a mirror whose `max_gib` holds
only one of them; `mirror prune` evicts the one pulled first, garbage-collects its blobs with
distribution's own collector, and the mirror serves the other one afterwards. No VM: the host
pulls through the mirror with skopeo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from executor.testing.registry import image_layout, running_registry
from tests.vm.conftest import write_test_config

pytestmark = pytest.mark.vm

UPSTREAM = "127.0.0.1:5063"
MIRROR_PORT = 5064
LAYER_BYTES = 300 * 1024  # random, so gzip cannot shrink it


def cli(config, *args):
    result = subprocess.run(
        [sys.executable, "-m", "executor", "--config", str(config), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{args}: rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def pull_through(mirror: str, name: str, dest: Path) -> None:
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{mirror}/{name}", f"oci:{dest}"],
        check=True,
        capture_output=True,
    )


def test_prune_evicts_the_least_recently_pulled_image_and_keeps_serving_the_other(host_settings, tmp_path):
    storage = Path(host_settings.image.dir).parent / f"test-mirror-prune-{os.getpid()}"
    cap_gib = 450 * 1024 / 1024**3  # room for one image, not two
    config = write_test_config(
        host_settings,
        tmp_path / "cfg",
        "lvxmp",
        mirror=f'port = {MIRROR_PORT}\nupstream = "http://{UPSTREAM}"\nstorage = "{storage}"\nmax_gib = {cap_gib}',
    )
    mirror = f"{host_settings.gateway}:{MIRROR_PORT}"
    try:
        with running_registry(tmp_path / "upstream", UPSTREAM) as upstream:
            for name in ("old", "new"):
                files = {f"{name}.bin": (os.urandom(LAYER_BYTES), 0o644)}  # one small layer each
                upstream.push(image_layout(tmp_path / name, files), f"library/{name}:1", tmp_path)
            assert "answering" in cli(config, "mirror", "start")
            pull_through(mirror, "library/old:1", tmp_path / "pulled-old")
            time.sleep(1.1)  # "last pulled" has the links' mtime
            pull_through(mirror, "library/new:1", tmp_path / "pulled-new")
            before = cli(config, "mirror", "status")
            assert "2 repositories: library/new, library/old" in before

            pruned = cli(config, "mirror", "prune")
            assert "evicted library/old;" in pruned and "garbage-collect removed" in pruned, pruned
            assert "restarted: supervisor pid" in pruned and "answering" in pruned

            after = cli(config, "mirror", "status")
            assert "1 repositories: library/new" in after
            used = sum(f.stat().st_size for f in (storage / "data").rglob("data") if f.is_file())
            assert LAYER_BYTES < used < cap_gib * 1024**3  # the old image's blobs are gone
            pull_through(mirror, "library/new:1", tmp_path / "again")  # still served
    finally:
        subprocess.run([sys.executable, "-m", "executor", "--config", str(config), "mirror", "stop"], check=False)
        shutil.rmtree(storage, ignore_errors=True)
