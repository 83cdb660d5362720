"""Long-running processes of ours on the host (the mirror's supervisor, the host agent): one
instance each, held by a flock, started detached where there is no systemd.

A held flock is what "running" means: a stale pid file or a dead process's leftovers cannot
fool it, because the kernel drops the lock with the process. The lock file holds the pid of
its holder, for `stop` and for operators.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from executor.core.waiting import poll
from executor.errors import SystemFailure

SPAWN_WAIT_S = 15.0  # for a detached process to take its lock
LOG_ROTATE_BYTES = 8 * 1024**2
SYSTEMD_DIR = Path("/etc/systemd/system")


class Service:
    """One process of ours, known by its lock file; `what` names it in messages."""

    def __init__(self, lock: Path, log: Path, what: str) -> None:
        self.lock = lock
        self.log = log
        self.what = what

    def pid(self) -> int | None:
        """The running process's pid (-1 if it wrote none yet); None when nobody holds the lock."""
        try:
            fd = os.open(self.lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock (with our pid in it) for the process's life; SystemFailure, saying
        who, if another one holds it."""
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.read(fd, 32).decode("ascii", "replace").strip()
                raise SystemFailure(f"{self.what} is already running (pid {other or '?'}; {self.lock})") from None
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            os.close(fd)

    def rotate_log(self) -> None:
        rotate(self.log)

    def log_tail(self, lines: int = 5, prefix: str = "") -> str:
        """The log's last `lines` lines (those starting with `prefix`)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join([line for line in text.splitlines() if line.startswith(prefix)][-lines:])

    def spawn(self, argv: list[str]) -> int:
        """Start `argv` detached from us (own session, no inherited descriptors, output to the
        log); its pid once it holds the lock."""
        proc = start_detached(argv, self.log)

        def holds_the_lock() -> int | None:
            pid = self.pid()
            if pid is None and proc.poll() is not None:
                raise SystemFailure(f"{self.what} exited with status {proc.returncode}: {self.log_tail()}")
            return pid

        pid = poll(holds_the_lock, SPAWN_WAIT_S, interval=0.1, max_interval=0.5)
        if pid is None:
            raise SystemFailure(f"{self.what} did not start within {SPAWN_WAIT_S:.0f} s: {self.log_tail()}")
        return pid

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM the process and wait until its lock is free; the pid it had, None if none
        was running."""
        pid = self.pid()
        if pid is None:
            return None
        if pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if poll(lambda: self.pid() is None, timeout, interval=0.1, max_interval=0.5) is None:
            raise SystemFailure(f"{self.what} (pid {pid}) did not stop within {timeout:.0f} s")
        return pid


def start_detached(argv: list[str], log: Path, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start `argv` in a session of its own (a signal to our process group is not for it), cwd
    /, stdin /dev/null, output appended to `log` (0600, rotated), no descriptor of ours but
    `pass_fds`: nobody waiting for our output or our end waits for it."""
    rotate(log)
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            cwd="/",
            close_fds=True,
            pass_fds=pass_fds,
        )
    finally:
        os.close(fd)


def rotate(log: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if log.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(log, log.with_name(log.name + ".1"))


def this_command() -> list[str]:
    """How to run this executor again from here (the venv's interpreter and package)."""
    return [sys.executable, "-m", "executor"]


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def systemctl(*args: str) -> None:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemFailure(f"systemctl {' '.join(args)} failed: {result.stderr.strip()}")


def unit_active(unit: str) -> bool:
    return subprocess.run(["systemctl", "is-active", "--quiet", unit], check=False).returncode == 0


def install_unit(unit: str, text: str) -> bool:
    """Write our systemd unit when it differs; whether it changed (then daemon-reload)."""
    path = SYSTEMD_DIR / unit
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return False
    path.write_text(text)
    systemctl("daemon-reload")
    return True


def unit_text(description: str, argv: list[str], after: str = "libvirtd.service") -> str:
    """A unit that runs `argv` (a foreground process of ours) and restarts it when it exits."""
    return (
        "[Unit]\n"
        f"Description={description}\n"
        f"After={after}\n\n"
        "[Service]\n"
        f"ExecStart={shlex.join(argv)}\n"
        "Restart=always\nRestartSec=5\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
