"""`libvirt-executor env JOB_ID` and `ssh JOB_ID [CMD]`: an operator's way into a running job's
VM, like `docker-machine env` and `docker-machine ssh`, with the job's own credentials (the
Docker client certificate and SSH key in the root-only state dir, the pinned host key from the
domain's metadata). Only VMs carrying this executor's metadata; a job that is gone says so."""

from __future__ import annotations

import os
import shlex
from typing import BinaryIO

from executor.adapters.guest_docker import DOCKER_TLS_PORT
from executor.adapters.guest_ssh import GuestSSH, SSHNotReady
from executor.adapters.hypervisor import connect
from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core.domain_xml import JobRecord
from executor.core.settings import Settings
from executor.errors import ConfigError, SystemFailure
from executor.jobvm.record import job_vm, running_record


def _job_vm(settings: Settings, job_id: int) -> tuple[str, JobRecord]:
    if os.geteuid() != 0:
        raise ConfigError("must run as root: the job's credentials are in the root-only state dir")
    vm = job_vm(settings, StateDir(settings.paths.state_dir), job_id)
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        try:
            return vm, running_record(hv, vm, job_id)
        except SystemFailure as exc:
            raise SystemFailure(f"job {job_id}: {exc}") from None


def docker_env(settings: Settings, job_id: int) -> list[str]:
    """Shell lines that point the docker CLI at the job's daemon (eval them)."""
    vm, record = _job_vm(settings, job_id)
    cert_dir = StateDir(settings.paths.state_dir).docker_cert_dir(vm)
    return [
        f"export DOCKER_HOST={shlex.quote(f'tcp://{record.ip}:{DOCKER_TLS_PORT}')}",
        "export DOCKER_TLS_VERIFY=1",
        f"export DOCKER_CERT_PATH={shlex.quote(cert_dir)}",
        f'# the daemon of job {job_id} in {vm}; run: eval "$(libvirt-executor env {job_id})"',
    ]


def ssh_session(
    settings: Settings, job_id: int, command: str | None, stdin: int, stdout: BinaryIO, stderr: BinaryIO
) -> int:
    """A shell (or `command`) in the job's VM as the job user; its exit status."""
    vm, record = _job_vm(settings, job_id)
    key = StateDir(settings.paths.state_dir).read_client_key(vm)
    try:
        ssh = GuestSSH.connect(record.ip, settings.vm.user, key, record.host_key, settings.timeouts.ssh_connect)
    except SSHNotReady as exc:
        raise SystemFailure(f"job {job_id}: cannot reach {vm}: {exc}") from None
    with ssh:
        return ssh.session(command, stdin, stdout, stderr)
