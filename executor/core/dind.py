"""`docker:dind` services, the way this executor serves them: the decisions, no I/O.

A dind service in a job with `image:` asks for a Docker daemon reachable at its aliases
(`docker`), on 2375 without TLS or on 2376 with TLS and client certificates under
`$DOCKER_TLS_CERTDIR/client`. The job already owns a whole dockerd in a throwaway VM, so in
"vm-daemon" mode the service is not started: its aliases resolve to the VM itself as the job's
containers see it (the job network's gateway), where small proxies pass 2375 (plain) and 2376
(TLS with per-job certificates laid out as the dind image lays them out) to the VM's dockerd
socket. In "privileged" mode the real image runs as a privileged container in the VM, with
`$DOCKER_TLS_CERTDIR/client` shared with the build container through a volume, as GitLab's
documented runner configuration does.
"""

from __future__ import annotations

import io
import ipaddress
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from executor.core import images
from executor.core.images import ServiceSpec

DIND_MODES = ("vm-daemon", "privileged")
# GitLab's docs and the docker image's tags: docker:dind, docker:27-dind, docker:27.3-dind-rootless,
# with or without docker.io/library/.
DEFAULT_DIND_IMAGES = (
    "docker:dind",
    "docker:*-dind",
    "docker:*dind*",
    "docker.io/library/docker:dind",
    "docker.io/library/docker:*-dind",
    "docker.io/library/docker:*dind*",
)
PLAIN_PORT = 2375
TLS_PORT = 2376
# The dind image's own default (ENV DOCKER_TLS_CERTDIR=/certs): a job that does not set the
# variable gets TLS, as it would from the real image.
DEFAULT_CERTDIR = "/certs"
CERTDIR_VARIABLE = "DOCKER_TLS_CERTDIR"
DIR_IN_VM = "/run/lvx-dind"  # tmpfs in the VM: the proxies' certificates and the client's
_SAFE_PATH = re.compile(r"^(/[A-Za-z0-9._-]+)+$")


class DindError(ValueError):
    """The job's dind settings are unusable (the job's fault)."""


def is_dind(name: str, patterns: Iterable[str]) -> bool:
    """Whether a service image is a Docker daemon the executor serves itself (`dind_images`)."""
    return any(images.allowed(name, [pattern]) for pattern in patterns)


@dataclass(frozen=True)
class DindService:
    index: int  # in the job's services
    name: str
    aliases: tuple[str, ...]  # where the job reaches the daemon: `docker`, plus the user's
    certdir: str  # "" for no TLS (2375 only)


def dind_services(
    services: Sequence[ServiceSpec],
    aliases: Sequence[tuple[str, ...]],
    patterns: Iterable[str],
    job_variables: Sequence[tuple[str, str]],
) -> list[DindService]:
    """The job's dind services with their aliases and TLS directory. DindError for a
    DOCKER_TLS_CERTDIR that is not a plain absolute path."""
    found = []
    patterns = tuple(patterns)
    for index, (service, names) in enumerate(zip(services, aliases, strict=True)):
        if is_dind(service.name, patterns):
            found.append(DindService(index, service.name, names, certdir(job_variables, service.variables)))
    return found


def certdir(job_variables: Sequence[tuple[str, str]], service_variables: Sequence[tuple[str, str]]) -> str:
    """DOCKER_TLS_CERTDIR as the dind container would see it: the service's variables over the
    job's, the image's default when neither sets it, "" (no TLS) when set empty."""
    values = dict(job_variables)
    values.update(service_variables)
    value = values.get(CERTDIR_VARIABLE, DEFAULT_CERTDIR)
    if value == "":
        return ""
    value = value.rstrip("/") or "/"
    if not _SAFE_PATH.match(value) or any(part in (".", "..") for part in value.split("/")):
        raise DindError(f"{CERTDIR_VARIABLE}={value!r} must be an absolute path of letters, digits, '.', '_' and '-'")
    return value


def host_entries(services: Sequence[DindService], address: str) -> dict[str, str]:
    """/etc/hosts entries that point every dind alias at the VM's daemon: `address` is the job
    network's gateway (what the VM's dockerd reported; checked to be an IPv4 address)."""
    ip = str(ipaddress.IPv4Address(address))
    return {alias: ip for service in services for alias in service.aliases}


def tls_names(services: Sequence[DindService]) -> tuple[str, ...]:
    """The server certificate's DNS names: every alias and localhost, as the dind image's
    entrypoint puts its hostname, `docker` and `localhost`."""
    names = ["docker", "localhost"]
    for service in services:
        names += [a for a in service.aliases if a not in names]
    return tuple(names)


def certdirs(services: Sequence[DindService]) -> tuple[str, ...]:
    """The distinct TLS directories the build container needs `client/` under."""
    return tuple(sorted({s.certdir for s in services if s.certdir}))


def proxy_commands(address: str, tls: bool, socket: str = "/var/run/docker.sock") -> list[list[str]]:
    """argv of the proxies in the VM: 2375 plain, and 2376 with mutual TLS when `tls`, both bound
    to `address` only (the job network's gateway: reachable from the job's containers and the
    VM, never from outside it). -t: a half-closed stream (docker attach, exec) stays open."""
    ip = str(ipaddress.IPv4Address(address))
    common = ["socat", "-t", "86400"]
    argv = [[*common, f"TCP-LISTEN:{PLAIN_PORT},bind={ip},reuseaddr,fork", f"UNIX-CONNECT:{socket}"]]
    if tls:
        argv.append(
            [
                *common,
                f"OPENSSL-LISTEN:{TLS_PORT},bind={ip},reuseaddr,fork,verify=1,"
                f"cert={DIR_IN_VM}/server/cert.pem,key={DIR_IN_VM}/server/key.pem,cafile={DIR_IN_VM}/ca/cert.pem",
                f"UNIX-CONNECT:{socket}",
            ]
        )
    return argv


def cert_archive(ca_cert: str, server_cert: str, server_key: str, client_cert: str, client_key: str) -> bytes:
    """The dind image's layout as a tar for DIR_IN_VM: ca/cert.pem, server/{ca,cert,key}.pem and
    client/{ca,cert,key}.pem. The client files are readable by every user of the build
    container (the VM and its daemon are the job's own); the server key is root's."""
    files = {
        "ca/cert.pem": (ca_cert, 0o644),
        "server/ca.pem": (ca_cert, 0o644),
        "server/cert.pem": (server_cert, 0o644),
        "server/key.pem": (server_key, 0o600),
        "client/ca.pem": (ca_cert, 0o644),
        "client/cert.pem": (client_cert, 0o644),
        "client/key.pem": (client_key, 0o644),
    }
    return tar_archive({name: (text.encode(), mode) for name, (text, mode) in files.items()})


def tar_archive(files: Mapping[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for directory in sorted({name.rsplit("/", 1)[0] for name in files if "/" in name}):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, (content, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), mode
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()
