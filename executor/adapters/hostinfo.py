"""Facts about the host machine read from /proc, /sys and /dev (CPU flags, KVM, free space, its
addresses, bridge netfilter) and name resolution."""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import shutil
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from executor.core import accel, admission, mirror, netpolicy

KVM_DEVICE = "/dev/kvm"


def accel_facts(kvm_offered: bool) -> accel.HostFacts:
    """What `accel.decide` needs: libvirt's offer (the caller asks libvirt) plus the CPU's
    virtualisation flag and whether /dev/kvm is the paravirtual kvm_pvm module."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    return accel.host_facts(kvm_offered, cpuinfo, os.path.isdir("/sys/module/kvm_pvm"))


@dataclass(frozen=True)
class DeviceMode:
    mode: int
    group: str


def kvm_device(path: str = KVM_DEVICE) -> DeviceMode | None:
    """Mode and group of /dev/kvm, None if there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return DeviceMode(st.st_mode, group)


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


BRIDGE_NF_CALL_IPTABLES = "/proc/sys/net/bridge/bridge-nf-call-iptables"


def local_ipv4_addresses() -> list[ipaddress.IPv4Address]:
    """Every IPv4 address of this host, on every interface, as the kernel has them now."""
    try:
        with open("/proc/net/fib_trie", encoding="ascii", errors="replace") as f:
            return netpolicy.local_addresses(f.read())
    except OSError:
        return []


def bridge_netfilter() -> bool | None:
    """Whether bridged frames go through iptables (what nwfilter's IP rules need): True/False,
    None if the br_netfilter module is not loaded at all."""
    try:
        with open(BRIDGE_NF_CALL_IPTABLES, encoding="ascii") as f:
            return f.read().strip() == "1"
    except FileNotFoundError:
        return None


def resolve_ipv4(host: str, timeout: float = 5.0) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses `host` resolves to here, [] if it does not resolve within `timeout`
    (getaddrinfo has no timeout of its own, so it runs in a thread that may be abandoned)."""
    found: list[ipaddress.IPv4Address] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return
        found.extend(ipaddress.IPv4Address(info[4][0]) for info in infos)

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout)
    return sorted(set(found)) if not worker.is_alive() else []


def listening_tcp() -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of every listening TCP socket of this host's network namespace."""
    found: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    for path, ipv6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                found += mirror.parse_proc_net_tcp(f.read(), ipv6)
        except OSError:
            continue
    return found


def processes_running(argv: list[str]) -> list[int]:
    """Pids of the processes whose command line is exactly `argv`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
                if [part.decode(errors="replace") for part in cmdline] == argv:
                    found.append(int(entry.name))
    return found


def memory_available() -> int | None:
    """The kernel's estimate of memory available for new work, in bytes (None if unreadable)."""
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            return admission.mem_available(f.read())
    except OSError:
        return None


QEMU_PID_DIR = "/run/libvirt/qemu"


def qemu_stopped(domain: str, pid_dir: str = QEMU_PID_DIR) -> bool:
    """Whether the domain's QEMU process is stopped by a signal (SIGSTOP: frozen). libvirt
    still reports such a domain as running or paused, and a resume would wait on its monitor
    for ever. False when the process cannot be found (libvirt's state tells the rest)."""
    try:
        with open(os.path.join(pid_dir, f"{domain}.pid"), encoding="ascii") as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except (OSError, ValueError):
        return False
    # "pid (comm) S ...": the comm may hold spaces and parentheses, the state follows the last ')'
    return stat.rpartition(")")[2].split()[:1] in (["T"], ["t"])
