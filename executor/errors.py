"""Exceptions and the one place that turns them into gitlab-runner exit codes.

gitlab-runner reads the exit code of every stage: BUILD_FAILURE_EXIT_CODE blames the job's
script, SYSTEM_FAILURE_EXIT_CODE blames the infrastructure (and is retried during prepare). Any
other code is an "unknown" failure. Python's and click's default exit 1 would read as a build
failure, so nothing here is left to defaults: everything that is not a BuildFailure is a system
failure. Pure: the cli writes BUILD_EXIT_CODE_FILE (`adapters.hostfiles`).
"""

from __future__ import annotations

from collections.abc import Mapping

DEFAULT_BUILD_FAILURE_EXIT_CODE = 1
DEFAULT_SYSTEM_FAILURE_EXIT_CODE = 2


class ExecutorError(Exception):
    """Base class of every error the executor raises on purpose."""

    reason = "runner_system_failure"  # the job history's and the metrics' word for it (core.history)


class ConfigError(ExecutorError):
    """The operator's configuration (or the host set-up) is wrong."""

    reason = "config"


class JobError(ExecutorError):
    """The job payload or environment given by gitlab-runner is unusable."""


class SystemFailure(ExecutorError):
    """Infrastructure failed: libvirt, the VM, SSH, a timeout."""


class TimedOut(SystemFailure):
    """Something we waited for (boot, SSH, dockerd, a bounded call) took too long."""

    reason = "timeout"


class AdmissionRefused(SystemFailure):
    """The host has no room for one more VM now (admission control); `resources` says which
    ran short ("pool_disk", "memory")."""

    reason = "admission"

    def __init__(self, message: str, resources: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.resources = resources


class ImageBuildError(SystemFailure):
    """Building the base image failed: a host tool exited non-zero, or the rootfs is unusable."""


class Interrupted(SystemFailure):
    """SIGTERM (or SIGINT) arrived: gitlab-runner cancelled the job or timed out."""

    reason = "interrupted"

    def __init__(self, signal_name: str = "SIGTERM") -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name


class BuildFailure(ExecutorError):
    """The job's own script exited non-zero: the user's fault, with their exit status."""

    reason = "script_failure"

    def __init__(self, exit_status: int) -> None:
        super().__init__(f"job script exited with status {exit_status}")
        self.exit_status = exit_status


class JobRefused(BuildFailure):
    """The job asks for something that cannot run here (an image that is not allowed or cannot
    be pulled, an unusable service definition): the job's fault, as in GitLab's docker executor."""

    reason = "image_refused"

    def __init__(self, reason: str) -> None:
        ExecutorError.__init__(self, reason)
        self.exit_status = 1


def _code_from(environ: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(environ.get(key, ""))
    except ValueError:
        return default


def exit_code_for(exc: BaseException | None, environ: Mapping[str, str]) -> int:
    """The process exit code for the outcome `exc` (None means success)."""
    if exc is None:
        return 0
    if isinstance(exc, BuildFailure):
        return _code_from(environ, "BUILD_FAILURE_EXIT_CODE", DEFAULT_BUILD_FAILURE_EXIT_CODE)
    return _code_from(environ, "SYSTEM_FAILURE_EXIT_CODE", DEFAULT_SYSTEM_FAILURE_EXIT_CODE)


def describe(exc: BaseException) -> str:
    """A one-line description for the job log, never a traceback."""
    text = str(exc) or exc.__class__.__name__
    if not isinstance(exc, ExecutorError):
        text = f"unexpected {exc.__class__.__name__}: {text}"
    return " ".join(text.split())


__all__ = [
    "AdmissionRefused",
    "BuildFailure",
    "ConfigError",
    "ExecutorError",
    "ImageBuildError",
    "Interrupted",
    "JobError",
    "JobRefused",
    "SystemFailure",
    "TimedOut",
    "describe",
    "exit_code_for",
]
