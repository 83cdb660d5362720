"""Build the base image: debootstrap rootfs -> ext4 (mkfs -d, no mounts) -> compressed qcow2.

Output directory (default /var/lib/libvirt-executor/image)::

    disk.qcow2     read-only base disk (0644: qemu reads it as a backing file)
    vmlinuz        kernel of the image (direct kernel boot)
    initrd.img     tiny busybox initramfs: loads virtio_pci/virtio_blk, mounts /dev/vda
    manifest.json  what the executor needs to boot it (see docs/image.md)

The recipe is everything under ``images/``; its hash plus the hashes of the preload tarballs
decide whether a rebuild is needed. The build happens in a temporary directory beside the output
and is renamed into place only when complete. This module is the one place besides tests that
runs host tools (debootstrap, chroot, mkfs.ext4, qemu-img) with subprocess.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from executor.errors import ConfigError
from executor.keys import generate_ed25519

log = logging.getLogger("executor.imagebuild")

MANIFEST_FORMAT = 1
DEFAULT_OUTPUT = Path("/var/lib/libvirt-executor/image")
RECIPE_DIR = Path(__file__).resolve().parent.parent / "images"
SUITE = "bookworm"
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
# Variant "baseline" (benchmarks/boot_bench.py only, never used for jobs): the same packages plus
# systemd-sysv, booted the stock Debian way (systemd, DHCP, Debian's initramfs-tools initrd).
# Recipe: images/baseline/ and images/packages.txt; it is excluded from the real image's hash.
VARIANTS = ("default", "baseline")
BASELINE_SUBDIR = "baseline"
BASELINE_OUTPUT = Path("/var/lib/libvirt-executor/bench-baseline")
BASELINE_CMDLINE = "root=/dev/vda rw console=ttyS0 apparmor=0"
BENCH_CLIENT_KEY = "bench_client_key"  # beside the baseline image, 0600; authorized for JOB_USER
REQUIRED_TOOLS = {"debootstrap": "debootstrap", "mkfs.ext4": "e2fsprogs", "qemu-img": "qemu-utils", "chroot": "coreutils"}


# ------------------------------------------------------------------ small helpers

def _run(argv: Sequence[str], *, what: str, capture: bool = False, env: dict | None = None) -> str:
    log.debug("run: %s", " ".join(map(str, argv)))
    proc = subprocess.run(
        [str(a) for a in argv],
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout if capture else ""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _in_variant(rel: str, variant: str) -> bool:
    """Whether a recipe file (path relative to the recipe dir) belongs to ``variant``'s recipe."""
    in_baseline = rel.startswith(BASELINE_SUBDIR + "/")
    if variant == "baseline":
        return in_baseline or rel == "packages.txt"
    return not in_baseline


def recipe_hash(recipe_dir: Path, preloads: Iterable[Path] = (), *, variant: str = "default") -> str:
    """Hash of every file of the variant's recipe (path, mode's exec bit, content) plus preloads.
    The default variant's hash ignores ``baseline/``, so the benchmark's baseline recipe never
    invalidates the real image."""
    h = hashlib.sha256(f"lvx-image-format-{MANIFEST_FORMAT}\n".encode())
    if variant != "default":
        h.update(f"variant {variant}\n".encode())
    for path in sorted(p for p in recipe_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = path.relative_to(recipe_dir).as_posix()
        if not _in_variant(rel, variant):
            continue
        h.update(f"file {rel} {int(os.access(path, os.X_OK))} {_sha256_file(path)}\n".encode())
    for p in preloads:
        h.update(f"preload {_sha256_file(p)}\n".encode())
    return h.hexdigest()


def debian_mirror(sources: Iterable[Path] | None = None) -> str:
    """The Debian mirror configured for apt on this host (one-line or deb822 format)."""
    if sources is None:
        d = Path("/etc/apt/sources.list.d")
        sources = [Path("/etc/apt/sources.list")] + (sorted(d.glob("*.list")) + sorted(d.glob("*.sources")) if d.is_dir() else [])
    for src in sources:
        try:
            text = src.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if src.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, _, v = line.partition(":")
                    fields[k.strip().lower()] = v.strip()
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                    continue
                suites = fields.get("suites", "").split()
                if any(s == SUITE for s in suites) and "main" in fields.get("components", "").split():
                    uri = fields.get("uris", "").split()
                    if uri:
                        return uri[0].rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line)
                if m and m.group(2) == SUITE and "main" in m.group(3).split():
                    return m.group(1).rstrip("/")
    raise ConfigError(
        f"no Debian '{SUITE} main' apt source found in /etc/apt/sources.list(.d); "
        "configure one so debootstrap can use the same mirror"
    )


def _ensure_tools() -> None:
    missing = [pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise ConfigError(f"missing host packages: {' '.join(sorted(set(missing)))}")
    log.info("installing missing host packages: %s", " ".join(sorted(set(missing))))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "install", "-y", "--no-install-recommends", *sorted(set(missing))], what="apt-get install", env=env)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    out = []
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            mnt = line.split()[1].replace("\\040", " ")
            if mnt.startswith(prefix):
                out.append(mnt)
    except OSError:
        pass
    return sorted(out, key=len, reverse=True)


