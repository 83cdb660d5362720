"""Facts about the base image and the pure parts of building it.

The job user, the builds and cache dirs, the suite, the kernel command line: the image recipe
(`images/build-rootfs.sh` gets them as arguments), the manifest and the config defaults all take
them from here, so the image and the executor cannot disagree about them.
Also here: the initrd's cpio writer, the kernel-module order, the recipe hash and reading the
host's apt sources, each over values the caller has read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from executor.errors import ConfigError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Debian 13: docker.io 26.1 (bookworm's 20.10 is end-of-life upstream and too old for today's
# docker:*-cli images and buildx). Built from the mirror the host's apt uses for its own suite.
SUITE = "trixie"
DISK_VIRTUAL_BYTES = 20 * 1024**3
JOB_USER = "runner"
BUILDS_DIR = "/builds"
CACHE_DIR = "/cache"
INIT = "/sbin/lvx-init"
# Direct kernel boot command line. apparmor=0: docker.io's AppArmor profile loading needs the
# apparmor userspace, which we do not ship (see docs/image.md). mitigations=off: the VM is the
# isolation boundary and belongs to one job; in-guest Spectre mitigations only slow TCG down.
CMDLINE = (
    f"root=/dev/vda rootfstype=ext4 rw console=ttyS0,115200 init={INIT} apparmor=0 "
    "mitigations=off quiet loglevel=4 nowatchdog 8250.nr_uarts=1 cryptomgr.notests "
    "random.trust_cpu=on"
)
INITRD_MODULES = ("virtio_pci", "virtio_blk")
PRELOAD_DIR_IN_IMAGE = "var/lib/lvx/preload"
READINESS_LINES = {
    "ssh": "lvx-init: ssh ready",
    "docker": "lvx-init: docker ready",
    "preload": "lvx-init: preload done",
}


QCOW2_MAGIC = b"QFI\xfb"


def parse_qcow2_header(header: bytes, name: str) -> tuple[int, bool]:
    """(virtual size, has a backing file) from a qcow2 image's first 32 bytes."""
    if len(header) < 32 or header[:4] != QCOW2_MAGIC:
        raise ValueError(f"{name} is not a qcow2 image")
    backing_offset = int.from_bytes(header[8:16], "big")
    return int.from_bytes(header[24:32], "big"), backing_offset != 0


def rootfs_script_args(rootfs: str, mirror: str, deb_cache: str) -> list[str]:
    """The arguments of `images/build-rootfs.sh`, in its order."""
    return [rootfs, mirror, deb_cache, SUITE, JOB_USER, BUILDS_DIR, CACHE_DIR]


@dataclass(frozen=True)
class RecipeFile:
    path: str  # relative to the recipe directory, '/'-separated
    executable: bool
    sha256: str


def recipe_hash(files: Iterable[RecipeFile], preload_sha256s: Iterable[str] = ()) -> str:
    """One hash over every recipe file (path, exec bit, content), the facts above that the recipe
    is built with, and every preload tarball: the image is rebuilt exactly when one changes."""
    h = hashlib.sha256(f"lvx-image-format-{MANIFEST_FORMAT}\n".encode())
    for fact in (SUITE, JOB_USER, BUILDS_DIR, CACHE_DIR, CMDLINE, *INITRD_MODULES):
        h.update(f"fact {fact}\n".encode())
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"file {f.path} {int(f.executable)} {f.sha256}\n".encode())
    for digest in preload_sha256s:
        h.update(f"preload {digest}\n".encode())
    return h.hexdigest()


def preload_file_name(index: int, source_name: str) -> str:
    """The name a preload tarball gets inside the image: ordered, harmless, ending in .tar."""
    name = f"{index:02d}-{re.sub(r'[^A-Za-z0-9._-]', '_', source_name)}"
    return name if name.endswith(".tar") else name + ".tar"


# ------------------------------------------------------------------ apt sources


def _release_suite(suite: str) -> bool:
    """A release (bookworm, trixie, stable, ...), not -updates, -security or -backports."""
    return bool(suite) and "-" not in suite and "/" not in suite


def _deb822_mirror(text: str) -> str | None:
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
            continue
        suites = fields.get("suites", "").split()
        if any(_release_suite(s) for s in suites) and "main" in fields.get("components", "").split():
            uris = fields.get("uris", "").split()
            if uris:
                return uris[0].rstrip("/")
    return None


def _one_line_mirror(text: str) -> str | None:
    for line in text.splitlines():
        m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line)
        if m and _release_suite(m.group(2)) and "main" in m.group(3).split():
            return m.group(1).rstrip("/")
    return None


def debian_mirror(sources: Iterable[tuple[str, str]]) -> str:
    """The mirror of the host's first apt source for a Debian release's main component (not
    -updates or -security); `sources` are (file name, text) pairs in apt's order, one-line
    (`.list`) or deb822 (`.sources`) format. The image's suite comes from the same mirror."""
    for name, text in sources:
        parse = _deb822_mirror if name.endswith(".sources") else _one_line_mirror
        mirror = parse(text)
        if mirror:
            return mirror
    raise ConfigError(
        "no Debian release 'main' apt source found in /etc/apt/sources.list(.d); "
        f"configure one so debootstrap can build {SUITE} from the same mirror"
    )


# ------------------------------------------------------------------ initrd (newc cpio, gzip)


class Cpio:
    """An in-memory cpio archive in the kernel's initramfs ("newc") format."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _pad(self) -> None:
        self.buf.write(b"\0" * ((4 - self.buf.tell() % 4) % 4))

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        name_b = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
        self.ino += 1
        self.buf.write(("070701" + "".join(f"{v:08x}" for v in fields)).encode() + name_b)
        self._pad()
        self.buf.write(data)
        self._pad()

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def module_order(modules_dep: str, wanted: Sequence[str], builtin: str = "") -> list[str]:
    """Module files (paths as in `modules.dep`) for `wanted` and their dependencies, each after
    what it depends on, so the initrd can insmod them in this order. A module the kernel has
    built in (`modules.builtin`) needs no file."""
    built_in = {PurePosixPath(m).name.split(".ko")[0].replace("-", "_") for m in builtin.split()}
    deps: dict[str, list[str]] = {}
    for line in modules_dep.splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {PurePosixPath(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in reversed(deps.get(mod, [])):  # modules.dep lists the deepest dependency last
            visit(dep)
        order.append(mod)

    for name in wanted:
        if name in built_in:
            continue
        if name not in by_name:
            raise ConfigError(f"kernel module {name} is not in the image's modules.dep")
        visit(by_name[name])
    return order


def initrd_archive(busybox: bytes, init_script: bytes, modules: Sequence[tuple[str, bytes]]) -> bytes:
    """The tiny initrd: busybox, our /init, and the modules in load order (name, content)."""
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "root", "modules"):
        cpio.dir(d)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init_script, 0o755)
    for name, content in modules:
        cpio.file(f"modules/{name}", content)
    cpio.file("modules/order", "".join(name + "\n" for name, _ in modules).encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)
