"""run_exec: stream one stage script into bash in the job's VM, with live output.

The script's exit status decides the outcome: 0 is success, anything else a BuildFailure with
that status. A lost VM or connection is a SystemFailure; SIGTERM stops the script's whole
process group in the VM before the stage exits.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import sys
from pathlib import Path
from typing import BinaryIO

from executor.adapters.guest_ssh import GuestSSH, SSHNotReady
from executor.adapters.hypervisor import connect
from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core.domain_xml import JobRecord
from executor.core.jobenv import Job
from executor.core.settings import Settings
from executor.core.waiting import poll, signals_deferred, signals_raise_interrupted
from executor.errors import BuildFailure, Interrupted, SystemFailure
from executor.jobvm.record import running_record, vm_alive
from executor.stages.config import DRIVER_NAME

log = logging.getLogger(__name__)

# A VM that answered prepare's SSH probe may still drop one handshake (sshd busy under load).
RUN_CONNECT_S = 30.0
# OpenSSH reports no exit status for a shell killed by a signal; bash would say 128+N.
KILLED_BY_SIGNAL_STATUS = 255


def run(
    settings: Settings,
    job: Job,
    script_path: str,
    stage: str,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> None:
    """Stream the stage script into bash in the VM. BuildFailure(status) if it exits non-zero."""
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    vm = naming.vm_name(settings.vm.name_prefix, job.job_id)
    try:
        script = Path(script_path).read_bytes()
    except OSError as exc:
        raise SystemFailure(f"cannot read the {stage} script {script_path}: {exc.strerror}") from None
    state = StateDir(settings.paths.state_dir)
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        record = running_record(hv, vm)
        key = state.read_client_key(vm)
        with _connect_for_run(settings, record, key) as ssh:
            # sshd starts each session command as a session and process-group leader, so $$ is
            # the group id of everything the script starts: that is what SIGTERM must reach.
            pidfile = f"/tmp/lvx-run-{secrets.token_hex(8)}.pid"
            command = f"echo $$ > {shlex.quote(pidfile)} && exec bash -s"
            try:
                with signals_raise_interrupted():
                    status = ssh.stream(command, script, stdout, stderr, lambda: vm_alive(hv, vm))
            except Interrupted:
                with signals_deferred():
                    _stop_remote_group(ssh, pidfile)
                raise
    if status is None:
        # The VM and the connection are fine (checked above), so it was something inside the job.
        stderr.write(f"{DRIVER_NAME}: the {stage} shell was killed by a signal\n".encode())
        stderr.flush()
    outcome = script_outcome(status)
    if outcome is not None:
        raise outcome


def script_outcome(status: int | None) -> BuildFailure | None:
    """What the remote shell's exit status means for the job: None for success, else the build
    failure carrying the status gitlab-runner records (a signal death counts as 255)."""
    if status is None:
        return BuildFailure(KILLED_BY_SIGNAL_STATUS)
    return BuildFailure(status) if status != 0 else None


def _connect_for_run(settings: Settings, record: JobRecord, key: str) -> GuestSSH:
    last: list[SSHNotReady] = []

    def attempt() -> GuestSSH | None:
        try:
            return GuestSSH.connect(record.ip, settings.vm.user, key, record.host_key, settings.timeouts.ssh_connect)
        except SSHNotReady as exc:
            last[:] = [exc]
            return None

    ssh = poll(attempt, RUN_CONNECT_S, interval=1.0, max_interval=3.0)
    if ssh is None:
        raise SystemFailure(f"cannot reach the job's VM over SSH: {last[0] if last else 'no answer'}")
    return ssh


def _stop_remote_group(ssh: GuestSSH, pidfile: str) -> None:
    """TERM the script's process group, then KILL what is left after a short grace."""
    q = shlex.quote(pidfile)
    command = (
        f"pg=$(cat {q} 2>/dev/null) || exit 0; "
        'sudo -n kill -TERM -- "-$pg" 2>/dev/null || kill -TERM -- "-$pg" 2>/dev/null; '
        "for i in 1 2 3 4 5 6 7 8 9 10; do "
        'kill -0 -- "-$pg" 2>/dev/null || sudo -n kill -0 -- "-$pg" 2>/dev/null || exit 0; sleep 0.3; done; '
        'sudo -n kill -KILL -- "-$pg" 2>/dev/null || kill -KILL -- "-$pg" 2>/dev/null; exit 0'
    )
    try:
        ssh.capture(command, timeout=10)
    except SystemFailure as exc:
        log.warning("could not stop the job's processes in the VM: %s", exc)
