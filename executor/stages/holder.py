"""The job's connection holder: one process per job that keeps the SSH connection to the job's
VM (and in image mode a client of its dockerd) for the job's whole life, and runs each stage
that `run` hands it over a 0600 unix socket in the job's state directory.

Why a process of ours rather than OpenSSH's ControlMaster: the stages' logic (liveness probes
with the console's tail, image mode's exec in the build container through dockerd, the host
cache, stopping a cancelled script's process tree) is paramiko and docker-py code; a held
OpenSSH master would leave it all to per-stage `ssh` and `docker` processes in the guest
(each a TCG-slow start) or duplicate it in shell. The holder runs that same code
(`stage_exec`) over connections it opened once, and `run` shrinks to a stdlib client.

Prepare creates the listening socket and passes it to the holder it starts (detached: own
session, no inherited descriptors but the socket, output to a log in the job dir), so a stage
that comes before the holder's connection is up waits in the socket's backlog instead of
missing it. The holder ends with the job's VM: on SIGTERM (teardown sends it), when the job's
state dir is gone, when the VM is found dead or silent (then remembered for the job's later
stages), or when its connection drops.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

from executor.adapters import holder_link
from executor.adapters.hostservice import start_detached, this_command
from executor.adapters.statedir import StateDir
from executor.core.jobenv import Job
from executor.core.settings import Settings
from executor.core.text import printable
from executor.errors import ExecutorError, Interrupted, SystemFailure
from executor.jobvm.teardown import holder_service
from executor.stages import stage_exec

log = logging.getLogger(__name__)

IDLE_CHECK_S = 2.0  # between stages: is the job still there, and its VM alive?
BUSY_POLL_S = 0.1
REQUEST_READ_S = 30.0
COMMAND = "hold-connection"


def start(settings: Settings, config_file: str, vm: str) -> None:
    """Start `vm`'s holder, detached; its socket listens when this returns."""
    state = StateDir(settings.paths.state_dir)
    listener = holder_link.listen(state.holder_file(vm, "sock"))
    try:
        argv = [*this_command(), "--config", config_file, COMMAND, vm, "--fd", str(listener.fileno())]
        start_detached(argv, state.holder_file(vm, "log"), pass_fds=(listener.fileno(),))
    finally:
        listener.close()


def serve(settings: Settings, job: Job, vm: str, listen_fd: int) -> None:
    """The holder's life: connect, then run each stage a client hands over, until the job's
    VM or state dir is gone, or SIGTERM."""
    state = StateDir(settings.paths.state_dir)
    listener = socket.socket(fileno=listen_fd)
    ended = _ending_on_signals()
    _one_log_stream()
    with holder_service(state, vm).hold(), listener, ExitStack() as held:
        try:
            session = stage_exec.open_session(settings, job, state, vm, held)
        except ExecutorError as exc:
            log.warning("not holding a connection to %s: %s", vm, exc)
            return  # waiting clients see the socket close and connect by themselves
        log.info("holding the connection to %s (%s) for job %d", vm, session.record.ip, job.job_id)
        listener.settimeout(IDLE_CHECK_S)
        try:
            while True:
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    reason = _why_not_needed(state, vm, session)
                    if reason:
                        log.info("ending: %s", reason)
                        return
                    continue
                with conn:
                    if not _serve_stage(session, conn, lambda: _turning_away_while_busy(listener)):
                        log.info("ending after that stage")
                        return
        except Interrupted:
            log.info("ending: %s", ended[-1] if ended else "interrupted")


@contextlib.contextmanager
def _turning_away_while_busy(listener: socket.socket) -> Iterator[None]:
    """While a stage runs, another request (two stages of one job at once: not what
    gitlab-runner does, but an operator's script may) is answered BUSY at once, instead of
    waiting in the backlog, and its stage connects by itself."""
    busy = threading.Event()
    busy.set()

    def turn_away() -> None:
        while busy.is_set():
            ready, _, _ = select.select([listener], [], [], BUSY_POLL_S)
            if not ready or not busy.is_set():
                continue
            try:
                conn, _ = listener.accept()
            except OSError:  # taken by the main loop meanwhile
                continue
            with conn, contextlib.suppress(OSError):
                holder_link.send(conn, holder_link.BUSY)

    thread = threading.Thread(target=turn_away, name="turn-away", daemon=True)
    thread.start()
    try:
        yield
    finally:
        busy.clear()


def _one_log_stream() -> None:
    """paramiko's warnings through our handler: one lock per line, so that its transport
    thread's lines never cut into ours in the log."""
    ours = logging.getLogger("executor")
    theirs = logging.getLogger("paramiko")
    theirs.handlers[:] = ours.handlers
    theirs.setLevel(logging.WARNING)
    theirs.propagate = False


