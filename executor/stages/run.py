"""run_exec: one stage script, with live output, in the job's VM or its build container.

Without an image, every stage is bash in the VM as the job user (over SSH). In image mode the
user stages (build_script, step_*, after_script) run in the build container (an exec through
the VM's dockerd, with GitLab's shell detection) and the helper stages (get_sources, caches,
artifacts, ...) run in the VM as root, so that they can read and replace what the container
wrote there as root. The script's exit status decides the outcome: 0 is success, anything else
a BuildFailure with that status. A lost VM or connection is a SystemFailure; SIGTERM stops the
script's processes in the VM or the container before the stage exits.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from executor.adapters.guest_docker import GuestDocker, TLSFiles
from executor.adapters.guest_ssh import GuestSSH, SSHNotReady
from executor.adapters.hypervisor import connect
from executor.adapters.statedir import StateDir
from executor.core import images, naming
from executor.core.domain_xml import JobRecord
from executor.core.images import ImageSpec
from executor.core.jobenv import Job
from executor.core.settings import Settings
from executor.core.waiting import poll, signals_deferred, signals_raise_interrupted
from executor.errors import BuildFailure, Interrupted, SystemFailure
from executor.jobvm.record import alive_and_answering, job_vm, running_record
from executor.stages import hostcache, imagemode
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
    try:
        script = Path(script_path).read_bytes()
    except OSError as exc:
        raise SystemFailure(f"cannot read the {stage} script {script_path}: {exc.strerror}") from None
    state = StateDir(settings.paths.state_dir)
    vm = job_vm(settings, state, job.job_id)
    image = imagemode.job_image(settings, job)
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        record = running_record(hv, vm, job.job_id)
        key = state.read_client_key(vm)
        with _connect_for_run(settings, record, key) as ssh:
            alive = alive_and_answering(hv, settings, vm, ssh)
            say = _job_log(stderr)
            if hostcache.enabled(settings) and stage in hostcache.RESTORE_STAGES:
                hostcache.restore(settings, job, vm, ssh, say)
            if image is not None and images.runs_in_container(stage):
                status: int | None = _run_in_container(state, vm, record.ip, image, ssh, script, stdout, stderr, alive)
            else:
                status = _run_in_vm(ssh, script, stdout, stderr, alive, as_root=image is not None)
            if hostcache.enabled(settings) and stage in hostcache.SAVE_STAGES:
                hostcache.save(settings, job, vm, ssh, say)
    if status is None:
        # The VM and the connection are fine (checked above), so it was something inside the job.
        _job_log(stderr)(f"the {stage} shell was killed by a signal")
    outcome = script_outcome(status)
    if outcome is not None:
        raise outcome


def _job_log(stderr: BinaryIO) -> Callable[[str], None]:
    """A line of ours in the job log (the stage's stderr, which gitlab-runner shows)."""

    def say(text: str) -> None:
        stderr.write(f"{DRIVER_NAME}: {text}\n".encode())
        stderr.flush()

    return say


def _run_in_vm(
    ssh: GuestSSH, script: bytes, stdout: BinaryIO, stderr: BinaryIO, alive: Callable[[], bool], as_root: bool
) -> int | None:
    # sshd starts each session command as a session and process-group leader, so $$ is the
    # group id of everything the script starts: that is what SIGTERM must reach.
    pidfile = f"/tmp/lvx-run-{secrets.token_hex(8)}.pid"
    shell = "sudo -n -H bash -s" if as_root else "bash -s"
    command = f"echo $$ > {shlex.quote(pidfile)} && exec {shell}"
    try:
        with signals_raise_interrupted():
            return ssh.stream(command, script, stdout, stderr, alive)
    except Interrupted:
        with signals_deferred():
            _stop_remote_group(ssh, pidfile)
        raise


def _run_in_container(
    state: StateDir,
    vm: str,
    ip: str,
    image: ImageSpec,
    ssh: GuestSSH,
    script: bytes,
    stdout: BinaryIO,
    stderr: BinaryIO,
    alive: Callable[[], bool],
) -> int:
    """The script as a file in the VM's tmpfs (bind-mounted into the container), run by the
    shell GitLab's detection finds in the image."""
    container = imagemode.build_container_name(vm)
    name = f"stage-{secrets.token_hex(8)}"
    ca, cert, key = state.docker_client_files(vm)
    execs: list[str] = []
    with GuestDocker.connect(ip, TLSFiles(ca, cert, key)) as docker:
        state_of = docker.container_state(container)
        if not state_of or not state_of.get("Running"):
            raise SystemFailure(f"the job's build container {container} is not running")
        docker.put_file(container, imagemode.SCRIPTS_DIR, name, script, mode=0o755)
        argv = ["sh", "-c", images.DETECT_SHELL, f"{imagemode.SCRIPTS_DIR}/{name}"]
        try:
            with signals_raise_interrupted():
                return docker.exec_stream(container, argv, stdout, stderr, alive, image.user, execs.append)
        except Interrupted:
            with signals_deferred():
                pid = docker.exec_pid(execs[0]) if execs else None
                if pid is not None:
                    _stop_process_tree(ssh, pid)
            raise
        finally:
            with signals_deferred():
                _remove_script(ssh, name)


def _remove_script(ssh: GuestSSH, name: str) -> None:
    try:
        ssh.capture(f"sudo -n rm -f {shlex.quote(imagemode.SCRIPTS_DIR_IN_VM + '/' + name)}", timeout=10)
    except SystemFailure as exc:
        log.debug("could not remove the stage script: %s", exc)


def _stop_process_tree(ssh: GuestSSH, pid: int) -> None:
    """TERM the container stage's process and all its descendants (seen from the VM), then KILL
    what is left after a short grace. The build container itself stays for after_script."""
    command = (
        'tree() { for c in $(pgrep -P "$1"); do tree "$c"; done; echo "$1"; }; '
        f'p=$(tree {int(pid)}); [ -n "$p" ] || exit 0; sudo -n kill -TERM $p 2>/dev/null; '
        f"for i in 1 2 3 4 5 6 7 8 9 10; do sudo -n kill -0 {int(pid)} 2>/dev/null || exit 0; sleep 0.3; done; "
        f"sudo -n kill -KILL $(tree {int(pid)}) 2>/dev/null; exit 0"
    )
    try:
        ssh.capture(command, timeout=15)
    except SystemFailure as exc:
        log.warning("could not stop the job's processes in the build container: %s", exc)


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
