"""The job history: one SQLite file (WAL; jobvm.journal names it, one per executor instance)
that the stage processes write themselves and `jobs` and the agent's metrics read.

Many processes write at once (each stage of each job is its own process): WAL lets readers go on
while one writes, every write is one short `BEGIN IMMEDIATE` transaction (no lock upgrade that
could deadlock), and a writer waits for another up to BUSY_TIMEOUT_S. The counters and
histograms the metrics export live here too, so they survive an agent restart and the pruning
of old rows. Writing the history never fails a job: callers log OSError/sqlite3.Error and go on.
Nothing secret is written: names, times, outcomes and our own error messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from executor.core.history import JobRow, StageRow, detail, job_outcome

BUSY_TIMEOUT_S = 10.0
SCHEMA_VERSION = 1  # in the file's user_version once its tables exist
HistoryError = sqlite3.Error  # what callers catch (with OSError) to go on without the history

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY,
    project TEXT NOT NULL DEFAULT '',
    project_id INTEGER,
    vm TEXT NOT NULL DEFAULT '',
    accel TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    mode TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 1,
    started REAL NOT NULL,
    prepare_seconds REAL,
    phases TEXT NOT NULL DEFAULT '{}',
    prepare_outcome TEXT NOT NULL DEFAULT '',
    prepare_reason TEXT NOT NULL DEFAULT '',
    cleanup_seconds REAL,
    ended REAL,
    outcome TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_started ON jobs (started);
CREATE TABLE IF NOT EXISTS stages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    stage TEXT NOT NULL,
    started REAL NOT NULL,
    seconds REAL,
    outcome TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    exit_status INTEGER
);
CREATE INDEX IF NOT EXISTS stages_job ON stages (job_id);
CREATE TABLE IF NOT EXISTS counters (
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (metric, labels)
);
CREATE TABLE IF NOT EXISTS histograms (
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    buckets TEXT NOT NULL,
    bucket_counts TEXT NOT NULL,
    sum REAL NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (metric, labels)
);
"""


# The jobs table's columns a JobRow has (all but attempts and prepare_reason).
_ROW_COLUMNS = (
    "job_id",
    "project",
    "project_id",
    "vm",
    "accel",
    "source",
    "mode",
    "started",
    "prepare_seconds",
    "phases",
    "prepare_outcome",
    "cleanup_seconds",
    "ended",
    "outcome",
    "reason",
    "detail",
)
_READY: set[Path] = set()  # history files this process has made sure of (WAL, tables)


@dataclass(frozen=True)
class Observation:
    """One more for a counter (`buckets` None: `value` is added), or one observation of a
    histogram with those upper bounds (+Inf implied)."""

    metric: str
    labels: Mapping[str, str] = field(default_factory=dict)
    value: float = 1.0
    buckets: Sequence[float] | None = None


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken at once (no read lock to upgrade later: no deadlock)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _labels_key(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(labels.items())), separators=(",", ":"))


