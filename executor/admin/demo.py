"""`libvirt-executor demo`: one job end to end, driven the way gitlab-runner drives it.

It serves a small git repository from the host (dumb HTTP on the VM bridge address), then runs
config, prepare, get_sources (clone), build_script (`docker version`, a container run) and
cleanup as separate processes through the runner simulator, and finally checks that nothing of
the job is left on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from executor.admin.listing import leftovers_once_removed
from executor.admin.observe import recent_jobs
from executor.core import naming
from executor.core.history import format_table
from executor.core.settings import Settings, settings_toml
from executor.errors import SystemFailure
from executor.testing.runnersim import RunnerSim, StageResult

GET_SOURCES = """\
export GIT_TERMINAL_PROMPT=0
git init -q "$CI_PROJECT_DIR"
cd "$CI_PROJECT_DIR"
git remote add origin {url}
git fetch -q origin '+refs/heads/*:refs/remotes/origin/*'
git checkout -f -q {sha}
echo "Checked out $(git log -1 --format='%h %s')"
"""

BUILD_SCRIPT = """\
cd "$CI_PROJECT_DIR"
cat README
echo "--- docker version ---"
docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}'
echo "--- a container, from a locally imported image (no registry needed) ---"
mkdir -p /tmp/rootfs/bin && cp /bin/busybox /tmp/rootfs/bin/ && ln -sf busybox /tmp/rootfs/bin/sh
tar -C /tmp/rootfs -c . | docker import - demo/busybox:latest >/dev/null
docker run --rm demo/busybox:latest /bin/sh -c 'echo "hello from container $(hostname) in VM"'
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _make_repository(root: Path, files: dict[str, str]) -> str:
    """A bare repository `root/demo.git` with one commit of `files`, ready for dumb HTTP; its sha."""
    work, bare = root / "work", root / "demo.git"
    git = ["git", "-c", "user.name=demo", "-c", "user.email=demo@example.invalid", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    for name, content in files.items():
        (work / name).write_text(content)
    subprocess.run([*git, "-C", str(work), "add", "."], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-q", "-m", "demo commit"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
    return subprocess.run(
        ["git", "-C", str(work), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


@contextmanager
def served_repository(root: Path, host: str, files: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Serve a one-commit repository of `files` over dumb HTTP on `host` (the VM bridge
    address, so VMs can clone it); yields (clone URL, commit sha)."""
    sha = _make_repository(root, files)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{server.server_address[1]}/demo.git", sha
    finally:
        server.shutdown()
        server.server_close()


def run_demo(settings: Settings, config_file: str, say: Callable[[str], None] = print) -> None:
    job_id = 900_000_000 + (int(time.time()) % 1_000_000) * 10 + os.getpid() % 10
    readme = {"README": "This repository was cloned inside a throwaway VM.\n"}
    with tempfile.TemporaryDirectory(prefix="lvx-demo-") as tmp:
        root = Path(tmp)
        with served_repository(root / "git", str(settings.gateway), readme) as (url, sha):
            # The VMs may reach only the host ports the config opens: open the git server's.
            port = int(urllib.parse.urlsplit(url).port or 80)
            network = dataclasses.replace(settings.network, allow_host_ports=(*settings.network.allow_host_ports, port))
            demo_config = root / "config.toml"
            demo_config.write_text(settings_toml(dataclasses.replace(settings, network=network)))
            say(f"--- serving the demo repository at {url} (config {config_file} plus that port open)")
            _run_demo_job(settings, str(demo_config), root / "runner", job_id, url, sha, say)


def _run_demo_job(
    settings: Settings, config_file: str, workdir: Path, job_id: int, url: str, sha: str, say: Callable[[str], None]
) -> None:
    vm = naming.vm_name(settings.vm.name_prefix, job_id)
    sim = RunnerSim(
        config_file,
        workdir,
        job_id,
        variables={"CI_PROJECT_DIR": "/builds/demo/project", "CI_BUILDS_DIR": "/builds"},
        merged_output=True,  # the lines in the order they came, as in a job log
    )
    started = time.monotonic()
    results: list[StageResult] = []

    def stage(title: str, result: StageResult) -> StageResult:
        results.append(result)
        say(f"--- {title}: exit {result.rc} ({result.seconds:.1f}s)")
        for line in (result.stdout + result.stderr).splitlines():
            say(f"    {line}")
        return result

    try:
        config = stage("config", sim.config())
        if config.rc == 0:
            say(f"    (driver: {json.loads(config.stdout)['driver']})")
        prepared = stage("prepare", sim.prepare()) if config.rc == 0 else None
        if prepared and prepared.rc == 0:
            stage("get_sources", sim.run(GET_SOURCES.format(url=url, sha=sha), "get_sources"))
            if results[-1].rc == 0:
                stage("build_script", sim.run(BUILD_SCRIPT, "build_script"))
    finally:
        stage("cleanup", sim.cleanup())
    left = leftovers_once_removed(settings, vm)
    say(f"--- job {job_id} took {time.monotonic() - started:.1f}s in all")
    if left:
        raise SystemFailure(f"demo: cleanup left {left} behind")
    say(f"--- nothing of {vm} is left on the host (domain, volumes, IP, lock, key, console log)")
    rows = [r for r in recent_jobs(settings, time.time() - 3600) if r.job_id == job_id]
    say("--- the job history (`libvirt-executor jobs`) says:")
    for line in format_table(rows).splitlines():
        say(f"    {line}")
    failed = [r for r in results if r.rc != 0]
    if failed:
        raise SystemFailure(f"demo job failed at `{' '.join(failed[0].argv[-2:])}` (exit {failed[0].rc})")
    say("--- demo job succeeded")
