"""Observability on real VMs: a pool job, a cold job and a failing job, then a real Prometheus
(Debian's, started here on loopback) scraping the real host agent's /metrics has the series an
operator's dashboard and alerts need, and `libvirt-executor jobs` shows each job's phases.

One agent keeps `pool.size = 1` for this module's prefix; at most two VMs exist at once (a job's
and the refill the agent boots beside it). The prefix's job history is started afresh (the state
dir is the host's, shared for the IP reservations).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from executor.adapters.hostfiles import load_settings
from executor.admin import pool as pool_admin
from executor.admin.reap import reap
from executor.core.waiting import poll
from executor.jobvm import journal
from tests.vm.conftest import write_test_config
from tests.vm.harness import Agent, RunnerSim

pytestmark = pytest.mark.vm

PREFIX = "lvxobs"
BOOT_WAIT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """Debian's Prometheus server on loopback, scraping one target every second."""

    def __init__(self, root: Path, target: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: libvirt-executor\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.address = f"127.0.0.1:{free_port()}"
        self.log = root / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    shutil.which("prometheus") or "/usr/bin/prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address={self.address}",
                ],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        ready = poll(self._ready, 60, interval=0.5)
        assert ready, f"prometheus did not start: {self.log.read_text()[-2000:]}"

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> dict[str, float]:
        """The instant vector `expr` now: each series' labels (without __name__, instance, job)
        as a sorted "k=v,..." string, and its value."""
        url = f"http://{self.address}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        found = {}
        for series in body["data"]["result"]:
            labels = {k: v for k, v in series["metric"].items() if k not in ("__name__", "instance", "job")}
            found[",".join(f"{k}={v}" for k, v in sorted(labels.items()))] = float(series["value"][1])
        return found

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def executor(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "executor", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def pool_vms(config: Path, state: str) -> list[str]:
    st = pool_admin.status(load_settings(str(config)))
    return [v["name"] for v in st["vms"] if v["pool_state"] == state]


@pytest.fixture(scope="module")
def observed(host_settings, tmp_path_factory, leftovers):
    root = tmp_path_factory.mktemp("observe")
    listen = f"127.0.0.1:{free_port()}"
    config = write_test_config(host_settings, root / "cfg", PREFIX, metrics_listen=listen, extra="\n[pool]\nsize = 1\n")
    settings = load_settings(str(config))
    journal.job_history(settings).path.unlink(missing_ok=True)  # this prefix's jobs only, from now
    assert executor(config, "pool", "fill").returncode == 0  # an earlier run's drain is kept in the state dir
    agent = Agent(config, root / "agent.log")
    prometheus = Prometheus(root / "prometheus", listen)
    try:
        yield {"config": config, "root": root, "agent": agent, "prometheus": prometheus, "listen": listen}
    finally:
        prometheus.stop()
        agent.stop()
        executor(config, "pool", "fill")
        reap(settings)
        assert leftovers(config) == {}


def run_job(config: Path, root: Path, job_id: int, script: str) -> tuple[str, int]:
    """One job, all its stages; (where its VM came from, the build stage's exit code)."""
    sim = RunnerSim(config, root / f"job{job_id}", job_id)
    prepared = sim.prepare()
    assert prepared.rc == 0, prepared.describe()
    try:
        assert sim.run("echo sources", "get_sources").rc == 0
        built = sim.run(script, "build_script")
    finally:
        assert sim.cleanup().rc == 0
    source = "pool" if "ready at" in prepared.stdout and "(pool, " in prepared.stdout else "cold"
    return source, built.rc


def test_prometheus_scrapes_jobs_by_outcome_prepare_by_source_and_the_pools_gauges(observed):
    config, root, prom = observed["config"], observed["root"], observed["prometheus"]
    assert poll(lambda: pool_vms(config, "idle") or None, BOOT_WAIT_S, interval=1.0), observed["agent"].text()[-3000:]

    assert run_job(config, root, 8101, "true") == ("pool", 0)
    # No refill: the next jobs must boot cold (and at most two VMs exist at once).
    assert executor(config, "pool", "drain").returncode == 0
    assert poll(lambda: not pool_vms(config, "idle") and not pool_vms(config, "booting"), BOOT_WAIT_S, interval=1.0)
    assert run_job(config, root, 8102, "true") == ("cold", 0)
    assert run_job(config, root, 8103, "echo failing; exit 3") == ("cold", 1)

    # What Prometheus scraped from the agent (once a scrape after the last cleanup came in).
    jobs = "libvirt_executor_jobs_total"
    assert poll(lambda: sum(prom.query(jobs).values()) == 3, 30, interval=1.0), prom.query(jobs)
    assert prom.query(jobs) == {
        "outcome=success": 2,  # an empty label is no label to Prometheus
        "outcome=build_failure,reason=script_failure": 1,
    }
    assert prom.query("libvirt_executor_prepare_seconds_count") == {
        "mode=shell,source=pool": 1,
        "mode=shell,source=cold": 2,
    }
    medians = prom.query("histogram_quantile(0.5, sum by (le, source) (libvirt_executor_prepare_seconds_bucket))")
    assert set(medians) == {"source=pool", "source=cold"} and medians["source=pool"] < medians["source=cold"]
    assert prom.query("libvirt_executor_pool_claims_total") == {"result=hit": 1, "result=miss": 2}
    assert prom.query("libvirt_executor_stage_seconds_count") == {"stage=get_sources": 3, "stage=build_script": 3}
    assert prom.query("libvirt_executor_cleanup_seconds_count") == {"": 3}
    assert prom.query("libvirt_executor_pool_target") == {"": 1}
    assert set(prom.query("libvirt_executor_vms")) == {"state=idle", "state=booting", "state=job", "state=removing"}
    assert prom.query('up{job="libvirt-executor"}') == {"": 1}
    with urllib.request.urlopen(f"http://{observed['listen']}/healthz", timeout=10) as resp:
        assert json.load(resp)["ok"] is True

    # The same jobs from the command line: each with where its time went.
    table = executor(config, "jobs").stdout
    print("\n" + table)
    lines = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert set(lines) == {"8101", "8102", "8103"}
    assert "pool" in lines["8101"] and "claim " in lines["8101"] and lines["8101"].endswith("success")
    assert "cold" in lines["8102"] and "boot-to-ssh " in lines["8102"] and "ssh-to-docker " in lines["8102"]
    assert lines["8103"].endswith("build_failure (script_failure)") and "(build_script failed)" in lines["8103"]
    rows = {r["job_id"]: r for r in json.loads(executor(config, "jobs", "--json").stdout)["jobs"]}
    assert [s["stage"] for s in rows[8103]["stages"]] == ["get_sources", "build_script"]
    assert rows[8103]["stages"][1]["exit_status"] == 3
