"""executor.core.waiting: polling with a fake clock, signals, time limits."""

from __future__ import annotations

import os
import signal
import time

import pytest

from executor.core.waiting import Deadline, signals_deferred, signals_raise_interrupted, time_limit, wait_until
from executor.errors import Interrupted, SystemFailure


class FakeTime:
    """A clock that only moves when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake():
    return FakeTime()


def test_returns_the_first_truthy_result_without_sleeping_after_it(fake):
    results = iter([None, False, None, "ready", "later"])
    calls = []

    def check():
        calls.append(fake.now)
        return next(results)

    assert wait_until(check, 60, "thing", clock=fake.clock, sleep=fake.sleep) == "ready"
    assert len(calls) == 4 and len(fake.sleeps) == 3


def test_zero_and_empty_values_other_than_none_and_false_count_as_done(fake):
    assert wait_until(lambda: 0, 1, "zero", clock=fake.clock, sleep=fake.sleep) == 0
    assert wait_until(lambda: "", 1, "empty", clock=fake.clock, sleep=fake.sleep) == ""
    assert fake.sleeps == []


def test_immediate_success_never_sleeps(fake):
    assert wait_until(lambda: True, 5, "x", clock=fake.clock, sleep=fake.sleep) is True
    assert fake.sleeps == []


def test_timeout_is_a_system_failure_naming_what(fake):
    calls = []
    with pytest.raises(SystemFailure, match=r"timed out after 30 s waiting for SSH on lvx-job-1"):
        wait_until(lambda: calls.append(1), 30, "SSH on lvx-job-1", clock=fake.clock, sleep=fake.sleep)
    assert fake.now == pytest.approx(1030.0)  # never sleeps past the deadline
    assert len(calls) >= 2  # checked again at the deadline before giving up


def test_check_raising_aborts_the_wait(fake):
    def check():
        if fake.now > 1001:
            raise SystemFailure("vm stopped while booting")
        return None

    with pytest.raises(SystemFailure, match="vm stopped"):
        wait_until(check, 60, "x", clock=fake.clock, sleep=fake.sleep)
    assert fake.now < 1005


def test_interval_grows_by_half_and_is_capped(fake):
    with pytest.raises(SystemFailure):
        wait_until(lambda: None, 20, "x", interval=0.5, max_interval=2.0, clock=fake.clock, sleep=fake.sleep)
    assert fake.sleeps[:5] == pytest.approx([0.5, 0.75, 1.125, 1.6875, 2.0])
    assert max(fake.sleeps) == 2.0
    assert all(s == 2.0 for s in fake.sleeps[4:-1])
    assert sum(fake.sleeps) == pytest.approx(20.0)


def test_last_sleep_is_shortened_to_the_deadline(fake):
    with pytest.raises(SystemFailure):
        wait_until(lambda: None, 1.0, "x", interval=0.4, max_interval=0.4, clock=fake.clock, sleep=fake.sleep)
    assert fake.sleeps == pytest.approx([0.4, 0.4, 0.2])


def test_deadline(fake):
    d = Deadline(10, clock=fake.clock)
    assert d.remaining() == 10 and not d.expired()
    fake.sleep(4)
    assert d.remaining() == 6
    fake.sleep(7)
    assert d.remaining() == 0.0 and d.expired()


# --- signals -------------------------------------------------------------------------------


@pytest.fixture
def sentinel_handlers():
    """Install recognisable handlers for the three signals and put the originals back after."""
    originals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    seen: list[int] = []

    def sentinel(signum, _frame):
        seen.append(signum)

    for s in originals:
        signal.signal(s, sentinel)
    yield sentinel, seen
    for s, h in originals.items():
        signal.signal(s, h)


def test_sigterm_becomes_interrupted_and_the_handler_is_restored(sentinel_handlers):
    sentinel, seen = sentinel_handlers
    with pytest.raises(Interrupted) as info:
        with signals_raise_interrupted():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # never reached: the handler raises first
            pytest.fail("SIGTERM did not interrupt")
    assert info.value.signal_name == "SIGTERM"
    assert isinstance(info.value, SystemFailure)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        assert signal.getsignal(s) is sentinel
    os.kill(os.getpid(), signal.SIGTERM)  # goes to the restored handler
    assert seen == [signal.SIGTERM]


@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "SIGINT"), (signal.SIGHUP, "SIGHUP")])
def test_sigint_and_sighup_interrupt_too(sentinel_handlers, sig, name):
    with pytest.raises(Interrupted, match=name):
        with signals_raise_interrupted():
            os.kill(os.getpid(), sig)
            pytest.fail("not interrupted")


def test_a_second_signal_during_the_rollback_is_ignored(sentinel_handlers):
    _, seen = sentinel_handlers
    rolled_back = False
    with pytest.raises(Interrupted):
        with signals_raise_interrupted():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except Interrupted:
                os.kill(os.getpid(), signal.SIGTERM)  # the rollback must not be interrupted
                rolled_back = True
                raise
    assert rolled_back and seen == []


def test_signals_deferred_records_instead(sentinel_handlers):
    sentinel, seen = sentinel_handlers
    with signals_deferred() as received:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGHUP)
        finished = True
    assert finished and received == [signal.SIGTERM, signal.SIGHUP]
    assert seen == []
    assert signal.getsignal(signal.SIGTERM) is sentinel


def test_handlers_are_restored_after_an_unrelated_exception(sentinel_handlers):
    sentinel, _ = sentinel_handlers
    with pytest.raises(KeyError):
        with signals_raise_interrupted():
            raise KeyError("x")
    with pytest.raises(KeyError):
        with signals_deferred():
            raise KeyError("x")
    assert signal.getsignal(signal.SIGTERM) is sentinel


# --- time_limit -----------------------------------------------------------------------------


def test_time_limit_raises_system_failure():
    previous = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    with pytest.raises(SystemFailure, match="rollback of lvx-job-1 did not finish"):
        with time_limit(0.1, "rollback of lvx-job-1"):
            time.sleep(2)
    assert time.monotonic() - start < 1.0
    assert signal.getsignal(signal.SIGALRM) is previous
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_time_limit_does_not_fire_after_a_quick_block():
    with time_limit(0.1, "quick"):
        value = 1 + 1
    assert value == 2 and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    time.sleep(0.15)  # would raise here if the timer had been left running
