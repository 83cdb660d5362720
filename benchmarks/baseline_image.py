"""The boot benchmark's BASELINE image: the base image's Debian packages plus systemd-sysv,
booted the stock Debian way (systemd, DHCP, Debian's initramfs-tools initrd). Never used for jobs.

Built with the same steps as the real image (executor.admin.imagebuild), from the recipe in
benchmarks/baseline/ plus images/packages.txt, and cached by its own recipe hash beside it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from executor.adapters import hosttools
from executor.adapters.keys import generate_ed25519
from executor.admin import imagebuild
from executor.core import imagerecipe as recipe

OUTPUT = Path("/var/lib/libvirt-executor/bench-baseline")
RECIPE_DIR = Path(__file__).resolve().parent / "baseline"
PACKAGES = imagebuild.RECIPE_DIR / "packages.txt"  # the real image's package list, shared
CMDLINE = "root=/dev/vda rw console=ttyS0 apparmor=0"
CLIENT_KEY = "bench_client_key"  # beside the image, 0600; authorized for the job user


def build_baseline(output_dir: Path = OUTPUT, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) the baseline image in `output_dir`; its manifest (with the client key's
    file name and the pinned host key)."""
    output_dir = output_dir.absolute()
    files = [
        *imagebuild.recipe_files(RECIPE_DIR),
        recipe.RecipeFile("packages.txt", False, hosttools.sha256_file(PACKAGES)),
    ]
    rhash = recipe.recipe_hash(files, ["variant baseline"])
    existing = imagebuild.read_manifest(output_dir, ("disk", "kernel", "initrd", "client_key"))
    if existing and existing.get("recipe_hash") == rhash and not force:
        return existing

    mirror = imagebuild.prepare_host(None)
    with imagebuild.build_workspace(output_dir) as tmp:
        started = time.monotonic()
        rootfs, out = tmp / "rootfs", tmp / "out"
        bench_private, bench_public = generate_ed25519("lvxbench-baseline")
        hosttools.run_tool(
            [
                "bash",
                RECIPE_DIR / "build-rootfs.sh",
                rootfs,
                mirror,
                imagebuild.deb_cache(output_dir),
                PACKAGES,
                recipe.SUITE,
                recipe.JOB_USER,
                bench_public,
            ],
            what="baseline build-rootfs.sh",
        )
        kver = imagebuild.kernel_version(rootfs)
        out.mkdir()
        imagebuild.take_kernel(rootfs, kver, out)
        # Debian's own initramfs-tools initrd (the stock path), made by the kernel's postinst.
        shutil.copyfile(rootfs / "boot" / f"initrd.img-{kver}", out / "initrd.img")
        for f in (rootfs / "boot").glob("initrd.img*"):
            f.unlink()
        host_key = (rootfs / "etc/ssh/ssh_host_ed25519_key.pub").read_text().strip()
        fd = os.open(out / CLIENT_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(bench_private)
        packages = hosttools.installed_packages(rootfs)
        imagebuild.make_disk(rootfs, tmp, out)
        manifest = imagebuild.base_manifest(rhash, kver, mirror, packages, out, started)
        manifest.update(
            variant="baseline",
            cmdline=CMDLINE,
            user=recipe.JOB_USER,
            host_key=host_key,
            client_key=CLIENT_KEY,
            network="dhcp",
            init="systemd",
        )
        imagebuild.install_output(out, output_dir, tmp, manifest)
    return manifest
