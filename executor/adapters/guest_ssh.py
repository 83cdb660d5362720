"""The only module that imports paramiko: SSH into a job VM with the per-job keys.

The VM's host key is pinned (RejectPolicy, no known_hosts read or written); no agent, no key
files searched, no password, no forwarding. Everything the VM sends is treated as hostile:
output is streamed in bounded chunks, never read to EOF into memory.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import select
import shutil
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import paramiko

from executor.core.waiting import Deadline
from executor.errors import SystemFailure

log = logging.getLogger(__name__)

SSH_PORT = 22
KEEPALIVE_S = 15
WATCH_PROBE_TIMEOUT_S = 30.0  # one probe's bound; `silent_for` keeps growing while it waits
_CHUNK = 32 * 1024
_CAPTURE_LIMIT = 64 * 1024


class SSHNotReady(SystemFailure):
    """The VM did not (yet) accept our connection: worth retrying until the boot deadline."""


@dataclass(frozen=True)
class CommandResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def succeeded(self) -> bool:
        return self.rc == 0


def _host_key(line: str) -> paramiko.PKey:
    parts = line.split()
    if len(parts) < 2:
        raise SystemFailure("pinned host key is malformed")
    return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))


def _client_key(private_openssh: str) -> paramiko.PKey:
    return paramiko.Ed25519Key.from_private_key(io.StringIO(private_openssh))


class GuestSSH:
    def __init__(self, client: paramiko.SSHClient) -> None:
        self._client = client
        self._last_answer = time.monotonic()
        self._stop_watch: threading.Event | None = None

    @classmethod
    def connect(
        cls, ip: str, user: str, client_key: str, host_key: str, timeout: float, port: int = SSH_PORT
    ) -> GuestSSH:
        """One connection attempt. SSHNotReady for what a booting VM does (refused, reset,
        banner or auth not yet there); SystemFailure for a wrong host key."""
        client = paramiko.SSHClient()
        pinned = _host_key(host_key)
        # paramiko looks a non-22 port up as "[ip]:port"
        client.get_host_keys().add(ip if port == SSH_PORT else f"[{ip}]:{port}", pinned.get_name(), pinned)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                ip,
                port=port,
                username=user,
                pkey=_client_key(client_key),
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                channel_timeout=timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException:
            client.close()
            raise SystemFailure(
                f"{ip} presented a host key other than the one seeded for this job: refusing to talk to it"
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            client.close()
            raise SSHNotReady(f"ssh {user}@{ip}: {exc.__class__.__name__}: {exc}") from None
        transport = client.get_transport()
        if transport is None:
            client.close()
            raise SSHNotReady(f"ssh {user}@{ip}: no transport")
        transport.set_keepalive(KEEPALIVE_S)
        return cls(client)

    def close(self) -> None:
        if self._stop_watch is not None:
            self._stop_watch.set()
        self._client.close()

    def connected(self) -> bool:
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    def probe(self, timeout: float) -> float | None:
        """Open and close a session: the VM's kernel and sshd must both answer. The seconds it
        took, or None if it did not answer within `timeout` (or the connection is gone)."""
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            return None
        started = time.monotonic()
        try:
            chan = transport.open_session(timeout=timeout)
        except (OSError, EOFError, paramiko.SSHException):
            return None
        chan.close()
        return time.monotonic() - started

    def watch(self, interval: float) -> None:
        """Probe the VM every `interval` s in the background (until `close`): `silent_for` then
        says how long it has not answered. A frozen guest keeps its TCP connection open and
        the stage's own channel simply goes quiet, which a silent job does too."""
        if self._stop_watch is not None:
            return
        self._last_answer = time.monotonic()
        stop = self._stop_watch = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                if self.probe(timeout=max(interval, WATCH_PROBE_TIMEOUT_S)) is not None:
                    self._last_answer = time.monotonic()

        threading.Thread(target=loop, name="ssh-liveness", daemon=True).start()

    def silent_for(self) -> float:
        """Seconds since the VM last answered a `watch` probe (or since the watch began)."""
        return time.monotonic() - self._last_answer

    def __enter__(self) -> GuestSSH:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_channel(self, command: str, timeout: float) -> paramiko.Channel:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SystemFailure("ssh connection to the VM is closed")
        try:
            chan = transport.open_session(timeout=timeout)
            chan.exec_command(command)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SystemFailure(f"ssh: cannot start a command in the VM: {exc}") from None
        return chan

    def capture(self, command: str, timeout: float, stdin: bytes = b"") -> CommandResult:
        """Run a short command of ours; output is capped, the whole call bounded by `timeout`."""
        chan = self._open_channel(command, timeout)
        try:
            if stdin:
                chan.sendall(stdin)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            chan.close()
            raise SystemFailure(f"ssh: connection lost: {exc}") from None
        return self._finish(chan, timeout)

    def _finish(self, chan: paramiko.Channel, timeout: float) -> CommandResult:
        """Close stdin, collect the capped output and the exit status, close the channel."""
        out, err = bytearray(), bytearray()
        deadline = Deadline(timeout)
        try:
            chan.shutdown_write()
            chan.settimeout(0.2)
            while not (chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready()):
                if deadline.expired():
                    raise SystemFailure(f"ssh: command did not finish within {timeout:.0f} s")
                if chan.closed and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                _drain(chan, out, err)
            _drain(chan, out, err)
            rc = chan.recv_exit_status() if chan.exit_status_ready() else -1
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SystemFailure(f"ssh: connection lost: {exc}") from None
        finally:
            chan.close()
        return CommandResult(rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def upload(self, command: str, produce: Callable[[BinaryIO], None], timeout: float) -> CommandResult:
        """Run `command` with what `produce` writes (to a file-like object) as its stdin, e.g. a
        tar stream; the whole call bounded by `timeout`, output captured as in `capture`."""
        chan = self._open_channel(command, timeout)
        chan.settimeout(timeout)
        try:
            sink = io.BufferedWriter(_ChannelWriter(chan), buffer_size=_CHUNK)
            produce(sink)
            sink.flush()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            chan.close()
            raise SystemFailure(f"ssh: connection lost while sending: {exc}") from None
        return self._finish(chan, timeout)

    def download(self, command: str, dest: BinaryIO, limit: int, timeout: float) -> DownloadResult:
        """Copy `command`'s stdout into `dest`, at most `limit` bytes: a VM that sends more is
        cut off (`overflow`), whatever it claimed before."""
        chan = self._open_channel(command, timeout)
        received, err = 0, bytearray()
        deadline = Deadline(timeout)
        try:
            chan.shutdown_write()
            chan.settimeout(0.2)
            while True:
                if deadline.expired():
                    raise SystemFailure(f"ssh: copying from the VM did not finish within {timeout:.0f} s")
                moved = False
                if chan.recv_ready():
                    data = chan.recv(_CHUNK)
                    received += len(data)
                    if received > limit:
                        return DownloadResult(-1, received, True, err.decode("utf-8", "replace"))
                    dest.write(data)
                    moved = True
                if chan.recv_stderr_ready():
                    data = chan.recv_stderr(_CHUNK)
                    err += data[: max(0, _CAPTURE_LIMIT - len(err))]
                    moved = True
                if moved:
                    continue
                # sshd sends the output, EOF and then the exit status: all of it before done
                if chan.closed or (chan.exit_status_ready() and chan.eof_received):
                    rc = chan.recv_exit_status() if chan.exit_status_ready() else -1
                    return DownloadResult(rc, received, False, err.decode("utf-8", "replace"))
                select.select([chan], [], [], 0.2)
        except (TimeoutError, OSError, EOFError, paramiko.SSHException) as exc:
            raise SystemFailure(f"ssh: connection lost while copying from the VM: {exc}") from None
        finally:
            chan.close()

    def stream(
        self,
        command: str,
        stdin: bytes,
        stdout: BinaryIO,
        stderr: BinaryIO,
        still_alive: Callable[[], bool],
        check_every: float = 5.0,
    ) -> int | None:
        """Run `command` with `stdin`, copying its output live. Return its exit status, or None
        if the remote process ended without one (killed by a signal).

        SystemFailure if the connection drops or `still_alive()` says the VM is gone (or raises
        SystemFailure itself, with the reason): a dead or frozen peer would otherwise only be
        noticed after minutes of TCP retransmits, or never.
        """
        chan = self._open_channel(command, timeout=30)
        transport = chan.get_transport()
        last_check = time.monotonic()
        try:
            chan.sendall(stdin)
            chan.shutdown_write()
            while True:
                moved = False
                if chan.recv_ready():
                    data = chan.recv(_CHUNK)
                    stdout.write(data)
                    stdout.flush()
                    moved = True
                if chan.recv_stderr_ready():
                    data = chan.recv_stderr(_CHUNK)
                    stderr.write(data)
                    stderr.flush()
                    moved = True
                if moved:
                    continue
                if chan.exit_status_ready():
                    return chan.recv_exit_status()
                if chan.closed:
                    return None
                if not transport.is_active():
                    raise SystemFailure("ssh connection to the VM was lost")
                now = time.monotonic()
                if now - last_check >= check_every:
                    last_check = now
                    if not still_alive():
                        raise SystemFailure("the job's VM stopped while the script was running")
                # Channel.fileno() becomes readable when data or EOF arrives.
                select.select([chan], [], [], 0.5)
        except (TimeoutError, OSError, EOFError, paramiko.SSHException) as exc:
            raise SystemFailure(f"ssh connection to the VM was lost: {exc}") from None
        finally:
            chan.close()

    def session(self, command: str | None, stdin: int, stdout: BinaryIO, stderr: BinaryIO) -> int:
        """An operator's session (`libvirt-executor ssh`): `command`, or a login shell when None,
        with a terminal when `stdin` is one (raw mode while it runs), input passed on until EOF,
        output copied live. Its exit status (255 if it reported none)."""
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SystemFailure("ssh connection to the VM is closed")
        terminal = os.isatty(stdin)
        saved = termios.tcgetattr(stdin) if terminal else None
        chan: paramiko.Channel | None = None
        try:
            chan = transport.open_session(timeout=30)
            if terminal:
                size = shutil.get_terminal_size()
                chan.get_pty(term=os.environ.get("TERM", "vt100"), width=size.columns, height=size.lines)
                tty.setraw(stdin)
            if command is None:
                chan.invoke_shell()
            else:
                chan.exec_command(command)
            reading = True
            while True:
                watched: list[Any] = [chan, stdin] if reading else [chan]
                ready, _, _ = select.select(watched, [], [], 0.5)
                while chan.recv_ready():
                    stdout.write(chan.recv(_CHUNK))
                    stdout.flush()
                while chan.recv_stderr_ready():
                    stderr.write(chan.recv_stderr(_CHUNK))
                    stderr.flush()
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    return chan.recv_exit_status() if chan.recv_exit_status() >= 0 else 255
                if stdin in ready:
                    data = os.read(stdin, _CHUNK)
                    if data:
                        chan.sendall(data)
                    else:
                        chan.shutdown_write()
                        reading = False
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SystemFailure(f"ssh connection to the VM was lost: {exc}") from None
        finally:
            if chan is not None:
                chan.close()
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


@dataclass(frozen=True)
class DownloadResult:
    rc: int  # -1: no exit status (cut off, or the command was killed)
    received: int
    overflow: bool  # more than the limit arrived; `dest` holds only the part below it
    stderr: str

    @property
    def succeeded(self) -> bool:
        return self.rc == 0 and not self.overflow


class _ChannelWriter(io.RawIOBase):
    """A channel's stdin as a writable file (for tarfile and shutil.copyfileobj)."""

    def __init__(self, chan: paramiko.Channel) -> None:
        self._chan = chan

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = bytes(data)
        self._chan.sendall(view)
        return len(view)


def _drain(chan: paramiko.Channel, out: bytearray, err: bytearray) -> None:
    try:
        while chan.recv_ready():
            data = chan.recv(_CHUNK)
            if len(out) < _CAPTURE_LIMIT:
                out += data[: _CAPTURE_LIMIT - len(out)]
        while chan.recv_stderr_ready():
            data = chan.recv_stderr(_CHUNK)
            if len(err) < _CAPTURE_LIMIT:
                err += data[: _CAPTURE_LIMIT - len(err)]
        if not chan.recv_ready() and not chan.recv_stderr_ready() and not chan.exit_status_ready():
            select.select([chan], [], [], 0.2)
    except TimeoutError:
        pass
