"""Deadlines, polling without unbounded retries, and SIGTERM turned into an exception."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from executor.errors import Interrupted, TimedOut

T = TypeVar("T")


class Deadline:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._end = clock() + seconds
        self.seconds = seconds

    def remaining(self) -> float:
        return max(0.0, self._end - self._clock())

    def expired(self) -> bool:
        return self.remaining() <= 0.0


def poll(
    check: Callable[[], T | None],
    timeout: float,
    interval: float = 0.5,
    max_interval: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T | None:
    """Call `check` until it returns something other than None/False, at most `timeout` seconds
    (at least once); None if it never did. The one retry loop of the executor.

    The interval grows (x1.5) up to `max_interval`: quick when the thing is nearly ready, cheap
    when it is slow. `check` may raise to abort the wait early (e.g. the VM died).
    """
    deadline = Deadline(timeout, clock)
    delay = interval
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        left = deadline.remaining()
        if left <= 0:
            return None
        sleep(min(delay, left))
        delay = min(delay * 1.5, max_interval)


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.5,
    max_interval: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`poll`, but SystemFailure("timed out ... waiting for `what`") when time runs out."""
    result = poll(check, timeout, interval, max_interval, clock, sleep)
    if result is None:
        raise TimedOut(f"timed out after {timeout:.0f} s waiting for {what}")
    return result


@contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT/SIGHUP raise Interrupted so rollbacks run.

    gitlab-runner sends SIGTERM to the whole process group on cancel or timeout and SIGKILL
    only after graceful_kill_timeout, so there is time to tidy up. A second signal while the
    rollback runs is ignored: the rollback is bounded by its own deadline.
    """
    fired = False

    def handler(signum: int, _frame: object) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """Within the block, SIGTERM/SIGINT/SIGHUP are recorded, not acted on (for teardown code)."""
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise SystemFailure if the block runs longer than `seconds` (SIGALRM; main thread only).

    Bounds blocking library calls (a hung libvirtd) that have no timeout of their own.
    """

    def handler(_signum: int, _frame: object) -> None:
        raise TimedOut(f"{what} did not finish within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
