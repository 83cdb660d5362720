"""executor.adapters.guest_ssh: key parsing and what a connection attempt makes of the peer.

The peers are real sockets on loopback: nothing listening, a listener that is no SSH server, and
a paramiko server that presents a host key other than the pinned one.
"""

from __future__ import annotations

import io
import socket
import threading
import time

import paramiko
import pytest

from executor.adapters.guest_ssh import CommandResult, GuestSSH, SSHNotReady, _client_key, _host_key
from executor.adapters.keys import generate_ed25519
from executor.core.waiting import poll
from executor.errors import SystemFailure

CLIENT_PRIVATE, _ = generate_ed25519("client")
_, PINNED_PUBLIC = generate_ed25519("pinned")


def test_host_key_line_is_parsed_and_a_malformed_one_refused():
    assert _host_key(PINNED_PUBLIC).get_name() == "ssh-ed25519"
    with pytest.raises(SystemFailure, match="malformed"):
        _host_key("ssh-ed25519")


def test_client_key_from_openssh_text():
    assert _client_key(CLIENT_PRIVATE).get_name() == "ssh-ed25519"


def test_command_result_success_is_exit_zero():
    assert CommandResult(0, "", "").succeeded and not CommandResult(1, "", "").succeeded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_is_not_ready_yet():
    with pytest.raises(SSHNotReady, match="ssh runner@127.0.0.1"):
        GuestSSH.connect("127.0.0.1", "runner", CLIENT_PRIVATE, PINNED_PUBLIC, 2, port=_free_port())


