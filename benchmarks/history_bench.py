#!/usr/bin/env python3
"""Job-history benchmark: what writing the job history adds to a stage, same run, no VM.

A `run` stage writes two short transactions (its row when it starts, its end and a histogram
observation when it ends), each from a fresh connection as a fresh process does. Measured here:
  * one stage's recording in-process (`journal.stage_recorded` around nothing), against the
    same block without it (the baseline), alone and with `--writers` other processes recording
    stages into the same file at the same time (concurrent jobs);
  * importing sqlite3, and the whole `run` path, in a fresh interpreter, against a fresh
    interpreter importing nothing (the baseline).
Figures, not pass/fail. Runs anywhere (a tmp state dir):
    .venv/bin/python benchmarks/history_bench.py --stages 300 --writers 4
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from executor.core.jobenv import Job
from executor.core.settings import PathSettings, Settings
from executor.jobvm import journal


def _job(job_id: int) -> Job:
    return Job(job_id=job_id, project="bench/project", project_id=1, pipeline_id=1, runner_id=1, timeout_s=3600)


def _time_stages(settings: Settings, job_id: int, stages: int, record: bool) -> list[float]:
    job, times = _job(job_id), []
    for n in range(stages):
        started = time.perf_counter()
        if record:
            with journal.stage_recorded(settings, job, f"step_{n % 3}"):
                pass
        times.append(time.perf_counter() - started)
    return times


def _writer(state_dir: str, job_id: int, stop_at: float) -> None:
    settings = Settings(paths=PathSettings(state_dir=state_dir))
    n = 0
    while time.time() < stop_at:
        with journal.stage_recorded(settings, _job(job_id), "step_script"):
            pass
        n += 1


def _fresh_interpreter(code: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=300)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--imports", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(paths=PathSettings(state_dir=str(Path(tmp) / "state")))
        with journal.prepare_recorded(settings, _job(1)):
            pass
        baseline = _time_stages(settings, 1, args.stages, record=False)
        alone = _time_stages(settings, 1, args.stages, record=True)
        stop_at = time.time() + 3600
        ctx = multiprocessing.get_context("fork")
        writers = [
            ctx.Process(target=_writer, args=(settings.paths.state_dir, 100 + i, stop_at)) for i in range(args.writers)
        ]
        for w in writers:
            w.start()
        time.sleep(0.5)
        busy = _time_stages(settings, 1, args.stages, record=True)
        for w in writers:
            w.terminate()
            w.join()
        rows = len(journal.job_history(settings).jobs()[0].stages) if journal.job_history(settings).jobs() else 0

    def ms(values: list[float]) -> str:
        q = statistics.quantiles(values, n=20)
        return f"median {statistics.median(values) * 1000:.2f} ms, p95 {q[18] * 1000:.2f} ms"

    print(f"one stage's recording ({args.stages} stages, each two transactions from fresh connections):")
    print(f"  baseline (no recording)            {ms(baseline)}")
    print(f"  recorded, alone                    {ms(alone)}")
    print(f"  recorded, {args.writers} other writers at once   {ms(busy)}")
    print(f"  (job 1 has {rows} stage rows: none lost)")
    nothing = _fresh_interpreter("pass", args.imports)
    sqlite = _fresh_interpreter("import sqlite3", args.imports)
    run_path = _fresh_interpreter("import executor.cli, executor.stages.run", args.imports)
    print(
        f"fresh interpreter ({args.imports} runs, median): nothing {nothing * 1000:.0f} ms, "
        f"import sqlite3 {sqlite * 1000:.0f} ms (+{(sqlite - nothing) * 1000:.0f} ms), "
        f"the whole run path (cli + stages.run, the history included) {run_path * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
