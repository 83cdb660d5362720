"""`libvirt-executor setup`: what the executor needs on this host, made idempotently."""

from __future__ import annotations

import ipaddress
import os
import shutil
from pathlib import Path

from executor.adapters import hostservice
from executor.adapters.hostfiles import load_settings
from executor.adapters.hypervisor import connect
from executor.adapters.statedir import StateDir
from executor.admin import mirror
from executor.agent import client as agent_client
from executor.core import naming
from executor.core.domain_xml import build_dir_pool, build_nat_network
from executor.core.nwfilter_xml import FILTER_NAME, build_job_filter, same_rules
from executor.errors import ConfigError
from executor.jobvm import layercache

SOURCE_EXAMPLE = Path(__file__).resolve().parent.parent.parent / "config.example.toml"


DEBIAN_SQUID_UNIT = "squid.service"  # the package's own: on every address, at our port 3128


def setup_host(config_file: str, example: str | None = None) -> list[str]:
    """Create the config (if missing), directories, storage pool, nwfilter, network and the
    registry mirror and the host agent (started). Idempotent:
    returns what it changed, an empty list when the host was already set up."""
    changes: list[str] = []
    config = Path(config_file)
    if not config.exists():
        template = Path(example) if example else SOURCE_EXAMPLE
        if not template.is_file():
            raise ConfigError(f"{config} does not exist and no template found at {template} (pass --example)")
        config.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.copyfile(template, config)
        os.chmod(config, 0o644)
        changes.append(f"wrote {config} from {template}")
    settings = load_settings(str(config))

    for directory, mode in (
        (settings.paths.state_dir, 0o700),
        (settings.paths.console_log_dir, 0o700),
        (settings.image.dir, 0o755),
    ):
        path = Path(directory)
        if not path.is_dir():
            path.mkdir(mode=mode, parents=True)
            changes.append(f"created {path}")
    StateDir(settings.paths.state_dir).ensure()

    net = settings.subnet
    with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
        if hv.ensure_pool(settings.libvirt.pool, build_dir_pool(settings.libvirt.pool, settings.libvirt.pool_path)):
            changes.append(f"storage pool {settings.libvirt.pool} at {settings.libvirt.pool_path} defined and started")
        cache = settings.docker_cache
        if cache.enabled and layercache.ensure_pool(hv, settings):
            changes.append(f"storage pool {cache.pool} at {cache.dir} defined and started (the Docker layer cache)")
        network_xml = build_nat_network(
            settings.libvirt.network,
            settings.libvirt.bridge,
            str(settings.gateway),
            str(ipaddress.IPv4Network(net).netmask),
        )
        # Defined whatever the config says, so that switching libvirt.nwfilter to it is one edit.
        wanted = build_job_filter(FILTER_NAME)
        defined = hv.nwfilter_xml(FILTER_NAME)
        if defined is None or not same_rules(defined, wanted):
            hv.define_nwfilter(wanted)
            changes.append(
                f"nwfilter {FILTER_NAME} {'defined' if defined is None else 'updated'} (the VM network policy)"
            )
        if hv.ensure_network(settings.libvirt.network, network_xml):
            changes.append(
                f"network {settings.libvirt.network} ({net}, bridge {settings.libvirt.bridge}) defined and started"
            )
    # After the network: the mirror listens on the bridge's address.
    changes += mirror.set_up(settings, config_file)
    # The host agent keeps the warm pool (idle with pool.size = 0) and the proxy forwarder.
    if hostservice.systemd_running() and hostservice.unit_active(DEBIAN_SQUID_UNIT):
        hostservice.systemctl("disable", "--now", DEBIAN_SQUID_UNIT)
        changes.append(f"stopped and disabled Debian's {DEBIAN_SQUID_UNIT} (the agent runs its own forwarder)")
    changes += agent_client.set_up(settings, config_file)
    return changes
