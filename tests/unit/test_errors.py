"""executor.errors: the one place that decides exit codes."""

from __future__ import annotations

import pytest

from executor.errors import (
    BuildFailure,
    ConfigError,
    Interrupted,
    JobError,
    SystemFailure,
    describe,
    exit_code_for,
)

CUSTOM = {"BUILD_FAILURE_EXIT_CODE": "11", "SYSTEM_FAILURE_EXIT_CODE": "12"}


def test_success_is_zero():
    assert exit_code_for(None, CUSTOM) == 0
    assert exit_code_for(None, {}) == 0


def test_build_failure_maps_to_the_build_code():
    assert exit_code_for(BuildFailure(42), CUSTOM) == 11
    assert exit_code_for(BuildFailure(42), {}) == 1


@pytest.mark.parametrize(
    "exc",
    [
        SystemFailure("vm died"),
        Interrupted("SIGTERM"),
        ConfigError("bad"),
        JobError("bad payload"),
        ValueError("bug"),
        RuntimeError("bug"),
        KeyboardInterrupt(),
        SystemExit(1),
        Exception(),
    ],
)
def test_everything_else_is_a_system_failure(exc):
    assert exit_code_for(exc, CUSTOM) == 12
    assert exit_code_for(exc, {}) == 2


@pytest.mark.parametrize("garbage", ["", "x", "1.5", "0x10", "eleven"])
def test_garbage_codes_fall_back_to_the_defaults(garbage):
    env = {"BUILD_FAILURE_EXIT_CODE": garbage, "SYSTEM_FAILURE_EXIT_CODE": garbage}
    assert exit_code_for(BuildFailure(3), env) == 1
    assert exit_code_for(SystemFailure("x"), env) == 2


def test_build_and_system_codes_are_read_independently():
    env = {"BUILD_FAILURE_EXIT_CODE": "nope", "SYSTEM_FAILURE_EXIT_CODE": "99"}
    assert exit_code_for(BuildFailure(3), env) == 1
    assert exit_code_for(SystemFailure("x"), env) == 99


def test_build_failure_carries_its_status():
    exc = BuildFailure(42)
    assert exc.exit_status == 42 and "42" in str(exc)
    assert Interrupted("SIGINT").signal_name == "SIGINT"
    assert isinstance(Interrupted(), SystemFailure)


def test_describe_is_one_line_and_flags_unexpected_errors():
    assert describe(SystemFailure("libvirt:\n  broken\tpipe")) == "libvirt: broken pipe"
    assert describe(ValueError("oops")) == "unexpected ValueError: oops"
    assert describe(KeyError()) == "unexpected KeyError: KeyError"