class JobHistory:
    """The history in the file `path` (made 0600, its directory 0700, at the first write).
    Each call opens its own connection: the stage processes are short, and a connection is
    cheap next to a process start."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _db(self, write: bool) -> Iterator[sqlite3.Connection]:
        """A connection; with `write`, inside one BEGIN IMMEDIATE transaction (committed at the
        end, rolled back on an exception)."""
        if self.path not in _READY or not self.path.exists():  # new, or removed by hand meanwhile
            _READY.discard(self.path)
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            if self.path not in _READY:
                # Every stage is a new process: a read of the schema's version, not a write
                # transaction, once the file has its tables (and WAL, which is persistent).
                if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    db.execute("PRAGMA journal_mode=WAL")
                    with _transaction(db):
                        for statement in filter(str.strip, _SCHEMA.split(";")):
                            db.execute(statement)
                        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                _READY.add(self.path)
            db.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent; a power cut may lose the last rows
            if write:
                with _transaction(db):
                    yield db
            else:
                yield db
        finally:
            db.close()

    # --- what the stages write ---------------------------------------------------------------

    def prepare_started(self, job_id: int, project: str, project_id: int | None, now: float) -> None:
        """A prepare attempt began (gitlab-runner retries a failed prepare with the same job)."""
        with self._db(write=True) as db:
            db.execute(
                "INSERT INTO jobs (job_id, project, project_id, started) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (job_id) DO UPDATE SET attempts = attempts + 1, started = excluded.started, "
                "prepare_outcome = '', prepare_reason = '', prepare_seconds = NULL, ended = NULL, "
                "outcome = '', reason = '', detail = ''",
                (job_id, project, project_id, now),
            )

    def prepare_ended(
        self,
        job_id: int,
        seconds: float,
        outcome: str,
        reason: str = "",
        error: str = "",
        *,
        vm: str = "",
        accel: str = "",
        source: str = "",
        mode: str = "",
        phases: Mapping[str, float] | None = None,
        observations: Sequence[Observation] = (),
    ) -> None:
        with self._db(write=True) as db:
            _record(db, observations)
            db.execute(
                "UPDATE jobs SET prepare_seconds = ?, prepare_outcome = ?, prepare_reason = ?, detail = ?, "
                "vm = ?, accel = ?, source = ?, mode = ?, phases = ? WHERE job_id = ?",
                (seconds, outcome, reason, detail(error), vm, accel, source, mode, json.dumps(phases or {}), job_id),
            )

    def stage_started(self, job_id: int, stage: str, now: float) -> int:
        """The row of a stage that began; its id for `stage_ended`."""
        with self._db(write=True) as db:
            cursor = db.execute("INSERT INTO stages (job_id, stage, started) VALUES (?, ?, ?)", (job_id, stage, now))
            return int(cursor.lastrowid or 0)

    def stage_ended(
        self,
        row_id: int,
        seconds: float,
        outcome: str,
        reason: str = "",
        exit_status: int | None = None,
        observations: Sequence[Observation] = (),
    ) -> None:
        with self._db(write=True) as db:
            _record(db, observations)
            db.execute(
                "UPDATE stages SET seconds = ?, outcome = ?, reason = ?, exit_status = ? WHERE id = ?",
                (seconds, outcome, reason, exit_status, row_id),
            )

    def job_ended(
        self,
        job_id: int,
        now: float,
        cleanup_seconds: float | None,
        cleaned_up: bool = True,
        observations: Sequence[Observation] = (),
    ) -> tuple[str, str] | None:
        """End the job's row (at cleanup; or at reap, `cleaned_up=False`, for a job whose
        cleanup never came): its outcome from its prepare and stages, counted once in
        `jobs_total`; a job without a row gets one. The (outcome, reason) written; None if it
        had ended before."""
        with self._db(write=True) as db:
            found = db.execute(
                "SELECT prepare_outcome, prepare_reason, ended FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if found is None:  # its prepare was killed before it wrote a word: the row says so
                db.execute("INSERT INTO jobs (job_id, started) VALUES (?, ?)", (job_id, now))
                found = ("", "", None)
            if found[2] is not None:
                return None
            outcome, reason = job_outcome(found[0], found[1], _stage_rows(db, job_id), cleaned_up)
            db.execute(
                "UPDATE jobs SET ended = ?, cleanup_seconds = ?, outcome = ?, reason = ? WHERE job_id = ?",
                (now, cleanup_seconds, outcome, reason, job_id),
            )
            _record(db, [*observations, Observation("jobs_total", {"outcome": outcome, "reason": reason})])
            return outcome, reason

    def open_jobs(self, started_before: float | None = None) -> list[int]:
        """Jobs whose row has no end yet (that started before `started_before`, if given)."""
        cutoff = float("inf") if started_before is None else started_before
        with self._db(write=False) as db:
            return [
                int(r[0]) for r in db.execute("SELECT job_id FROM jobs WHERE ended IS NULL AND started < ?", (cutoff,))
            ]

    def record(self, observations: Sequence[Observation]) -> None:
        """Counters and histogram observations that belong to no job's row."""
        with self._db(write=True) as db:
            _record(db, observations)

    def prune(self, now: float, keep_days: float) -> int:
        """Drop jobs (and their stages) that ended more than `keep_days` ago, and rows nobody
        ended that started that long ago; how many jobs went."""
        cutoff = now - keep_days * 86400
        with self._db(write=True) as db:
            old = "SELECT job_id FROM jobs WHERE COALESCE(ended, started) < ?"
            db.execute(f"DELETE FROM stages WHERE job_id IN ({old})", (cutoff,))
            return db.execute("DELETE FROM jobs WHERE COALESCE(ended, started) < ?", (cutoff,)).rowcount

    # --- what `jobs` and the metrics read ------------------------------------------------------

    def jobs(self, since: float = 0.0, limit: int = 1000) -> list[JobRow]:
        """Jobs started at or after `since`, newest first."""
        with self._db(write=False) as db:
            rows = db.execute(
                f"SELECT {', '.join(_ROW_COLUMNS)} FROM jobs WHERE started >= ? ORDER BY started DESC LIMIT ?",
                (since, limit),
            ).fetchall()
            found = []
            for values in rows:
                row = dict(zip(_ROW_COLUMNS, values, strict=True))
                row["phases"] = json.loads(row["phases"])
                found.append(JobRow(**row, stages=_stage_rows(db, row["job_id"])))
            return found

    def counters(self) -> list[tuple[str, dict[str, str], float]]:
        with self._db(write=False) as db:
            return [(m, json.loads(labels), v) for m, labels, v in db.execute("SELECT * FROM counters ORDER BY 1, 2")]

    def histograms(self) -> list[tuple[str, dict[str, str], list[tuple[float, int]], float, int]]:
        """(metric, labels, [(upper bound, cumulative count)], sum, count) of each histogram."""
        with self._db(write=False) as db:
            return [
                (m, json.loads(labels), list(zip(json.loads(bounds), json.loads(counts), strict=True)), total, n)
                for m, labels, bounds, counts, total, n in db.execute("SELECT * FROM histograms ORDER BY 1, 2")
            ]


