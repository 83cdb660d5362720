"""Host-side state of jobs: per-job locks, IP reservations and the per-job SSH client key.

Every stage is its own process, so anything a later stage (or a later `reap`) needs is on disk,
keyed by the VM name:

    <state_dir>/locks/<vm>.lock     flock held by prepare for its whole run (and by cleanup)
    <state_dir>/leases/<ip>         an IP reservation; the file holds the VM name
    <state_dir>/jobs/<vm>/client_key  the job's SSH client key (0600), for `run`
    <state_dir>/jobs/<vm>/docker/{ca,cert,key}.pem  the executor's TLS client for the VM's dockerd
                                    (the docker CLI's names: DOCKER_CERT_PATH for `env`)
    <state_dir>/alloc.lock          serialises IP allocation between concurrent prepares
    <state_dir>/admission.lock      serialises prepare's admission check with its disk's creation
    <state_dir>/runner/             the gitlab-runner binary's hash memo and its volumes' records
    <state_dir>/claims/<job-vm>     a job served from the warm pool: holds the pool VM's name
    <state_dir>/agent/              the host agent's lock (with its pid), log and status, and
                                    the pool's "drained" marker, per name prefix
    <state_dir>/docker-cache/       the Docker layer cache's lineages (<lineage>.json: head,
                                    last use), its lock, and the flattening lock

A lock that is held means "a stage is working on this VM right now": reap never touches it.
The kernel drops flocks when a process dies, even by SIGKILL, so a crashed prepare never leaves
a lock held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import ipaddress
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from executor.core.waiting import Deadline, poll
from executor.errors import SystemFailure

CLIENT_KEY = "client_key"
LOST = "lost"  # why the job's VM was found dead or silent, for the job's later stages
REMOVING = "removing"  # cleanup stopped the VM; its remover removes the rest
DOCKER_DIR = "docker"
DOCKER_CA, DOCKER_CERT, DOCKER_KEY = f"{DOCKER_DIR}/ca.pem", f"{DOCKER_DIR}/cert.pem", f"{DOCKER_DIR}/key.pem"


class StateDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.locks = self.root / "locks"
        self.leases = self.root / "leases"
        self.jobs = self.root / "jobs"
        self.claims_dir = self.root / "claims"
        self.agent_dir = self.root / "agent"

    def ensure(self) -> None:
        for d in (self.root, self.locks, self.leases, self.jobs, self.claims_dir, self.agent_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    # --- locks ---------------------------------------------------------------------------

    def lock_path(self, vm: str) -> Path:
        return self.locks / f"{vm}.lock"

    def _open_locked(self, vm: str, wait: float | None) -> int | None:
        """Open and flock the VM's lock file; None if busy (now, or for `wait` seconds).

        Lock files are deleted by whoever holds them last, so after locking we check that the
        file we hold is still the one at the path; if not, someone deleted it meanwhile and we
        start again on the new file (the usual flock-and-unlink dance).
        """
        path = self.lock_path(vm)
        deadline = Deadline(wait or 0.0)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if not poll(functools.partial(_try_flock, fd), deadline.remaining(), interval=0.2, max_interval=0.2):
                    os.close(fd)
                    return None
                try:
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)

    @contextmanager
    def job_lock(self, vm: str, timeout: float) -> Iterator[None]:
        """Hold the VM's lock, waiting at most `timeout` seconds for another stage to let go."""
        self.ensure()
        fd = self._open_locked(vm, timeout)
        if fd is None:
            raise SystemFailure(f"another executor process has held the lock of {vm} for more than {timeout:.0f} s")
        try:
            yield
        finally:
            os.close(fd)

    @contextmanager
    def lock_if_free(self, vm: str) -> Iterator[bool]:
        """Non-blocking: True (and the lock held) if no stage is working on `vm`. For reap."""
        self.ensure()
        fd = self._open_locked(vm, None)
        try:
            yield fd is not None
        finally:
            if fd is not None:
                os.close(fd)

    def lock_held(self, vm: str) -> bool:
        """Whether a live process holds the VM's lock right now (never creates a lock file)."""
        try:
            fd = os.open(self.lock_path(vm), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's shared lock at once
        return False

    def remove_lock_file(self, vm: str) -> None:
        """Remove the VM's lock file; call only while holding the lock, as the last step."""
        _unlink(self.lock_path(vm))

    def locked_vms(self) -> list[str]:
        """VM names that have a lock file (held or not)."""
        if not self.locks.is_dir():
            return []
        return sorted(p.name[: -len(".lock")] for p in self.locks.glob("*.lock"))

    # --- IP reservations -----------------------------------------------------------------

    def allocate_ip(self, vm: str, candidates: Iterable[ipaddress.IPv4Address]) -> str:
        """Reserve the first free address for `vm` (or return the one it already has)."""
        self.ensure()
        with open(self.root / "alloc.lock", "a") as alloc:
            fcntl.flock(alloc, fcntl.LOCK_EX)
            taken = self.reservations()
            for ip, owner in taken.items():
                if owner == vm:
                    return ip
            for candidate in candidates:
                ip = str(candidate)
                if ip in taken:
                    continue
                try:
                    fd = os.open(self.leases / ip, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(vm + "\n")
                return ip
        raise SystemFailure(
            "no free IP address left in the VM subnet (too many concurrent jobs, or run `libvirt-executor reap`)"
        )

    def reservations(self) -> dict[str, str]:
        """ip -> VM name, for every reservation on disk."""
        return _names_in(self.leases)

    def release_unowned_ips(self) -> list[str]:
        """Remove reservations naming no VM. `allocate_ip` creates the file and then writes the
        owner, so a prepare SIGKILLed in between leaves an empty one that no cleanup can match;
        under the allocation lock no allocation is half-way, so an empty one is debris."""
        if not self.leases.is_dir():
            return []
        released = []
        with open(self.root / "alloc.lock", "a") as alloc:
            fcntl.flock(alloc, fcntl.LOCK_EX)
            for ip, owner in self.reservations().items():
                if not owner:
                    _unlink(self.leases / ip)
                    released.append(ip)
        return sorted(released)

    def release_ip(self, vm: str) -> list[str]:
        return _remove_naming(self.leases, vm)

    # --- per-job files -------------------------------------------------------------------

    def job_dir(self, vm: str) -> Path:
        return self.jobs / vm

    def write_client_key(self, vm: str, private_key: str) -> None:
        self._write_private(vm, CLIENT_KEY, private_key)

    def _write_private(self, vm: str, name: str, text: str) -> Path:
        """A 0600 file in the job's 0700 directory."""
        self.ensure()  # mkdir(parents=True) alone would make the state dirs 0755
        path = self.job_dir(vm) / name
        for d in (self.job_dir(vm), path.parent):
            d.mkdir(mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file that already exists
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def write_docker_client(self, vm: str, ca: str, cert: str, key: str) -> None:
        """The executor's TLS client material for the VM's dockerd (0600, root only)."""
        for name, text in ((DOCKER_CA, ca), (DOCKER_CERT, cert), (DOCKER_KEY, key)):
            self._write_private(vm, name, text)

    def docker_client_files(self, vm: str) -> tuple[str, str, str]:
        """(CA, certificate, key) paths of the job's Docker client; SystemFailure if missing."""
        d = self.job_dir(vm)
        paths = tuple(str(d / name) for name in (DOCKER_CA, DOCKER_CERT, DOCKER_KEY))
        if not all(os.path.isfile(p) for p in paths):
            raise SystemFailure(f"no Docker client certificate for {vm}: was prepare run for this job?")
        return paths[0], paths[1], paths[2]

    def docker_cert_dir(self, vm: str) -> str:
        """The directory of the job's Docker client files, named as the docker CLI wants them
        (DOCKER_CERT_PATH); SystemFailure if they are missing."""
        self.docker_client_files(vm)
        return str(self.job_dir(vm) / DOCKER_DIR)

    def write_job_record(self, vm: str, name: str, value: Any) -> None:
        """A JSON file of the job's (e.g. what was restored into its VM), gone with the job."""
        self._write_private(vm, f"{name}.json", json.dumps(value))

    def read_job_record(self, vm: str, name: str) -> Any:
        """What `write_job_record` wrote; None if absent or unreadable."""
        return _read_json(self.job_dir(vm) / f"{name}.json")

    def read_client_key(self, vm: str) -> str:
        try:
            return (self.job_dir(vm) / CLIENT_KEY).read_text()
        except FileNotFoundError:
            raise SystemFailure(f"no SSH key for {vm}: was prepare run for this job?") from None

    def holder_file(self, vm: str, suffix: str) -> Path:
        """`<job dir>/holder.<suffix>`: the job's connection holder's sock, lock and log."""
        return self.job_dir(vm) / f"holder.{suffix}"

    def mark_lost(self, vm: str, reason: str) -> None:
        """Remember that the job's VM was found dead or silent (only while its job dir exists:
        after teardown there is no job left to tell)."""
        if self.job_dir(vm).is_dir():
            with contextlib.suppress(OSError):
                self._write_private(vm, LOST, reason)

    def lost_reason(self, vm: str) -> str | None:
        """Why the job's VM was found dead or silent earlier in its job; None if it was not."""
        try:
            return (self.job_dir(vm) / LOST).read_text() or None
        except OSError:
            return None

    def mark_removing(self, vm: str) -> None:
        """Cleanup stopped `vm` for good; the rest goes in the background (or through reap)."""
        if self.job_dir(vm).is_dir():
            self._write_private(vm, REMOVING, "")

    def removing_vms(self) -> list[str]:
        return [vm for vm in self.job_dir_vms() if (self.job_dir(vm) / REMOVING).exists()]

    def remove_job_dir(self, vm: str) -> bool:
        d = self.job_dir(vm)
        if not d.exists():
            return False
        shutil.rmtree(d)
        return True

    def job_dir_vms(self) -> list[str]:
        return sorted(p.name for p in self.jobs.iterdir()) if self.jobs.is_dir() else []

    # --- warm-pool claims: which pool VM serves which job ------------------------------------

    def write_claim(self, job_vm: str, vm: str) -> None:
        """Record that the job whose cold VM would be `job_vm` runs in the pool VM `vm`."""
        self.ensure()
        _write_atomic(self.claims_dir / job_vm, vm + "\n")

    def claimed_vm(self, job_vm: str) -> str | None:
        try:
            return (self.claims_dir / job_vm).read_text().strip() or None
        except FileNotFoundError:
            return None

    def claims(self) -> dict[str, str]:
        """job VM name -> the pool VM serving it, for every claim on disk."""
        return _names_in(self.claims_dir)

    def release_claims(self, vm: str) -> list[str]:
        """Remove the claims naming `vm` (the VM is gone); the job VM names they were for."""
        return _remove_naming(self.claims_dir, vm)

    # --- the host agent (per name prefix) ---------------------------------------------------

    def agent_file(self, prefix: str, suffix: str) -> Path:
        """`<state_dir>/agent/<prefix>.<suffix>`: lock, drained, status.json."""
        self.ensure()
        return self.agent_dir / f"{prefix}.{suffix}"

    def write_agent_file(self, prefix: str, suffix: str, text: str) -> bool:
        """Replace an agent file (0600) with `text` when it differs; whether it did."""
        path = self.agent_file(prefix, suffix)
        with contextlib.suppress(OSError):
            if path.read_text(encoding="utf-8") == text:
                return False
        _write_atomic(path, text)
        return True

    def write_agent_status(self, prefix: str, value: dict[str, Any]) -> None:
        _write_atomic(self.agent_file(prefix, "status.json"), json.dumps(value))

    def read_agent_status(self, prefix: str) -> dict[str, Any] | None:
        value = _read_json(self.agent_file(prefix, "status.json"))
        return value if isinstance(value, dict) else None

    def pool_drained(self, prefix: str) -> bool:
        return self.agent_file(prefix, "drained").exists()

    def set_pool_drained(self, prefix: str, drained: bool) -> bool:
        """Mark the pool drained (the keeper boots nothing) or not; whether that changed."""
        path = self.agent_file(prefix, "drained")
        if drained == path.exists():
            return False
        if drained:
            path.touch(mode=0o600)
        else:
            _unlink(path)
        return True

    # --- the Docker layer cache's lineages (jobvm.layercache) --------------------------------

    @property
    def docker_cache_dir(self) -> Path:
        self.ensure()
        d = self.root / "docker-cache"
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def docker_cache_lock(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        """Held while a head is read or replaced and while dead volumes are deleted: short."""
        return _held_flock(self.docker_cache_dir / "lock", timeout, "updating the Docker layer cache")

    @contextmanager
    def docker_cache_flattening(self) -> Iterator[bool]:
        """Non-blocking: True (and the lock held) if no process is flattening a head now."""
        fd = os.open(self.docker_cache_dir / "flatten.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            yield bool(_try_flock(fd))
        finally:
            os.close(fd)

    def read_lineages(self) -> dict[str, dict[str, Any]]:
        """lineage name -> its record (head, recipe, used, ...); unreadable records are left out."""
        found = {}
        for path in sorted(self.docker_cache_dir.glob("*.json")):
            value = _read_json(path)
            if isinstance(value, dict):
                found[path.name[: -len(".json")]] = value
        return found

    def write_lineage(self, name: str, value: dict[str, Any]) -> None:
        _write_atomic(self.docker_cache_dir / f"{name}.json", json.dumps(value))

    def remove_lineage(self, name: str) -> None:
        _unlink(self.docker_cache_dir / f"{name}.json")

    # --- the runner binary's volumes (shared by all jobs) ---------------------------------

    @property
    def runner_dir(self) -> Path:
        """0700: the binary's hash memo, the volumes' records, scratch space for building one."""
        self.ensure()
        d = self.root / "runner"
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def runner_lock(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        """Serialise making runner volumes (one prepare builds, the others wait and reuse)."""
        return _held_flock(self.runner_dir / "volume.lock", timeout, "making the runner volume")

    def admission_lock(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        """Serialise admission checks with the disk creation that follows them: otherwise two
        prepares could both find room for one more disk before either disk exists."""
        self.ensure()
        return _held_flock(self.root / "admission.lock", timeout, "checking the host's room for a VM")

    def read_runner_record(self, name: str) -> dict[str, Any] | None:
        """A JSON record in the runner dir (the hash memo, a volume's), None if absent or bad."""
        value = _read_json(self.runner_dir / f"{name}.json")
        return value if isinstance(value, dict) else None

    def write_runner_record(self, name: str, value: dict[str, Any]) -> None:
        _write_atomic(self.runner_dir / f"{name}.json", json.dumps(value))

    def remove_runner_record(self, name: str) -> None:
        _unlink(self.runner_dir / f"{name}.json")


@contextmanager
def _held_flock(path: Path, timeout: float, what: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if not poll(functools.partial(_try_flock, fd), timeout, interval=0.2, max_interval=1.0):
            raise SystemFailure(f"another prepare has been {what} for more than {timeout:.0f} s")
        yield
    finally:
        os.close(fd)


def _names_in(directory: Path) -> dict[str, str]:
    """file name -> the VM name it holds, for a directory of such files (IP reservations,
    claims); files being written (dot files) are left out."""
    found: dict[str, str] = {}
    if not directory.is_dir():
        return found
    for p in directory.iterdir():
        if p.name.startswith("."):
            continue
        try:
            found[p.name] = p.read_text().strip()
        except FileNotFoundError:
            continue
    return found


def _remove_naming(directory: Path, vm: str) -> list[str]:
    """Remove the files of `directory` that hold `vm`; their names, sorted."""
    removed = sorted(name for name, owner in _names_in(directory).items() if owner == vm)
    for name in removed:
        _unlink(directory / name)
    return removed


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` by a complete new file (0600): readers see the old or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    """A JSON file's value; None if it is absent or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _try_flock(fd: int) -> bool | None:
    """Take the exclusive flock on `fd` if it is free; None if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
