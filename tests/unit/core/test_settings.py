"""executor.core.settings: defaults, validation (every problem at once), loading."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from executor.core.settings import (
    CONFIG_PATH_ENV,
    DEFAULT_CONFIG_PATH,
    Settings,
    config_path,
    parse_settings,
    settings_toml,
)
from executor.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[3] / "config.example.toml"


def _problems(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, source="cfg.toml")
    return str(info.value)


# --- defaults --------------------------------------------------------------------------------


def test_example_config_equals_the_defaults():
    assert parse_settings(EXAMPLE.read_text(encoding="utf-8"), source=str(EXAMPLE)) == Settings()


def test_example_config_shows_every_key_of_every_section():
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    expected = {f.name: {g.name for g in dataclasses.fields(f.default_factory)} for f in dataclasses.fields(Settings)}
    assert {section: set(keys) for section, keys in raw.items()} == expected


def test_empty_config_is_all_defaults():
    assert parse_settings("") == Settings()


def test_integer_seconds_become_floats_and_values_are_kept():
    s = parse_settings('[timeouts]\nboot = 30\n[vm]\nvcpus = 4\n[docker]\nregistry_mirrors = ["http://10.0.0.2:5000"]')
    assert s.timeouts.boot == 30.0 and isinstance(s.timeouts.boot, float)
    assert s.vm.vcpus == 4
    assert s.docker.registry_mirrors == ("http://10.0.0.2:5000",)
    assert s.vm.memory_mib == Settings().vm.memory_mib  # untouched keys keep their default


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().vm.vcpus = 8  # type: ignore[misc]


def test_network_and_gateway_come_from_the_subnet():
    s = parse_settings('[libvirt]\nsubnet = "10.20.30.0/24"')
    assert str(s.subnet) == "10.20.30.0/24"
    assert str(s.gateway) == "10.20.30.1"


# --- validation: one problem at a time ---------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, detail",
    [
        ('[libvirt]\naccel = "hvf"', "libvirt.accel", "auto, kvm or tcg"),
        ('[libvirt]\naccel = "KVM"', "libvirt.accel", "auto, kvm or tcg"),
        ('[libvirt]\nsubnet = "banana"', "libvirt.subnet", ""),
        ('[libvirt]\nsubnet = "192.168.213.5/24"', "libvirt.subnet", "host bits"),
        ('[libvirt]\nsubnet = "10.0.0.0/29"', "libvirt.subnet", "too small"),
        ('[libvirt]\nsubnet = "fd00::/64"', "libvirt.subnet", ""),
        ('[libvirt]\npool = "../etc"', "libvirt.pool", "not a valid libvirt object name"),
        ('[libvirt]\nnetwork = "a b"', "libvirt.network", "not a valid libvirt object name"),
        ('[libvirt]\nnwfilter = "x/y"', "libvirt.nwfilter", "not a valid libvirt object name"),
        ('[libvirt]\nbridge = "averyveryverylongbridge"', "libvirt.bridge", "max 15"),
        ('[libvirt]\npool_path = "var/lib/pool"', "libvirt.pool_path", "absolute path"),
        ('[image]\ndir = "image"', "image.dir", "absolute path"),
        ('[paths]\nstate_dir = "./state"', "paths.state_dir", "absolute path"),
        ('[paths]\nconsole_log_dir = "log"', "paths.console_log_dir", "absolute path"),
        ('[vm]\nbuilds_dir = "builds"', "vm.builds_dir", "absolute path"),
        ('[vm]\ncache_dir = "~/cache"', "vm.cache_dir", "absolute path"),
        ('[vm]\nname_prefix = "LVX"', "vm.name_prefix", ""),
        ('[vm]\nname_prefix = "1vx"', "vm.name_prefix", ""),
        ("[vm]\nvcpus = 0", "vm.vcpus", "between 1 and 64"),
        ("[vm]\nmemory_mib = 128", "vm.memory_mib", "between 256"),
        ("[vm]\ndisk_gib = 0", "vm.disk_gib", "between 1"),
        ('[vm]\nuser = "root"', "vm.user", "non-root"),
        ('[vm]\nuser = "Bad User"', "vm.user", "non-root"),
        ("[timeouts]\nboot = 0", "timeouts.boot", "positive"),
        ("[timeouts]\ndocker = -1", "timeouts.docker", "positive"),
        ("[timeouts]\nssh_connect = 0.0", "timeouts.ssh_connect", "positive"),
        ("[timeouts]\ncleanup = -0.5", "timeouts.cleanup", "positive"),
        ("[timeouts]\nexpiry_margin = 0", "timeouts.expiry_margin", "positive"),
        ("[timeouts]\nmax_lifetime = -3600", "timeouts.max_lifetime", "positive"),
        # TOML has nan and inf; neither is a usable deadline (nan <= 0 is False).
        ("[timeouts]\nboot = nan", "timeouts.boot", "finite"),
        ("[timeouts]\nmax_lifetime = inf", "timeouts.max_lifetime", "finite"),
        ('[docker]\nregistry_mirrors = ["ftp://mirror"]', "docker.registry_mirrors", "http(s) URL"),
        ('[docker]\nregistry_mirrors = ["mirror.example:5000"]', "docker.registry_mirrors", "http(s) URL"),
        ('[docker]\nregistry_mirrors = ["http://a b"]', "docker.registry_mirrors", "http(s) URL"),
        ('[docker]\nregistry_mirrors = ["http://m/\\"x"]', "docker.registry_mirrors", "http(s) URL"),
        ('[docker]\ninsecure_registries = ["a b"]', "docker.insecure_registries", "host[:port]"),
        ('[docker]\ndind = "nested"', "docker.dind", "must be 'vm-daemon' or 'privileged'"),
        ('[runner]\nbinary = "gitlab-runner"', "runner.binary", "absolute path"),
        ('[cache]\nmode = "local"', "cache.mode", "must be 'off' or 'host'"),
        ('[cache]\ndir = "cache"', "cache.dir", "absolute path"),
        ("[cache]\nmax_gib = 0", "cache.max_gib", "positive number of GiB"),
        ("[cache]\nmax_total_gib = -1", "cache.max_total_gib", "positive number of GiB"),
        ("[cache]\nmax_gib = 60", "cache.max_gib", "60 GiB per project is above cache.max_total_gib (50)"),
        ('[cache]\nserver_addresses = ["http://minio:9000"]', "cache.server_addresses", "host or host:port"),
        ("[docker_cache]\nenabled = 1", "docker_cache.enabled", "expected true or false"),
        ("[docker_cache]\nmax_gib = 0", "docker_cache.max_gib", "positive number of GiB"),
        ("[docker_cache]\nmax_total_gib = nan", "docker_cache.max_total_gib", "positive number of GiB"),
        (
            "[docker_cache]\nmax_gib = 200",
            "docker_cache.max_gib",
            "200 GiB per lineage is above docker_cache.max_total_gib",
        ),
        ('[docker_cache]\ndir = "cache"', "docker_cache.dir", "absolute path"),
        ('[docker_cache]\npool = "a b"', "docker_cache.pool", "not a valid libvirt object name"),
        ('[docker_cache]\npool = "libvirt-executor"', "docker_cache.pool and docker_cache.dir", "must differ"),
        ('[cache]\nserver_addresses = ["minio:99999"]', "cache.server_addresses", "host or host:port"),
        # wrong types
        ('[vm]\nvcpus = "2"', "vm.vcpus", "expected an integer"),
        ("[vm]\nvcpus = 2.5", "vm.vcpus", "expected an integer"),
        ("[vm]\nvcpus = true", "vm.vcpus", "expected an integer"),
        ('[timeouts]\nboot = "4m"', "timeouts.boot", "expected a number of seconds"),
        ("[timeouts]\nboot = false", "timeouts.boot", "expected a number of seconds"),
        ("[libvirt]\nuri = 5", "libvirt.uri", "expected a string"),
        ('[docker]\nregistry_mirrors = "http://m"', "docker.registry_mirrors", "expected a list of strings"),
        ("[docker]\ninsecure_registries = [1, 2]", "docker.insecure_registries", "expected a list of strings"),
        ("[timeouts]\nunresponsive = 0", "timeouts.unresponsive", "must be positive"),
        ("[timeouts]\nunresponsive = 10", "timeouts.unresponsive", "at least 15 (the VM is probed every 5 s)"),
        ("[limits]\ncpu_percent = 5", "limits.cpu_percent", "below 10 a VM cannot boot in time"),
        ("[limits]\ncpu_percent = -1", "limits.cpu_percent", "between 0 (no limit) and 1000"),
        ("[limits]\ndisk_mbps = 1.5", "limits.disk_mbps", "expected an integer"),
        ("[limits]\nnet_mbit = 1000000", "limits.net_mbit", "between 0 (no limit) and 100000"),
        ("[admission]\nenabled = 1", "admission.enabled", "expected true or false"),
        ("[admission]\npool_margin_gib = -1", "admission.pool_margin_gib", "between 0 and 4096"),
        ("[admission]\nmemory_margin_mib = -5", "admission.memory_margin_mib", "between 0 and 262144"),
        ("[pool]\nsize = -1", "pool.size", "between 0 (no pool) and 64"),
        ("[pool]\nsize = 65", "pool.size", "between 0 (no pool) and 64"),
        ('[pool]\nidle = "stopped"', "pool.idle", "must be 'paused' or 'running'"),
        ("[pool]\nmax_idle = 10", "pool.max_idle", "between 60 and 604800 seconds"),
        ('[pool]\nprepull = ["Not An Image"]', "pool.prepull", "invalid image name"),
        ("[history]\nkeep_days = 0", "history.keep_days", "between 1 and 3650"),
        ('[metrics]\nlisten = "9253"', "metrics.listen", "is not address:port, like 127.0.0.1:9253"),
        ('[metrics]\nlisten = "localhost:9253"', "metrics.listen", "does not appear to be an IPv4 or IPv6 address"),
        ('[metrics]\nlisten = "127.0.0.1:99999"', "metrics.listen", "is not address:port"),
        # structure
        ("[libvirtt]\nuri = 'x'", "libvirtt", "unknown section"),
        ("[vm]\nvcpu = 2", "vm.vcpu", "unknown key"),
        ("vm = 3", "vm", "must be a table"),
    ],
)
def test_each_problem_is_reported_with_its_key(text, key, detail):
    message = _problems(text)
    assert message.startswith("cfg.toml: invalid configuration")
    assert f"{key}: " in message
    assert detail in message


def test_valid_mirror_and_registry_are_accepted():
    s = parse_settings(
        '[docker]\nregistry_mirrors = ["https://mirror.example:5000/v2", "http://[fd00::1]:5000"]\n'
        'insecure_registries = ["192.168.213.2:5000", "10.0.0.0/8"]'
    )
    assert len(s.docker.registry_mirrors) == 2 and len(s.docker.insecure_registries) == 2


def test_unknown_key_lists_the_known_ones():
    message = _problems("[vm]\nvcpu = 2")
    assert "vcpus" in message and "memory_mib" in message


def test_every_problem_is_reported_together_in_one_error():
    text = """
