"""One stage script in the job's VM or its build container, over a `StageSession`: what the
connection holder does for every stage of a job over one connection, and what `run` does
itself, over a connection of its own, when there is no holder.

Without an image, every stage is bash in the VM as the job user (over SSH). In image mode the
user stages (build_script, step_*, after_script) run in the build container (an exec through
the VM's dockerd, with GitLab's shell detection) and the helper stages (get_sources, caches,
artifacts, ...) run in the VM as root, so that they can read and replace what the container
wrote there as root. A lost VM or connection is a SystemFailure; Interrupted (SIGTERM) stops
the script's processes in the VM or the container before it propagates.
"""

from __future__ import annotations

import logging
import secrets
import shlex
from collections.abc import Callable
from contextlib import ExitStack
from typing import BinaryIO

from executor.adapters.guest_docker import GuestDocker, TLSFiles
from executor.adapters.guest_ssh import GuestSSH, SSHNotReady
from executor.adapters.hypervisor import connect
from executor.adapters.statedir import StateDir
from executor.core import images, naming, proxy
from executor.core.domain_xml import JobRecord
from executor.core.images import ImageSpec
from executor.core.jobenv import Job
from executor.core.settings import Settings
from executor.core.waiting import poll, signals_deferred, signals_raise_interrupted
from executor.errors import Interrupted, SystemFailure
from executor.jobvm.record import VMLost, alive_and_answering, running_record
from executor.stages import hostcache, imagemode
from executor.stages.config import DRIVER_NAME

log = logging.getLogger(__name__)

# A VM that answered prepare's SSH probe may still drop one handshake (sshd busy under load).
RUN_CONNECT_S = 30.0


class StageSession:
    """The job's VM as its stages use it: the record, one SSH connection probed for liveness,
    and in image mode one client of the VM's dockerd. Everything is opened by `open_session`
    and closed with the ExitStack given to it."""

    def __init__(
        self,
        settings: Settings,
        job: Job,
        state: StateDir,
        vm: str,
        record: JobRecord,
        ssh: GuestSSH,
        alive: Callable[[], bool],
        docker: Callable[[], GuestDocker],
    ) -> None:
        self.settings, self.job, self.state, self.vm, self.record = settings, job, state, vm, record
        self.ssh, self.alive = ssh, alive
        self._docker = docker
        self.image = imagemode.job_image(settings, job)
        # Exported before the runner's script, whose own exports (the job's variables) win.
        env = proxy.environment(settings, job.gitlab_host) if proxy.enabled(settings) else {}
        self._prelude = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()).encode()

    def execute(
        self, stage: str, script: bytes, stdout: BinaryIO, stderr: BinaryIO, later: list[Callable[[], None]]
    ) -> int | None:
        """Run `script` for `stage`; its exit status (None: killed by a signal). Tidying that
        need not delay the stage's answer goes into `later`."""
        say = job_log(stderr)
        script = self._prelude + script
        if hostcache.enabled(self.settings) and stage in hostcache.RESTORE_STAGES:
            hostcache.restore(self.settings, self.job, self.vm, self.ssh, say)
        if self.image is not None and images.runs_in_container(stage):
            status: int | None = self._in_container(self.image, script, stdout, stderr, later)
        else:
            status = _in_vm(self.ssh, script, stdout, stderr, self.alive, as_root=self.image is not None)
        if hostcache.enabled(self.settings) and stage in hostcache.SAVE_STAGES:
            hostcache.save(self.settings, self.job, self.vm, self.ssh, say)
        if status is None:
            # The VM and the connection are fine (checked on the way), so it was something inside the job.
            say(f"the {stage} shell was killed by a signal")
        return status

    def _in_container(
        self, image: ImageSpec, script: bytes, stdout: BinaryIO, stderr: BinaryIO, later: list[Callable[[], None]]
    ) -> int:
        """The script as a file in the VM's tmpfs (bind-mounted into the container), run by the
        shell GitLab's detection finds in the image."""
        container = imagemode.build_container_name(self.vm)
        name = f"stage-{secrets.token_hex(8)}"
        docker = self._docker()
        try:
            docker.put_file(container, imagemode.SCRIPTS_DIR, name, script, mode=0o755)
        except SystemFailure:
            state_of = docker.container_state(container)
            if not state_of or not state_of.get("Running"):
                raise SystemFailure(f"the job's build container {container} is not running") from None
            raise
        later.append(lambda: _remove_script(self.ssh, name))
        argv = ["sh", "-c", images.DETECT_SHELL, f"{imagemode.SCRIPTS_DIR}/{name}"]
        execs: list[str] = []
        try:
            with signals_raise_interrupted():
                return docker.exec_stream(container, argv, stdout, stderr, self.alive, image.user, execs.append)
        except Interrupted:
            with signals_deferred():
                pid = docker.exec_pid(execs[0]) if execs else None
                if pid is not None:
                    _stop_process_tree(self.ssh, pid)
            raise


