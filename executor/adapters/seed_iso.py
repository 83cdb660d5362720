"""The only module that imports pycdlib: ISO9660 images, the seed disk (built in memory) and
the runner binary's volume (streamed from and to files).

Rock Ridge and Joliet carry the real file names and modes; the level-1 (8.3) names are only
what ISO9660 itself insists on. What goes into the files is decided in ``core.seedspec``.
"""

from __future__ import annotations

import io
import re
import stat
from pathlib import Path
from typing import BinaryIO

import pycdlib

from executor.core.seedspec import VOLUME_LABEL, SeedSpec, seed_files


def _iso9660_name(name: str, used: set[str]) -> str:
    """A unique level-1 (8.3, upper case) ISO9660 name; the real name lives in Rock Ridge/Joliet."""
    stem, _, ext = name.partition(".")

    def clean(s: str) -> str:
        return re.sub(r"[^A-Z0-9_]", "_", s.upper())

    stem, ext = clean(stem)[:8] or "F", clean(ext)[:3]
    candidate = stem
    n = 0
    while (candidate, ext) in {tuple(u.split(".", 1)) for u in used}:
        n += 1
        candidate = stem[: 8 - len(str(n))] + str(n)
    used.add(f"{candidate}.{ext}")
    return f"{candidate}.{ext};1"


def build_seed_iso(spec: SeedSpec) -> bytes:
    """Render ``spec`` into a NoCloud ``cidata`` ISO9660 image (Rock Ridge + Joliet)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=VOLUME_LABEL, rock_ridge="1.09", joliet=3)
    dirs: dict[str, str] = {"": ""}
    used: dict[str, set[str]] = {"": set()}
    try:
        for path, content, mode in seed_files(spec):
            parent, _, name = path.rpartition("/")
            if parent not in dirs:
                iso_dir = dirs[""] + "/" + re.sub(r"[^A-Z0-9_]", "_", parent.upper())[:8]
                iso.add_directory(iso_dir, rr_name=parent, joliet_path="/" + parent, file_mode=stat.S_IFDIR | 0o555)
                dirs[parent] = iso_dir
                used[parent] = set()
            iso_path = dirs[parent] + "/" + _iso9660_name(name, used[parent])
            iso.add_fp(
                io.BytesIO(content),
                len(content),
                iso_path=iso_path,
                rr_name=name,
                joliet_path="/" + path,
                file_mode=stat.S_IFREG | mode,
            )
        out = io.BytesIO()
        iso.write_fp(out)
    finally:
        iso.close()
    return out.getvalue()


def build_file_iso(label: str, files: list[tuple[str, Path, int]], dest: BinaryIO) -> None:
    """Write an ISO9660 image (Rock Ridge) of `files` = (name in the root, host path, mode) to
    `dest`, reading each file as it goes (a runner binary is ~100 MB)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=label, rock_ridge="1.09")
    used: set[str] = set()
    sources = [path.open("rb") for _, path, _ in files]
    try:
        for (name, path, mode), source in zip(files, sources, strict=True):
            iso.add_fp(
                source,
                path.stat().st_size,
                iso_path="/" + _iso9660_name(name, used),
                rr_name=name,
                file_mode=stat.S_IFREG | mode,
            )
        iso.write_fp(dest)
    finally:
        iso.close()
        for source in sources:
            source.close()
