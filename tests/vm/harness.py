"""The gitlab-runner simulator for vm tests (it lives in the package for the demo command), a
way to wait for a running stage to reach a point instead of sleeping, and the real host agent
run in the foreground for a test's config."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from executor.testing.runnersim import RunnerSim, StageResult, kill_group, runner_script, terminate_like_runner

__all__ = [
    "Agent",
    "RunnerSim",
    "StageResult",
    "kill_group",
    "read_until",
    "runner_script",
    "terminate_like_runner",
]


def read_until(proc: subprocess.Popen[bytes], marker: str, timeout: float = 120) -> str:
    """Read the running stage's stdout until `marker` appears (what it printed so far), or fail
    after `timeout` seconds. The bytes read are not in the stage's later result."""
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{marker!r} did not appear within {timeout:.0f} s: {seen[-2000:]!r}")
        if not select.select([proc.stdout], [], [], min(left, 1.0))[0]:
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            raise AssertionError(f"the stage ended before printing {marker!r}: {seen[-2000:]!r}")
        seen += chunk
    return seen.decode("utf-8", "replace")


class Agent:
    """The real host agent, in the foreground as its unit runs it, output in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        out = open(self.log, "ab")  # noqa: SIM115 (the process keeps it)
        return subprocess.Popen(
            [sys.executable, "-m", "executor", "--config", str(self.config), "agent"],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def restart(self) -> None:
        self.stop()
        self.proc = self._start()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=180)