def _safe_rmtree(path: Path) -> None:
    """Remove a build dir, but never recurse into something still mounted inside it."""
    if not path.exists():
        return
    for mnt in _mounts_under(path):
        subprocess.run(["umount", "-l", mnt], check=False)
    if _mounts_under(path):
        raise RuntimeError(f"refusing to delete {path}: filesystems are still mounted inside it")
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ initrd (newc cpio, gzip)

class _Cpio:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
        )
        self.ino += 1
        self.buf.write(hdr.encode() + name_b)
        self.buf.write(b"\0" * ((4 - self.buf.tell() % 4) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * ((4 - self.buf.tell() % 4) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _module_order(moddir: Path, wanted: Sequence[str]) -> list[str]:
    """Module files (relative to moddir) for ``wanted`` and their dependencies, deps first."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for d in reversed(deps.get(mod, [])):  # modules.dep lists the deepest dependency last
            visit(d)
        order.append(mod)

    for name in wanted:
        if name not in by_name:
            raise RuntimeError(f"kernel module {name} not found in {moddir}")
        visit(by_name[name])
    return order


def build_initrd(rootfs: Path, kver: str, init_script: Path) -> bytes:
    moddir = rootfs / "lib/modules" / kver
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "root", "modules"):
        cpio.dir(d)
    cpio.file("bin/busybox", (rootfs / "bin/busybox").read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init_script.read_bytes(), 0o755)
    order = _module_order(moddir, INITRD_MODULES)
    for mod in order:
        cpio.file(f"modules/{Path(mod).name}", (moddir / mod).read_bytes())
    cpio.file("modules/order", "".join(Path(m).name + "\n" for m in order).encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


# ------------------------------------------------------------------ manifest / cache

def _read_manifest(output_dir: Path) -> dict | None:
    try:
        manifest = json.loads((output_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    keys = ("disk", "kernel", "initrd") + (("client_key",) if manifest.get("variant") == "baseline" else ())
    for key in keys:
        if not isinstance(manifest.get(key), str) or not (output_dir / manifest[key]).is_file():
            return None
    return manifest


def _packages(rootfs: Path) -> dict[str, str]:
    out = _run(
        ["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W", "-f", "${Package}\t${Version}\t${db:Status-Status}\n"],
        what="dpkg-query",
        capture=True,
    )
    pkgs = {}
    for line in out.splitlines():
        name, version, status = (line.split("\t") + ["", ""])[:3]
        if status == "installed":
            pkgs[name] = version
    return dict(sorted(pkgs.items()))


def _qemu_img_info(path: Path) -> dict:
    return json.loads(_run(["qemu-img", "info", "--output=json", path], what="qemu-img info", capture=True))


# ------------------------------------------------------------------ the build

def build_image(
    output_dir: Path = DEFAULT_OUTPUT,
    preloads: Sequence[Path] = (),
    force: bool = False,
    *,
    recipe_dir: Path | None = None,
    mirror: str | None = None,
    variant: str = "default",
) -> dict:
    """Build (or reuse) the base image in ``output_dir`` and return its manifest.

    ``variant="baseline"`` builds the boot benchmark's stock-Debian baseline instead (see
    ``BASELINE_OUTPUT``): never the real image, never used for jobs."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown image variant {variant!r} (known: {', '.join(VARIANTS)})")
    baseline = variant == "baseline"
    output_dir = Path(output_dir).absolute()
    recipe = Path(recipe_dir or RECIPE_DIR)
    preloads = [Path(p).absolute() for p in preloads]
    script = recipe / BASELINE_SUBDIR / "build-rootfs.sh" if baseline else recipe / "build-rootfs.sh"

    if not script.is_file():
        raise ConfigError(f"image recipe not found: {script}")
    if baseline and preloads:
        raise ConfigError("the baseline variant takes no preloads")
    for p in preloads:
        if not p.is_file():
            raise ConfigError(f"preload tarball not found: {p}")
    rhash = recipe_hash(recipe, preloads, variant=variant)

    existing = _read_manifest(output_dir)
    if existing and existing.get("recipe_hash") == rhash and existing.get("variant", "default") == variant and not force:
        log.info("image in %s is up to date (recipe %s)", output_dir, rhash[:12])
        return existing

    if os.geteuid() != 0:
        raise ConfigError("building the base image needs root (debootstrap, chroot, device nodes)")
    _ensure_tools()
    mirror = mirror or debian_mirror()

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # The baseline shares the real image's .deb cache (same packages) when both sit side by side.
    cache = output_dir.parent / f".{DEFAULT_OUTPUT.name if baseline else output_dir.name}.debcache"
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.build-", dir=output_dir.parent))
    t0 = time.monotonic()
    try:
        rootfs = tmp / "rootfs"
        log.info("building base image (recipe %s) from %s in %s", rhash[:12], mirror, tmp)
        argv: list = ["bash", script, rootfs, mirror, cache]
        if baseline:
            bench_private, bench_public = generate_ed25519("lvxbench-baseline")
            argv.append(bench_public)
        _run(argv, what=str(script.relative_to(recipe)))
        t_rootfs = time.monotonic() - t0
        log.info("rootfs ready after %.0f s", t_rootfs)

        kvers = sorted(p.name for p in (rootfs / "lib/modules").iterdir())
        if len(kvers) != 1:
            raise RuntimeError(f"expected one kernel in the rootfs, found {kvers}")
        kver = kvers[0]
        out = tmp / "out"
        out.mkdir()
        shutil.copyfile(rootfs / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
        if baseline:
            # Debian's own initramfs-tools initrd (the stock path), made by the kernel's postinst.
            shutil.copyfile(rootfs / "boot" / f"initrd.img-{kver}", out / "initrd.img")
            for f in (rootfs / "boot").glob("initrd.img*"):
                f.unlink()
            host_key = (rootfs / "etc/ssh/ssh_host_ed25519_key.pub").read_text().strip()
            fd = os.open(out / BENCH_CLIENT_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(bench_private)
        else:
            (out / "initrd.img").write_bytes(build_initrd(rootfs, kver, recipe / "initrd-init"))
        for f in (rootfs / "boot").glob("vmlinuz*"):
            f.unlink()

        preload_names = []
        if preloads:
            dest = rootfs / PRELOAD_DIR_IN_IMAGE
            dest.mkdir(parents=True, exist_ok=True)
            for i, p in enumerate(preloads):
                name = f"{i:02d}-{re.sub(r'[^A-Za-z0-9._-]', '_', p.name)}"
                if not name.endswith(".tar"):
                    name += ".tar"
                shutil.copyfile(p, dest / name)
                os.chmod(dest / name, 0o600)
                preload_names.append({"file": name, "source": p.name, "sha256": _sha256_file(p)})
            log.info("preloads copied: %s", ", ".join(n["file"] for n in preload_names))

        packages = _packages(rootfs)

        log.info("making ext4 filesystem (%d GiB virtual, sparse)", DISK_VIRTUAL_BYTES // 1024**3)
        raw = tmp / "disk.raw"
        with raw.open("wb") as f:
            f.truncate(DISK_VIRTUAL_BYTES)
        _run(
            ["mkfs.ext4", "-q", "-F", "-L", "lvxroot", "-d", rootfs, "-m", "0",
             "-E", "lazy_itable_init=0,lazy_journal_init=0", raw],
            what="mkfs.ext4",
        )
        _safe_rmtree(rootfs)
        log.info("converting to compressed qcow2")
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zlib,cluster_size=65536",
              raw, out / "disk.qcow2"], what="qemu-img convert")
        raw.unlink()
        for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
            os.chmod(out / name, 0o644)

        info = _qemu_img_info(out / "disk.qcow2")
        manifest: dict = {
            "format": MANIFEST_FORMAT,
            "recipe_hash": rhash,
            "built_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "kernel": "vmlinuz",
            "initrd": "initrd.img",
            "disk": "disk.qcow2",
            "disk_format": "qcow2",
            "cmdline": CMDLINE,
            "kernel_version": kver,
            "user": JOB_USER,
            "builds_dir": BUILDS_DIR,
            "cache_dir": CACHE_DIR,
            "seed_device": "/dev/vdb",
            "seed_format": 1,
            "readiness": {"ssh": "lvx-init: ssh ready", "docker": "lvx-init: docker ready",
                          "preload": "lvx-init: preload done"},
            "suite": SUITE,
            "mirror": mirror,
            "packages": packages,
            "sizes": {
                "disk_bytes": (out / "disk.qcow2").stat().st_size,
                "virtual_bytes": int(info["virtual-size"]),
                "kernel_bytes": (out / "vmlinuz").stat().st_size,
                "initrd_bytes": (out / "initrd.img").stat().st_size,
            },
            "preloads": preload_names,
            "build_seconds": round(time.monotonic() - t0, 1),
        }
        if baseline:
            manifest.update(
                variant="baseline", cmdline=BASELINE_CMDLINE, host_key=host_key, client_key=BENCH_CLIENT_KEY,
                network="dhcp", init="systemd",
            )
            for key in ("seed_device", "seed_format", "readiness", "builds_dir", "cache_dir"):
                del manifest[key]
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(out / "manifest.json", 0o644)
        os.chmod(out, 0o755)

        # Swap into place: two renames (a directory cannot atomically replace a non-empty one).
        # Readers see either the old complete image or the new complete one, never a partial.
        old = None
        if output_dir.exists():
            old = tmp / "previous"
            os.rename(output_dir, old)
        os.rename(out, output_dir)
        log.info(
            "image built in %.0f s: %s (%.0f MiB on disk, %d GiB virtual)",
            time.monotonic() - t0, output_dir, manifest["sizes"]["disk_bytes"] / 2**20,
            manifest["sizes"]["virtual_bytes"] // 1024**3,
        )
        return manifest
    finally:
        _safe_rmtree(tmp)
