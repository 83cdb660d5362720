"""The host side of `[cache] mode = "host"`: archives kept per project, replaced atomically.

Layout under `cache.dir` (0700, root): `<project id>/<entry>.zip` and `<entry>.json` (the path in
the VM, size, mtime). The `.zip` file's own mtime says when it was last used; `.json` is written
after the `.zip` is in place, so an entry without both files is a half-written one: it is ignored,
and replaced when the same path is stored again. One flock (`.lock`) covers storing and evicting.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from executor.core.hostcache import StoredArchive, entry_name


class CacheStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _project_dir(self, project_id: int) -> Path:
        return self.root / str(int(project_id))

    def ensure(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.ensure()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def archives(self, project_id: int | None = None) -> list[StoredArchive]:
        """The complete entries of one project, or of all projects."""
        if project_id is not None:
            dirs = [self._project_dir(project_id)]
        else:
            dirs = [d for d in self.root.iterdir() if d.name.isdigit()] if self.root.is_dir() else []
        found = []
        for d in dirs:
            for meta in d.glob("*.json") if d.is_dir() else ():
                archive = _read_entry(int(d.name), meta)
                if archive is not None:
                    found.append(archive)
        return found

    def open_archive(self, archive: StoredArchive) -> BinaryIO:
        return (self._project_dir(archive.project_id) / f"{archive.entry}.zip").open("rb")

    def mark_used(self, archive: StoredArchive) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._project_dir(archive.project_id) / f"{archive.entry}.zip")

    @contextlib.contextmanager
    def receiving(self, project_id: int) -> Iterator[tuple[BinaryIO, Path]]:
        """A temp file in the project's directory to receive an archive into; removed on exit
        unless `store` renamed it into place."""
        d = self._project_dir(project_id)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=d, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f, Path(name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def store(self, project_id: int, path: str, size: int, mtime: int, received: Path) -> StoredArchive:
        """Put a received archive in place of the project's entry for `path` (atomic: a reader
        sees the old or the new one). Call with the lock held."""
        d = self._project_dir(project_id)
        entry = entry_name(path)
        meta = d / f"{entry}.json"
        with contextlib.suppress(FileNotFoundError):
            meta.unlink()  # until the new .json exists the entry is incomplete, never mismatched
        os.replace(received, d / f"{entry}.zip")
        _write_atomic(meta, json.dumps({"path": path, "size": size, "mtime": mtime}).encode())
        return StoredArchive(project_id, entry, path, size, mtime, time.time())

    def delete(self, archive: StoredArchive) -> None:
        d = self._project_dir(archive.project_id)
        for suffix in (".json", ".zip"):
            with contextlib.suppress(FileNotFoundError):
                (d / f"{archive.entry}{suffix}").unlink()


def _read_entry(project_id: int, meta: Path) -> StoredArchive | None:
    data = meta.with_suffix(".zip")
    try:
        fields = json.loads(meta.read_text(encoding="utf-8"))
        st = data.stat()
    except (OSError, ValueError):
        return None
    path, size, mtime = fields.get("path"), fields.get("size"), fields.get("mtime")
    if not isinstance(path, str) or not isinstance(size, int) or not isinstance(mtime, int) or st.st_size != size:
        return None
    return StoredArchive(project_id, meta.stem, path, size, mtime, st.st_mtime)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".meta-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
