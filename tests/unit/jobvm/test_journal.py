"""executor.jobvm.journal: what prepare, a stage and cleanup leave in the job history, and that
a history that cannot be written never fails the job."""

from __future__ import annotations

import logging
import os

import pytest

from executor.core.jobenv import Job
from executor.errors import Interrupted, TimedOut
from executor.jobvm import journal

JOB = Job(job_id=77, project="g/p", project_id=1, pipeline_id=1, runner_id=1, timeout_s=600)


def test_a_failed_prepare_records_why_and_a_canceled_stage_says_so(tmp_settings):
    with pytest.raises(TimedOut), journal.prepare_recorded(tmp_settings, JOB) as facts:
        facts.vm, facts.source = "lvx-job-77", "cold"
        raise TimedOut("timed out after 240 s waiting for SSH")
    [row] = journal.job_history(tmp_settings).jobs()
    assert (row.prepare_outcome, row.vm, row.source) == ("system_failure", "lvx-job-77", "cold")
    assert row.detail == "timed out after 240 s waiting for SSH"
    # a failed prepare is not a prepare_seconds sample (it would skew the boot times)
    assert journal.job_history(tmp_settings).histograms() == []

    with journal.prepare_recorded(tmp_settings, JOB):
        pass  # gitlab-runner's retry succeeds
    with pytest.raises(Interrupted), journal.stage_recorded(tmp_settings, JOB, "step_script"):
        raise Interrupted()
    journal.job_ended(tmp_settings, JOB.job_id, 0.2)
    [row] = journal.job_history(tmp_settings).jobs()
    assert (row.outcome, row.reason) == ("canceled", "interrupted")
    assert [(s.stage, s.outcome, s.reason) for s in row.stages] == [("step_script", "canceled", "interrupted")]


def test_a_history_that_cannot_be_written_is_logged_and_the_job_goes_on(tmp_settings, caplog):
    os.makedirs(journal.job_history(tmp_settings).path)  # a directory where the file should be
    ran = []
    with caplog.at_level(logging.WARNING):
        with journal.prepare_recorded(tmp_settings, JOB):
            ran.append("prepare")
        with journal.stage_recorded(tmp_settings, JOB, "step_script"):
            ran.append("stage")
        journal.job_ended(tmp_settings, JOB.job_id, 0.1)
    assert ran == ["prepare", "stage"]
    assert "the job history was not updated (prepare started)" in caplog.text
