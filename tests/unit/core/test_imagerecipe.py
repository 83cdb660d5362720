"""executor.core.imagerecipe: the recipe hash, apt sources, module order, the initrd archive."""

from __future__ import annotations

import gzip

import pytest

from executor.core import imagerecipe as recipe
from executor.errors import ConfigError


def cpio_entries(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc cpio archive (what the kernel unpacks as initramfs)."""
    entries, pos = {}, 0
    while True:
        assert archive[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = (name_start + namesize + 3) & ~3
        data = archive[data_start : data_start + size]
        pos = (data_start + size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data)


def test_initrd_archive_holds_busybox_init_and_modules_in_order():
    modules = [("virtio.ko", b"A" * 5), ("virtio_ring.ko", b"B"), ("virtio_pci.ko", b"C" * 9)]
    entries = cpio_entries(gzip.decompress(recipe.initrd_archive(b"BUSYBOX", b"#!/bin/sh\n", modules)))
    assert entries["bin/busybox"] == (0o100755, b"BUSYBOX")
    assert entries["init"] == (0o100755, b"#!/bin/sh\n")
    assert entries["bin/sh"] == (0o120777, b"busybox")
    assert entries["dev"][0] == 0o040755
    assert entries["modules/virtio_pci.ko"] == (0o100644, b"C" * 9)
    assert entries["modules/order"][1] == b"virtio.ko\nvirtio_ring.ko\nvirtio_pci.ko\n"


def test_initrd_archive_is_reproducible():
    first = recipe.initrd_archive(b"x", b"y", [("m.ko", b"z")])
    assert first == recipe.initrd_archive(b"x", b"y", [("m.ko", b"z")])  # no timestamps inside


MODULES_DEP = """\
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
kernel/drivers/virtio/virtio_ring.ko.xz: kernel/drivers/virtio/virtio.ko.xz
kernel/drivers/virtio/virtio.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz kernel/drivers/virtio/virtio.ko.xz
kernel/fs/isofs/isofs.ko.xz:
"""


def test_module_order_puts_dependencies_first_and_each_once():
    order = [m.rsplit("/", 1)[1] for m in recipe.module_order(MODULES_DEP, ("virtio_pci", "virtio_blk"))]
    assert order == [
        "virtio.ko.xz",
        "virtio_ring.ko.xz",
        "virtio_pci_modern_dev.ko.xz",
        "virtio_pci.ko.xz",
        "virtio_blk.ko.xz",
    ]


def test_module_order_names_a_missing_module():
    with pytest.raises(ConfigError, match="virtio_net"):
        recipe.module_order(MODULES_DEP, ("virtio_net",))


def test_debian_mirror_from_one_line_and_deb822_sources():
    one_line = "# comment\ndeb [arch=amd64] http://mirror.example/debian/ bookworm main contrib\n"
    assert recipe.debian_mirror([("sources.list", one_line)]) == "http://mirror.example/debian"
    deb822 = (
        "Types: deb\nURIs: http://other.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://deb.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert recipe.debian_mirror([("sources.list", ""), ("debian.sources", deb822)]) == "http://deb.example/debian"


def test_debian_mirror_skips_disabled_source_only_and_update_entries_and_says_what_is_missing():
    deb822 = (
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    with pytest.raises(ConfigError, match="no Debian release 'main' apt source"):
        recipe.debian_mirror([("debian.sources", deb822), ("x.list", "deb http://m/debian bookworm contrib\n")])


def test_module_order_skips_built_in_modules():
    order = recipe.module_order(MODULES_DEP, ("virtio_pci", "virtio_blk", "ext4"), "kernel/fs/ext4/ext4.ko\n")
    assert [m.rsplit("/", 1)[1] for m in order][-1] == "virtio_blk.ko.xz"


def test_recipe_hash_changes_with_content_exec_bit_path_and_preloads():
    base = [recipe.RecipeFile("a.sh", True, "11"), recipe.RecipeFile("b.txt", False, "22")]
    h = recipe.recipe_hash(base)
    assert h == recipe.recipe_hash(list(reversed(base)))  # order of discovery does not matter
    assert h != recipe.recipe_hash([recipe.RecipeFile("a.sh", True, "33"), base[1]])
    assert h != recipe.recipe_hash([recipe.RecipeFile("a.sh", False, "11"), base[1]])
    assert h != recipe.recipe_hash([recipe.RecipeFile("c.sh", True, "11"), base[1]])
    assert h != recipe.recipe_hash(base, ["ff"])


def test_preload_file_names_are_ordered_harmless_tarballs():
    assert recipe.preload_file_name(0, "busybox.tar") == "00-busybox.tar"
    assert recipe.preload_file_name(12, "../../etc/passwd") == "12-.._.._etc_passwd.tar"
    assert recipe.preload_file_name(3, "img name;rm -rf") == "03-img_name_rm_-rf.tar"


def test_qcow2_header():
    header = b"QFI\xfb" + (3).to_bytes(4, "big") + (0).to_bytes(8, "big") + bytes(8) + (20 << 30).to_bytes(8, "big")
    assert recipe.parse_qcow2_header(header, "d") == (20 << 30, False)
    backed = header[:8] + (512).to_bytes(8, "big") + header[16:]
    assert recipe.parse_qcow2_header(backed, "d") == (20 << 30, True)
    with pytest.raises(ValueError, match="raw.img is not a qcow2 image"):
        recipe.parse_qcow2_header(b"\0" * 32, "raw.img")


def test_rootfs_script_gets_the_job_user_and_dirs_the_config_defaults_use():
    from executor.core.settings import VMSettings

    args = recipe.rootfs_script_args("/r", "http://m", "/c")
    vm = VMSettings()
    assert args == ["/r", "http://m", "/c", recipe.SUITE, vm.user, vm.builds_dir, vm.cache_dir]


def test_recipe_hash_changes_with_the_suite_the_image_is_built_from(monkeypatch):
    files = [recipe.RecipeFile("a.sh", True, "11")]
    before = recipe.recipe_hash(files)
    monkeypatch.setattr(recipe, "SUITE", "forky")
    assert recipe.recipe_hash(files) != before
