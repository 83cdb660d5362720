"""executor.admin.imagebuild: the build steps that need no root, on tmp directories."""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import pytest

from executor.admin import imagebuild
from executor.core import imagerecipe
from executor.errors import ConfigError
from tests.unit.core.test_imagerecipe import cpio_entries


def fake_rootfs(root, kver="6.1.0-test"):
    moddir = root / "lib/modules" / kver
    (moddir / "kernel/drivers/virtio").mkdir(parents=True)
    (moddir / "kernel/drivers/block").mkdir(parents=True)
    for name, data in (
        ("virtio/virtio.ko", b"V"),
        ("virtio/virtio_ring.ko", b"R"),
        ("virtio/virtio_pci.ko", b"P"),
        ("block/virtio_blk.ko", b"B"),
    ):
        (moddir / "kernel/drivers" / name).write_bytes(data)
    (moddir / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio.ko:\n"
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n"
    )
    (root / "bin").mkdir()
    (root / "bin/busybox").write_bytes(b"BUSYBOX")
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{kver}").write_bytes(b"KERNEL")
    return kver


def test_build_initrd_takes_the_rootfs_busybox_and_the_virtio_modules(tmp_path):
    kver = fake_rootfs(tmp_path / "rootfs")
    init = tmp_path / "initrd-init"
    init.write_text("#!/bin/sh\necho init\n")
    entries = cpio_entries(gzip.decompress(imagebuild.build_initrd(tmp_path / "rootfs", kver, init)))
    assert entries["bin/busybox"][1] == b"BUSYBOX" and entries["init"][1] == init.read_bytes()
    assert entries["modules/order"][1] == b"virtio.ko\nvirtio_ring.ko\nvirtio_pci.ko\nvirtio_blk.ko\n"


def test_kernel_is_taken_out_of_the_rootfs(tmp_path):
    kver = fake_rootfs(tmp_path / "rootfs")
    (tmp_path / "out").mkdir()
    assert imagebuild.kernel_version(tmp_path / "rootfs") == kver
    imagebuild.take_kernel(tmp_path / "rootfs", kver, tmp_path / "out")
    assert (tmp_path / "out/vmlinuz").read_bytes() == b"KERNEL"
    assert list((tmp_path / "rootfs/boot").iterdir()) == []


def test_preloads_are_copied_under_safe_names_with_their_hash(tmp_path):
    (tmp_path / "rootfs").mkdir()
    tarball = tmp_path / "my image;x"
    tarball.write_bytes(b"tar bytes")
    copied = imagebuild.copy_preloads(tmp_path / "rootfs", [tarball])
    digest = hashlib.sha256(b"tar bytes").hexdigest()
    assert copied == [{"file": "00-my_image_x.tar", "source": "my image;x", "sha256": digest}]
    dest = tmp_path / "rootfs" / imagerecipe.PRELOAD_DIR_IN_IMAGE / "00-my_image_x.tar"
    assert dest.read_bytes() == b"tar bytes" and (os.stat(dest).st_mode & 0o777) == 0o600


def test_recipe_files_cover_every_file_with_its_exec_bit(tmp_path):
    (tmp_path / "rootfs/etc").mkdir(parents=True)
    (tmp_path / "build.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "build.sh", 0o755)
    (tmp_path / "rootfs/etc/conf").write_text("x\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__/junk.pyc").write_bytes(b"")
    files = {f.path: f.executable for f in imagebuild.recipe_files(tmp_path)}
    assert files == {"build.sh": True, "rootfs/etc/conf": False}


def test_an_up_to_date_image_is_reused_without_building(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    (recipe_dir / "build-rootfs.sh").write_text("exit 1\n")
    out = tmp_path / "image"
    out.mkdir()
    for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
        (out / name).write_bytes(b"x")
    rhash = imagerecipe.recipe_hash(imagebuild.recipe_files(recipe_dir))
    manifest = {"recipe_hash": rhash, "disk": "disk.qcow2", "kernel": "vmlinuz", "initrd": "initrd.img"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(imagebuild, "prepare_host", lambda mirror: pytest.fail("must not build"))
    assert imagebuild.build_image(out, recipe_dir=recipe_dir) == manifest

    class RebuildStarted(Exception):
        pass

    def start_rebuild(mirror):
        raise RebuildStarted

    (recipe_dir / "build-rootfs.sh").write_text("exit 2\n")  # the recipe changed: a rebuild is due
    monkeypatch.setattr(imagebuild, "prepare_host", start_rebuild)
    with pytest.raises(RebuildStarted):
        imagebuild.build_image(out, recipe_dir=recipe_dir)


def test_missing_recipe_or_preload_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="image recipe not found"):
        imagebuild.build_image(tmp_path / "out", recipe_dir=tmp_path)
    (tmp_path / "build-rootfs.sh").write_text("")
    with pytest.raises(ConfigError, match="preload tarball not found"):
        imagebuild.build_image(tmp_path / "out", [tmp_path / "absent.tar"], recipe_dir=tmp_path)


def test_read_manifest_needs_every_file_it_names(tmp_path):
    assert imagebuild.read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text('{"disk": "d", "kernel": "k", "initrd": "i"}')
    assert imagebuild.read_manifest(tmp_path) is None
    for name in "dki":
        (tmp_path / name).write_bytes(b"")
    assert imagebuild.read_manifest(tmp_path) == {"disk": "d", "kernel": "k", "initrd": "i"}
    (tmp_path / "manifest.json").write_text("[1, 2]")
    assert imagebuild.read_manifest(tmp_path) is None
