"""executor.core.netpolicy: what a job VM may reach, and the nwfilter parameters that say so."""

from __future__ import annotations

import ipaddress

from executor.core import netpolicy
from executor.core.netpolicy import DEFAULT_BLOCKED_NETWORKS, Policy

GATEWAY = ipaddress.IPv4Address("192.168.213.1")
HOST = [ipaddress.IPv4Address(a) for a in ("127.0.0.1", "192.0.2.2", "192.168.213.1")]


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def decide(**overrides) -> Policy:
    args = {
        "gateway": GATEWAY,
        "allow_host_ports": (),
        "allowed_networks": (),
        "blocked_networks": DEFAULT_BLOCKED_NETWORKS,
        "host_addresses": HOST,
        "gitlab_server": None,
    }
    args.update(overrides)
    return netpolicy.decide(**args)


def blocks(policy: Policy, address: str) -> bool:
    """Whether the filter drops a packet from the VM to `address` (allowed rules come first)."""
    ip = ipaddress.IPv4Address(address)
    return not any(ip in n for n in policy.allowed) and any(ip in n for n in policy.blocked)


def test_defaults_block_the_host_private_ranges_and_metadata_and_allow_the_internet():
    policy = decide()
    assert policy.host_ports == (53,)
    for address in (
        "192.168.213.1",
        "192.0.2.2",
        "169.254.169.254",
        "10.1.2.3",
        "172.20.0.1",
        "100.64.0.1",
        "127.0.0.1",
        "224.0.0.251",
        "192.168.1.1",
    ):
        assert blocks(policy, address), address
    for address in ("1.1.1.1", "151.101.0.1", "192.0.3.1"):
        assert not blocks(policy, address), address
    assert policy.notes == ()


def test_a_host_address_outside_every_blocked_range_is_blocked_too():
    policy = decide(blocked_networks=(), host_addresses=[ipaddress.IPv4Address("203.0.113.7")])
    assert blocks(policy, "203.0.113.7") and blocks(policy, "192.168.213.1")
    assert not blocks(policy, "203.0.113.8")


def test_allowed_networks_and_host_ports_are_exceptions():
    policy = decide(allow_host_ports=(5000, 5000, 8080), allowed_networks=("10.1.2.3/32",))
    assert policy.host_ports == (53, 5000, 8080)
    assert not blocks(policy, "10.1.2.3") and blocks(policy, "10.1.2.4")


def test_the_jobs_gitlab_server_in_a_blocked_range_is_allowed_and_said():
    server = ("gitlab.lan", [ipaddress.IPv4Address("10.9.8.7"), ipaddress.IPv4Address("1.2.3.4")])
    policy = decide(gitlab_server=server)
    assert not blocks(policy, "10.9.8.7") and blocks(policy, "10.9.8.6")
    assert policy.notes == (
        "allowing the job's GitLab server gitlab.lan (10.9.8.7) for git and artifacts, "
        "although it is in the blocked network 10.0.0.0/8",
    )


def test_a_gitlab_server_that_is_public_or_already_allowed_needs_no_note():
    public = decide(gitlab_server=("gitlab.com", [ipaddress.IPv4Address("172.65.251.78")]))
    assert public.notes == () and public.allowed == ()
    allowed = decide(allowed_networks=("10.9.0.0/16",), gitlab_server=("g", [ipaddress.IPv4Address("10.9.8.7")]))
    assert allowed.notes == () and allowed.allowed == (net("10.9.0.0/16"),)


def test_filter_parameters_walk_networks_and_masks_in_step():
    policy = Policy(
        host_ports=(53, 5000), allowed=(net("10.1.2.3/32"),), blocked=(net("10.0.0.0/8"), net("192.0.2.2/32")), notes=()
    )
    assert netpolicy.filter_parameters("192.168.213.10", "192.168.213.1", policy) == [
        ("IP", "192.168.213.10"),
        ("CTRL_IP_LEARNING", "none"),
        ("GATEWAY", "192.168.213.1"),
        ("HOST_PORT", "53"),
        ("HOST_PORT", "5000"),
        ("ALLOW_NET", "10.1.2.3"),
        ("ALLOW_MASK", "32"),
        ("BLOCK_NET", "10.0.0.0"),
        ("BLOCK_NET", "192.0.2.2"),
        ("BLOCK_MASK", "8"),
        ("BLOCK_MASK", "32"),
    ]


def test_an_empty_allow_list_still_gives_the_filter_a_value_that_never_matches():
    params = netpolicy.filter_parameters("192.168.213.10", "192.168.213.1", decide())
    assert ("ALLOW_NET", "0.0.0.0") in params and ("ALLOW_MASK", "32") in params


FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 192.0.2.0/24 2 0 2
        |-- 192.0.2.0
           /24 link UNICAST
        |-- 192.0.2.2
           /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.255.255.1
        /32 host LOCAL
     |-- 127.0.0.1
        /32 host LOCAL
     |-- 192.0.2.2
        /32 host LOCAL
"""


def test_local_addresses_are_the_host_local_leaves_of_fib_trie():
    assert [str(a) for a in netpolicy.local_addresses(FIB_TRIE)] == ["10.255.255.1", "127.0.0.1", "192.0.2.2"]


def test_a_listed_cache_server_in_a_blocked_range_is_allowed_and_said():
    policy = decide(cache_servers=[("minio.lan", [ipaddress.IPv4Address("10.4.4.4")])])
    assert not blocks(policy, "10.4.4.4") and blocks(policy, "10.4.4.5")
    assert policy.notes == (
        "allowing the cache server minio.lan (10.4.4.4) from cache.server_addresses, "
        "although it is in the blocked network 10.0.0.0/8",
    )


def test_a_cache_server_on_this_host_or_that_does_not_resolve_is_not_allowed_and_said():
    policy = decide(cache_servers=[("myself", [ipaddress.IPv4Address("192.0.2.2")]), ("nowhere.lan", [])])
    assert blocks(policy, "192.0.2.2") and policy.allowed == ()
    assert policy.notes == (
        "the cache server nowhere.lan (cache.server_addresses) does not resolve here: not allowed",
        "not allowing the cache server myself (192.0.2.2): it is this host; "
        "list its port in network.allow_host_ports instead",
    )
