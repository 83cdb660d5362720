"""`libvirt-executor agent`: the host agent in the foreground (what its systemd unit and
`agent start` run), until SIGTERM or SIGINT. On the way out it removes its idle VMs; after a
SIGKILL, `reap` does."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable

from executor.adapters.prometheus import Health, MetricsServer
from executor.adapters.statedir import StateDir
from executor.agent import client
from executor.agent.cachekeeper import CacheKeeper
from executor.agent.forwarding import ForwarderKeeper
from executor.agent.keeper import Keeper
from executor.core.metrics import Family
from executor.core.settings import Settings, metrics_address
from executor.core.waiting import signals_deferred, signals_raise_interrupted
from executor.errors import ExecutorError, Interrupted, describe
from executor.jobvm import journal

log = logging.getLogger(__name__)

ROUND_S = 2.0  # between two looks at the pool (a claim is refilled within this)
HEALTHY_ROUND_S = 60.0  # /healthz fails once the pool keeper has not finished a round for this long
HISTORY_PRUNE_S = 600.0  # old job-history rows are dropped this often

Collect = Callable[[Callable[[], dict[str, object]]], Iterable[Family]]


def serve(settings: Settings, config_file: str, say: Callable[[str], None], collect: Collect | None = None) -> None:
    """Keep the pool and the proxy forwarder; serve `collect`'s metrics (given the agent's own
    status) and /healthz on `[metrics] listen` unless that is empty."""
    StateDir(settings.paths.state_dir).ensure()
    with client.service(settings).hold():
        say(
            f"host agent for name prefix {settings.vm.name_prefix!r} started (pid {os.getpid()}): "
            f"pool.size = {settings.pool.size}, idle {settings.pool.idle}"
        )
        keeper = Keeper(config_file, settings, say)
        forwarding = ForwarderKeeper(settings, say)
        caching = CacheKeeper(lambda: keeper.settings, say)
        caching.start()
        said: dict[str, str] = {}
        rounds = {"updated": 0.0, "pruned": 0.0}

        def keep_pool() -> None:
            keeper.round()
            rounds["updated"] = time.time()

        def forward() -> None:
            forwarding.round(keeper.settings)

        def prune_history() -> None:
            if time.monotonic() - rounds["pruned"] >= HISTORY_PRUNE_S:
                rounds["pruned"] = time.monotonic()
                journal.prune(keeper.settings)

        def status() -> dict[str, object]:
            return {"updated": rounds["updated"], "boots": keeper.boots, "boot_failures": keeper.boot_failures}

        def health() -> tuple[bool, dict[str, object]]:
            age = time.time() - rounds["updated"]
            return age < HEALTHY_ROUND_S, {"last_round_age_s": round(age, 1), "last_error": keeper.last_error}

        duties: tuple[tuple[str, Callable[[], None]], ...] = (
            ("pool round", keep_pool),
            ("proxy forwarder", forward),
            ("job history", prune_history),
        )
        server = _serve_metrics(settings, lambda: collect(status), health, say) if collect else None
        try:
            with signals_raise_interrupted():
                while True:
                    for what, duty in duties:
                        try:
                            duty()
                            said.pop(what, None)
                        except Interrupted:
                            raise
                        except Exception as exc:  # one bad round (libvirtd restarting, a bug) must not end the agent
                            text = describe(exc)
                            if said.get(what) != text:  # said once, not every round
                                say(f"{what} failed: {text}")
                                log.debug("details", exc_info=True)
                            said[what] = text
                            if duty is keep_pool:
                                keeper.last_error = text
                    time.sleep(ROUND_S)
        except Interrupted as exc:
            say(f"stopping ({exc}): removing the idle VMs")
        with signals_deferred():
            if server is not None:
                server.close()
            forwarding.stop()
            caching.stop()
            try:
                keeper.drain("the agent stopped")
            except ExecutorError as exc:
                say(f"could not remove every idle VM ({exc}): `reap` removes them")
        say("stopped")


def _serve_metrics(
    settings: Settings, collect: Callable[[], Iterable[Family]], health: Health, say: Callable[[str], None]
) -> MetricsServer | None:
    """The metrics endpoint, or None (said why) when it is off or its address is taken: the
    pool matters more than the metrics."""
    if not settings.metrics.listen:
        return None
    host, port = metrics_address(settings.metrics.listen)
    try:
        server = MetricsServer(host, port, collect, health)
    except OSError as exc:
        say(f"not serving metrics on {settings.metrics.listen}: {exc}")
        return None
    say(f"serving metrics on http://{settings.metrics.listen}/metrics and /healthz")
    return server
