"""The host agent's second duty when `[network] proxy` is set: keep the proxy forwarder (core.proxy,
adapters.forwarder) running with the current config and credentials, on the host's VM-network
address. Without a proxy, it stops one that runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from executor.adapters.forwarder import Forwarder
from executor.adapters.hostfiles import read_secret
from executor.adapters.statedir import StateDir
from executor.core import proxy
from executor.core.settings import Settings


class ForwarderKeeper:
    def __init__(self, settings: Settings, say: Callable[[str], None]) -> None:
        prefix = settings.vm.name_prefix
        self.forwarder = Forwarder(
            StateDir(settings.paths.state_dir).agent_file(prefix, "squid.conf"),
            Path(settings.paths.console_log_dir) / f"proxy-{prefix}.log",
        )
        self.say = say

    def round(self, settings: Settings) -> None:
        if not proxy.enabled(settings):
            if self.forwarder.running():
                self.forwarder.stop()
                self.say("proxy forwarder stopped (network.proxy is not set)")
            return
        credentials = None
        if settings.network.proxy_credentials_file:
            text = read_secret(settings.network.proxy_credentials_file, "network.proxy_credentials_file")
            credentials = proxy.parse_credentials(text, "network.proxy_credentials_file")
        done = self.forwarder.keep(proxy.forwarder_config(settings, credentials))
        if done:
            self.say(
                f"proxy forwarder {done}: {proxy.forwarder_url(settings)} -> {settings.network.proxy}"
                + (" (with credentials)" if credentials else "")
            )

    def stop(self) -> None:
        self.forwarder.stop()
