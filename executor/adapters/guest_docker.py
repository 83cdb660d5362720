"""The only module that imports docker (docker-py): the job VM's dockerd over TCP with mutual TLS.

The daemon listens on tcp://<VM IP>:2376 with --tlsverify and a per-job CA; the executor holds
the only client certificate. Everything the daemon says (logs, errors, image configs) comes from
a VM the job controls: output is bounded and passed on as bytes, never interpreted.
"""

from __future__ import annotations

import io
import logging
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import docker
import docker.errors
import docker.tls
import requests.exceptions

from executor.errors import SystemFailure

log = logging.getLogger(__name__)

DOCKER_TLS_PORT = 2376
_LOG_LIMIT = 16 * 1024
_CHUNK = 64 * 1024


class DockerUnavailable(SystemFailure):
    """The VM's dockerd does not answer (yet): a system failure once the wait is over."""


class PullFailed(Exception):
    """The registry refused the image or has none by that name: the job's fault."""


@dataclass(frozen=True)
class TLSFiles:
    ca: str
    cert: str
    key: str


@dataclass
class PullProgress:
    """What a pull has done so far, summed over its layers: downloaded, then unpacked (dockerd
    reports both per layer; unpacking a big layer under TCG takes as long as downloading it)."""

    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (done, total) bytes
    unpacked: dict[str, int] = field(default_factory=dict)  # id -> bytes of it unpacked so far
    finished: set[str] = field(default_factory=set)

    def update(self, event: Mapping[str, Any]) -> None:
        layer = event.get("id")
        status = str(event.get("status", ""))
        if not isinstance(layer, str) or len(layer) != 12:
            return
        detail = event.get("progressDetail")
        detail = detail if isinstance(detail, dict) else {}
        done, total = self.layers.get(layer, (0, 0))
        current = detail.get("current")
        if status == "Downloading" and isinstance(current, int):
            done, total = current, int(detail.get("total") or total)
        if status == "Extracting" and isinstance(current, int):
            done = max(done, total)  # unpacking starts once the layer is downloaded
            self.unpacked[layer] = current
        if status in ("Pull complete", "Already exists", "Download complete"):
            done = max(done, total)
            if status != "Download complete":
                self.finished.add(layer)
                self.unpacked[layer] = total
        self.layers[layer] = (done, total)

    def line(self) -> str:
        done = sum(d for d, _ in self.layers.values())
        total = sum(t for _, t in self.layers.values())
        text = f"{len(self.finished)}/{len(self.layers)} layers, {done / 1e6:.1f}/{total / 1e6:.1f} MB downloaded"
        if any(layer not in self.finished for layer in self.unpacked):
            text += f", unpacking: {sum(self.unpacked.values()) / 1e6:.1f}/{total / 1e6:.1f} MB unpacked"
        return text


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    network: str
    aliases: tuple[str, ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    entrypoint: tuple[str, ...] | None = None
    command: tuple[str, ...] | None = None
    binds: tuple[str, ...] = ()  # "host:container[:mode]", host paths in the VM
    user: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    extra_hosts: tuple[tuple[str, str], ...] = ()  # (name, IPv4 address) for /etc/hosts
    privileged: bool = False


def _daemon_error(what: str, exc: Exception) -> SystemFailure:
    explanation = getattr(exc, "explanation", None) or str(exc)
    return SystemFailure(f"docker in the job's VM: {what}: {str(explanation)[:500]}")


class GuestDocker:
    def __init__(self, client: docker.DockerClient) -> None:
        self._client = client
        self._api = client.api

    @classmethod
    def connect(cls, ip: str, tls: TLSFiles, timeout: float = 60) -> GuestDocker:
        config = docker.tls.TLSConfig(client_cert=(tls.cert, tls.key), ca_cert=tls.ca, verify=True)
        try:
            client = docker.DockerClient(
                base_url=f"tcp://{ip}:{DOCKER_TLS_PORT}", tls=config, timeout=int(timeout), version="1.41"
            )
        except docker.errors.DockerException as exc:
            raise DockerUnavailable(f"cannot reach the VM's dockerd: {exc}") from None
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override the session's CA (the job's
        # own) and *_PROXY send the connection elsewhere: the runner's environment decides neither.
        client.api.trust_env = False
        return cls(client)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> GuestDocker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ping(self) -> bool:
        try:
            return bool(self._api.ping())
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            raise DockerUnavailable(f"dockerd in the VM does not answer: {exc}") from None

    # --- images -----------------------------------------------------------------------------

    def image_present(self, ref: str) -> bool:
        try:
            self._api.inspect_image(ref)
            return True
        except docker.errors.ImageNotFound:
            return False
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise _daemon_error(f"inspecting {ref}", exc) from None

    def pull(
        self,
        repository: str,
        tag: str,
        auth: Mapping[str, str] | None,
        progress: Callable[[PullProgress], None],
    ) -> None:
        """Pull `repository:tag` (or @digest); PullFailed if the registry says no."""
        state = PullProgress()
        try:
            events = self._api.pull(
                repository, tag=tag, stream=True, decode=True, auth_config=dict(auth) if auth else None
            )
            for event in events:
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    raise PullFailed(str(event.get("error"))[:500])
                state.update(event)
                progress(state)
        except docker.errors.NotFound as exc:
            raise PullFailed(str(exc.explanation or exc)[:500]) from None
        except docker.errors.APIError as exc:
            if exc.status_code is not None and 400 <= exc.status_code < 500:
                raise PullFailed(str(exc.explanation or exc)[:500]) from None
            raise _daemon_error(f"pulling {repository}", exc) from None
        except requests.exceptions.RequestException as exc:
            raise _daemon_error(f"pulling {repository}", exc) from None

    def exposed_tcp_ports(self, ref: str) -> list[int]:
        try:
            config = self._api.inspect_image(ref).get("Config") or {}
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise _daemon_error(f"inspecting {ref}", exc) from None
        ports = []
        for key in config.get("ExposedPorts") or {}:
            number, _, proto = str(key).partition("/")
            if proto in ("", "tcp") and number.isdigit():
                ports.append(int(number))
        return sorted(ports)[:20]

    # --- networks and containers ----------------------------------------------------------------

    def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        try:
            self._api.create_network(name, driver="bridge", labels=dict(labels), check_duplicate=True)
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise _daemon_error(f"creating network {name}", exc) from None

    def network_gateway(self, name: str) -> str | None:
        """The IPv4 gateway of a network the daemon made: the VM itself as its containers see it
        (what the VM's daemon says: the caller checks it is an address)."""
        try:
            configs = self._api.inspect_network(name).get("IPAM", {}).get("Config") or []
        except (docker.errors.APIError, requests.exceptions.RequestException, AttributeError) as exc:
            raise _daemon_error(f"inspecting network {name}", exc) from None
        for config in configs:
            gateway = config.get("Gateway") if isinstance(config, dict) else None
            if isinstance(gateway, str) and "." in gateway:
                return gateway
        return None

    def run_container(self, spec: ContainerSpec) -> str:
        """Create and start a container; its id."""
        api = self._api
        try:
            host_config = api.create_host_config(
                binds=list(spec.binds),
                network_mode=spec.network,
                extra_hosts=dict(spec.extra_hosts) or None,
                privileged=spec.privileged,
            )
            networking = api.create_networking_config(
                {spec.network: api.create_endpoint_config(aliases=list(spec.aliases))}  # type: ignore[arg-type]  # the stub is wrong: it takes {network: endpoint}
            )
            created = api.create_container(
                spec.image,
                name=spec.name,
                command=list(spec.command) if spec.command is not None else None,
                entrypoint=list(spec.entrypoint) if spec.entrypoint is not None else None,
                environment=[f"{k}={v}" for k, v in spec.environment],
                user=spec.user or "",
                labels=dict(spec.labels),
                host_config=host_config,
                networking_config=networking,
            )
            api.start(created["Id"])
            return str(created["Id"])
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise _daemon_error(f"starting container {spec.name}", exc) from None

    def container_state(self, name: str) -> dict[str, Any] | None:
        """The container's State (Running, ExitCode, ...), None if there is no such container."""
        try:
            state = self._api.inspect_container(name).get("State")
        except docker.errors.NotFound:
            return None
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise _daemon_error(f"inspecting {name}", exc) from None
        return state if isinstance(state, dict) else {}

    def container_commands(self, name: str) -> list[str]:
        """The command lines of the container's processes (`docker top`); [] when it runs none
        or is gone."""
        try:
            top = self._api.top(name)
        except docker.errors.APIError:
            return []  # not running (any more)
        except requests.exceptions.RequestException as exc:
            raise _daemon_error(f"listing the processes of {name}", exc) from None
        titles = top.get("Titles") or []
        column = titles.index("CMD") if "CMD" in titles else len(titles) - 1
        return [str(row[column]) for row in top.get("Processes") or [] if len(row) > column >= 0]

    def run_throwaway(self, image: str, argv: Sequence[str]) -> int:
        """Run `argv` in a new container of `image` and remove it; its exit code."""
        try:
            created = self._api.create_container(image, command=list(argv), host_config=self._api.create_host_config())
            try:
                self._api.start(created["Id"])
                code = self._api.wait(created["Id"], timeout=120).get("StatusCode")
            finally:
                self._api.remove_container(created["Id"], force=True)
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise _daemon_error(f"running a container of {image}", exc) from None
        return int(code) if isinstance(code, int) else 255

    def container_address(self, name: str, network: str) -> str | None:
        try:
            networks = self._api.inspect_container(name)["NetworkSettings"]["Networks"]
        except (docker.errors.APIError, requests.exceptions.RequestException, KeyError, TypeError) as exc:
            raise _daemon_error(f"inspecting {name}", exc) from None
        address = (networks.get(network) or {}).get("IPAddress")
        return str(address) if address else None

    def logs_tail(self, name: str, lines: int = 20) -> str:
        try:
            data = self._api.logs(name, stdout=True, stderr=True, tail=lines)
        except (docker.errors.APIError, requests.exceptions.RequestException):
            return ""
        return bytes(data[-_LOG_LIMIT:]).decode("utf-8", "replace")

    def put_file(self, container: str, directory: str, name: str, content: bytes, mode: int = 0o700) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), mode, int(time.time())
            tar.addfile(info, io.BytesIO(content))
        try:
            self._api.put_archive(container, directory, buf.getvalue())
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise _daemon_error(f"copying a file into {container}", exc) from None

    # --- exec ---------------------------------------------------------------------------------

    def exec_stream(
        self,
        container: str,
        argv: Sequence[str],
        stdout: BinaryIO,
        stderr: BinaryIO,
        still_alive: Callable[[], bool],
        user: str | None = None,
        started: Callable[[str], None] = lambda exec_id: None,
        check_every: float = 5.0,
    ) -> int:
        """Run `argv` in the container with output copied live; its exit code. `started` gets
        the exec's id (`exec_pid` finds its process, to stop it on a cancel). The stream is read
        in a thread so that the VM's liveness is checked, and signals are handled, while the
        command is silent."""
        try:
            exec_id = self._api.exec_create(container, list(argv), user=user or "")["Id"]
            # The raw socket, read frame by frame: docker-py's own stream polls the file
            # descriptor and misses records the TLS layer already holds, so output came late.
            sock = self._api.exec_start(exec_id, socket=True)
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise _daemon_error("starting the stage in the build container", exc) from None
        started(exec_id)
        pipe: queue.Queue[tuple[bytes | None, bytes | None] | BaseException | None] = queue.Queue(maxsize=64)
        threading.Thread(target=_pump, args=(_frames(getattr(sock, "_sock", sock)), pipe), daemon=True).start()
        last_check = time.monotonic()
        while True:
            try:
                item = pipe.get(timeout=0.5)
            except queue.Empty:
                item = ()  # type: ignore[assignment]
            if item is None:
                break
            if isinstance(item, BaseException):
                raise _daemon_error("reading the stage's output", item if isinstance(item, Exception) else Exception())
            if item:
                out, err = item
                for data, sink in ((out, stdout), (err, stderr)):
                    if data:
                        sink.write(data)
                        sink.flush()
            if time.monotonic() - last_check >= check_every:
                last_check = time.monotonic()
                if not still_alive():
                    raise SystemFailure("the job's VM stopped while the script was running")
        try:
            code = self._api.exec_inspect(exec_id).get("ExitCode")
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise _daemon_error("reading the stage's exit code", exc) from None
        return int(code) if isinstance(code, int) else 255

    def exec_pid(self, exec_id: str) -> int | None:
        """The exec's process id in the VM, None once it has ended (or before it began)."""
        try:
            info = self._api.exec_inspect(exec_id)
        except (docker.errors.APIError, requests.exceptions.RequestException):
            return None
        pid = info.get("Pid")
        return pid if info.get("Running") and isinstance(pid, int) and pid > 0 else None

    def exec_quiet(self, container: str, argv: Sequence[str], user: str | None = None) -> int:
        """Run a short command of ours in the container; its exit code (output discarded)."""
        try:
            exec_id = self._api.exec_create(container, list(argv), user=user or "")["Id"]
            self._api.exec_start(exec_id)
            code = self._api.exec_inspect(exec_id).get("ExitCode")
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise _daemon_error("running a command in the build container", exc) from None
        return int(code) if isinstance(code, int) else 255


def _frames(sock: Any) -> Iterator[tuple[bytes | None, bytes | None]]:
    """(stdout, stderr) chunks of Docker's multiplexed stream: an 8-byte header (stream type,
    three zero bytes, big-endian size) before each frame."""
    buf = b""
    while True:
        data = sock.recv(_CHUNK)
        if not data:
            return
        buf += data
        while len(buf) >= 8:
            size = int.from_bytes(buf[4:8], "big")
            if len(buf) < 8 + size:
                break
            kind, payload, buf = buf[0], buf[8 : 8 + size], buf[8 + size :]
            yield (payload, None) if kind != 2 else (None, payload)


def _pump(chunks: Iterator[Any], pipe: queue.Queue[Any]) -> None:
    try:
        for item in chunks:
            if isinstance(item, tuple) and len(item) == 2:
                pipe.put(item)
        pipe.put(None)
    except BaseException as exc:
        pipe.put(exc)
