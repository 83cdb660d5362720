"""Where a job VM may send packets: the decision behind each VM's nwfilter parameters.

Default: the public internet, DNS on the host's bridge address and the host ports the operator
lists; nothing else on the host (any of its addresses), nothing private, link-local (cloud
metadata), loopback or multicast. `allowed_networks` are exceptions, and the job's own GitLab
server is allowed automatically when it resolves into a blocked range (git clone and artifact
uploads need it). IPv6 never leaves the VM: clean-traffic drops every non-IPv4 frame at layer 2.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

DNS_PORT = 53
# RFC 1918, shared address space (RFC 6598), link-local incl. cloud metadata, loopback, multicast,
# and "this network" / reserved (never legitimate destinations from a job).
DEFAULT_BLOCKED_NETWORKS = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "224.0.0.0/4",
    "0.0.0.0/8",
    "240.0.0.0/4",
)
# A nwfilter variable cannot be empty; this network never matches a packet a VM can send.
NEVER_MATCHES = ipaddress.IPv4Network("0.0.0.0/32")


@dataclass(frozen=True)
class Policy:
    host_ports: tuple[int, ...]  # TCP ports on the bridge address (DNS always, over TCP and UDP)
    allowed: tuple[ipaddress.IPv4Network, ...]  # exceptions, checked before `blocked`
    blocked: tuple[ipaddress.IPv4Network, ...]
    notes: tuple[str, ...]  # what the job log should say about the policy


def decide(
    gateway: ipaddress.IPv4Address,
    allow_host_ports: Iterable[int],
    allowed_networks: Iterable[str],
    blocked_networks: Iterable[str],
    host_addresses: Iterable[ipaddress.IPv4Address],
    gitlab_server: tuple[str, Iterable[ipaddress.IPv4Address]] | None = None,
    cache_servers: Iterable[tuple[str, Iterable[ipaddress.IPv4Address]]] = (),
) -> Policy:
    """The policy for one job VM. `host_addresses` are every address of the host, found when the
    job starts; `gitlab_server` is (host name, its addresses) from the job payload;
    `cache_servers` are the distributed cache's servers the operator listed, the same way."""
    ports = tuple(sorted({DNS_PORT, *allow_host_ports}))
    allowed = [ipaddress.IPv4Network(n) for n in allowed_networks]
    host = [ipaddress.IPv4Network(a) for a in sorted({gateway, *host_addresses})]
    blocked = [ipaddress.IPv4Network(n) for n in blocked_networks] + host
    notes = []
    servers = []
    if gitlab_server is not None:
        servers.append(("the job's GitLab server", gitlab_server[0], gitlab_server[1], "for git and artifacts"))
    for name, addresses in cache_servers:
        addresses = list(addresses)
        servers.append(("the cache server", name, addresses, "from cache.server_addresses"))
        if not addresses:
            notes.append(f"the cache server {name} (cache.server_addresses) does not resolve here: not allowed")
    for what, name, addresses, why in servers:
        for address in sorted(set(addresses)):
            if any(address in n for n in host):
                # allowing a host address would open every port of the host
                notes.append(
                    f"not allowing {what} {name} ({address}): it is this host; "
                    "list its port in network.allow_host_ports instead"
                )
                continue
            inside = next((n for n in blocked if address in n), None)
            if inside is None or any(address in n for n in allowed):
                continue
            allowed.append(ipaddress.IPv4Network(address))
            notes.append(f"allowing {what} {name} ({address}) {why}, although it is in the blocked network {inside}")
    return Policy(ports, tuple(_collapse(allowed)), tuple(_collapse(blocked)), tuple(notes))


def _collapse(networks: list[ipaddress.IPv4Network]) -> list[ipaddress.IPv4Network]:
    return list(ipaddress.collapse_addresses(networks))


def filter_parameters(ip: str, gateway: str, policy: Policy) -> list[tuple[str, str]]:
    """The nwfilter parameters of one VM's interface, in the order of `nwfilter_xml`'s rules.
    Networks go in two lists walked in step ($..._NET[@n] with $..._MASK[@n])."""
    params = [("IP", ip), ("CTRL_IP_LEARNING", "none"), ("GATEWAY", gateway)]
    params += [("HOST_PORT", str(port)) for port in policy.host_ports]
    for prefix, networks in (("ALLOW", policy.allowed or (NEVER_MATCHES,)), ("BLOCK", policy.blocked)):
        params += [(f"{prefix}_NET", str(n.network_address)) for n in networks]
        params += [(f"{prefix}_MASK", str(n.prefixlen)) for n in networks]
    return params


def local_addresses(fib_trie: str) -> list[ipaddress.IPv4Address]:
    """The host's own IPv4 addresses (every interface, secondary ones too) from the text of
    /proc/net/fib_trie: each is a "/32 host LOCAL" leaf."""
    found = set()
    last: str | None = None
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|--"):
            last = text[3:].strip()
        elif text == "/32 host LOCAL" and last is not None:
            with contextlib.suppress(ValueError):  # a leaf of another kind
                found.add(ipaddress.IPv4Address(last))
    return sorted(found)
