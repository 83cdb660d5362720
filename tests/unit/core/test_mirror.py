"""core.mirror: the registry's config, the VM daemon's mirrors, eviction, listeners, counters."""

from __future__ import annotations

import dataclasses
import ipaddress
import json

import pytest

from executor.core import mirror
from executor.core.mirror import MODE_CACHE_ONLY, MODE_PROXY, UpstreamWatch, cache_only_because
from executor.core.settings import GIB, MirrorSettings, Settings, parse_settings
from executor.errors import ConfigError


def settings(**mirror_keys) -> Settings:
    return dataclasses.replace(Settings(), mirror=MirrorSettings(**mirror_keys))


def test_registry_config_is_a_proxy_on_the_vm_network_address_only():
    config = json.loads(mirror.registry_config(settings(port=5050), "/srv/m/data", None))
    assert config["http"]["addr"] == "192.168.213.1:5050"  # the subnet's .1, never 0.0.0.0 or :5050
    assert config["http"]["debug"]["addr"] == "127.0.0.1:5050"
    assert config["proxy"] == {"remoteurl": "https://registry-1.docker.io"}
    assert config["storage"]["filesystem"]["rootdirectory"] == "/srv/m/data"


def test_upstream_credentials_go_into_the_proxy_section_only():
    s = settings(upstream="http://10.1.2.3:5000/", username="bot", password_file="/etc/pw")
    text = mirror.registry_config(s, "/d", "s3cret")
    config = json.loads(text)
    assert config["proxy"] == {"remoteurl": "http://10.1.2.3:5000", "username": "bot", "password": "s3cret"}
    assert text.count("s3cret") == 1


def test_the_daemon_gets_our_mirror_first_only_when_it_answers():
    s = dataclasses.replace(settings(), docker=dataclasses.replace(Settings().docker, registry_mirrors=("http://m2",)))
    assert mirror.daemon_mirrors(s, mirror_answers=True) == ["http://192.168.213.1:5000", "http://m2"]
    assert mirror.daemon_mirrors(s, mirror_answers=False) == ["http://m2"]
    off = dataclasses.replace(s, mirror=MirrorSettings(enabled=False))
    assert mirror.daemon_mirrors(off, mirror_answers=True) == ["http://m2"]
    assert mirror.host_ports(s) == (5000,) and mirror.host_ports(off) == ()


def repo(name, last_used, mib):
    return mirror.CachedRepository(name, last_used, mib * 2**20)


def test_eviction_takes_the_least_recently_pulled_down_to_the_low_watermark():
    repos = [repo("new", 300, 400), repo("old", 100, 400), repo("mid", 200, 400)]
    used = 1200 * 2**20
    chosen = mirror.evictions(repos, used, max_gib=1000 / 1024)  # cap 1000 MiB, watermark 800 MiB
    assert [r.name for r in chosen] == ["old"]
    chosen = mirror.evictions(repos, used, max_gib=500 / 1024)  # watermark 400 MiB
    assert [r.name for r in chosen] == ["old", "mid"]


