"""Choosing the accelerator: KVM where it can boot the image, TCG otherwise.

libvirt offers KVM whenever /dev/kvm opens, but that is not enough: some hosts (our CI machines)
expose /dev/kvm through a paravirtual nested module (`kvm_pvm`) on which a stock Debian kernel
dies with a KVM internal error or hangs. Hardware virtualisation shows as the vmx (Intel) or
svm (AMD) CPU flag; without it, `auto` picks TCG. Pure: `adapters.hostinfo` reads /proc and /sys.
"""

from __future__ import annotations

from dataclasses import dataclass

from executor.errors import ConfigError


@dataclass(frozen=True)
class HostFacts:
    kvm_offered: bool  # libvirt's domain capabilities list a kvm domain
    cpu_virt_flag: bool  # vmx or svm in /proc/cpuinfo
    paravirt_kvm: bool  # the kvm_pvm module is loaded


@dataclass(frozen=True)
class Choice:
    accel: str  # "kvm" or "tcg"
    domain_type: str  # libvirt <domain type=...>: "kvm" or "qemu"
    reason: str


def decide(setting: str, facts: HostFacts) -> Choice:
    kvm = Choice("kvm", "kvm", "")
    if setting == "tcg":
        return Choice("tcg", "qemu", 'accel = "tcg" in the config')
    if setting == "kvm":
        if not facts.kvm_offered:
            raise ConfigError('accel = "kvm" but libvirt offers no KVM on this host (is /dev/kvm there?)')
        return Choice("kvm", "kvm", 'accel = "kvm" in the config')
    if not facts.kvm_offered:
        return Choice("tcg", "qemu", "libvirt offers no KVM on this host")
    if facts.paravirt_kvm:
        return Choice("tcg", "qemu", "/dev/kvm is the paravirtual kvm_pvm module, which cannot boot a stock kernel")
    if not facts.cpu_virt_flag:
        return Choice("tcg", "qemu", "the CPU shows no vmx/svm flag, so /dev/kvm cannot run a stock kernel")
    return Choice(kvm.accel, kvm.domain_type, "hardware virtualisation available")


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU feature flags in the text of /proc/cpuinfo."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


def host_facts(kvm_offered: bool, cpuinfo: str, kvm_pvm_loaded: bool) -> HostFacts:
    return HostFacts(
        kvm_offered=kvm_offered,
        cpu_virt_flag=bool(cpu_flags(cpuinfo) & {"vmx", "svm"}),
        paravirt_kvm=kvm_pvm_loaded,
    )


def kvm_device_problem(mode: int, group: str) -> str | None:
    """Why QEMU's user (group kvm) cannot open /dev/kvm, or None if it can.

    Without udev, /dev/kvm stays root-only. libvirt then finds KVM usable when it probes QEMU
    but not for the QEMU user, discards its capability cache on every call and probes again:
    every define or start takes seconds to minutes, even for TCG domains.
    """
    if mode & 0o006 == 0o006 or (group == "kvm" and mode & 0o060 == 0o060):
        return None
    return f"/dev/kvm is {group}:{mode & 0o777:04o}, not usable by the kvm group: libvirt re-probes QEMU on every call"
