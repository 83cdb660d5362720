"""Host tools the image build runs (debootstrap, chroot, mkfs.ext4, qemu-img, dpkg-query, apt)
and the build directory's filesystem chores. The only place that starts host processes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from executor.errors import ConfigError, ImageBuildError

log = logging.getLogger(__name__)

# tool -> the Debian package that has it
REQUIRED_TOOLS = {
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "qemu-img": "qemu-utils",
    "chroot": "coreutils",
}
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")


def run_tool(
    argv: Sequence[str | Path], *, what: str, capture: bool = False, env: Mapping[str, str] | None = None
) -> str:
    """Run a host tool; ImageBuildError with the last lines of its stderr if it fails."""
    log.debug("run: %s", " ".join(map(str, argv)))
    try:
        proc = subprocess.run(
            [str(a) for a in argv],
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else None,
        )
    except OSError as exc:
        raise ImageBuildError(f"{what}: cannot start {argv[0]}: {exc.strerror}") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout if capture else ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def apt_sources() -> list[tuple[str, str]]:
    """(file name, text) of every apt source file, in apt's order; unreadable ones skipped."""
    paths = [APT_SOURCES]
    if APT_SOURCES_DIR.is_dir():
        paths += sorted(APT_SOURCES_DIR.glob("*.list")) + sorted(APT_SOURCES_DIR.glob("*.sources"))
    sources = []
    for path in paths:
        try:
            sources.append((path.name, path.read_text(encoding="utf-8", errors="replace")))
        except OSError:
            continue
    return sources


def ensure_tools() -> None:
    """Install the Debian packages of missing build tools (apt-get), or say which are missing."""
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise ConfigError(f"missing host packages: {' '.join(missing)}")
    log.info("installing missing host packages: %s", " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run_tool(["apt-get", "install", "-y", "--no-install-recommends", *missing], what="apt-get install", env=env)


def installed_packages(rootfs: Path) -> dict[str, str]:
    """name -> version of every package installed in `rootfs`."""
    out = run_tool(
        [
            "dpkg-query",
            f"--admindir={rootfs}/var/lib/dpkg",
            "-W",
            "-f",
            "${Package}\t${Version}\t${db:Status-Status}\n",
        ],
        what="dpkg-query",
        capture=True,
    )
    packages = {}
    for line in out.splitlines():
        name, version, status = ([*line.split("\t"), "", ""])[:3]
        if status == "installed":
            packages[name] = version
    return dict(sorted(packages.items()))


def qemu_img_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(
        run_tool(["qemu-img", "info", "--output=json", path], what="qemu-img info", capture=True)
    )
    return info


def ext4_image(rootfs: Path, raw: Path, virtual_bytes: int) -> None:
    """A sparse raw ext4 image of `virtual_bytes` filled from `rootfs` (mkfs -d: no mounts)."""
    with raw.open("wb") as f:
        f.truncate(virtual_bytes)
    run_tool(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "lvxroot",
            "-d",
            rootfs,
            "-m",
            "0",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            raw,
        ],
        what="mkfs.ext4",
    )


def compressed_qcow2(raw: Path, qcow2: Path) -> None:
    run_tool(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            "-o",
            "compression_type=zlib,cluster_size=65536",
            raw,
            qcow2,
        ],
        what="qemu-img convert",
    )


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    mounts = []
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            mnt = line.split()[1].replace("\\040", " ")
            if mnt.startswith(prefix):
                mounts.append(mnt)
    except OSError:
        pass
    return sorted(mounts, key=len, reverse=True)


def safe_rmtree(path: Path) -> None:
    """Remove a build dir, but never recurse into something still mounted inside it."""
    if not path.exists():
        return
    for mnt in _mounts_under(path):
        subprocess.run(["umount", "-l", mnt], check=False)
    if _mounts_under(path):
        raise ImageBuildError(f"refusing to delete {path}: filesystems are still mounted inside it")
    shutil.rmtree(path, ignore_errors=True)
