"""The proxy forwarder's process on the host: Debian's squid in the foreground (core.proxy
writes its config), run and restarted by the host agent.

Its config is root's alone (0600: it holds the company proxy's password); squid reads it as
root and then runs as its own user. Its output goes to a log beside the agent's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path

SQUID = "/usr/sbin/squid"
LOG_KEEP_BYTES = 8 * 1024**2  # a longer log moves to <log>.1 at the next start


class Forwarder:
    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self._proc: subprocess.Popen[bytes] | None = None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def keep(self, text: str) -> str | None:
        """Have squid run with config `text`: what was done ("started", "restarted: ..."),
        None when it already ran with it."""
        changed = _write_private(self.config, text)
        if self.running() and not changed:
            return None
        why = "the config changed" if self.running() else (f"it exited ({self._proc.returncode})" if self._proc else "")
        self.stop()
        for pid in _leftovers(self.config):  # of an agent that was killed: it holds the port
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self.log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.log.stat().st_size > LOG_KEEP_BYTES:
                os.replace(self.log, self.log.with_name(self.log.name + ".1"))
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            self._proc = subprocess.Popen(
                [SQUID, "-N", "-d", "1", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                cwd="/",
            )
        finally:
            os.close(fd)
        return f"restarted ({why})" if why else "started"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


def _write_private(path: Path, text: str) -> bool:
    """Replace `path` (0600) with `text` when it differs; whether it did."""
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    os.replace(tmp, path)
    return True


def _leftovers(config: Path) -> list[int]:
    wanted = [SQUID, "-N", "-d", "1", "-f", str(config)]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
                if [a.decode(errors="replace") for a in argv] == wanted:
                    found.append(int(entry.name))
    return found


def connect_status(host: str, port: int, target: str, timeout: float = 15.0) -> tuple[int | None, str]:
    """Ask the proxy at host:port to CONNECT to `target` (host:port): the HTTP status of its
    answer and its status line, or (None, why) when it does not answer."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            line = sock.makefile("rb").readline(512).decode("latin-1").strip()
    except OSError as exc:
        return None, str(exc)
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None, f"not an HTTP proxy answer: {line[:80]!r}"
    return int(parts[1]), line
