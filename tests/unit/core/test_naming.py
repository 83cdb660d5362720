"""executor.core.naming: names derived from the job, and recognising only our own."""

from __future__ import annotations

import ipaddress
import re

import pytest

from executor.core import naming


def test_vm_and_volume_names():
    vm = naming.vm_name("lvx", 4242)
    assert vm == "lvx-job-4242"
    assert naming.overlay_volume_name(vm) == "lvx-job-4242.qcow2"
    assert naming.seed_volume_name(vm) == "lvx-job-4242-seed.iso"
    assert naming.vm_name("ci2", "17") == "ci2-job-17"  # coerced through int


def test_vm_name_refuses_non_integer_ids():
    with pytest.raises(ValueError):
        naming.vm_name("lvx", "1; rm -rf /")


@pytest.mark.parametrize("job_id", [1, 9, 10, 4242, 10**17, 10**18 - 1])
def test_job_id_round_trips(job_id):
    vm = naming.vm_name("lvx", job_id)
    assert naming.job_id_of("lvx", vm) == job_id
    assert naming.vm_of_volume("lvx", naming.overlay_volume_name(vm)) == vm
    assert naming.vm_of_volume("lvx", naming.seed_volume_name(vm)) == vm


@pytest.mark.parametrize(
    "name",
    [
        "lvx-job-0",
        "lvx-job-01",
        "lvx-job-1x",
        "lvx-job-",
        "lvx-job--1",
        "lvx-job-+1",
        "lvx-job- 1",
        "lvx-job-1 ",
        "lvx-job-1\n",
        "lvx-job-" + "1" * 19,
        "other-job-1",
        "lvxx-job-1",
        "xlvx-job-1",
        "lvx-job-job-1",
        "lvx-1",
        "LVX-job-1",
        "../lvx-job-1",
        "lvx-job-1/../../etc",
        "/var/lib/lvx-job-1",
        "lvx-job-1.qcow2",
        "",
    ],
)
def test_job_id_of_rejects_foreign_names(name):
    assert naming.job_id_of("lvx", name) is None


def test_prefix_is_taken_literally_not_as_a_regex():
    assert naming.job_id_of("l.x", "lvx-job-1") is None
    assert naming.job_id_of("l.x", "l.x-job-1") == 1


def test_overlapping_prefixes_do_not_claim_each_others_vms():
    assert naming.job_id_of("lvx", naming.vm_name("lvx-job", 5)) is None
    assert naming.job_id_of("lvx-job", naming.vm_name("lvx", 5)) is None


@pytest.mark.parametrize(
    "volume",
    [
        "lvx-job-0.qcow2",
        "lvx-job-1x.qcow2",
        "lvx-job-1.img",
        "lvx-job-1.qcow2.bak",
        "lvx-job-1-seed.iso.qcow2",
        "lvx-job-1.qcow2-seed.iso",
        "other-job-1.qcow2",
        "base.qcow2",
        "disk.qcow2",
        ".qcow2",
        "-seed.iso",
        "../lvx-job-1.qcow2",
        "sub/lvx-job-1.qcow2",
        "lvx-job-1",
    ],
)
def test_vm_of_volume_rejects_foreign_volumes(volume):
    assert naming.vm_of_volume("lvx", volume) is None


def test_mac_for_is_stable_and_well_formed():
    ip = ipaddress.IPv4Address("192.168.213.10")
    assert naming.mac_for(ip) == naming.mac_for(ipaddress.IPv4Address("192.168.213.10")) == "52:54:00:a8:d5:0a"
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", naming.mac_for(ipaddress.IPv4Address("10.255.255.254")))


def test_mac_for_is_unique_across_a_slash_16():
    net = ipaddress.IPv4Network("172.16.0.0/16")
    macs = {naming.mac_for(ip) for ip in net.hosts()}
    assert len(macs) == net.num_addresses - 2


def test_vm_addresses_of_a_slash_24():
    net = ipaddress.IPv4Network("192.168.213.0/24")
    addrs = [str(a) for a in naming.vm_addresses(net)]
    assert addrs[0] == "192.168.213.10" and addrs[-1] == "192.168.213.254"
    assert len(addrs) == 245
    for excluded in ["192.168.213.0", "192.168.213.1", "192.168.213.255"] + [f"192.168.213.{i}" for i in range(2, 10)]:
        assert excluded not in addrs


def test_vm_addresses_of_a_slash_28():
    net = ipaddress.IPv4Network("10.1.2.16/28")
    assert [str(a) for a in naming.vm_addresses(net)] == [f"10.1.2.{i}" for i in range(26, 31)]


def test_vm_addresses_of_a_slash_16_exclude_only_the_start_and_the_ends():
    net = ipaddress.IPv4Network("172.16.0.0/16")
    addrs = naming.vm_addresses(net)
    assert str(addrs[0]) == "172.16.0.10" and str(addrs[-1]) == "172.16.255.254"
    assert len(addrs) == net.num_addresses - 2 - 9
    assert ipaddress.IPv4Address("172.16.1.1") in addrs  # only the subnet's own .1-.9 are special


def test_pool_vm_names_are_ours_with_their_volumes_and_never_a_jobs():
    vm = naming.pool_vm_name("lvx", "0a1b2c3d")
    assert vm == "lvx-pool-0a1b2c3d"
    assert naming.is_pool_name("lvx", vm) and naming.is_vm_name("lvx", vm)
    assert naming.job_id_of("lvx", vm) is None
    assert naming.vm_of_volume("lvx", naming.overlay_volume_name(vm)) == vm
    assert naming.vm_of_volume("lvx", naming.seed_volume_name(vm)) == vm
    for foreign in (
        "lvx-pool-0A1B2C3D",
        "lvx-pool-0a1b2c3",
        "lvx-pool-0a1b2c3d0",
        "lvxx-pool-0a1b2c3d",
        "lvx-pool-job-1",
    ):
        assert not naming.is_vm_name("lvx", foreign), foreign
    with pytest.raises(ValueError):
        naming.pool_vm_name("lvx", "../../x")
