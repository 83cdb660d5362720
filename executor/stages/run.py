"""run_exec: one stage script, with live output, in the job's VM or its build container.

The stage goes to the job's connection holder (`stages.holder`, started by prepare), which runs
it over the SSH connection it holds for the whole job; this path imports nothing but the
standard library and the executor's light modules, so a stage costs an interpreter start and
one SSH channel. Without a holder (it never started, or ended) the stage connects by itself
(`stage_exec.run_direct`) and says so at debug level. What happens in the VM is the same either
way (`stage_exec`).

The script's exit status decides the outcome: 0 is success, anything else a BuildFailure with
that status (255 for a shell killed by a signal). A lost VM or connection is a SystemFailure;
once a stage has found the VM dead or silent, the job's later stages fail at once. SIGTERM
stops the script's processes in the VM or the container before the stage exits.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import BinaryIO

from executor.adapters import holder_link
from executor.adapters.statedir import StateDir
from executor.core.jobenv import Job
from executor.core.settings import Settings
from executor.errors import BuildFailure, Interrupted, SystemFailure
from executor.jobvm import cacheverdict, journal
from executor.jobvm.record import VMLost, job_vm
from executor.stages.config import DRIVER_NAME

log = logging.getLogger(__name__)

# OpenSSH reports no exit status for a shell killed by a signal; bash would say 128+N.
KILLED_BY_SIGNAL_STATUS = 255
# The holder answers a request once its connection is up (RUN_CONNECT_S at worst, after
# prepare): a request it has not taken up by then is run directly instead.
HOLDER_ACCEPT_S = 90.0
# After SIGTERM, how long the holder may take to stop the script's processes and say so.
HOLDER_STOP_S = 30.0


class NotServed(Exception):
    """The holder did not take the stage up: the script has not started."""


def run(
    settings: Settings,
    job: Job,
    script_path: str,
    stage: str,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> None:
    """Run the stage script in the job's VM. BuildFailure(status) if it exits non-zero. The
    stage is recorded in the job history."""
    with journal.stage_recorded(settings, job, stage):
        _run(settings, job, script_path, stage, stdout or sys.stdout.buffer, stderr or sys.stderr.buffer)


def _run(settings: Settings, job: Job, script_path: str, stage: str, stdout: BinaryIO, stderr: BinaryIO) -> None:
    try:
        script = Path(script_path).read_bytes()
    except OSError as exc:
        raise SystemFailure(f"cannot read the {stage} script {script_path}: {exc.strerror}") from None
    state = StateDir(settings.paths.state_dir)
    vm = job_vm(settings, state, job.job_id)
    _refuse_if_lost(state, vm)

    def say(line: str) -> None:
        stderr.write(f"{DRIVER_NAME}: {line}\n".encode())
        stderr.flush()

    with cacheverdict.stage_watched(state, vm, stage, say):
        try:
            try:
                status = through_holder(state.holder_file(vm, "sock"), job.job_id, stage, script, stdout, stderr)
            except NotServed as exc:
                log.debug("the job's connection holder did not take the %s stage (%s): connecting directly", stage, exc)
                _refuse_if_lost(state, vm)  # the holder may have found the VM dead meanwhile
                from executor.stages import stage_exec

                status = stage_exec.run_direct(settings, job, state, vm, stage, script, stdout, stderr)
        except SystemFailure as exc:
            if not isinstance(exc, (VMLost, Interrupted)) and state.lost_reason(vm) is not None:
                raise VMLost(str(exc)) from None  # the holder found it: the history says which failure
            raise
        outcome = script_outcome(status)
        if outcome is not None:
            raise outcome


def _refuse_if_lost(state: StateDir, vm: str) -> None:
    reason = state.lost_reason(vm)
    if reason is not None:
        raise VMLost(f"{reason} (found by an earlier stage of this job: not trying again)")


def script_outcome(status: int | None) -> BuildFailure | None:
    """What the remote shell's exit status means for the job: None for success, else the build
    failure carrying the status gitlab-runner records (a signal death counts as 255)."""
    if status is None:
        return BuildFailure(KILLED_BY_SIGNAL_STATUS)
    return BuildFailure(status) if status != 0 else None


def through_holder(
    path: Path, job_id: int, stage: str, script: bytes, stdout: BinaryIO, stderr: BinaryIO
) -> int | None:
    """Have the holder listening at `path` run the stage, copying its output live; the script's
    exit status. NotServed if the holder did not take it up; SystemFailure if it failed or went
    away during the stage; Interrupted, once the holder has stopped the script, on SIGTERM."""
    sock = holder_link.dial(path)
    if sock is None:
        raise NotServed("nobody listens at its socket")
    stopping: list[str] = []

    def forward(signum: int, _frame: object) -> None:
        if not stopping:
            stopping.append(signal.Signals(signum).name)
            sock.settimeout(HOLDER_STOP_S)
            with contextlib.suppress(OSError):  # the holder is gone: the loop below finds out
                holder_link.send(sock, holder_link.TERMINATE, stopping[0].encode())

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        with sock:
            try:
                holder_link.send_json(sock, holder_link.REQUEST, {"job_id": job_id, "stage": stage})
                holder_link.send(sock, holder_link.SCRIPT, script)
            except OSError as exc:
                raise NotServed(f"it did not take the request: {exc}") from None
            return _follow(sock, stdout, stderr, stopping)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _follow(sock: socket.socket, stdout: BinaryIO, stderr: BinaryIO, stopping: list[str]) -> int | None:
    sock.settimeout(HOLDER_ACCEPT_S)
    accepted = False
    while True:
        try:
            kind, payload = holder_link.receive(sock)
        except (holder_link.LinkClosed, OSError) as exc:
            if stopping:
                raise Interrupted(stopping[0]) from None
            if not accepted:
                raise NotServed(str(exc)) from None
            raise SystemFailure(f"the job's connection holder went away during the stage: {exc}") from None
        if kind == holder_link.BUSY and not accepted:
            raise NotServed("it runs another stage of the job")
        if kind == holder_link.ACCEPTED:
            accepted = True
            sock.settimeout(HOLDER_STOP_S if stopping else None)
        elif kind in (holder_link.STDOUT, holder_link.STDERR):
            sink = stdout if kind == holder_link.STDOUT else stderr
            sink.write(payload)
            sink.flush()
        elif kind == holder_link.RESULT:
            if stopping:
                raise Interrupted(stopping[0])
            result = holder_link.decode_json(payload)
            if "failure" in result:
                raise SystemFailure(str(result["failure"]))
            status = result.get("status")
            return status if isinstance(status, int) else None
