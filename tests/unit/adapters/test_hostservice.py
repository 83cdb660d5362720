"""executor.adapters.hostservice: one instance per lock, a detached start, a stop, with real
processes."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from executor.adapters.hostservice import Service
from executor.errors import SystemFailure

# A stand-in long-running process: holds the service's lock the way the agent and the mirror
# supervisor do (Service.hold), until SIGTERM.
HOLDER = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from executor.adapters.hostservice import Service
    service = Service(Path(sys.argv[1]), Path(sys.argv[2]), "the test service")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with service.hold():
        print("holding", flush=True)
        while True:
            time.sleep(0.1)
    """
)


@pytest.fixture
def service(tmp_path):
    return Service(tmp_path / "svc.lock", tmp_path / "log" / "svc.log", "the test service")


def test_spawn_detaches_the_holder_and_stop_ends_it(service, tmp_path):
    assert service.pid() is None and service.stop() is None
    pid = service.spawn([sys.executable, "-c", HOLDER, str(service.lock), str(service.log)])
    try:
        assert service.pid() == pid
        assert os.getsid(pid) == pid  # its own session: a runner's process group kill misses it
        with pytest.raises(SystemFailure, match=rf"the test service is already running \(pid {pid};"):
            with service.hold():
                pass
    finally:
        assert service.stop(timeout=10) == pid
    assert service.pid() is None
    assert "holding" in service.log_tail()


def test_a_holder_that_exits_at_once_is_reported_with_its_log(service):
    with pytest.raises(SystemFailure, match="the test service exited with status 3: bad config"):
        service.spawn([sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"])