def _ending_on_signals() -> list[str]:
    """SIGTERM or SIGHUP while idle end the holder (a stage's own handler stops the stage
    first); SIGINT is how a client's TERMINATE reaches a running stage, and nothing else."""
    ended: list[str] = []

    def handler(signum: int, _frame: object) -> None:
        ended.append(signal.Signals(signum).name)
        raise Interrupted(ended[-1])

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return ended


def _why_not_needed(state: StateDir, vm: str, session: stage_exec.StageSession) -> str | None:
    if not state.holder_file(vm, "sock").exists():
        return "the job's state dir is gone (cleaned up or reaped)"
    if not session.ssh.connected():
        return "the SSH connection to the VM dropped"
    try:
        if not session.alive():
            return f"{vm} stopped"
    except SystemFailure as exc:
        return str(exc)
    return None


def _serve_stage(
    session: stage_exec.StageSession,
    conn: socket.socket,
    while_running: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
) -> bool:
    """Run the stage `conn` asks for (within `while_running`) and answer, then tidy up after it
    (a next stage waits for that in the backlog); whether the holder goes on afterwards."""
    try:
        if holder_link.peer_uid(conn) != os.geteuid():
            log.warning("refused a request from uid %d", holder_link.peer_uid(conn))
            return True
        conn.settimeout(REQUEST_READ_S)
        stage, script = _read_request(conn, session.job.job_id)
        conn.settimeout(None)
        holder_link.send(conn, holder_link.ACCEPTED)
    except (holder_link.LinkClosed, OSError) as exc:
        log.warning("dropped a request: %s", exc)
        return True
    running = threading.Event()
    client_stopped = threading.Event()
    threading.Thread(target=_watch_client, args=(conn, running, client_stopped), daemon=True).start()
    later: list[Callable[[], None]] = []
    result: dict[str, Any]
    go_on = True
    running.set()
    try:
        with while_running():
            out, err = _sink(conn, holder_link.STDOUT), _sink(conn, holder_link.STDERR)
            status = session.execute(stage, script, out, err, later)
        result = {"status": status}
    except Interrupted as exc:
        result = {"interrupted": exc.signal_name}
        go_on = client_stopped.is_set()  # else it was our own SIGTERM: the job is over
    except ExecutorError as exc:
        result = {"failure": str(exc)}
        go_on = session.state.lost_reason(session.vm) is None
    except Exception as exc:  # a bug of ours must still end the stage as a system failure
        log.exception("the %s stage failed", stage)
        result = {"failure": f"the job's connection holder failed: {exc.__class__.__name__}: {exc}"}
    finally:
        running.clear()
    with contextlib.suppress(OSError):
        holder_link.send_json(conn, holder_link.RESULT, result)
    for tidy in later:
        tidy()
    log.info("%s: %s", printable(stage, "?"), result.get("status", result.get("interrupted", "failure")))
    return go_on


def _read_request(conn: socket.socket, job_id: int) -> tuple[str, bytes]:
    kind, payload = holder_link.receive(conn)
    request = holder_link.decode_json(payload) if kind == holder_link.REQUEST else {}
    stage = request.get("stage")
    if request.get("job_id") != job_id or not isinstance(stage, str):
        raise holder_link.LinkClosed(f"not a request for a stage of job {job_id}")
    kind, script = holder_link.receive(conn)
    if kind != holder_link.SCRIPT:
        raise holder_link.LinkClosed("a request without a script")
    return stage, script


def _watch_client(conn: socket.socket, running: threading.Event, client_stopped: threading.Event) -> None:
    """The client's TERMINATE, or its end (SIGKILLed), stops the running stage: a SIGINT to
    ourselves, which the stage's handler turns into Interrupted."""
    while True:
        try:
            kind, _ = holder_link.receive(conn)
        except (holder_link.LinkClosed, OSError):
            kind = holder_link.TERMINATE
        if kind == holder_link.TERMINATE:
            client_stopped.set()
            # Again while it runs: between the parts of a stage that stop on it, SIGINT is ignored.
            while running.is_set():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1.0)
            return


def _sink(conn: socket.socket, kind: bytes) -> io.BufferedWriter:
    return io.BufferedWriter(_FrameWriter(conn, kind))


class _FrameWriter(io.RawIOBase):
    """A stage's stdout or stderr as frames to the client. A client that went away loses the
    rest; the stage is stopped by `_watch_client`."""

    def __init__(self, conn: socket.socket, kind: bytes) -> None:
        self._conn, self._kind, self._gone = conn, kind, False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = bytes(data)
        if not self._gone:
            try:
                holder_link.send(self._conn, self._kind, view)
            except OSError:
                self._gone = True
        return len(view)
