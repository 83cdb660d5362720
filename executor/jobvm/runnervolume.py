"""The host's gitlab-runner binary as a read-only volume for job VMs (core.runnerbinary).

One volume per binary hash, made by the first prepare that needs it and reused by every later
one. The binary's hash is remembered per path with its (inode, size, mtime), so a prepare
re-reads the binary only after it was replaced. Volumes of replaced binaries are deleted once
no job can still be using them (superseded longer ago than the longest VM lifetime).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from executor.adapters.hypervisor import Hypervisor
from executor.adapters.seed_iso import build_file_iso
from executor.adapters.statedir import StateDir
from executor.core import runnerbinary
from executor.core.domain_xml import build_raw_volume
from executor.core.settings import Settings
from executor.errors import ConfigError, SystemFailure

log = logging.getLogger(__name__)

LOCK_WAIT_S = 300.0  # another prepare building the volume (hash, ISO, upload of ~100 MB)


@dataclass(frozen=True)
class RunnerBinary:
    path: Path
    sha256: str
    size: int


def find_binary(settings: Settings) -> Path | None:
    """`runner.binary` (ConfigError if set but unusable), else `gitlab-runner` on PATH, else None."""
    if settings.runner.binary:
        path = Path(settings.runner.binary)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ConfigError(f"runner.binary: {path} is not an executable file")
        return path
    found = shutil.which(runnerbinary.BINARY_NAME)
    return Path(found).resolve() if found else None


def host_binary(settings: Settings, state: StateDir) -> RunnerBinary | None:
    """The binary jobs get, with its hash; None if the host has none."""
    path = find_binary(settings)
    if path is None:
        return None
    st = path.stat()
    identity = {"path": str(path), "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo_name = "binary-" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    memo = state.read_runner_record(memo_name)
    if memo is not None and {k: memo.get(k) for k in identity} == identity and isinstance(memo.get("sha256"), str):
        return RunnerBinary(path, memo["sha256"], st.st_size)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    state.write_runner_record(memo_name, {**identity, "sha256": digest.hexdigest()})
    return RunnerBinary(path, digest.hexdigest(), st.st_size)


def ensure_volume(hv: Hypervisor, settings: Settings, state: StateDir, binary: RunnerBinary) -> str:
    """The path of the binary's volume in the pool, made now if it does not exist yet."""
    pool = settings.libvirt.pool
    name = runnerbinary.volume_name(settings.vm.name_prefix, binary.sha256)
    path = hv.volume_path(pool, name)
    if path is not None and state.read_runner_record(name) is not None:
        return path
    with state.runner_lock(LOCK_WAIT_S):
        path = hv.volume_path(pool, name)
        if path is not None and state.read_runner_record(name) is not None:
            return path  # made by the prepare we waited for
        if path is not None:  # a half-made one: its maker died before recording it
            hv.delete_volume(pool, name)
        started = time.monotonic()
        path = _make_volume(hv, pool, name, binary, state.runner_dir)
        state.write_runner_record(name, {"sha256": binary.sha256, "source": str(binary.path), "superseded": None})
        log.info("made %s from %s in %.1fs", name, binary.path, time.monotonic() - started)
        _retire_others(hv, settings, state, name)
    return path


def _make_volume(hv: Hypervisor, pool: str, name: str, binary: RunnerBinary, scratch: Path) -> str:
    with tempfile.TemporaryFile(dir=scratch) as iso:
        build_file_iso(runnerbinary.ISO_LABEL, [(runnerbinary.BINARY_NAME, binary.path, 0o555)], iso)
        size = iso.tell()
        iso.seek(0)
        path = hv.create_volume(pool, build_raw_volume(name, size))
        try:
            hv.upload_volume(pool, name, iso, size)
        except BaseException:
            hv.delete_volume(pool, name)
            raise
    return path


def _retire_others(hv: Hypervisor, settings: Settings, state: StateDir, current: str) -> None:
    """Mark the other runner volumes superseded; delete those superseded longer ago than any
    job VM may live (a job prepared just before the binary changed still has its volume)."""
    now = time.time()
    for name in hv.volume_names(settings.libvirt.pool):
        if name == current or not runnerbinary.is_volume_name(settings.vm.name_prefix, name):
            continue
        record = state.read_runner_record(name) or {}
        superseded = record.get("superseded")
        if not isinstance(superseded, (int, float)):
            state.write_runner_record(name, {**record, "superseded": now})
        elif now - superseded > settings.timeouts.max_lifetime:
            try:
                hv.delete_volume(settings.libvirt.pool, name)
                state.remove_runner_record(name)
            except SystemFailure as exc:
                log.warning("could not delete the old runner volume %s: %s", name, exc)
