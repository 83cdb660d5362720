"""The host agent's proxy forwarder and doctor's check of it, with real squid processes on
loopback: the agent's forwarder (as in production) in front of a stand-in for the company's
proxy (another squid, asking for a password), and a TCP listener as the web."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from executor.admin.doctor import _check_proxy
from executor.agent.forwarding import ForwarderKeeper
from executor.core.settings import NetworkSettings, Settings
from executor.core.waiting import poll
from executor.testing.company_proxy import company_proxy

pytestmark = pytest.mark.skipif(not shutil.which("squid") or os.geteuid() != 0, reason="needs squid and root")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def company(tmp_path):
    """The company's proxy: user "bot", password "right-pw", on 127.0.0.2."""
    with company_proxy("127.0.0.2", _free_port("127.0.0.2"), "bot", "right-pw") as (url, _):
        yield url


@pytest.fixture
def web():
    """What the proxy is asked to reach."""
    server = socket.create_server(("127.0.0.3", 0))
    yield f"127.0.0.3:{server.getsockname()[1]}"
    server.close()


def _settings(tmp_path, company, password: str) -> Settings:
    credentials = tmp_path / "proxy-credentials"
    credentials.write_text(f"bot:{password}\n")
    credentials.chmod(0o600)
    (tmp_path / "state").mkdir(mode=0o700, exist_ok=True)
    network = NetworkSettings(
        proxy=company, proxy_credentials_file=str(credentials), proxy_port=_free_port("127.0.0.1")
    )
    paths = dataclasses.replace(Settings().paths, state_dir=str(tmp_path / "state"), console_log_dir=str(tmp_path))
    libvirt = dataclasses.replace(Settings().libvirt, subnet="127.0.0.0/24")  # the forwarder on 127.0.0.1
    return Settings(libvirt=libvirt, network=network, paths=paths)


def test_the_agents_forwarder_adds_the_credentials_and_doctor_sees_it_through(tmp_path, company, web):
    said: list[str] = []
    settings = _settings(tmp_path, company, "right-pw")
    keeper = ForwarderKeeper(settings, said.append)
    try:
        keeper.round(settings)
        assert said == [
            f"proxy forwarder started: http://127.0.0.1:{settings.network.proxy_port} -> {company} (with credentials)"
        ]
        assert poll(lambda: _answers("127.0.0.1", settings.network.proxy_port), 10, interval=0.1)
        config = Path(settings.paths.state_dir) / "agent" / "lvx.squid.conf"
        assert config.stat().st_mode & 0o777 == 0o600  # it holds the password
        check = _check_proxy(settings, target=web)
        assert check.ok and not check.warning, check.line()
        assert "right-pw" not in check.line() and not any("right-pw" in line for line in said)
        keeper.round(settings)  # nothing changed: nothing done
        assert len(said) == 1
    finally:
        keeper.stop()


def test_wrong_credentials_are_a_clear_failure_and_a_fixed_file_is_picked_up(tmp_path, company, web):
    said: list[str] = []
    settings = _settings(tmp_path, company, "wrong-pw")
    keeper = ForwarderKeeper(settings, said.append)
    try:
        keeper.round(settings)
        assert poll(lambda: _answers("127.0.0.1", settings.network.proxy_port), 10, interval=0.1)
        check = _check_proxy(settings, target=web)
        assert check.ok is False and f"{company} refused the forwarder's credentials" in check.detail
        assert "network.proxy_credentials_file" in check.fix and "wrong-pw" not in check.line()
        Path(settings.network.proxy_credentials_file).write_text("bot:right-pw\n")
        keeper.round(settings)
        assert said[-1].startswith("proxy forwarder restarted (the config changed)")
        time.sleep(0.5)
        assert poll(lambda: _check_proxy(settings, target=web).ok, 10, interval=0.2)
    finally:
        keeper.stop()
    down = _check_proxy(settings, target=web)
    assert down.ok is False and "does not answer" in down.detail
