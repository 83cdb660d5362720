"""Images made here and a real registry to pull them from (there is no Docker Hub on a
development host): for the vm tests and the benchmarks.

`image_layout` writes an OCI image layout (one layer tarball of the files given, e.g. Debian's
busybox-static); `Registry` runs Debian's `docker-registry` (distribution) on an address of this
host, optionally with htpasswd auth; `push` copies a layout into it with Debian's `skopeo`.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = "/bin/busybox"
APPLETS = (
    "sh",
    "echo",
    "cat",
    "ls",
    "sleep",
    "id",
    "env",
    "wget",
    "nc",
    "hostname",
    "kill",
    "ps",
    "grep",
    "test",
    "[",
    "true",
    "false",
    "mkdir",
    "httpd",
    "rm",
    "stat",
    "chmod",
    "pgrep",
)


def _blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def busybox_files(extra: Mapping[str, bytes] | None = None) -> dict[str, tuple[bytes, int]]:
    """A minimal root filesystem: static busybox as /bin/sh and friends, root in /etc/passwd."""
    files = {
        "bin/busybox": (Path(BUSYBOX).read_bytes(), 0o755),
        "etc/passwd": (b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644),
        "etc/group": (b"root:x:0:\nnogroup:x:65534:\n", 0o644),
    }
    for name, content in (extra or {}).items():
        executable = name.startswith(("bin/", "usr/bin/", "usr/local/bin/")) or ".so" in name  # the loader too
        files[name] = (content, 0o755 if executable else 0o644)
    return files


def image_layout(
    directory: Path,
    files: Mapping[str, tuple[bytes, int]],
    *,
    symlinks: Mapping[str, str] | None = None,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    exposed_ports: list[int] | None = None,
) -> Path:
    """An OCI image layout in `directory` with one gzip'd layer of `files` (path -> (content,
    mode)) and `symlinks`; busybox applets are linked to /bin/busybox when it is there."""
    links = dict(symlinks or {})
    if "bin/busybox" in files:
        links.update({f"bin/{a}": "busybox" for a in APPLETS if f"bin/{a}" not in files})
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        dirs = sorted({str(Path(p).parent) for p in (*files, *links)} - {"."})
        for d in (*dirs, "tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        for name, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), mode
            tar.addfile(info, io.BytesIO(content))
        for name, target in sorted(links.items()):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    layer = gzip.compress(raw.getvalue(), mtime=0)
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layer_digest, layer_size = _blob(blobs, layer)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": env or ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "Entrypoint": entrypoint,
            "Cmd": cmd,
            "ExposedPorts": {f"{p}/tcp": {} for p in exposed_ports or []},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_digest, config_size = _blob(blobs, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}
        ],
    }
    manifest_digest, manifest_size = _blob(blobs, json.dumps(manifest).encode())
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return directory


def docker_cli_files(workdir: Path) -> dict[str, bytes]:
    """The host's Debian docker CLI (from the docker.io package, downloaded with apt) and the
    libraries its loader needs, laid out for an image."""
    debs = workdir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob("docker.io_*.deb")):
        subprocess.run(["apt-get", "download", "-q", "docker.io"], cwd=debs, check=True, capture_output=True)
    deb = next(debs.glob("docker.io_*.deb"))
    tree = workdir / "tree"
    tree.mkdir(exist_ok=True)
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree), "./usr/bin/docker"], input=tar, check=True)
    binary = tree / "usr/bin/docker"
    files = {"usr/bin/docker": binary.read_bytes()}
    ldd = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    for path in re.findall(r"(/\S+\.so[.\d]*)", ldd):
        files[path.lstrip("/")] = Path(path).read_bytes()
    return files


@dataclass
class Registry:
    address: str  # host:port, plain HTTP
    auth: tuple[str, str] | None = None  # (user, password) when htpasswd is on
    process: subprocess.Popen[bytes] | None = None

    def stop(self) -> None:
        """Stop serving (e.g. an upstream going away under a mirror); its data stays until the
        context ends."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def push(self, layout: Path, name: str, workdir: Path) -> str:
        """Copy the layout to `name` (path:tag) in this registry; the pullable reference."""
        argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false"]
        if self.auth:  # in an auth file, not on the command line
            auth_file = workdir / "skopeo-auth.json"
            token = f"{self.auth[0]}:{self.auth[1]}".encode()
            auth_file.write_text(json.dumps({"auths": {self.address: {"auth": base64.b64encode(token).decode()}}}))
            os.chmod(auth_file, 0o600)
            argv += ["--dest-authfile", str(auth_file)]
        subprocess.run([*argv, f"oci:{layout}", f"docker://{self.address}/{name}"], check=True, capture_output=True)
        return f"{self.address}/{name}"


@contextmanager
def running_registry(directory: Path, address: str, auth: tuple[str, str] | None = None) -> Iterator[Registry]:
    """Debian's docker-registry serving `directory` on `address`, stopped afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    auth_block = ""
    if auth:
        hashed = subprocess.run(
            ["htpasswd", "-Bbn", auth[0], auth[1]], check=True, capture_output=True, text=True
        ).stdout
        (directory / "htpasswd").write_text(hashed)
        auth_block = f"auth:\n  htpasswd:\n    realm: lvx-test\n    path: {directory / 'htpasswd'}\n"
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {directory / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {address}\n{auth_block}"
    )
    with open(directory / "log", "wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{address}/v2/", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # 401: up, asking for auth
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"docker-registry did not start: {(directory / 'log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.2)
        yield Registry(address, auth, proc)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(directory / "data", ignore_errors=True)
