"""The accelerator for this host: libvirt's offer and the host's CPU, decided by core.accel."""

from __future__ import annotations

from executor.adapters import hostinfo
from executor.adapters.hypervisor import Hypervisor
from executor.core import accel
from executor.core.settings import Settings


def choose_accel(settings: Settings, hv: Hypervisor) -> accel.Choice:
    if settings.libvirt.accel == "tcg":
        return accel.decide("tcg", hostinfo.accel_facts(kvm_offered=False))
    return accel.decide(settings.libvirt.accel, hostinfo.accel_facts(hv.kvm_offered()))
