"""The host agent seen from outside: whether it runs, starting and stopping it (a systemd unit
where there is systemd, a detached process where there is none), what it last reported.

One agent per host and name prefix: its lock is `<state_dir>/agent/<prefix>.lock`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from executor.adapters import hostservice
from executor.adapters.statedir import StateDir
from executor.core.settings import Settings

SYSTEMD_UNIT = "libvirt-executor-agent.service"
STOP_WAIT_S = 120.0  # a stopping agent removes its idle VMs first (a destroy takes 1-2 s each)


def service(settings: Settings, state: StateDir | None = None) -> hostservice.Service:
    state = state or StateDir(settings.paths.state_dir)
    prefix = settings.vm.name_prefix
    return hostservice.Service(
        state.agent_file(prefix, "lock"), log_path(settings), f"the host agent for name prefix {prefix!r}"
    )


def log_path(settings: Settings) -> Path:
    """Where a detached agent writes (under systemd: the journal)."""
    return Path(settings.paths.console_log_dir) / f"agent-{settings.vm.name_prefix}.log"


def _agent_command(config_file: str) -> list[str]:
    return [*hostservice.this_command(), "--config", os.path.abspath(config_file), "agent"]


def set_up(settings: Settings, config_file: str) -> list[str]:
    """Have the agent running (setup): what changed."""
    if hostservice.systemd_running():
        text = hostservice.unit_text("libvirt-executor host agent (warm pool)", _agent_command(config_file))
        changed = hostservice.install_unit(SYSTEMD_UNIT, text)
        if changed or not hostservice.unit_active(SYSTEMD_UNIT):
            hostservice.systemctl("enable", SYSTEMD_UNIT)
            hostservice.systemctl("restart", SYSTEMD_UNIT)
            return [f"host agent (re)started: {SYSTEMD_UNIT}"]
        return []
    if service(settings).pid() is not None:
        return []
    return [f"host agent started: {start(settings, config_file)}"]


def start(settings: Settings, config_file: str) -> str:
    if hostservice.systemd_running():
        hostservice.systemctl("start", SYSTEMD_UNIT)
        return f"started {SYSTEMD_UNIT}"
    agent = service(settings)
    pid = agent.pid()
    if pid is not None:
        return f"already running (pid {pid})"
    pid = agent.spawn(_agent_command(config_file))
    return f"pid {pid}, log {agent.log}"


def stop(settings: Settings) -> str:
    if hostservice.systemd_running():
        hostservice.systemctl("stop", SYSTEMD_UNIT)
        return f"stopped {SYSTEMD_UNIT}"
    pid = service(settings).stop(STOP_WAIT_S)
    return "not running" if pid is None else f"stopped (pid {pid})"


def last_status(settings: Settings) -> dict[str, Any] | None:
    """What the agent wrote after its last round (None if it never ran)."""
    return StateDir(settings.paths.state_dir).read_agent_status(settings.vm.name_prefix)
