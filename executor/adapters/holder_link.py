"""The unix socket between a job's stages and its connection holder (stdlib only: `run`'s lean
path imports this and nothing heavier).

A frame is one type byte, a 4-byte big-endian length and that many bytes. A stage sends its
request (`REQUEST`: JSON with the job id and the stage; `SCRIPT`: the script) and, on SIGTERM,
`TERMINATE`. The holder answers `ACCEPTED` when it starts the stage, then the stage's output
(`STDOUT`, `STDERR`) in the order it came, and one `RESULT` (JSON); or `BUSY` when it runs
another stage of the job. A stage that sees the socket missing, refused, closed or `BUSY`
before `ACCEPTED` knows the script never started and may run it another way; after `ACCEPTED`
a lost holder is a failed stage.

The socket is a 0600 file in the job's 0700 state directory, and the holder also checks the
peer's uid (SO_PEERCRED) before it reads a request.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

REQUEST = b"Q"
SCRIPT = b"S"
TERMINATE = b"T"
ACCEPTED = b"A"
BUSY = b"B"  # another stage of the job runs: run this one another way
STDOUT = b"O"
STDERR = b"E"
RESULT = b"R"

_HEADER = struct.Struct(">cI")
MAX_FRAME = 64 * 1024**2  # a stage script with every variable of a big job fits


class LinkClosed(Exception):
    """The other end closed the socket (or sent something that is no frame)."""


def send(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_HEADER.pack(kind, len(payload)) + payload)


def send_json(sock: socket.socket, kind: bytes, value: dict[str, Any]) -> None:
    send(sock, kind, json.dumps(value).encode())


def receive(sock: socket.socket) -> tuple[bytes, bytes]:
    """The next frame (kind, payload); LinkClosed at EOF or on garbage."""
    kind, size = _HEADER.unpack(_read_exactly(sock, _HEADER.size))
    if size > MAX_FRAME:
        raise LinkClosed(f"a frame of {size} bytes is more than {MAX_FRAME}")
    return kind, _read_exactly(sock, size)


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        value = json.loads(payload)
    except ValueError:
        raise LinkClosed("a frame that should hold JSON does not") from None
    if not isinstance(value, dict):
        raise LinkClosed("a frame that should hold a JSON object does not")
    return value


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1024**2))
        if not chunk:
            raise LinkClosed("the other end closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def dial(path: Path) -> socket.socket | None:
    """A connection to the holder at `path`; None when there is none to talk to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError:  # no such file, refused (nobody listens), permission
        sock.close()
        return None
    return sock


def listen(path: Path) -> socket.socket:
    """A listening socket at `path` (replacing a stale one), 0600 from its first moment."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (from the kernel)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)
