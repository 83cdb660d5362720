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
from collections.abc import Iterator, Mapping, Sequence
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
    "xargs",
    "sed",
    "cut",
    "printf",
    "cp",
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
        # the loader and the libraries too
        executable = name.startswith(("bin/", "usr/bin/", "usr/sbin/", "usr/local/bin/")) or ".so" in name
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
    volumes: list[str] | None = None,
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
            "Volumes": {v: {} for v in volumes or []},
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


def debian_binaries(workdir: Path, binaries: Mapping[str, Sequence[str]]) -> dict[str, bytes]:
    """Binaries from this host's Debian packages (package -> paths in it; downloaded with apt)
    and the libraries their loader needs, as image files (path -> content)."""
    debs = workdir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    tree = workdir / "tree"
    tree.mkdir(exist_ok=True)
    files: dict[str, bytes] = {}
    for package, paths in binaries.items():
        if not list(debs.glob(f"{package}_*.deb")):
            subprocess.run(["apt-get", "download", "-q", package], cwd=debs, check=True, capture_output=True)
        deb = next(debs.glob(f"{package}_*.deb"))
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree), *(f"./{p}" for p in paths)], input=tar, check=True)
        for path in paths:
            binary = tree / path
            files[path] = binary.read_bytes()
            ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout  # static: no libs
            for lib in re.findall(r"(/\S+\.so[.\d]*)", ldd):
                files[lib.lstrip("/")] = Path(lib).read_bytes()
    return files


def docker_cli_files(workdir: Path) -> dict[str, bytes]:
    """The host's Debian docker CLI (from the docker.io package) and its libraries."""
    return debian_binaries(workdir, {"docker.io": ["usr/bin/docker"]})


# Stand-in for the docker:dind image's dockerd-entrypoint.sh (there is no Docker Hub here): the
# same certificate layout under $DOCKER_TLS_CERTDIR and the same ports, moby's cgroup v2 nesting
# step, Debian's dockerd without iptables (not in this image; no NAT is needed by the tests).
DIND_ENTRYPOINT = """#!/bin/sh
set -e
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  mkdir -p /sys/fs/cgroup/init
  xargs -rn1 < /sys/fs/cgroup/cgroup.procs > /sys/fs/cgroup/init/cgroup.procs || :
  sed -e 's/ / +/g' -e 's/^/+/' < /sys/fs/cgroup/cgroup.controllers > /sys/fs/cgroup/cgroup.subtree_control
fi
mkdir -p /run /var/lib/docker
if [ -z "$DOCKER_TLS_CERTDIR" ]; then
  exec dockerd --host=tcp://0.0.0.0:2375 --iptables=false "$@"
fi
d=$DOCKER_TLS_CERTDIR
mkdir -p "$d/ca" "$d/server" "$d/client"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }
key "$d/ca/key.pem"
openssl req -new -x509 -days 825 -key "$d/ca/key.pem" -out "$d/ca/cert.pem" -subj "/CN=docker:dind CA"
sign() {  # $1 dir, $2 subject, $3 extensions
  key "$d/$1/key.pem"
  openssl req -new -key "$d/$1/key.pem" -out "$d/$1/csr.pem" -subj "$2"
  printf '[x]\n%s\n' "$3" > "$d/$1/openssl.cnf"
  openssl x509 -req -days 825 -in "$d/$1/csr.pem" -CA "$d/ca/cert.pem" -CAkey "$d/ca/key.pem" \
    -CAcreateserial -out "$d/$1/cert.pem" -extfile "$d/$1/openssl.cnf" -extensions x
  cp "$d/ca/cert.pem" "$d/$1/ca.pem"
}
ip=$(hostname -i | cut -d' ' -f1)
sign server "/CN=docker:dind server" \
  "subjectAltName = DNS:docker, DNS:localhost, DNS:$(hostname), IP:127.0.0.1, IP:$ip"
sign client "/CN=docker:dind client" "extendedKeyUsage = clientAuth"
chmod -R a+rX "$d/client"
exec dockerd --host=tcp://0.0.0.0:2376 --tlsverify --tlscacert "$d/server/ca.pem" \
  --tlscert "$d/server/cert.pem" --tlskey "$d/server/key.pem" --iptables=false "$@"
"""


def dind_image(directory: Path, workdir: Path) -> Path:
    """A stand-in for docker:dind: Debian's dockerd, containerd and runc, openssl for the
    certificates, static busybox for the entrypoint's shell; /var/lib/docker a volume."""
    files = busybox_files(
        {
            **debian_binaries(
                workdir,
                {
                    "docker.io": ["usr/sbin/dockerd", "usr/sbin/docker-proxy"],
                    "containerd": ["usr/bin/containerd", "usr/bin/containerd-shim-runc-v2"],
                    "runc": ["usr/sbin/runc"],
                    "tini": ["usr/bin/tini-static"],
                },
            ),
            "usr/bin/openssl": Path("/usr/bin/openssl").read_bytes(),
            "usr/lib/ssl/openssl.cnf": Path("/usr/lib/ssl/openssl.cnf").read_bytes(),
            "usr/local/bin/dockerd-entrypoint.sh": DIND_ENTRYPOINT.encode(),
        }
    )
    for lib in re.findall(
        r"(/\S+\.so[.\d]*)", subprocess.run(["ldd", "/usr/bin/openssl"], capture_output=True, text=True).stdout
    ):
        files[lib.lstrip("/")] = (Path(lib).read_bytes(), 0o755)
    return image_layout(
        directory,
        files,
        symlinks={"usr/bin/docker-init": "tini-static", "var/run": "../run"},
        entrypoint=["dockerd-entrypoint.sh"],
        env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "DOCKER_TLS_CERTDIR=/certs"],
        exposed_ports=[2375, 2376],
        volumes=["/var/lib/docker"],
    )


@dataclass
class Registry:
    address: str  # host:port, plain HTTP
    auth: tuple[str, str] | None = None  # (user, password) when htpasswd is on
    process: subprocess.Popen[bytes] | None = None
    directory: Path | None = None

    def stop(self) -> None:
        """Stop serving (e.g. an upstream going away under a mirror); its data stays until the
        context ends."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def start(self) -> None:
        """Serve again what it served before `stop` (the upstream coming back)."""
        assert self.directory is not None
        self.stop()
        self.process = _serve(self.directory, self.address)

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
    registry = Registry(address, auth, None, directory)
    try:
        registry.start()
        yield registry
    finally:
        registry.stop()
        shutil.rmtree(directory / "data", ignore_errors=True)


def _serve(directory: Path, address: str) -> subprocess.Popen[bytes]:
    """docker-registry with `directory`'s config, once it answers on `address`."""
    with open(directory / "log", "ab") as log:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(directory / "config.yml")], stdout=subprocess.DEVNULL, stderr=log
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://{address}/v2/", timeout=2)
            return proc
        except urllib.error.HTTPError:
            return proc  # 401: up, asking for auth
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.terminate()
                proc.wait(10)
                raise RuntimeError(
                    f"docker-registry did not start: {(directory / 'log').read_text()[-2000:]}"
                ) from None
            time.sleep(0.2)