def open_session(settings: Settings, job: Job, state: StateDir, vm: str, held: ExitStack) -> StageSession:
    """Connect to the job's running VM `vm` (libvirt, SSH, and dockerd when first needed);
    SystemFailure saying why not. A VM found dead or silent is remembered for the job's later
    stages (`StateDir.mark_lost`)."""
    hv = held.enter_context(connect(settings.libvirt.uri, naming.METADATA_NS))
    record = running_record(hv, vm, job.job_id)
    key = state.read_client_key(vm)
    ssh = held.enter_context(_remembering_loss(state, vm, lambda: _connect(settings, vm, record, key)))
    alive = _alive_remembering_loss(state, vm, alive_and_answering(hv, settings, vm, ssh))
    docker: list[GuestDocker] = []

    def docker_client() -> GuestDocker:
        if not docker:
            ca, cert, tls_key = state.docker_client_files(vm)
            docker.append(held.enter_context(GuestDocker.connect(record.ip, TLSFiles(ca, cert, tls_key))))
        return docker[0]

    return StageSession(settings, job, state, vm, record, ssh, alive, docker_client)


def run_direct(
    settings: Settings,
    job: Job,
    state: StateDir,
    vm: str,
    stage: str,
    script: bytes,
    stdout: BinaryIO,
    stderr: BinaryIO,
) -> int | None:
    """One stage over a connection of its own (no connection holder): its exit status."""
    later: list[Callable[[], None]] = []
    with ExitStack() as held:
        session = open_session(settings, job, state, vm, held)
        try:
            return session.execute(stage, script, stdout, stderr, later)
        finally:
            with signals_deferred():
                for tidy in later:
                    tidy()


def job_log(stderr: BinaryIO) -> Callable[[str], None]:
    """A line of ours in the job log (the stage's stderr, which gitlab-runner shows)."""

    def say(text: str) -> None:
        stderr.write(f"{DRIVER_NAME}: {text}\n".encode())
        stderr.flush()

    return say


def _remembering_loss(state: StateDir, vm: str, connect_ssh: Callable[[], GuestSSH]) -> GuestSSH:
    try:
        return connect_ssh()
    except VMLost as exc:
        state.mark_lost(vm, str(exc))
        raise


def _alive_remembering_loss(state: StateDir, vm: str, alive: Callable[[], bool]) -> Callable[[], bool]:
    """`alive`, which also records a dead or silent VM for the job's later stages (not a
    libvirt hiccup: the next stage may well get through)."""

    def check() -> bool:
        try:
            answer = alive()
        except VMLost as exc:
            state.mark_lost(vm, str(exc))
            raise
        if not answer:
            state.mark_lost(vm, f"the job's VM {vm} stopped")
        return answer

    return check


def _connect(settings: Settings, vm: str, record: JobRecord, key: str) -> GuestSSH:
    last: list[SSHNotReady] = []

    def attempt() -> GuestSSH | None:
        try:
            return GuestSSH.connect(record.ip, settings.vm.user, key, record.host_key, settings.timeouts.ssh_connect)
        except SSHNotReady as exc:
            last[:] = [exc]
            return None

    ssh = poll(attempt, RUN_CONNECT_S, interval=1.0, max_interval=3.0)
    if ssh is None:
        raise VMLost(f"cannot reach the job's VM {vm} over SSH: {last[0] if last else 'no answer'}")
    return ssh


def _in_vm(
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
