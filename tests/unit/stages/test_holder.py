"""The job's connection holder and `run`'s client of it, over real unix sockets.

Each side runs for real against the other side's frames, written by hand in a thread: the
holder's `_serve_stage` (with a stand-in for the VM session: what it runs is `stage_exec`,
tested with the VM in `tests/vm`), and `run.through_holder`. Both take signals, so whichever
is under test runs in the main thread.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from executor.adapters import holder_link
from executor.adapters.statedir import StateDir
from executor.core.waiting import signals_raise_interrupted
from executor.errors import Interrupted, SystemFailure
from executor.stages import holder
from executor.stages.run import NotServed, through_holder

JOB_ID = 77
VM = "lvx-job-77"


@pytest.fixture(autouse=True)
def restored_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@dataclass
class FakeJob:
    job_id: int = JOB_ID


@dataclass
class StandInSession:
    """What `_serve_stage` uses of a StageSession; `behaviour` plays the stage."""

    state: StateDir
    behaviour: str = "ok"
    vm: str = VM
    job: FakeJob = field(default_factory=FakeJob)
    events: list[str] = field(default_factory=list)

    def execute(self, stage, script, stdout, stderr, later):
        self.events.append(f"execute {stage} {script!r}")
        later.append(lambda: self.events.append("tidied"))
        if self.behaviour == "ok":
            stdout.write(b"out-1\n")
            stdout.flush()
            stderr.write(b"err-1\n")
            stderr.flush()
            stdout.write(b"out-2\n")
            stdout.flush()
            return 3
        if self.behaviour == "lost":
            self.state.mark_lost(self.vm, "the job's VM stopped responding")
            raise SystemFailure("the job's VM stopped responding")
        with signals_raise_interrupted():  # as stage_exec does around the remote script
            stdout.write(b"started\n")
            stdout.flush()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.05)
        raise AssertionError("the stage was not interrupted")


def _pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def _client(sock, job_id=JOB_ID, then=None):
    """A thread sending a request and collecting every frame until RESULT or EOF."""
    frames: list[tuple[bytes, bytes]] = []

    def talk():
        holder_link.send_json(sock, holder_link.REQUEST, {"job_id": job_id, "stage": "build_script"})
        holder_link.send(sock, holder_link.SCRIPT, b"echo hi\n")
        while True:
            try:
                kind, payload = holder_link.receive(sock)
            except (holder_link.LinkClosed, OSError):
                return
            frames.append((kind, payload))
            if then is not None and kind == holder_link.STDOUT:
                then(sock)
            if kind == holder_link.RESULT:
                return

    thread = threading.Thread(target=talk, daemon=True)
    thread.start()
    return thread, frames


@pytest.fixture
def session(tmp_settings):
    state = StateDir(tmp_settings.paths.state_dir)
    state.write_client_key(VM, "KEY")
    holder._ending_on_signals()  # the holder's own handlers, as in `serve`
    return StandInSession(state)


def test_a_stage_through_the_holder_answers_its_output_in_order_then_the_status_then_tidies(session):
    server, client = _pair()
    thread, frames = _client(client)
    assert holder._serve_stage(session, server) is True
    thread.join(5)
    assert frames == [
        (holder_link.ACCEPTED, b""),
        (holder_link.STDOUT, b"out-1\n"),
        (holder_link.STDERR, b"err-1\n"),
        (holder_link.STDOUT, b"out-2\n"),
        (holder_link.RESULT, b'{"status": 3}'),
    ]
    assert session.events == ["execute build_script b'echo hi\\n'", "tidied"]


def test_a_request_for_another_job_is_not_taken_up(session):
    server, client = _pair()
    thread, frames = _client(client, job_id=JOB_ID + 1)
    assert holder._serve_stage(session, server) is True
    server.close()
    thread.join(5)
    assert frames == [] and session.events == []


@pytest.mark.parametrize("how", ["terminate", "go-away"])
def test_a_client_that_is_stopped_or_gone_stops_the_running_stage_and_the_holder_goes_on(session, how):
    session.behaviour = "wait"

    def stop(sock):
        if how == "terminate":
            holder_link.send(sock, holder_link.TERMINATE, b"SIGTERM")
        else:
            sock.shutdown(socket.SHUT_WR)

    server, client = _pair()
    thread, frames = _client(client, then=stop)
    started = time.monotonic()
    assert holder._serve_stage(session, server) is True
    assert time.monotonic() - started < 5
    thread.join(5)
    assert frames[-1] == (holder_link.RESULT, b'{"interrupted": "SIGINT"}')


def test_our_own_sigterm_during_a_stage_stops_it_and_ends_the_holder(session):
    session.behaviour = "wait"
    server, client = _pair()
    thread, frames = _client(client, then=lambda sock: os.kill(os.getpid(), signal.SIGTERM))
    assert holder._serve_stage(session, server) is False
    thread.join(5)
    assert frames[-1] == (holder_link.RESULT, b'{"interrupted": "SIGTERM"}')


def test_a_vm_found_lost_fails_the_stage_and_ends_the_holder(session):
    session.behaviour = "lost"
    server, client = _pair()
    thread, frames = _client(client)
    assert holder._serve_stage(session, server) is False
    thread.join(5)
    assert frames[-1] == (holder_link.RESULT, b'{"failure": "the job\'s VM stopped responding"}')


def test_the_socket_is_the_owners_alone():
    # Not under tmp_path, which is 0700: here the socket's own mode is all that stops another user.
    directory = Path(tempfile.mkdtemp(prefix="lvx-holder-test-"))
    directory.chmod(0o755)
    path = directory / "holder.sock"
    listener = holder_link.listen(path)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        if os.geteuid() != 0:
            pytest.skip("needs root to try as another user")
        child = os.fork()
        if child == 0:  # another user, trying to reach the socket
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                socket.socket(socket.AF_UNIX).connect(str(path))
            except PermissionError:
                code = 13
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 13
    finally:
        listener.close()
        shutil.rmtree(directory)


# --- run's side ---------------------------------------------------------------------------


def _holder(path, script):
    """A thread listening at `path` that plays `script(conn, request)` for one connection."""
    listener = holder_link.listen(path)
    seen: dict[str, object] = {}

    def serve():
        conn, _ = listener.accept()
        with conn:
            _, payload = holder_link.receive(conn)
            seen["request"] = holder_link.decode_json(payload)
            _, seen["script"] = holder_link.receive(conn)
            script(conn, seen)
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, seen


def _through(path):
    out, err = io.BytesIO(), io.BytesIO()
    status = through_holder(path, JOB_ID, "build_script", b"echo hi\n", out, err)
    return status, out.getvalue(), err.getvalue()


def test_run_without_a_holder_is_not_served(tmp_path):
    with pytest.raises(NotServed):
        _through(tmp_path / "holder.sock")


def test_run_copies_the_output_and_returns_the_status(tmp_path):
    def play(conn, seen):
        holder_link.send(conn, holder_link.ACCEPTED)
        holder_link.send(conn, holder_link.STDOUT, b"hello\n")
        holder_link.send(conn, holder_link.STDERR, b"warning\n")
        holder_link.send_json(conn, holder_link.RESULT, {"status": 0})

    thread, seen = _holder(tmp_path / "holder.sock", play)
    assert _through(tmp_path / "holder.sock") == (0, b"hello\n", b"warning\n")
    thread.join(5)
    assert seen == {"request": {"job_id": JOB_ID, "stage": "build_script"}, "script": b"echo hi\n"}


def test_a_holder_gone_before_it_took_the_stage_up_is_not_served(tmp_path):
    thread, _ = _holder(tmp_path / "holder.sock", lambda conn, seen: None)
    with pytest.raises(NotServed):
        _through(tmp_path / "holder.sock")
    thread.join(5)


def test_a_holder_gone_during_the_stage_is_a_system_failure(tmp_path):
    thread, _ = _holder(tmp_path / "holder.sock", lambda conn, seen: holder_link.send(conn, holder_link.ACCEPTED))
    with pytest.raises(SystemFailure, match="connection holder went away during the stage"):
        _through(tmp_path / "holder.sock")
    thread.join(5)


def test_a_failure_the_holder_reports_is_a_system_failure_with_its_reason(tmp_path):
    def play(conn, seen):
        holder_link.send(conn, holder_link.ACCEPTED)
        holder_link.send_json(conn, holder_link.RESULT, {"failure": "the job's VM stopped"})

    thread, _ = _holder(tmp_path / "holder.sock", play)
    with pytest.raises(SystemFailure, match="^the job's VM stopped$"):
        _through(tmp_path / "holder.sock")
    thread.join(5)


def test_sigterm_is_passed_to_the_holder_and_run_ends_interrupted_once_it_answers(tmp_path):
    def play(conn, seen):
        holder_link.send(conn, holder_link.ACCEPTED)
        os.kill(os.getpid(), signal.SIGTERM)  # gitlab-runner cancels the job
        kind, payload = holder_link.receive(conn)
        seen["then"] = (kind, payload)
        holder_link.send_json(conn, holder_link.RESULT, {"interrupted": "SIGINT"})

    thread, seen = _holder(tmp_path / "holder.sock", play)
    with pytest.raises(Interrupted, match="SIGTERM"):
        _through(tmp_path / "holder.sock")
    thread.join(5)
    assert seen["then"] == (holder_link.TERMINATE, b"SIGTERM")


def test_a_second_stage_while_one_runs_is_turned_away_busy_at_once(session, tmp_path):
    session.behaviour = "wait"
    listener = holder_link.listen(tmp_path / "holder.sock")
    answers: list[tuple[bytes, bytes]] = []

    def second_then_stop(sock):
        other = holder_link.dial(tmp_path / "holder.sock")
        assert other is not None
        other.settimeout(5)
        answers.append(holder_link.receive(other))
        other.close()
        holder_link.send(sock, holder_link.TERMINATE, b"SIGTERM")

    server, client = _pair()
    thread, frames = _client(client, then=second_then_stop)
    assert holder._serve_stage(session, server, lambda: holder._turning_away_while_busy(listener)) is True
    thread.join(5)
    listener.close()
    assert answers == [(holder_link.BUSY, b"")]
    assert frames[-1] == (holder_link.RESULT, b'{"interrupted": "SIGINT"}')


def test_run_turned_away_busy_is_not_served(tmp_path):
    thread, _ = _holder(tmp_path / "holder.sock", lambda conn, seen: holder_link.send(conn, holder_link.BUSY))
    with pytest.raises(NotServed, match="another stage"):
        _through(tmp_path / "holder.sock")
    thread.join(5)
