"""The network policy, probed from inside real job VMs with listeners that stay on this machine.

On the host: an HTTP service on all addresses, one on an allowed port of the bridge address, and
a port-less bridge `lvxprobe0` holding 169.254.169.254 (cloud metadata), 10.255.255.1 (a "LAN"
host listed in allowed_networks) and 10.255.255.2 (a LAN host that is not). A second job's VM
serves HTTP too. Every probe is bounded (curl -m 5) and goes to an address bound on this host or
to the other VM on the VM network.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import ipaddress
import socket
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager

import libvirt
import pytest

from executor.adapters import hostinfo
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim

pytestmark = pytest.mark.vm

PROBE_BRIDGE = "lvxprobe0"
METADATA = "169.254.169.254"
LAN_ALLOWED = "10.255.255.1"
LAN_BLOCKED = "10.255.255.2"
OTHER_VM_PORT = 8000
# The VM's own uplink (docker0 has a global address too) and its address.
UPLINK = "dev=$(ip -4 route show default | awk '{print $5}')\n"
OWN_ADDRESS = UPLINK + "ip -4 -o addr show dev $dev | awk '{print $4}' | cut -d/ -f1"
# `probe NAME URL [curl options]` prints NAME=open if an HTTP answer came back within 5 s.
PROBE = (
    "probe() { name=$1; url=$2; shift 2; "
    'if curl -s -o /dev/null -m 5 "$@" "$url"; then echo "$name=open"; else echo "$name=closed"; fi; }\n'
)


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.text.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _IPv6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@contextmanager
def http_listener(host: str, port: int, text: str) -> Iterator[int]:
    server_class = _IPv6Server if ":" in host else http.server.ThreadingHTTPServer
    server = server_class((host, port), _Answer)
    server.text = text  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def probe_bridge():
    """A bridge without ports holding the metadata and the fake LAN addresses (no dummy links
    here); removed afterwards."""
    subprocess.run(["ip", "link", "del", PROBE_BRIDGE], capture_output=True)
    ip("link", "add", "name", PROBE_BRIDGE, "type", "bridge")
    try:
        ip("link", "set", PROBE_BRIDGE, "up")
        for address in (METADATA, LAN_ALLOWED, LAN_BLOCKED):
            ip("addr", "add", f"{address}/32", "dev", PROBE_BRIDGE)
        yield
    finally:
        subprocess.run(["ip", "link", "del", PROBE_BRIDGE], capture_output=True)


@pytest.fixture(scope="module")
def listeners(host_settings, probe_bridge):
    gateway = str(host_settings.gateway)
    with (
        http_listener("0.0.0.0", 0, "host-service") as everywhere,
        http_listener(gateway, 0, "allowed-port") as allowed,
        http_listener(METADATA, 80, "metadata"),
        http_listener(LAN_ALLOWED, 0, "lan") as lan,
        http_listener("::", 0, "ipv6") as ipv6,
    ):
        yield {"everywhere": everywhere, "allowed": allowed, "lan": lan, "ipv6": ipv6}


def host_lan_address(gateway: ipaddress.IPv4Address) -> str:
    """An address of this host that is neither loopback, nor the bridge's, nor a probe's."""
    ours = {gateway, *(ipaddress.IPv4Address(a) for a in (METADATA, LAN_ALLOWED, LAN_BLOCKED))}
    others = [a for a in hostinfo.local_ipv4_addresses() if not a.is_loopback and a not in ours]
    assert others, "this host has no address besides loopback and the VM bridge"
    return str(others[0])


@pytest.fixture(scope="module")
def vms(host_settings, tmp_path_factory, listeners, git_server, leftovers):
    root = tmp_path_factory.mktemp("netpolicy")
    config = write_test_config(
        host_settings,
        root / "cfg",
        "lvxnet",
        allow_host_ports=(git_server["port"], listeners["allowed"]),
        allowed_networks=(f"{LAN_ALLOWED}/32",),
    )
    sims = [RunnerSim(config, root / f"runner{i}", 9100 + i) for i in (1, 2)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        prepared = list(pool.map(lambda s: s.prepare(), sims))
    try:
        for result in prepared:
            assert result.rc == 0, result.describe()
        ips = []
        for sim in sims:
            found = sim.run(OWN_ADDRESS, stage="probe")
            assert found.rc == 0, found.describe()
            ips.append(found.stdout.strip())
        served = sims[1].run(
            f"setsid -f python3 -m http.server {OTHER_VM_PORT} >/dev/null 2>&1\n"
            "for _ in $(seq 120); do\n"
            f"  curl -s -o /dev/null -m 2 http://127.0.0.1:{OTHER_VM_PORT}/ && {{ echo serving; break; }}; sleep 0.5\n"
            "done\n"
        )
        assert "serving" in served.stdout, served.describe()
        yield {"sims": sims, "ips": ips, "config": config}
    finally:
        for sim in sims:
            cleaned = sim.cleanup()
            assert cleaned.rc == 0, cleaned.describe()
        assert leftovers(config) == {}


def probe(sim: RunnerSim, lines: str) -> dict[str, str]:
    result = sim.run(PROBE + lines, stage="probe")
    assert result.rc == 0, result.describe()
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def test_the_host_the_lan_metadata_and_other_vms_are_unreachable(vms, listeners, host_settings):
    gateway = host_settings.gateway
    found = probe(
        vms["sims"][0],
        f"probe bridge-address http://{gateway}:{listeners['everywhere']}/\n"
        f"probe host-lan-address http://{host_lan_address(gateway)}:{listeners['everywhere']}/\n"
        f"probe host-ssh http://{gateway}:22/\n"
        f"probe metadata http://{METADATA}/latest/meta-data/\n"
        f"probe lan-host http://{LAN_BLOCKED}:{listeners['everywhere']}/\n"
        f"probe other-vm http://{vms['ips'][1]}:{OTHER_VM_PORT}/\n",
    )
    assert found == {
        "bridge-address": "closed",
        "host-lan-address": "closed",
        "host-ssh": "closed",
        "metadata": "closed",
        "lan-host": "closed",
        "other-vm": "closed",
    }


def test_an_allowed_host_port_an_allowed_network_and_dns_still_work(vms, listeners, host_settings):
    found = probe(
        vms["sims"][0],
        f"probe allowed-port http://{host_settings.gateway}:{listeners['allowed']}/\n"
        f"probe allowed-network http://{LAN_ALLOWED}:{listeners['lan']}/\n"
        f"timeout 5 bash -c 'exec 3<>/dev/tcp/{host_settings.gateway}/53' && echo dns-tcp=open || echo dns-tcp=closed\n",
    )
    assert found == {"allowed-port": "open", "allowed-network": "open", "dns-tcp": "open"}


def test_git_over_an_allowed_port_clones(vms, git_server):
    cloned = vms["sims"][0].run(
        f"git clone -q {git_server['url']} /tmp/clone && git -C /tmp/clone rev-parse HEAD", stage="get_sources"
    )
    assert cloned.rc == 0, cloned.describe()
    assert git_server["sha"] in cloned.stdout


def test_a_forged_source_address_gets_nowhere(vms, listeners, host_settings):
    """The job takes another address (the other VM's) beside its own and keeps its own NAT from
    rewriting it (the image masquerades everything leaving the uplink): packets from it are
    dropped (clean-traffic), to the host and to the other VM alike; its own address still works."""
    gateway, other = host_settings.gateway, vms["ips"][1]
    allowed = f"http://{gateway}:{listeners['allowed']}/"
    found = probe(
        vms["sims"][0],
        f"{UPLINK}sudo ip addr add {other}/32 dev $dev\n"
        f"sudo iptables -t nat -I POSTROUTING -s {other} -j RETURN\n"
        f"probe forged-to-host {allowed} --interface {other}\n"
        f"probe forged-to-vm http://{other}:{OTHER_VM_PORT}/ --interface {other}\n"
        f"sudo iptables -t nat -D POSTROUTING -s {other} -j RETURN\n"
        f"sudo ip addr del {other}/32 dev $dev\n"
        f"probe own-to-host {allowed}\n",
    )
    assert found == {"forged-to-host": "closed", "forged-to-vm": "closed", "own-to-host": "open"}


def test_a_changed_mac_loses_the_network_until_it_is_changed_back(vms, listeners, host_settings):
    """Everything the VM sends from a MAC other than its own is dropped. The MAC is restored in
    the same script, so the stage's SSH connection recovers once it is back."""
    allowed = f"http://{host_settings.gateway}:{listeners['allowed']}/"
    found = probe(
        vms["sims"][0],
        f"{UPLINK}mac=$(cat /sys/class/net/$dev/address)\n"
        "sudo ip link set dev $dev address 52:54:00:ee:ee:ee\n"
        f"probe forged-mac {allowed}\n"
        "sudo ip link set dev $dev address $mac\n"
        f"probe own-mac {allowed}\n",
    )
    assert found == {"forged-mac": "closed", "own-mac": "open"}


def test_ipv6_is_dropped_at_layer_2(vms):
    """clean-traffic lets only IPv4 and ARP frames out of a VM's port: the IPv6 datagrams a job
    sends land on the final DROP of the port's ebtables chain (its counter grows by at least as
    many as were sent; the guest's own router solicitations may add more)."""
    tap = _tap_device(vms["sims"][0])
    before = _final_drop_count(tap)
    sent = vms["sims"][0].run(
        "python3 -c 'import socket\n"
        "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        'for _ in range(20): s.sendto(b"x", ("ff02::1%eth0", 9))\n'
        'print("sent")\'',
        stage="probe",
    )
    assert sent.rc == 0 and "sent" in sent.stdout, sent.describe()
    assert _final_drop_count(tap) - before >= 20


def _tap_device(sim: RunnerSim) -> str:
    conn = libvirt.open("qemu:///system")
    try:
        xml = conn.lookupByName(f"lvxnet-job-{sim.job_id}").XMLDesc(0)
    finally:
        conn.close()
    target = ET.fromstring(xml).find("devices/interface/target")
    assert target is not None
    return target.get("dev", "")


def _final_drop_count(tap: str) -> int:
    listing = subprocess.run(
        ["ebtables", "-t", "nat", "-L", f"libvirt-I-{tap}", "--Lc"], check=True, capture_output=True, text=True
    ).stdout
    last = [line for line in listing.splitlines() if line.startswith("-j DROP")][-1]
    return int(last.split("pcnt =")[1].split()[0])
