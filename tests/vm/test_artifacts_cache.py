"""Artifacts and caches: the host's gitlab-runner binary in every job VM, and `[cache] mode =
"host"` keeping a project's cache archives between throwaway VMs.

No real gitlab-runner can be installed here: `runner.binary` points at the stand-in
(executor/testing/gitlab_runner_standin.py), which records its argv in the job log and implements
cache-archiver/cache-extractor with zip. The stage bodies below are the runner's own guarded
calls (shells/abstract.go: `if gitlab-runner --version ...; then gitlab-runner cache-extractor
--file <relative path> ...`), with paths laid out as the runner lays them out.

Three jobs, one VM at a time: project A's job 1 writes a cache, the host binary is replaced,
project A's job 2 gets the new binary and job 1's cache (and goes over the size limits), and a
job of project B gets none of A's cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import libvirt
import pytest

from executor.adapters.cachestore import CacheStore
from executor.adapters.hostfiles import load_settings
from executor.adapters.statedir import StateDir
from executor.core import runnerbinary
from executor.testing import gitlab_runner_standin
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim

pytestmark = pytest.mark.vm

PREFIX = "lvxart"
PROJECT_A, PROJECT_B = 101, 202
PROJECT_DIR = "/builds/demo/project"
CACHE_KEY_DIR = "../../../cache/demo/project"  # the runner's path: relative to the build dir
MAX_GIB = 0.002  # 2.1 MB per project


def restore_cache_body(key: str) -> str:
    return f"""cd {PROJECT_DIR}
if gitlab-runner --version >/dev/null 2>/dev/null; then
  echo "Checking cache for {key}..."
  if gitlab-runner cache-extractor --file {CACHE_KEY_DIR}/{key}/cache.zip --timeout 10; then
    echo "Successfully extracted cache"
  else
    echo "WARNING: Failed to extract cache"
  fi
else
  echo "WARNING: Missing gitlab-runner. Extracting cache is disabled."
fi
"""


def archive_cache_body(key: str, path: str) -> str:
    return f"""cd {PROJECT_DIR}
if gitlab-runner --version >/dev/null 2>/dev/null; then
  echo "Creating cache {key}..."
  if gitlab-runner cache-archiver --file {CACHE_KEY_DIR}/{key}/cache.zip --timeout 10 --path {path}; then
    echo "Created cache"
  else
    echo "WARNING: Failed to create cache"
  fi
else
  echo "WARNING: Missing gitlab-runner. Creating cache is disabled."
fi
"""


UPLOAD_ARTIFACTS_BODY = f"""cd {PROJECT_DIR}
if gitlab-runner --version >/dev/null 2>/dev/null; then
  gitlab-runner artifacts-uploader --url http://gitlab.invalid/ --token [MASKED] --id 1 --path out.txt
else
  echo "WARNING: Missing gitlab-runner. Uploading artifacts is disabled."
fi
"""

SHOW_BINARY = 'sha256sum "$(readlink -f "$(command -v gitlab-runner)")"; sudo -n -H bash -c "gitlab-runner --version"'


def install_standin(path: Path, build: int) -> str:
    """The stand-in at `path`, made distinct per `build`; its sha256."""
    source = Path(gitlab_runner_standin.__file__).read_text()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".new")
    tmp.write_text(source + f"\n# stand-in build {build}\n")
    tmp.chmod(0o755)
    tmp.replace(path)  # a new inode, as a package upgrade makes
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def setup(host_settings, tmp_path_factory, leftovers):
    root = tmp_path_factory.mktemp("artcache")
    binary = root / "bin" / "gitlab-runner"
    extra = f"""
[runner]
binary = "{binary}"

[cache]
mode = "host"
dir = "{root / "hostcache"}"
max_gib = {MAX_GIB}
max_total_gib = 0.01
"""
    config = write_test_config(host_settings, root / "cfg", PREFIX, extra=extra)
    yield {"root": root, "binary": binary, "config": config, "store": CacheStore(root / "hostcache")}
    assert not leftovers(config)
    _remove_runner_volumes(load_settings(str(config)))


def _remove_runner_volumes(settings) -> None:
    """The shared runner volumes of this test's prefix (kept by design after jobs end)."""
    conn = libvirt.open(settings.libvirt.uri)
    try:
        pool = conn.storagePoolLookupByName(settings.libvirt.pool)
        for name in pool.listVolumes():
            if runnerbinary.is_volume_name(PREFIX, name):
                pool.storageVolLookupByName(name).delete(0)
                StateDir(settings.paths.state_dir).remove_runner_record(name)
    finally:
        conn.close()


def job(setup, job_id: int, project_id: int) -> RunnerSim:
    payload = {"job_info": {"id": job_id, "name": "t", "stage": "test", "project_id": project_id}}
    return RunnerSim(setup["config"], setup["root"] / f"runner{job_id}", job_id, payload_extra=payload)


