"""executor.adapters.jobhistory: the SQLite job history in a tmp state dir, written by many
processes at once as the stages of concurrent jobs do."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat

from executor.adapters.jobhistory import JobHistory, Observation
from executor.core import history

CTX = multiprocessing.get_context("fork")


def _one_job(path: str, job_id: int, stages: int) -> None:
    """What a job's processes write, each write from its own connection as separate processes do."""
    h = JobHistory(path)
    h.prepare_started(job_id, "group/project", 7, 1000.0)
    h.prepare_ended(
        job_id,
        2.5,
        history.SUCCESS,
        vm=f"lvx-job-{job_id}",
        source="cold",
        mode="shell",
        phases={"clone": 0.1, "boot_to_ssh": 2.0},
        observations=[Observation("prepare_seconds", {"source": "cold", "mode": "shell"}, 2.5, (1, 5))],
    )
    for n in range(stages):
        row = h.stage_started(job_id, f"step_{n}", 1001.0 + n)
        h.stage_ended(
            row, 0.2, history.SUCCESS, observations=[Observation("stage_seconds", {"stage": "other"}, 0.2, (1,))]
        )
    h.job_ended(job_id, 1100.0, 0.1)


def test_two_jobs_at_once_write_every_row_and_count(tmp_path):
    """Eight writer processes (two jobs' worth of stages each, at once): nothing is lost or
    counted twice, and the file is the owner's alone."""
    procs = [CTX.Process(target=_one_job, args=(str(tmp_path / "h.sqlite3"), 100 + i, 25)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    h = JobHistory(tmp_path / "h.sqlite3")
    rows = h.jobs()
    assert sorted(r.job_id for r in rows) == [100 + i for i in range(8)]
    assert all(len(r.stages) == 25 and r.outcome == history.SUCCESS for r in rows)
    assert h.counters() == [("jobs_total", {"outcome": "success", "reason": ""}, 8.0)]
    histograms = {m: (buckets, n) for m, _labels, buckets, _sum, n in h.histograms()}
    assert histograms["prepare_seconds"] == ([(1.0, 0), (5.0, 8)], 8)
    assert histograms["stage_seconds"] == ([(1.0, 200)], 200)
    assert stat.S_IMODE(os.stat(tmp_path / "h.sqlite3").st_mode) == 0o600


def _killed_in_prepare(path: str) -> None:
    JobHistory(path).prepare_started(5, "p", None, 1000.0)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_job_killed_mid_prepare_keeps_its_row_and_cleanup_says_how_it_ended(tmp_path):
    p = CTX.Process(target=_killed_in_prepare, args=(str(tmp_path / "h.sqlite3"),))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    h = JobHistory(tmp_path / "h.sqlite3")
    assert h.open_jobs() == [5]
    assert h.job_ended(5, 1010.0, 0.3) == (history.CANCELED, history.KILLED)
    assert h.job_ended(5, 1011.0, 0.3) is None  # once only: a second cleanup counts nothing
    assert h.open_jobs() == []
    assert h.counters() == [("jobs_total", {"outcome": "canceled", "reason": "killed"}, 1.0)]


def test_a_job_killed_before_its_prepare_wrote_anything_still_gets_a_row_at_cleanup(tmp_path):
    h = JobHistory(tmp_path / "h.sqlite3")
    assert h.job_ended(8, 1000.0, 0.1) == (history.CANCELED, history.KILLED)
    assert [(r.job_id, r.outcome, r.ended) for r in h.jobs()] == [(8, "canceled", 1000.0)]


def test_reap_ends_a_job_whose_cleanup_never_came_as_a_system_failure(tmp_path):
    h = JobHistory(tmp_path / "h.sqlite3")
    h.prepare_started(6, "p", None, 1000.0)
    h.prepare_ended(6, 1.0, history.SUCCESS)
    h.stage_started(6, "step_script", 1001.0)  # the runner died during it
    assert h.job_ended(6, 2000.0, None, cleaned_up=False) == (history.SYSTEM_FAILURE, history.NO_CLEANUP)
    [row] = h.jobs()
    assert (row.outcome, row.reason, row.cleanup_seconds) == ("system_failure", "no_cleanup", None)
    assert row.stages[0].seconds is None


def test_a_retried_prepare_starts_its_row_again_and_the_failure_is_kept_with_its_message(tmp_path):
    h = JobHistory(tmp_path / "h.sqlite3")
    h.prepare_started(9, "p", 1, 1000.0)
    h.prepare_ended(9, 3.0, history.SYSTEM_FAILURE, history.TIMEOUT, "timed out\nafter 240 s\x1b[31m")
    assert h.jobs()[0].detail == "timed out after 240 s[31m"
    h.prepare_started(9, "p", 1, 1050.0)  # gitlab-runner's retry of a failed prepare
    [row] = h.jobs()
    assert (row.started, row.prepare_outcome, row.detail) == (1050.0, "", "")
    h.prepare_ended(9, 3.0, history.SYSTEM_FAILURE, history.TIMEOUT, "again")
    assert h.job_ended(9, 1100.0, 0.1) == (history.SYSTEM_FAILURE, history.TIMEOUT)


def test_prune_drops_old_jobs_with_their_stages_but_keeps_the_counters(tmp_path):
    h = JobHistory(tmp_path / "h.sqlite3")
    for job_id, started in ((1, 0.0), (2, 90 * 86400.0)):
        h.prepare_started(job_id, "p", None, started)
        h.prepare_ended(job_id, 1.0, history.SUCCESS)
        h.stage_started(job_id, "step_script", started + 1)
        h.job_ended(job_id, started + 10, 0.1)
    assert h.prune(now=100 * 86400.0, keep_days=30) == 1
    assert [r.job_id for r in h.jobs()] == [2]
    assert h.counters() == [("jobs_total", {"outcome": "canceled", "reason": "killed"}, 2.0)]


def test_reading_before_anything_was_written_gives_nothing(tmp_path):
    h = JobHistory(tmp_path / "state" / "h.sqlite3")
    assert (h.jobs(), h.counters(), h.histograms(), h.open_jobs()) == ([], [], [], [])
