"""`libvirt-executor agent`: the host agent in the foreground (what its systemd unit and
`agent start` run), until SIGTERM or SIGINT. On the way out it removes its idle VMs; after a
SIGKILL, `reap` does."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from executor.adapters.statedir import StateDir
from executor.agent import client
from executor.agent.forwarding import ForwarderKeeper
from executor.agent.keeper import Keeper
from executor.core.settings import Settings
from executor.core.waiting import signals_deferred, signals_raise_interrupted
from executor.errors import ExecutorError, Interrupted, describe

log = logging.getLogger(__name__)

ROUND_S = 2.0  # between two looks at the pool (a claim is refilled within this)


def serve(settings: Settings, config_file: str, say: Callable[[str], None]) -> None:
    StateDir(settings.paths.state_dir).ensure()
    with client.service(settings).hold():
        say(
            f"host agent for name prefix {settings.vm.name_prefix!r} started (pid {os.getpid()}): "
            f"pool.size = {settings.pool.size}, idle {settings.pool.idle}"
        )
        keeper = Keeper(config_file, settings, say)
        forwarding = ForwarderKeeper(settings, say)
        said: dict[str, str] = {}

        def forward() -> None:
            forwarding.round(keeper.settings)

        duties: tuple[tuple[str, Callable[[], None]], ...] = (
            ("pool round", keeper.round),
            ("proxy forwarder", forward),
        )
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
                            if duty is not forward:
                                keeper.last_error = text
                    time.sleep(ROUND_S)
        except Interrupted as exc:
            say(f"stopping ({exc}): removing the idle VMs")
        with signals_deferred():
            forwarding.stop()
            try:
                keeper.drain("the agent stopped")
            except ExecutorError as exc:
                say(f"could not remove every idle VM ({exc}): `reap` removes them")
        say("stopped")