def _record(db: sqlite3.Connection, observations: Sequence[Observation]) -> None:
    for o in observations:
        key = _labels_key(o.labels)
        if o.buckets is None:
            db.execute(
                "INSERT INTO counters VALUES (?, ?, ?) "
                "ON CONFLICT (metric, labels) DO UPDATE SET value = value + excluded.value",
                (o.metric, key, o.value),
            )
            continue
        found = db.execute(
            "SELECT buckets, bucket_counts, sum, count FROM histograms WHERE metric = ? AND labels = ?", (o.metric, key)
        ).fetchone()
        bounds = list(o.buckets)
        counts = json.loads(found[1]) if found and json.loads(found[0]) == bounds else [0] * len(bounds)
        for i, bound in enumerate(bounds):
            if o.value <= bound:
                counts[i] += 1
        db.execute(
            "INSERT OR REPLACE INTO histograms VALUES (?, ?, ?, ?, ?, ?)",
            (
                o.metric,
                key,
                json.dumps(bounds),
                json.dumps(counts),
                (found[2] if found else 0.0) + o.value,
                (found[3] if found else 0) + 1,
            ),
        )


def _stage_rows(db: sqlite3.Connection, job_id: int) -> list[StageRow]:
    return [
        StageRow(stage=r[0], started=r[1], seconds=r[2], outcome=r[3], reason=r[4], exit_status=r[5])
        for r in db.execute(
            "SELECT stage, started, seconds, outcome, reason, exit_status FROM stages WHERE job_id = ? ORDER BY id",
            (job_id,),
        )
    ]
