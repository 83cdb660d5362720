"""The executor's files on the host: its config, the base image's manifest, console logs, and
the files gitlab-runner hands a stage (the job payload, BUILD_EXIT_CODE_FILE)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from executor.core import naming
from executor.core.baseimage import BaseImage, parse_base_image
from executor.core.imagerecipe import MANIFEST, parse_qcow2_header
from executor.core.jobenv import Job, RegistryCredentials, job_response_path, parse_job, parse_registry_credentials
from executor.core.settings import CONFIG_PATH_ENV, Settings, parse_settings
from executor.core.text import printable_lines
from executor.errors import ConfigError, JobError


def load_settings(path: str) -> Settings:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist (run `libvirt-executor setup`, "
            f"or pass --config / set {CONFIG_PATH_ENV})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse_settings(text, source=path)


def load_base_image(directory: str | Path) -> BaseImage:
    d = Path(directory)
    try:
        text: str | None = (d / MANIFEST).read_text(encoding="utf-8")
    except FileNotFoundError:
        text = None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"base image manifest {d / MANIFEST} is unreadable: {exc}") from None
    return parse_base_image(d, text, Path.is_file)


def _payload_text(environ: Mapping[str, str]) -> str:
    path = job_response_path(environ)
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise JobError(f"cannot read the job payload {path}: {exc.strerror}") from None


def load_job(environ: Mapping[str, str]) -> Job:
    """The job from the payload file gitlab-runner names in JOB_RESPONSE_FILE."""
    return parse_job(_payload_text(environ), environ)


def load_registry_credentials(environ: Mapping[str, str]) -> RegistryCredentials:
    """The payload's registry credentials, read again when prepare needs them (they are not
    part of `Job`, which every stage keeps)."""
    return parse_registry_credentials(_payload_text(environ))


def write_build_exit_code(exit_status: int, environ: Mapping[str, str]) -> None:
    """Record the script's status where gitlab-runner reads it (allow_failure: exit_codes).

    The runner parses the first line with strconv.Atoi: a bare integer, no spaces. The file is
    never cleared between stages by the runner, so it is always rewritten whole.
    """
    path = environ.get("BUILD_EXIT_CODE_FILE")
    if not path:
        return
    with open(path, "w", encoding="ascii") as f:
        f.write(f"{int(exit_status)}\n")


def console_log(settings: Settings, vm: str) -> Path:
    return Path(settings.paths.console_log_dir) / naming.console_log_name(vm)


def console_tail(path: Path, lines: int = 25, limit: int = 64 * 1024) -> str:
    """The end of a VM's serial console, with control characters removed (the guest wrote it)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return printable_lines("\n".join(data.splitlines()[-lines:]))


def console_log_vms(settings: Settings) -> list[str]:
    """VM names that have a console log in the console-log directory."""
    directory = Path(settings.paths.console_log_dir)
    if not directory.is_dir():
        return []
    suffix = naming.CONSOLE_LOG_SUFFIX
    return sorted(p.name[: -len(suffix)] for p in directory.glob("*" + suffix))


def qcow2_header(path: Path) -> tuple[int, bool]:
    """(virtual size, has a backing file) from a qcow2 header; ValueError if it is not qcow2."""
    with open(path, "rb") as f:
        return parse_qcow2_header(f.read(32), str(path))


def remove_file(path: Path) -> bool:
    """Remove a file; False if it was not there."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def sync_file(path: str) -> None:
    """Flush a file QEMU wrote to stable storage (a disk kept after its VM is gone)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_secret(path: str, what: str) -> str:
    """A secret kept in a root-only file (its first line); a ConfigError naming `what` if it
    cannot be read or other users can read it. The secret itself never reaches a message."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            text = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if st.st_mode & 0o077:
        raise ConfigError(f"{what}: {path} is mode {st.st_mode & 0o777:o}; make it 0600 (it holds a password)")
    if not text:
        raise ConfigError(f"{what}: {path} is empty")
    return text
