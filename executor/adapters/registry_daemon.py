"""The registry mirror's process on the host: Debian's `docker-registry`, supervised by us.

Everything of one mirror lives in its storage directory:

    <storage>/config.yml        distribution's config (0640 root:docker-registry; may hold the
                                upstream's password)
    <storage>/data/             the cached blobs and manifests (owned by docker-registry)
    <storage>/supervisor.lock   flock held by the supervisor for its whole life, with its pid
    <storage>/registry.log      the registry's and the supervisor's output (rotated at 8 MiB)

    <storage>/mode.json         the supervisor's: pulling through or serving the cache only, since when

The supervisor is one `hostservice.Service` (its lock says whether it runs). It restarts the
registry when it exits, and stops it for maintenance (eviction and garbage collection, which
distribution wants done offline). distribution 2.8 in proxy mode exits at start when its
upstream does not answer, so while the upstream is down (probed every 10 s) the supervisor runs
the same registry over the same storage without `proxy:` and read-only: it serves what is
cached, and the supervisor switches back once the upstream answers. One registry at a time:
the running one is stopped before the other starts, so the storage never has two writers, and
the read-only one writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from executor.core.mirror import MODE_CACHE_ONLY, CachedRepository, UpstreamWatch
from executor.core.waiting import poll
from executor.errors import ConfigError, SystemFailure

REGISTRY_BINARY = "/usr/bin/docker-registry"
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0  # a registry that ran this long restarts at once after an exit
UPSTREAM_PROBE_S = 10.0  # how often the supervisor asks whether the upstream answers
SYSTEMD_UNIT = "libvirt-executor-mirror.service"
DEBIAN_UNIT = "docker-registry.service"  # the package's own: Debian's config, on every address


def account(user: str) -> tuple[int, int]:
    """(uid, gid) of the registry's user; a ConfigError when the package did not create it."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"user {user} does not exist: install Debian's docker-registry package") from None
    return entry.pw_uid, entry.pw_gid


class MirrorDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.data = self.root / "data"
        self.config = self.root / "config.yml"
        self.lock = self.root / "supervisor.lock"
        self.log = self.root / "registry.log"
        self.mode_file = self.root / "mode.json"  # the supervisor's: proxy or cache-only, since when
        self.repositories = self.data / "docker" / "registry" / "v2" / "repositories"
        self.blobs = self.data / "docker" / "registry" / "v2" / "blobs"

    def ensure(self, user: str) -> list[str]:
        """The directories, owned so that only root and the registry's user get in."""
        uid, gid = account(user)
        made = []
        for path, owner, mode in ((self.root, 0, 0o750), (self.data, uid, 0o750)):
            if not path.is_dir():
                path.mkdir(parents=True)
                made.append(f"created {path}")
            os.chown(path, owner, gid)
            os.chmod(path, mode)
        return made

    def write_config(self, text: str, user: str) -> bool:
        """Replace config.yml atomically when `text` differs; whether it changed."""
        with contextlib.suppress(OSError):
            if self.config.read_text() == text:
                return False
        _, gid = account(user)
        tmp = self.config.with_name(".config.yml.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        with os.fdopen(fd, "w") as f:
            os.fchown(f.fileno(), 0, gid)
            os.fchmod(f.fileno(), 0o640)
            f.write(text)
        os.replace(tmp, self.config)
        return True

    def write_mode(self, state: dict[str, Any]) -> None:
        tmp = self.mode_file.with_name(".mode.json.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.mode_file)

    def read_mode(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.mode_file.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def clear_mode(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.mode_file.unlink()

    # --- what is cached ---------------------------------------------------------------------

    def blob_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.blobs.rglob("data") if f.is_file()) if self.blobs.is_dir() else 0

    def cached_repositories(self) -> list[CachedRepository]:
        """Each cached repository (a directory with `_manifests`), when it was last pulled and
        the bytes of the layers it links."""
        if not self.repositories.is_dir():
            return []
        found = []
        for manifests in self.repositories.rglob("_manifests"):
            repo = manifests.parent
            links = [p for p in manifests.rglob("link") if p.is_file()]
            last_used = max((p.stat().st_mtime for p in links), default=repo.stat().st_mtime)
            size = 0
            for link in (repo / "_layers").rglob("link") if (repo / "_layers").is_dir() else ():
                digest = link.parent.name
                data = self.blobs / "sha256" / digest[:2] / digest / "data"
                with contextlib.suppress(OSError):
                    size += data.stat().st_size
            found.append(CachedRepository(str(repo.relative_to(self.repositories)), last_used, size))
        return found

    def delete_repository(self, name: str) -> None:
        path = (self.repositories / name).resolve()
        if self.repositories.resolve() not in path.parents:
            raise ValueError(f"{name!r} is not a repository of {self.repositories}")
        shutil.rmtree(path)

    def exit_reason(self, offset: int) -> str:
        """The panic or fatal line the registry wrote after `offset` of its log (distribution
        2.8 panics at start when its upstream does not answer), "" if none."""
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                text = f.read(256 * 1024).decode("utf-8", "replace")
        except OSError:
            return ""
        for line in text.splitlines():
            if line.startswith("panic:") or "level=fatal" in line:
                return line[:300]
        return ""


def garbage_collect(mirror: MirrorDir, user: str, timeout: float = 600) -> int:
    """distribution's offline garbage collection (the registry must be stopped): removes blobs
    that no remaining manifest references. How many blobs it removed."""
    uid, gid = account(user)
    result = subprocess.run(
        [REGISTRY_BINARY, "garbage-collect", "--delete-untagged", str(mirror.config)],
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        lines = output.strip().splitlines()
        raise SystemFailure(f"docker-registry garbage-collect failed: {lines[-1] if lines else result.returncode}")
    return output.count("blob eligible for deletion")


def serve_argv(mirror: MirrorDir) -> list[str]:
    return [REGISTRY_BINARY, "serve", str(mirror.config)]


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def supervise(
    mirror: MirrorDir,
    user: str,
    *,
    config_for: Callable[[str], str],
    upstream: UpstreamWatch,
    upstream_problem: Callable[[], str | None],
    leftovers: list[int],
    check_every: float,
    maintenance_due: Callable[[], bool],
    maintain: Callable[[], None],
    say: Callable[[str], None],
    rotate_log: Callable[[], None],
) -> None:
    """Run the registry until SIGTERM/SIGINT, restarting it when it exits (backing off up to
    30 s while it keeps failing) and stopping it for `maintain` whenever `maintenance_due`,
    asked every `check_every` seconds. The upstream is probed every UPSTREAM_PROBE_S: the
    registry runs with `config_for(mode)` for the mode `upstream` decides (pulling through, or
    serving the cache only), restarted when that changes; the mode is kept in the mode file.
    Only one registry ever runs over the storage: `leftovers` (pids of registries serving this
    mirror, left by a killed supervisor) are stopped first. Call with the supervisor lock held."""
    uid, gid = account(user)
    stopping: list[int] = []

    def request_stop(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    for pid in leftovers:
        say(f"stopping a registry left by an earlier supervisor (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def entered(mode: str) -> None:
        mirror.write_mode(upstream.as_dict())
        if mode == MODE_CACHE_ONLY:
            say(f"serving the cache only, read-only: the upstream does not answer ({upstream.reason})")
        else:
            say("pulling through from the upstream")

    mode = upstream.starting(upstream_problem(), time.time())
    entered(mode)
    backoff = 1.0
    next_check = 0.0
    while not stopping:
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + check_every
            if maintenance_due():
                maintain()
        rotate_log()
        mirror.write_config(config_for(upstream.mode), user)
        started = time.monotonic()
        with open(mirror.log, "ab") as log:
            log_offset = log.tell()
            proc = subprocess.Popen(
                serve_argv(mirror),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                user=uid,
                group=gid,
                extra_groups=[],
                cwd="/",
            )
        interrupted = False
        next_probe = time.monotonic() + UPSTREAM_PROBE_S
        while proc.poll() is None:
            if stopping:
                _stop(proc)
                interrupted = True
                break
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + check_every
                if maintenance_due():
                    _stop(proc)
                    maintain()
                    interrupted = True
                    break
            if time.monotonic() >= next_probe:
                if upstream.probed(upstream_problem(), time.time()):
                    _stop(proc)  # one registry at a time over the storage: stopped, then the other
                    entered(upstream.mode)
                    interrupted = True
                    break
                mirror.write_mode(upstream.as_dict())
                next_probe = time.monotonic() + UPSTREAM_PROBE_S
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.5)
        if stopping or interrupted:
            continue
        ran = time.monotonic() - started
        why = mirror.exit_reason(log_offset)
        if upstream.proxy_exited(upstream_problem(), time.time()):
            say(f"docker-registry exited with status {proc.returncode} after {ran:.0f} s ({why or 'no reason given'})")
            entered(upstream.mode)
            continue
        backoff = 1.0 if ran >= STABLE_AFTER_S else min(backoff * 2, MAX_BACKOFF_S)
        say(
            f"docker-registry exited with status {proc.returncode} after {ran:.0f} s"
            + (f" ({why})" if why else "")
            + f"; restarting in {backoff:.0f} s"
        )
        poll(lambda: bool(stopping), backoff, interval=0.2, max_interval=0.2)  # a SIGTERM cuts it short
    mirror.clear_mode()
    say(f"stopped ({signal.Signals(stopping[0]).name})")


# --- the registry API, over plain HTTP on this host ---------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


def probe(url: str, timeout: float = 3.0) -> str | None:
    """None when `url` is a registry root answering its API (/v2/: 200, or 401 asking for
    auth); else why not."""
    try:
        with _OPENER.open(url.rstrip("/") + "/v2/", timeout=timeout) as resp:
            resp.read(1024)
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code == 401 else f"HTTP {exc.code} on /v2/: not a registry API"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def debug_vars(address: str, timeout: float = 3.0) -> dict[str, Any] | None:
    """The registry's expvar page (`/debug/vars` on its debug address), None if unreachable."""
    try:
        with _OPENER.open(f"http://{address}/debug/vars", timeout=timeout) as resp:
            data = json.loads(resp.read(1024 * 1024))
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