def _serve_once(handle) -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            handle(conn)
        finally:
            conn.close()
            listener.close()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def test_a_peer_that_is_no_ssh_server_is_not_ready_yet():
    port = _serve_once(lambda conn: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    with pytest.raises(SSHNotReady):
        GuestSSH.connect("127.0.0.1", "runner", CLIENT_PRIVATE, PINNED_PUBLIC, 3, port=port)


def test_a_host_key_other_than_the_pinned_one_is_refused_as_a_system_failure():
    impostor_private, _ = generate_ed25519("impostor")
    server_key = paramiko.Ed25519Key.from_private_key(io.StringIO(impostor_private))

    def ssh_server(conn: socket.socket) -> None:
        transport = paramiko.Transport(conn)
        transport.add_server_key(server_key)
        try:
            transport.start_server(server=paramiko.ServerInterface())
            transport.accept(5)
        except (paramiko.SSHException, EOFError, OSError):
            pass
        finally:
            transport.close()

    port = _serve_once(ssh_server)
    with pytest.raises(SystemFailure, match="host key other than the one seeded") as info:
        GuestSSH.connect("127.0.0.1", "runner", CLIENT_PRIVATE, PINNED_PUBLIC, 5, port=port)
    assert not isinstance(info.value, SSHNotReady)  # never retried as "still booting"


PINNED_PRIVATE, PINNED_PUBLIC_2 = generate_ed25519("peer")


class _ExecServer(paramiko.ServerInterface):
    """A paramiko SSH server on loopback that accepts our key and one exec request."""

    def __init__(self) -> None:
        self.command = threading.Event()
        self.text = ""

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.text = command.decode()
        self.command.set()
        return True


def _exec_peer(behave) -> tuple[int, dict]:
    """A peer that runs `behave(channel, command)` for the one command it gets; what it saw."""
    seen: dict = {}

    def ssh_server(conn: socket.socket) -> None:
        transport = paramiko.Transport(conn)
        transport.add_server_key(paramiko.Ed25519Key.from_private_key(io.StringIO(PINNED_PRIVATE)))
        server = _ExecServer()
        try:
            transport.start_server(server=server)
            chan = transport.accept(10)
            server.command.wait(10)
            seen["command"] = server.text
            behave(chan, seen)
            chan.shutdown_write()
            chan.close()
            deadline = time.monotonic() + 5
            while transport.is_active() and time.monotonic() < deadline:  # the client hangs up
                time.sleep(0.02)
        except (paramiko.SSHException, EOFError, OSError):
            pass
        finally:
            transport.close()

    return _serve_once(ssh_server), seen


def _connect(port: int) -> GuestSSH:
    return GuestSSH.connect("127.0.0.1", "runner", CLIENT_PRIVATE, PINNED_PUBLIC_2, 5, port=port)


def test_download_copies_the_output_and_cuts_off_a_peer_that_sends_more_than_the_limit():
    def send(chan: paramiko.Channel, seen: dict) -> None:
        chan.sendall(b"x" * 200_000)
        chan.shutdown_write()  # EOF, then the status, as sshd does
        chan.send_exit_status(0)

    port, _ = _exec_peer(send)
    sink = io.BytesIO()
    with _connect(port) as ssh:
        result = ssh.download("cat big", sink, limit=100_000, timeout=10)
    assert result.overflow and not result.succeeded
    assert len(sink.getvalue()) <= 100_000

    port, seen = _exec_peer(send)
    sink = io.BytesIO()
    with _connect(port) as ssh:
        result = ssh.download("cat big", sink, limit=200_000, timeout=10)
    assert result.succeeded and result.received == 200_000 and sink.getvalue() == b"x" * 200_000
    assert seen["command"] == "cat big"


def test_upload_streams_what_the_producer_writes_into_the_commands_stdin():
    def receive(chan: paramiko.Channel, seen: dict) -> None:
        data = bytearray()
        while chunk := chan.recv(65536):
            data += chunk
        seen["stdin"] = bytes(data)
        chan.sendall_stderr(b"done\n")
        chan.send_exit_status(3)

    port, seen = _exec_peer(receive)
    payload = bytes(range(256)) * 1000
    with _connect(port) as ssh:
        result = ssh.upload("tar -x", lambda sink: sink.write(payload), timeout=10)
    assert seen["stdin"] == payload and seen["command"] == "tar -x"
    assert result.rc == 3 and result.stderr == "done\n"


class _FreezableServer(_ExecServer):
    """Opens every session it is asked for, until `frozen`: then it answers nothing (its
    transport thread blocks, as a guest whose kernel stopped), until `thawed`."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen, self.thawed = threading.Event(), threading.Event()

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if self.frozen.is_set():
            self.thawed.wait(30)
        return paramiko.OPEN_SUCCEEDED


def _freezable_peer() -> tuple[int, _FreezableServer]:
    server = _FreezableServer()

    def ssh_server(conn: socket.socket) -> None:
        transport = paramiko.Transport(conn)
        transport.add_server_key(paramiko.Ed25519Key.from_private_key(io.StringIO(PINNED_PRIVATE)))
        try:
            transport.start_server(server=server)
            while transport.is_active():
                chan = transport.accept(1)
                if chan is not None:
                    chan.close()
        except (paramiko.SSHException, EOFError, OSError):
            pass
        finally:
            transport.close()

    return _serve_once(ssh_server), server


def test_probe_times_a_session_open_and_a_frozen_peer_gives_none():
    port, server = _freezable_peer()
    try:
        with _connect(port) as ssh:
            took = ssh.probe(timeout=5)
            assert took is not None and 0 <= took < 5
            server.frozen.set()
            started = time.monotonic()
            assert ssh.probe(timeout=0.5) is None
            assert 0.4 < time.monotonic() - started < 3
    finally:
        server.thawed.set()


def test_watch_keeps_silence_short_while_the_peer_answers_and_lets_it_grow_once_frozen():
    port, server = _freezable_peer()
    try:
        with _connect(port) as ssh:
            ssh.watch(0.1)
            # answered probes keep the silence near the interval
            assert poll(lambda: ssh.silent_for() < 0.3, 5, interval=0.05)
            server.frozen.set()
            assert poll(lambda: ssh.silent_for() > 1.0, 5, interval=0.05)
            server.thawed.set()  # the pending probe is answered, and the next ones
            assert poll(lambda: ssh.silent_for() < 0.3, 5, interval=0.05)
    finally:
        server.thawed.set()