def run_ok(sim: RunnerSim, body: str, stage: str) -> str:
    result = sim.run(body, stage=stage)
    assert result.rc == 0, result.describe()
    return result.stdout + result.stderr


def test_artifacts_and_a_host_cache_across_jobs_and_projects(setup):
    store: CacheStore = setup["store"]
    sha1 = install_standin(setup["binary"], 1)

    # Job 1, project A: the binary is on PATH at the host's hash, the guarded stages call it,
    # and the cache it writes is kept on the host.
    sim = job(setup, 7301, PROJECT_A)
    try:
        prepared = sim.prepare()
        assert prepared.rc == 0, prepared.describe()
        assert "artifacts, caches and dependencies are disabled" not in prepared.stdout + prepared.stderr
        shown = run_ok(sim, SHOW_BINARY, "build_script")
        assert sha1 in shown and gitlab_runner_standin.VERSION in shown, shown
        run_ok(sim, f"mkdir -p {PROJECT_DIR} && cd {PROJECT_DIR} && echo source > README", "get_sources")
        log = run_ok(sim, restore_cache_body("key1-protected"), "restore_cache")
        assert "no cached archives of project 101 on the host yet" in log, log
        assert "gitlab-runner stand-in: cache-extractor --file" in log and "Failed to extract cache" in log, log
        run_ok(
            sim,
            f"cd {PROJECT_DIR} && mkdir vendor && echo from-job-1 > vendor/marker && "
            "head -c 1200000 /dev/urandom > vendor/blob",
            "build_script",
        )
        log = run_ok(sim, archive_cache_body("key1-protected", "vendor"), "archive_cache")
        assert "gitlab-runner stand-in: cache-archiver --file" in log and "Created cache" in log, log
        assert "kept cache demo/project/key1-protected/cache.zip" in log, log
        log = run_ok(sim, UPLOAD_ARTIFACTS_BODY, "upload_artifacts_on_success")
        assert "gitlab-runner stand-in: artifacts-uploader --url http://gitlab.invalid/" in log, log
    finally:
        assert sim.cleanup().rc == 0
    assert [a.path for a in store.archives(PROJECT_A)] == ["demo/project/key1-protected/cache.zip"]

    # The runner is upgraded on the host: the next job gets the new binary, no image rebuild.
    sha2 = install_standin(setup["binary"], 2)
    assert sha2 != sha1

    # Job 2, project A: job 1's cache is restored; a second key pushes the project over
    # max_gib (the least recently used key goes), and an archive bigger than max_gib is refused.
    sim = job(setup, 7302, PROJECT_A)
    try:
        assert sim.prepare().rc == 0
        shown = run_ok(sim, SHOW_BINARY, "build_script")
        assert sha2 in shown and sha1 not in shown, shown
        run_ok(sim, f"mkdir -p {PROJECT_DIR}", "get_sources")
        log = run_ok(sim, restore_cache_body("key1-protected"), "restore_cache")
        assert "restored 1 cached archive(s) of project 101 from the host" in log, log
        assert "Successfully extracted cache" in log, log
        assert run_ok(sim, f"cat {PROJECT_DIR}/vendor/marker", "build_script").startswith("from-job-1"), log
        run_ok(sim, f"cd {PROJECT_DIR} && mkdir vendor2 && head -c 1200000 /dev/urandom > vendor2/blob", "build_script")
        log = run_ok(sim, archive_cache_body("key2-protected", "vendor2"), "archive_cache")
        assert "kept cache demo/project/key2-protected/cache.zip" in log, log
        assert "evicted this project's least recently used cache demo/project/key1-protected/cache.zip" in log, log
        run_ok(sim, f"cd {PROJECT_DIR} && mkdir big && head -c 3000000 /dev/urandom > big/blob", "build_script")
        log = run_ok(sim, archive_cache_body("key3-protected", "big"), "archive_cache")
        assert "cache demo/project/key3-protected/cache.zip is 2.9 MiB, above cache.max_gib" in log, log
        assert "not kept on the host" in log, log
    finally:
        assert sim.cleanup().rc == 0
    assert [a.path for a in store.archives(PROJECT_A)] == ["demo/project/key2-protected/cache.zip"]

    # Project B: same paths, but none of project A's archives.
    sim = job(setup, 7303, PROJECT_B)
    try:
        assert sim.prepare().rc == 0
        run_ok(sim, f"mkdir -p {PROJECT_DIR}", "get_sources")
        log = run_ok(sim, restore_cache_body("key2-protected"), "restore_cache")
        assert "no cached archives of project 202 on the host yet" in log, log
        assert "Failed to extract cache" in log, log
        listing = run_ok(sim, f"ls -A {PROJECT_DIR}; sudo -n find /cache -type f", "build_script")
        assert "vendor2" not in listing and "cache.zip" not in listing, listing
    finally:
        assert sim.cleanup().rc == 0
    assert store.archives(PROJECT_B) == []