[libvirt]
accel = "xen"
subnet = "300.1.1.0/24"
pool_path = "relative"
[vm]
vcpus = "many"
memory_mib = 1
[timeouts]
boot = 0
cleanup = -5
[docker]
registry_mirrors = ["gopher://m"]
[bogus]
x = 1
"""
    message = _problems(text)
    for key in (
        "libvirt.accel",
        "libvirt.subnet",
        "libvirt.pool_path",
        "vm.vcpus",
        "vm.memory_mib",
        "timeouts.boot",
        "timeouts.cleanup",
        "docker.registry_mirrors",
        "bogus",
    ):
        assert f"\n  {key}: " in message, key
    assert message.count("\n  ") == 9  # one line per problem, nothing else


def test_invalid_toml_is_a_config_error():
    message = _problems("[vm\nvcpus = 2")
    assert "not valid TOML" in message and message.startswith("cfg.toml")


def test_config_path_precedence():
    assert config_path("/x.toml", {CONFIG_PATH_ENV: "/env.toml"}) == "/x.toml"
    assert config_path(None, {CONFIG_PATH_ENV: "/env.toml"}) == "/env.toml"
    assert config_path(None, {CONFIG_PATH_ENV: ""}) == DEFAULT_CONFIG_PATH
    assert config_path(None, {}) == DEFAULT_CONFIG_PATH


def test_settings_written_as_toml_read_back_the_same():
    text = (
        '[libvirt]\naccel = "tcg"\nsubnet = "10.20.30.0/24"\n[vm]\nname_prefix = "ci"\nvcpus = 3\n'
        '[timeouts]\nboot = 12.5\n[docker]\nregistry_mirrors = ["http://m:5000"]\n'
        '[network]\nallow_host_ports = [5000, 8080]\nallowed_networks = ["10.1.2.3/32"]\n'
    )
    settings = parse_settings(text)
    assert parse_settings(settings_toml(settings)) == settings
    assert parse_settings(settings_toml(Settings())) == Settings()


def test_the_metrics_address_takes_ipv4_and_bracketed_ipv6():
    from executor.core.settings import metrics_address

    assert metrics_address("127.0.0.1:9253") == ("127.0.0.1", 9253)
    assert metrics_address("[::1]:9253") == ("::1", 9253)
    assert parse_settings('[metrics]\nlisten = ""').metrics.listen == ""  # off
