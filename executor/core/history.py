"""The job history's vocabulary (pure): how a job ended in GitLab's words, the bounded label
values the metrics use, the histogram buckets, and the `jobs` table.

Outcomes are the custom executor's: `success`, `build_failure` (the job's fault),
`system_failure` (ours: gitlab-runner retries prepare), `canceled` (SIGTERM or a kill from
gitlab-runner: a cancel or the job timeout). Each has a reason from a short fixed list, so
`libvirt_executor_jobs_total{outcome,reason}` stays a handful of series whatever jobs do.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from executor.core.reaping import format_duration
from executor.core.text import printable
from executor.errors import BuildFailure, Interrupted

SUCCESS = "success"
BUILD_FAILURE = "build_failure"
SYSTEM_FAILURE = "system_failure"
CANCELED = "canceled"
OUTCOMES = (SUCCESS, BUILD_FAILURE, SYSTEM_FAILURE, CANCELED)

# Reasons (GitLab's failure_reason words where one fits).
SCRIPT_FAILURE = "script_failure"  # a stage script exited non-zero
IMAGE_REFUSED = "image_refused"  # an image or service the job may not or cannot use, a job size too big
VM_LOST = "vm_lost"  # the guest died or stopped answering
ADMISSION = "admission"  # the host had no room for the VM
TIMEOUT = "timeout"  # boot, SSH, dockerd or cleanup took too long
CONFIG = "config"  # the operator's config or host set-up is wrong
RUNNER_SYSTEM_FAILURE = "runner_system_failure"  # any other infrastructure failure
INTERRUPTED = "interrupted"  # SIGTERM: the job was canceled or timed out
KILLED = "killed"  # a stage ended without a word (SIGKILL): its end was written by cleanup
NO_CLEANUP = "no_cleanup"  # cleanup never came (the runner died): reap ended the row
REASONS = (
    "",
    SCRIPT_FAILURE,
    IMAGE_REFUSED,
    VM_LOST,
    ADMISSION,
    TIMEOUT,
    CONFIG,
    RUNNER_SYSTEM_FAILURE,
    INTERRUPTED,
    KILLED,
    NO_CLEANUP,
)

# gitlab-runner's stage names; anything else (a newer runner's) is counted as "other".
STAGE_KINDS = (
    "prepare_script",
    "get_sources",
    "restore_cache",
    "download_artifacts",
    "step_script",
    "build_script",
    "after_script",
    "archive_cache",
    "archive_cache_on_failure",
    "upload_artifacts_on_success",
    "upload_artifacts_on_failure",
    "cleanup_file_variables",
)
OTHER_STAGE = "other"
# Stages whose failure does not fail the job (GitLab ignores after_script's exit status).
_IGNORED_FAILURES = frozenset({"after_script", "cleanup_file_variables"})

# Seconds: a pool claim is well under a second, a cold boot under TCG a minute or more.
PREPARE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
CLEANUP_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)

DETAIL_CHARS = 300  # what a row keeps of an error's message


def classify(exc: BaseException | None) -> tuple[str, str]:
    """(outcome, reason) of a stage that ended with `exc` (None: success), as gitlab-runner
    sees it through the exit code (errors.exit_code_for)."""
    if exc is None:
        return SUCCESS, ""
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return CANCELED, INTERRUPTED
    reason = getattr(exc, "reason", RUNNER_SYSTEM_FAILURE)
    reason = reason if reason in REASONS else RUNNER_SYSTEM_FAILURE
    return (BUILD_FAILURE if isinstance(exc, BuildFailure) else SYSTEM_FAILURE), reason


def stage_kind(stage: str) -> str:
    """The bounded label for a gitlab-runner stage name."""
    return stage if stage in STAGE_KINDS else OTHER_STAGE


def detail(text: str) -> str:
    """An error message as a row keeps it: one printable line, bounded."""
    line = printable(" ".join(text.split()))
    return line if len(line) <= DETAIL_CHARS else line[: DETAIL_CHARS - 1] + "…"


@dataclass(frozen=True)
class StageRow:
    stage: str
    started: float
    seconds: float | None  # None: it never said how it ended (killed)
    outcome: str  # one of OUTCOMES, "" while it runs or when it was killed
    reason: str = ""
    exit_status: int | None = None


@dataclass(frozen=True)
class JobRow:
    """One job of the history. Times are Unix seconds; phases are seconds by name."""

    job_id: int
    project: str = ""
    project_id: int | None = None
    vm: str = ""
    accel: str = ""
    source: str = ""  # pool | cold
    mode: str = ""  # shell | image | dind
    started: float = 0.0
    prepare_seconds: float | None = None
    phases: Mapping[str, float] | None = None
    prepare_outcome: str = ""
    cleanup_seconds: float | None = None
    ended: float | None = None
    outcome: str = ""
    reason: str = ""
    detail: str = ""
    stages: Sequence[StageRow] = ()


def job_outcome(
    prepare_outcome: str, prepare_reason: str, stages: Sequence[StageRow], cleaned_up: bool = True
) -> tuple[str, str]:
    """How a job ended, from its prepare and stages: the first failure that fails a job in
    GitLab decides; a prepare or stage without an end was killed (by gitlab-runner: canceled),
    unless cleanup never came either (`cleaned_up=False`: the runner itself died)."""
    outcome, reason = _first_failure(prepare_outcome, prepare_reason, stages)
    if not cleaned_up and (outcome, reason) == (CANCELED, KILLED):
        return SYSTEM_FAILURE, NO_CLEANUP
    return outcome, reason


def _first_failure(prepare_outcome: str, prepare_reason: str, stages: Sequence[StageRow]) -> tuple[str, str]:
    if prepare_outcome == "":
        return CANCELED, KILLED
    if prepare_outcome != SUCCESS:
        return prepare_outcome, prepare_reason
    for stage in stages:
        if stage.outcome == "":
            return CANCELED, KILLED
        if stage.outcome in (CANCELED, SYSTEM_FAILURE):
            return stage.outcome, stage.reason
        if stage.outcome == BUILD_FAILURE and stage.stage not in _IGNORED_FAILURES:
            return BUILD_FAILURE, stage.reason or SCRIPT_FAILURE
    return SUCCESS, ""


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value:.2f}s"
    return f"{value:.1f}s" if value < 600 else f"{value / 60:.0f}m"


def _phase_text(row: JobRow) -> str:
    # Named as in the job log's "ready" line.
    return " ".join(f"{name.replace('_', '-')} {_seconds(value)}" for name, value in (row.phases or {}).items())


def _stages_text(row: JobRow) -> str:
    total = sum(s.seconds or 0.0 for s in row.stages)
    failed = [s.stage for s in row.stages if s.outcome not in (SUCCESS, "") or s.seconds is None]
    text = f"{len(row.stages)} in {_seconds(total)}" if row.stages else "-"
    return text + (f" ({', '.join(failed)} failed)" if failed else "")


def format_table(rows: Sequence[JobRow], now: float | None = None) -> str:
    """The `jobs` table, newest first, like `docker ps -a`: where each job's time went."""
    now = time.time() if now is None else now
    header = ("JOB", "PROJECT", "STARTED", "FROM", "MODE", "PREPARE", "PHASES", "STAGES", "CLEANUP", "OUTCOME")
    table = [header]
    for r in rows:
        ago = now - r.started
        started = (
            f"{format_duration(ago)} ago" if ago < 86400 else time.strftime("%m-%d %H:%M", time.localtime(r.started))
        )
        outcome = r.outcome or ("running" if r.prepare_outcome == SUCCESS else "preparing")
        if r.reason:
            outcome += f" ({r.reason})"
        table.append(
            (
                str(r.job_id),
                printable(r.project) or "-",
                started,
                r.source or "-",
                r.mode or "-",
                _seconds(r.prepare_seconds),
                _phase_text(r) or "-",
                _stages_text(r),
                _seconds(r.cleanup_seconds),
                outcome,
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table)
