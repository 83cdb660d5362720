"""`libvirt-executor image build`: debootstrap rootfs -> ext4 (mkfs -d, no mounts) -> qcow2.

Output directory (default /var/lib/libvirt-executor/image)::

    disk.qcow2     read-only base disk (0644: qemu reads it as a backing file)
    vmlinuz        kernel of the image (direct kernel boot)
    initrd.img     tiny busybox initramfs: loads virtio_pci/virtio_blk, mounts /dev/vda
    manifest.json  what the executor needs to boot it (see docs/image.md)

The recipe is everything under ``images/``; its hash plus the hashes of the preload tarballs
decide whether a rebuild is needed. The build happens in a temporary directory beside the output
and is renamed into place only when complete. The steps are public: the boot benchmark builds
its stock-Debian baseline with them (benchmarks/baseline_image.py).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from executor.adapters import hosttools
from executor.core import imagerecipe as recipe
from executor.errors import ConfigError, ImageBuildError

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path("/var/lib/libvirt-executor/image")
RECIPE_DIR = Path(__file__).resolve().parent.parent.parent / "images"
ROOTFS_SCRIPT = "build-rootfs.sh"


def build_image(
    output_dir: Path = DEFAULT_OUTPUT,
    preloads: Sequence[Path] = (),
    force: bool = False,
    *,
    recipe_dir: Path | None = None,
    mirror: str | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the base image in ``output_dir`` and return its manifest."""
    output_dir = Path(output_dir).absolute()
    recipe_root = Path(recipe_dir or RECIPE_DIR)
    preloads = [Path(p).absolute() for p in preloads]
    script = recipe_root / ROOTFS_SCRIPT
    if not script.is_file():
        raise ConfigError(f"image recipe not found: {script}")
    for p in preloads:
        if not p.is_file():
            raise ConfigError(f"preload tarball not found: {p}")
    rhash = recipe.recipe_hash(recipe_files(recipe_root), [hosttools.sha256_file(p) for p in preloads])
    existing = read_manifest(output_dir)
    if existing and existing.get("recipe_hash") == rhash and not force:
        log.info("image in %s is up to date (recipe %s)", output_dir, rhash[:12])
        return existing

    mirror = prepare_host(mirror)
    with build_workspace(output_dir) as tmp:
        started = time.monotonic()
        rootfs = tmp / "rootfs"
        log.info("building base image (recipe %s) from %s in %s", rhash[:12], mirror, tmp)
        args = recipe.rootfs_script_args(str(rootfs), mirror, str(deb_cache(output_dir)))
        hosttools.run_tool(["bash", script, *args], what=ROOTFS_SCRIPT)
        log.info("rootfs ready after %.0f s", time.monotonic() - started)
        kver = kernel_version(rootfs)
        out = tmp / "out"
        out.mkdir()
        take_kernel(rootfs, kver, out)
        (out / "initrd.img").write_bytes(build_initrd(rootfs, kver, recipe_root / "initrd-init"))
        preloaded = copy_preloads(rootfs, preloads)
        packages = hosttools.installed_packages(rootfs)
        make_disk(rootfs, tmp, out)
        manifest = base_manifest(rhash, kver, mirror, packages, out, started)
        manifest.update(
            cmdline=recipe.CMDLINE,
            user=recipe.JOB_USER,
            builds_dir=recipe.BUILDS_DIR,
            cache_dir=recipe.CACHE_DIR,
            seed_device="/dev/vdb",
            seed_format=1,
            readiness=recipe.READINESS_LINES,
            preloads=preloaded,
        )
        install_output(out, output_dir, tmp, manifest)
    return manifest


def prepare_host(mirror: str | None) -> str:
    """Check that the build can run here (root, the tools); the Debian mirror to use."""
    if os.geteuid() != 0:
        raise ConfigError("building the base image needs root (debootstrap, chroot, device nodes)")
    hosttools.ensure_tools()
    return mirror or recipe.debian_mirror(hosttools.apt_sources())


