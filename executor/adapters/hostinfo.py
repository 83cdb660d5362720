"""Facts about the host machine read from /proc, /sys and /dev: CPU flags, KVM, free space."""

from __future__ import annotations

import grp
import os
import shutil
from dataclasses import dataclass

from executor.core import accel

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
