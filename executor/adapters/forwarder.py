"""The proxy forwarder on the wire: how Debian's squid is run for it (core.proxy writes its
config, the host agent keeps the process), and a CONNECT through it, as a VM's HTTPS goes.

squid reads its 0600 config (it holds the company proxy's password) as root and then runs as its
own user; `-N -d 1`: in the foreground, logging to stderr.
"""

from __future__ import annotations

import socket
from pathlib import Path

SQUID = "/usr/sbin/squid"


def squid_argv(config: Path) -> list[str]:
    return [SQUID, "-N", "-d", "1", "-f", str(config)]


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
