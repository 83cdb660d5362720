"""executor.core.history: how a job ended in GitLab's words, and the `jobs` table."""

from __future__ import annotations

from executor.core import history
from executor.core.history import JobRow, StageRow
from executor.errors import (
    AdmissionRefused,
    BuildFailure,
    ConfigError,
    Interrupted,
    JobRefused,
    SystemFailure,
    TimedOut,
)
from executor.jobvm.record import VMLost


def stage(name: str, outcome: str, reason: str = "", seconds: float | None = 1.0) -> StageRow:
    return StageRow(name, 0.0, seconds, outcome, reason)


def test_each_error_has_its_outcome_and_a_reason_from_the_fixed_list():
    cases = {
        None: ("success", ""),
        BuildFailure(2): ("build_failure", "script_failure"),
        JobRefused("image not allowed"): ("build_failure", "image_refused"),
        Interrupted(): ("canceled", "interrupted"),
        KeyboardInterrupt(): ("canceled", "interrupted"),
        VMLost("silent"): ("system_failure", "vm_lost"),
        TimedOut("boot"): ("system_failure", "timeout"),
        AdmissionRefused("full", ("memory",)): ("system_failure", "admission"),
        ConfigError("bad"): ("system_failure", "config"),
        SystemFailure("libvirt"): ("system_failure", "runner_system_failure"),
        ValueError("a bug"): ("system_failure", "runner_system_failure"),
    }
    for exc, expected in cases.items():
        assert history.classify(exc) == expected, exc
        assert expected[0] in history.OUTCOMES and expected[1] in history.REASONS


def test_the_first_failure_that_fails_a_job_in_gitlab_decides_its_outcome():
    ok = history.SUCCESS
    assert history.job_outcome(ok, "", [stage("get_sources", ok), stage("step_script", ok)]) == ("success", "")
    # after_script's exit status does not fail a GitLab job
    assert history.job_outcome(ok, "", [stage("step_script", ok), stage("after_script", "build_failure")]) == (
        "success",
        "",
    )
    failed = [stage("step_script", "build_failure", "script_failure"), stage("upload_artifacts_on_failure", ok)]
    assert history.job_outcome(ok, "", failed) == ("build_failure", "script_failure")
    lost = [stage("step_script", "system_failure", "vm_lost"), stage("after_script", "system_failure", "vm_lost")]
    assert history.job_outcome(ok, "", lost) == ("system_failure", "vm_lost")
    assert history.job_outcome("system_failure", "timeout", []) == ("system_failure", "timeout")
    assert history.job_outcome("build_failure", "image_refused", []) == ("build_failure", "image_refused")


def test_a_prepare_or_stage_without_an_end_was_killed_unless_cleanup_never_came():
    assert history.job_outcome("", "", []) == ("canceled", "killed")
    running = [stage("step_script", "", seconds=None)]
    assert history.job_outcome("success", "", running) == ("canceled", "killed")
    assert history.job_outcome("success", "", running, cleaned_up=False) == ("system_failure", "no_cleanup")
    assert history.job_outcome("success", "", [], cleaned_up=False) == ("success", "")


def test_stage_kinds_stay_a_bounded_set():
    assert history.stage_kind("step_script") == "step_script"
    assert history.stage_kind("step_release") == "other"
    assert history.stage_kind("x" * 1000) == "other"


def test_the_jobs_table_shows_where_each_jobs_time_went():
    rows = [
        JobRow(
            job_id=12,
            project="group/app",
            source="pool",
            mode="image",
            started=1000.0,
            prepare_seconds=1.2,
            phases={"claim": 0.4, "give": 0.1, "pulls": 0.5, "services": 0.2, "total": 1.2},
            prepare_outcome="success",
            cleanup_seconds=0.15,
            ended=1100.0,
            outcome="build_failure",
            reason="script_failure",
            stages=[stage("get_sources", "success", seconds=0.5), stage("step_script", "build_failure", seconds=30.0)],
        ),
        JobRow(job_id=13, project="evil\x1b[2Jname", started=1090.0, prepare_outcome=""),
    ]
    lines = history.format_table(rows, now=1120.0).splitlines()
    assert lines[0].split() == [
        "JOB",
        "PROJECT",
        "STARTED",
        "FROM",
        "MODE",
        "PREPARE",
        "PHASES",
        "STAGES",
        "CLEANUP",
        "OUTCOME",
    ]
    assert "group/app" in lines[1] and "2m00s ago" in lines[1] and "pool" in lines[1]
    assert "claim 0.40s give 0.10s pulls 0.50s services 0.20s total 1.2s" in lines[1]
    assert "2 in 30.5s (step_script failed)" in lines[1]
    assert lines[1].endswith("build_failure (script_failure)")
    assert "\x1b" not in lines[2] and lines[2].endswith("preparing")
