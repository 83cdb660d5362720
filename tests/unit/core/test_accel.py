"""executor.core.accel: KVM only where it can boot the image, TCG otherwise."""

from __future__ import annotations

import pytest

from executor.core import accel
from executor.core.accel import Choice, HostFacts, cpu_flags, decide, host_facts
from executor.errors import ConfigError

REAL_KVM = HostFacts(kvm_offered=True, cpu_virt_flag=True, paravirt_kvm=False)
PVM = HostFacts(kvm_offered=True, cpu_virt_flag=False, paravirt_kvm=True)
NO_FLAG = HostFacts(kvm_offered=True, cpu_virt_flag=False, paravirt_kvm=False)
NO_KVM = HostFacts(kvm_offered=False, cpu_virt_flag=True, paravirt_kvm=False)
ALL_FACTS = [HostFacts(k, f, p) for k in (False, True) for f in (False, True) for p in (False, True)]


@pytest.mark.parametrize("facts", ALL_FACTS)
def test_tcg_forced_is_always_tcg(facts):
    choice = decide("tcg", facts)
    assert (choice.accel, choice.domain_type) == ("tcg", "qemu")
    assert "config" in choice.reason


@pytest.mark.parametrize("facts", [f for f in ALL_FACTS if f.kvm_offered])
def test_kvm_forced_is_kvm_whenever_offered(facts):
    choice = decide("kvm", facts)
    assert (choice.accel, choice.domain_type) == ("kvm", "kvm")


@pytest.mark.parametrize("facts", [f for f in ALL_FACTS if not f.kvm_offered])
def test_kvm_forced_without_kvm_is_a_config_error(facts):
    with pytest.raises(ConfigError, match="/dev/kvm"):
        decide("kvm", facts)


def test_auto_with_real_kvm_is_kvm():
    assert decide("auto", REAL_KVM) == Choice("kvm", "kvm", "hardware virtualisation available")


@pytest.mark.parametrize(
    "facts, reason_part",
    [
        (PVM, "kvm_pvm"),
        (HostFacts(kvm_offered=True, cpu_virt_flag=True, paravirt_kvm=True), "kvm_pvm"),  # pvm wins over a flag
        (NO_FLAG, "vmx/svm"),
        (NO_KVM, "no KVM"),
        (HostFacts(False, False, True), "no KVM"),
    ],
)
def test_auto_falls_back_to_tcg_with_a_reason(facts, reason_part):
    choice = decide("auto", facts)
    assert (choice.accel, choice.domain_type) == ("tcg", "qemu")
    assert reason_part in choice.reason


def test_auto_picks_kvm_only_in_the_one_good_case():
    kvm = [f for f in ALL_FACTS if decide("auto", f).accel == "kvm"]
    assert kvm == [REAL_KVM]


def test_host_facts_passes_kvm_offered_through():
    assert host_facts(True, "", False).kvm_offered is True
    assert host_facts(False, "", False).kvm_offered is False


def test_host_facts_read_the_virtualisation_flag_from_cpuinfo():
    intel = "processor\t: 0\nflags\t\t: fpu vme vmx sse2\n\nprocessor\t: 1\nflags\t\t: fpu vmx\n"
    assert host_facts(True, intel, False).cpu_virt_flag is True
    assert host_facts(True, "flags\t\t: fpu svm\n", False).cpu_virt_flag is True
    assert host_facts(True, "flags\t\t: fpu sse2 hypervisor\n", True) == HostFacts(True, False, True)
    assert cpu_flags("model name\t: vmx lookalike\nflags\t: a b\n") == {"a", "b"}


@pytest.mark.parametrize(
    "mode, group, usable",
    [
        (0o020600, "root", False),  # root-only, as left without udev: libvirt re-probes QEMU
        (0o020660, "root", False),  # group-writable, but not the kvm group
        (0o020660, "kvm", True),  # what udev sets up
        (0o020640, "kvm", False),  # kvm group without write
        (0o020666, "root", True),  # world read-write
    ],
)
def test_kvm_device_problem(mode, group, usable):
    problem = accel.kvm_device_problem(mode, group)
    assert (problem is None) is usable
    if problem:
        assert f"{group}:{mode & 0o777:04o}" in problem
