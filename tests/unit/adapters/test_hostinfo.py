"""executor.adapters.hostinfo.qemu_stopped on a real process stopped and continued by signals."""

from __future__ import annotations

import os
import signal
import subprocess

from executor.adapters import hostinfo
from executor.core.waiting import poll


def test_a_stopped_process_is_seen_as_frozen_and_a_running_or_missing_one_is_not(tmp_path):
    proc = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "lvx-pool-0000000a.pid").write_text(f"{proc.pid}\n")
        assert not hostinfo.qemu_stopped("lvx-pool-0000000a", str(tmp_path))
        os.kill(proc.pid, signal.SIGSTOP)
        assert poll(lambda: hostinfo.qemu_stopped("lvx-pool-0000000a", str(tmp_path)), 5, interval=0.05)
        os.kill(proc.pid, signal.SIGCONT)
        assert poll(lambda: not hostinfo.qemu_stopped("lvx-pool-0000000a", str(tmp_path)), 5, interval=0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not hostinfo.qemu_stopped("lvx-pool-0000000a", str(tmp_path))  # no such process now
    assert not hostinfo.qemu_stopped("lvx-pool-0000000b", str(tmp_path))  # no pid file
