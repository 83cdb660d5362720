"""executor.admin.observe and adapters.prometheus: the metrics from a tmp job history and
libvirt's test driver, in Prometheus' format (checked by the real promtool), served over HTTP."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest

from executor.adapters.prometheus import MetricsServer, exposition
from executor.admin.observe import families
from executor.core.domain_xml import build_domain
from executor.core.jobenv import Job
from executor.core.settings import ImageSettings
from executor.errors import AdmissionRefused, BuildFailure
from executor.jobvm import journal
from tests.unit.conftest import make_driver_spec, make_record


def _job(job_id: int) -> Job:
    return Job(job_id=job_id, project="group/app", project_id=3, pipeline_id=1, runner_id=1, timeout_s=3600)


def _history(settings) -> None:
    """A pool job that succeeded, a cold one that failed its script, one refused by admission."""
    for job_id, source, fails in ((1, "pool", False), (2, "cold", True)):
        with journal.prepare_recorded(settings, _job(job_id)) as facts:
            facts.vm, facts.source, facts.mode, facts.claim = f"lvx-job-{job_id}", source, "shell", "hit"
        with pytest.raises(BuildFailure) if fails else contextlib.nullcontext():
            with journal.stage_recorded(settings, _job(job_id), "step_script"):
                if fails:
                    raise BuildFailure(3)
        journal.job_ended(settings, job_id, 0.2)
    with pytest.raises(AdmissionRefused), journal.prepare_recorded(settings, _job(3)):
        raise AdmissionRefused("no room", ("memory",))
    journal.job_ended(settings, 3, 0.1)


def _samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")
    }


def test_metrics_count_jobs_by_outcome_and_prepare_by_source_from_the_history(hv, tmp_settings, tmp_path):
    tmp_settings = dataclasses.replace(tmp_settings, image=ImageSettings(dir=str(tmp_path / "no-image")))
    _history(tmp_settings)
    hv.define_and_start(build_domain(make_driver_spec(make_record(vm="lvx-job-2", job_id=2), name="lvx-job-2")))
    text = exposition(lambda: families(tmp_settings)).decode()
    got = _samples(text)
    assert got['libvirt_executor_jobs_total{outcome="success",reason=""}'] == 1
    assert got['libvirt_executor_jobs_total{outcome="build_failure",reason="script_failure"}'] == 1
    assert got['libvirt_executor_jobs_total{outcome="system_failure",reason="admission"}'] == 1
    assert got['libvirt_executor_admission_refusals_total{resource="memory"}'] == 1
    assert got['libvirt_executor_pool_claims_total{result="hit"}'] == 2
    assert got['libvirt_executor_prepare_seconds_count{mode="shell",source="pool"}'] == 1
    assert got['libvirt_executor_prepare_seconds_count{mode="shell",source="cold"}'] == 1
    assert got['libvirt_executor_stage_seconds_count{stage="step_script"}'] == 2
    assert got["libvirt_executor_cleanup_seconds_count"] == 3
    assert got['libvirt_executor_vms{state="job"}'] == 1
    assert got["libvirt_executor_history_open_jobs"] == 0
    # No base image in tmp: that part is missing and says so, the rest is there.
    assert got['libvirt_executor_collect_errors{part="image"}'] == 1
    assert 'part="history"' not in text and 'part="vms"' not in text
    if shutil.which("promtool"):  # installed by scripts/setup.sh; .ci/run checks the agent's too
        check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_the_server_answers_metrics_and_healthz_and_says_when_unhealthy(tmp_settings):
    healthy = {"ok": True}
    server = MetricsServer("127.0.0.1", 0, lambda: families(tmp_settings), lambda: (healthy["ok"], {"why": "x"}))
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            assert b"libvirt_executor_build_info" in resp.read()
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as resp:
            assert json.loads(resp.read()) == {"ok": True, "why": "x"}
        healthy["ok"] = False
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(f"{base}/healthz", timeout=10)
        assert failed.value.code == 503
    finally:
        server.close()
