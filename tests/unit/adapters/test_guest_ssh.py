"""executor.adapters.guest_ssh: key parsing and what a connection attempt makes of the peer.

The peers are real sockets on loopback: nothing listening, a listener that is no SSH server, and
a paramiko server that presents a host key other than the pinned one.
"""

from __future__ import annotations

import io
import socket
import threading

import paramiko
import pytest

from executor.adapters.guest_ssh import CommandResult, GuestSSH, SSHNotReady, _client_key, _host_key
from executor.adapters.keys import generate_ed25519
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