def recipe_files(recipe_dir: Path) -> list[recipe.RecipeFile]:
    return [
        recipe.RecipeFile(
            path.relative_to(recipe_dir).as_posix(), os.access(path, os.X_OK), hosttools.sha256_file(path)
        )
        for path in sorted(recipe_dir.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    ]


def deb_cache(output_dir: Path) -> Path:
    """debootstrap's .deb cache beside the real image (the baseline shares it: same packages)."""
    return output_dir.parent / f".{DEFAULT_OUTPUT.name}.debcache"


@contextmanager
def build_workspace(output_dir: Path) -> Iterator[Path]:
    """A temporary directory beside `output_dir` (same filesystem: the result is renamed in),
    removed afterwards whatever happened."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.build-", dir=output_dir.parent))
    try:
        yield tmp
    finally:
        hosttools.safe_rmtree(tmp)


def kernel_version(rootfs: Path) -> str:
    kvers = sorted(p.name for p in (rootfs / "lib/modules").iterdir())
    if len(kvers) != 1:
        raise ImageBuildError(f"expected one kernel in the rootfs, found {kvers}")
    return kvers[0]


def take_kernel(rootfs: Path, kver: str, out: Path) -> None:
    """Move the kernel out of the rootfs (direct kernel boot: the disk needs none)."""
    shutil.copyfile(rootfs / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
    for f in (rootfs / "boot").glob("vmlinuz*"):
        f.unlink()


def build_initrd(rootfs: Path, kver: str, init_script: Path) -> bytes:
    moddir = rootfs / "lib/modules" / kver
    builtin = moddir / "modules.builtin"
    order = recipe.module_order(
        (moddir / "modules.dep").read_text(), recipe.INITRD_MODULES, builtin.read_text() if builtin.exists() else ""
    )
    modules = [(Path(mod).name, (moddir / mod).read_bytes()) for mod in order]
    return recipe.initrd_archive((rootfs / "bin/busybox").read_bytes(), init_script.read_bytes(), modules)


def copy_preloads(rootfs: Path, preloads: Sequence[Path]) -> list[dict[str, str]]:
    """Put the preload tarballs where the image's init loads them into dockerd."""
    copied = []
    if preloads:
        dest = rootfs / recipe.PRELOAD_DIR_IN_IMAGE
        dest.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(preloads):
            name = recipe.preload_file_name(i, p.name)
            shutil.copyfile(p, dest / name)
            os.chmod(dest / name, 0o600)
            copied.append({"file": name, "source": p.name, "sha256": hosttools.sha256_file(p)})
        log.info("preloads copied: %s", ", ".join(c["file"] for c in copied))
    return copied


def make_disk(rootfs: Path, tmp: Path, out: Path) -> None:
    """rootfs -> sparse ext4 -> compressed qcow2 in `out`; the rootfs is removed on the way."""
    log.info("making ext4 filesystem (%d GiB virtual, sparse)", recipe.DISK_VIRTUAL_BYTES // 1024**3)
    raw = tmp / "disk.raw"
    hosttools.ext4_image(rootfs, raw, recipe.DISK_VIRTUAL_BYTES)
    hosttools.safe_rmtree(rootfs)
    log.info("converting to compressed qcow2")
    hosttools.compressed_qcow2(raw, out / "disk.qcow2")
    raw.unlink()


def base_manifest(
    rhash: str, kver: str, mirror: str, packages: dict[str, str], out: Path, started: float
) -> dict[str, Any]:
    """The manifest fields every image has (the caller adds how to boot it)."""
    info = hosttools.qemu_img_info(out / "disk.qcow2")
    return {
        "format": recipe.MANIFEST_FORMAT,
        "recipe_hash": rhash,
        "built_at": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
        "kernel": "vmlinuz",
        "initrd": "initrd.img",
        "disk": "disk.qcow2",
        "disk_format": "qcow2",
        "kernel_version": kver,
        "suite": recipe.SUITE,
        "mirror": mirror,
        "packages": packages,
        "sizes": {
            "disk_bytes": (out / "disk.qcow2").stat().st_size,
            "virtual_bytes": int(info["virtual-size"]),
            "kernel_bytes": (out / "vmlinuz").stat().st_size,
            "initrd_bytes": (out / "initrd.img").stat().st_size,
        },
        "build_seconds": round(time.monotonic() - started, 1),
    }


def install_output(out: Path, output_dir: Path, tmp: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest and swap `out` into place: two renames (a directory cannot atomically
    replace a non-empty one), so readers see the old complete image or the new one, never a
    partial one."""
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        os.chmod(out / name, 0o644)
    (out / recipe.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    os.chmod(out / recipe.MANIFEST, 0o644)
    os.chmod(out, 0o755)
    if output_dir.exists():
        os.rename(output_dir, tmp / "previous")
    os.rename(out, output_dir)
    log.info(
        "image built in %.0f s: %s (%.0f MiB on disk, %d GiB virtual)",
        manifest["build_seconds"],
        output_dir,
        manifest["sizes"]["disk_bytes"] / 2**20,
        manifest["sizes"]["virtual_bytes"] // 1024**3,
    )


def read_manifest(output_dir: Path, required: Sequence[str] = ("disk", "kernel", "initrd")) -> dict[str, Any] | None:
    """The manifest of a complete image in `output_dir`, None if there is none."""
    try:
        manifest = json.loads((output_dir / recipe.MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    for key in required:
        if not isinstance(manifest.get(key), str) or not (output_dir / manifest[key]).is_file():
            return None
    return manifest
