"""The host agent's second duty when `[network] proxy` is set: keep the proxy forwarder (core.proxy,
adapters.forwarder) running with the current config and credentials, on the host's VM-network
address. Without a proxy, it stops one that runs.

The config (`<state_dir>/agent/<prefix>.squid.conf`, 0600) is rewritten when it changes, and
squid restarted; squid is also restarted when it exited. Its log is beside the agent's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from executor.adapters import forwarder, hostinfo
from executor.adapters.hostfiles import read_secret
from executor.adapters.hostservice import start_detached
from executor.adapters.statedir import StateDir
from executor.core import proxy
from executor.core.settings import Settings

CONFIG = "squid.conf"  # an agent file: <state_dir>/agent/<prefix>.squid.conf
STOP_WAIT_S = 10.0


class ForwarderKeeper:
    def __init__(self, settings: Settings, say: Callable[[str], None]) -> None:
        self.prefix = settings.vm.name_prefix
        self.state = StateDir(settings.paths.state_dir)
        self.config = self.state.agent_file(self.prefix, CONFIG)
        self.log = Path(settings.paths.console_log_dir) / f"proxy-{self.prefix}.log"
        self.say = say
        self._proc: subprocess.Popen[bytes] | None = None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def round(self, settings: Settings) -> None:
        if not proxy.enabled(settings):
            if self.running():
                self.stop()
                self.say("proxy forwarder stopped (network.proxy is not set)")
            return
        credentials = None
        if settings.network.proxy_credentials_file:
            text = read_secret(settings.network.proxy_credentials_file, "network.proxy_credentials_file")
            credentials = proxy.parse_credentials(text, "network.proxy_credentials_file")
        changed = self.state.write_agent_file(self.prefix, CONFIG, proxy.forwarder_config(settings, credentials))
        if self.running() and not changed:
            return
        why = "the config changed" if self.running() else (f"it exited ({self._proc.returncode})" if self._proc else "")
        self.stop()
        argv = forwarder.squid_argv(self.config)
        for pid in hostinfo.processes_running(argv):  # of an agent that was killed: it holds the port
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        self._proc = start_detached(argv, self.log)
        self.say(
            f"proxy forwarder {f'restarted ({why})' if why else 'started'}: "
            f"{proxy.forwarder_url(settings)} -> {settings.network.proxy}"
            + (" (with credentials)" if credentials else "")
        )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
