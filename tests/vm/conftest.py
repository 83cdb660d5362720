"""Fixtures for the vm tier: real libvirtd, qemu, the built base image, real SSH.

The tests use their own name prefix and state directories, so they never touch VMs of a real
runner on the same host; the pool, network and image are the ones `libvirt-executor setup`
and `image build` made. A missing prerequisite fails the tests with the fix, never skips them.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path

import pytest

from executor.adapters.hostfiles import load_settings
from executor.admin.demo import served_repository
from executor.admin.listing import leftovers_once_removed
from executor.core.nwfilter_xml import FILTER_NAME
from executor.core.settings import config_path

LIBVIRT_SOCKET = "/var/run/libvirt/libvirt-sock"


def _host_config() -> str:
    return config_path(None, os.environ)


@pytest.fixture(scope="session")
def host_settings():
    path = _host_config()
    if not os.path.exists(LIBVIRT_SOCKET):
        pytest.fail(f"libvirtd is not running ({LIBVIRT_SOCKET} missing): run scripts/setup.sh", pytrace=False)
    if not os.path.exists(path):
        pytest.fail(f"no executor config at {path}: run scripts/setup.sh (or libvirt-executor setup)", pytrace=False)
    settings = load_settings(path)
    if not Path(settings.image.dir, "manifest.json").exists():
        pytest.fail(f"no base image in {settings.image.dir}: run `libvirt-executor image build`", pytrace=False)
    return settings


def write_test_config(
    host_settings,
    directory: Path,
    prefix: str,
    expiry_margin: int = 1800,
    pool: tuple[str, str] | None = None,
    allow_host_ports: tuple[int, ...] = (),
    allowed_networks: tuple[str, ...] = (),
    docker: str = "",
    mirror: str = "enabled = false",
    extra: str = "",
    vm: str = "",
    timeouts: str = "",
    image_dir: str | None = None,
    network: str = "",
    vcpus: int = 1,
    memory_mib: int = 1024,
    metrics_listen: str = "",
) -> Path:
    """A config for tests: the host's pool (or `pool` = (name, path)), network, image and state
    dir (IP reservations must be shared by everything on one network), our own name prefix and
    console-log dir, and the executor's network policy (nwfilter lvx-job, whatever the host's
    config says) with these host ports and networks open. No registry mirror unless `mirror`
    (the [mirror] section's lines) says so; `vm` and `timeouts` are added to those sections
    and `extra` is appended (more sections), `network` to [network]. `image_dir`: another base
    image than the host's. `vcpus` and `memory_mib`: the normal VM size (small by default).
    `metrics_listen`: where a test's agent serves metrics (none by default: the host's agent has
    the default address)."""
    s = host_settings
    pool_name, pool_path = pool or (s.libvirt.pool, s.libvirt.pool_path)
    text = f"""
[libvirt]
uri = "{s.libvirt.uri}"
accel = "{s.libvirt.accel}"
pool = "{pool_name}"
pool_path = "{pool_path}"
network = "{s.libvirt.network}"
bridge = "{s.libvirt.bridge}"
subnet = "{s.libvirt.subnet}"
nwfilter = "{FILTER_NAME}"

[image]
dir = "{image_dir or s.image.dir}"

[vm]
name_prefix = "{prefix}"
vcpus = {vcpus}
memory_mib = {memory_mib}
{vm}

[timeouts]
boot = 300
docker = 240
cleanup = 60
expiry_margin = {expiry_margin}
{timeouts}

[paths]
state_dir = "{s.paths.state_dir}"
console_log_dir = "{directory / "console"}"

[network]
allow_host_ports = {list(allow_host_ports)}
allowed_networks = {json.dumps(list(allowed_networks))}
{network}

[docker]
{docker}

[mirror]
{mirror}

[metrics]
listen = "{metrics_listen}"
{extra}
"""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def leftovers():
    """A function returning what a test config's prefix still has on the host (empty: nothing),
    once cleanup's detached removers had time to finish."""
    return lambda config: leftovers_once_removed(load_settings(str(config)))


@pytest.fixture(scope="session")
def git_server(host_settings, tmp_path_factory):
    """A small git repository served over dumb HTTP on the VM bridge address (the host)."""
    files = {
        "README": "hello from the demo repository\n",
        "check.sh": "#!/bin/sh\necho repository-check-ok\n",
    }
    root = tmp_path_factory.mktemp("gitsrv")
    with served_repository(root, str(host_settings.gateway), files) as (url, sha):
        yield {"url": url, "sha": sha, "port": int(urllib.parse.urlsplit(url).port or 80)}