def test_no_eviction_within_the_cap():
    assert mirror.evictions([repo("a", 1, 10)], GIB, max_gib=1) == []


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 01D5A8C0:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000   102        0 1 1
   1: 0100007F:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000   102        0 2 1
   2: 00000000:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 01D5A8C0:1388 0AD5A8C0:9C40 01 00000000:00000000 00:00000000 00000000   102        0 4 1
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:1388 00000000000000000000000000000000:0000 0A
"""


def test_proc_net_tcp_listeners_and_the_foreign_ones_on_the_mirror_port():
    v4 = mirror.parse_proc_net_tcp(PROC_NET_TCP)
    assert v4 == [
        (ipaddress.IPv4Address("192.168.213.1"), 5000),
        (ipaddress.IPv4Address("127.0.0.1"), 5000),
        (ipaddress.IPv4Address("0.0.0.0"), 5000),
    ]  # the established connection (state 01) is not a listener
    v6 = mirror.parse_proc_net_tcp(PROC_NET_TCP6, ipv6=True)
    assert v6 == [(ipaddress.IPv6Address("::"), 5000)]
    assert mirror.foreign_listeners(v4 + v6, settings()) == ["0.0.0.0:5000", "[::]:5000"]
    assert mirror.foreign_listeners(v4[:2], settings()) == []
    assert mirror.foreign_listeners(v4, settings(port=5001)) == []


def test_proxy_counters_from_debug_vars():
    expvars = {
        "registry": {
            "proxy": {
                "blobs": {"Requests": 3, "Hits": 2, "Misses": 1, "BytesPulled": 10, "BytesPushed": 10},
                "manifests": {"Requests": 2, "Hits": 1, "Misses": 1, "BytesPulled": 5, "BytesPushed": 5},
            }
        }
    }
    stats = mirror.proxy_stats(expvars)
    assert stats is not None and stats.blobs.hits == 2 and stats.manifests.misses == 1
    assert mirror.proxy_stats({}) is None
    assert mirror.proxy_stats({"registry": {"proxy": {"blobs": {"Hits": "x"}}}}) is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[mirror]\nport = 53", "mirror.port: 53 is not a free TCP port"),
        ("[mirror]\nport = 70000", "mirror.port: 70000"),
        ('[mirror]\nupstream = "ftp://x"', "mirror.upstream: 'ftp://x' must be a registry's root URL"),
        ('[mirror]\nupstream = "https://r.example/v2/x"', "must be a registry's root URL"),
        ('[mirror]\nusername = "bot"', "set both (upstream credentials) or neither"),
        ('[mirror]\nstorage = "relative"', "mirror.storage: must be an absolute path"),
        ("[mirror]\nmax_gib = 0", "mirror.max_gib: must be a positive number of GiB"),
        ('[mirror]\nmax_gib = "big"', "mirror.max_gib: expected a number, got 'big'"),
        ('[mirror]\nenabled = "yes"', "mirror.enabled: expected true or false"),
    ],
)
def test_bad_mirror_keys_are_reported(text, problem):
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        parse_settings(text)
    assert problem in str(info.value)


def test_mirror_keys_are_read():
    s = parse_settings('[mirror]\nport = 5050\nupstream = "http://10.0.0.5:5000"\nmax_gib = 0.5\nenabled = false')
    assert s.mirror == MirrorSettings(enabled=False, port=5050, upstream="http://10.0.0.5:5000", max_gib=0.5)


def test_the_cache_only_config_is_the_same_registry_without_proxy_and_read_only():
    s = settings(upstream="http://10.1.2.3:5000/", username="bot", password_file="/etc/pw")
    proxy = json.loads(mirror.registry_config(s, "/data", "pw"))
    cache = json.loads(mirror.registry_config(s, "/data", "pw", mode=MODE_CACHE_ONLY))
    assert "proxy" in proxy and "maintenance" not in proxy["storage"]
    assert "proxy" not in cache and "pw" not in json.dumps(cache)  # no upstream, so no upstream password
    assert cache["storage"]["maintenance"] == {"readonly": {"enabled": True}}
    assert cache["storage"]["filesystem"] == proxy["storage"]["filesystem"]  # the same cache
    assert cache["http"] == proxy["http"]  # on the same address


def test_a_mirror_starting_without_its_upstream_serves_its_cache_at_once_and_pulls_through_at_the_first_answer():
    watch = UpstreamWatch("https://up")
    assert watch.starting("no such host", 100.0) == MODE_CACHE_ONLY
    assert watch.as_dict() == {
        "mode": MODE_CACHE_ONLY,
        "since": 100.0,
        "reason": "no such host",
        "upstream": "https://up",
    }
    assert watch.probed("timed out", 110.0) is False and watch.reason == "timed out" and watch.since == 100.0
    assert watch.probed(None, 120.0) is True and watch.mode == MODE_PROXY and watch.since == 120.0


def test_a_running_mirror_serves_its_cache_after_two_failed_probes_in_a_row_not_one():
    watch = UpstreamWatch("https://up")
    assert watch.starting(None, 0.0) == MODE_PROXY
    assert watch.probed("refused", 10.0) is False and watch.mode == MODE_PROXY
    assert watch.probed(None, 20.0) is False
    assert watch.probed("refused", 30.0) is False
    assert watch.probed("refused", 40.0) is True and watch.mode == MODE_CACHE_ONLY and watch.since == 40.0


def test_a_proxy_that_exits_for_its_upstream_switches_at_once_and_for_another_reason_does_not():
    watch = UpstreamWatch("https://up")
    watch.starting(None, 0.0)
    assert watch.proxy_exited(None, 5.0) is False and watch.mode == MODE_PROXY  # a crash: restart it
    assert watch.proxy_exited("no such host", 6.0) is True and watch.mode == MODE_CACHE_ONLY


def test_cache_only_because_says_since_when_and_why_in_printable_text():
    state = {"mode": "cache-only", "since": 1_800_000_000, "reason": "no\nsuch host\x1b[31m", "upstream": "https://up"}
    assert (
        cache_only_because(state) == "upstream https://up unreachable since 2027-01-15 08:00:00 UTC (no?such host?[31m)"
    )
    assert cache_only_because({**state, "mode": "proxy"}) is None and cache_only_because(None) is None
