"""The gitlab-runner simulator for vm tests (it lives in the package for the demo command), and
a way to wait for a running stage to reach a point instead of sleeping."""

from __future__ import annotations

import os
import select
import subprocess
import time

from executor.testing.runnersim import RunnerSim, StageResult, kill_group, runner_script, terminate_like_runner

__all__ = [
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
