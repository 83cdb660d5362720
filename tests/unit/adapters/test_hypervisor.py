"""executor.adapters.hypervisor against libvirt's built-in test driver (a fresh connection per test)."""

from __future__ import annotations

import libvirt
import pytest

from executor.adapters import hypervisor
from executor.core import naming
from executor.core.domain_xml import (
    build_dir_pool,
    build_domain,
    build_nat_network,
    build_overlay_volume,
    build_raw_volume,
    parse_job_record,
)
from executor.errors import ConfigError, SystemFailure

POOL = "default-pool"  # predefined and active in test:///default


@pytest.fixture
def spec(driver_spec_factory):
    return driver_spec_factory()


def test_each_test_starts_from_the_pristine_driver(hv):
    # the only domain the test driver defines itself; nothing left over from other tests
    assert [d.name for d in hv.domains()] == ["test"]
    assert hv.volume_names(POOL) == []


def test_define_and_start_then_domain_and_domains(hv, spec):
    hv.define_and_start(build_domain(spec))
    info = hv.domain(spec.name)
    assert info.name == spec.name and info.state == "running" and info.active
    assert parse_job_record(info.metadata) == spec.record
    by_name = {d.name: d for d in hv.domains()}
    assert set(by_name) == {"test", spec.name}
    assert by_name["test"].metadata is None  # not ours: no metadata in our namespace
    assert parse_job_record(by_name[spec.name].metadata) == spec.record


def test_metadata_is_read_in_our_namespace_only(spec):
    with hypervisor.connect("test:///default", "urn:somebody-else") as other:
        other.define_and_start(build_domain(spec))
        assert other.domain(spec.name).metadata is None


def test_a_user_paused_domain_is_active_and_not_an_io_error(hv, spec):
    # The test driver can pause a domain only as a user would (reason "user"); the I/O-error
    # pause that a full pool causes is provoked for real in tests/vm/test_disk_full.py.
    hv.define_and_start(build_domain(spec))
    conn = libvirt.open("test:///default")
    try:
        conn.lookupByName(spec.name).suspend()
        assert conn.lookupByName(spec.name).state() == [libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER]
    finally:
        conn.close()
    info = hv.domain(spec.name)
    assert info.state == "paused" and info.active and info.io_error is False
    assert hv.domain("test").io_error is False


def test_unknown_domain_is_none(hv):
    assert hv.domain("lvx-job-999") is None


def test_destroy_and_undefine_are_idempotent(hv, spec):
    hv.define_and_start(build_domain(spec))
    assert hv.destroy(spec.name) is True
    info = hv.domain(spec.name)
    assert info.state == "shutoff" and not info.active
    assert hv.destroy(spec.name) is False  # not running any more
    assert hv.undefine(spec.name) is True
    assert hv.domain(spec.name) is None
    assert hv.undefine(spec.name) is False
    assert hv.destroy(spec.name) is False
    assert [d.name for d in hv.domains()] == ["test"]


def test_define_of_invalid_xml_is_a_system_failure(hv):
    with pytest.raises(SystemFailure, match="defining domain"):
        hv.define_and_start("<domain type='test'><name>broken</name></domain>")
    assert hv.domain("broken") is None


def test_defining_a_second_domain_of_the_same_name_fails_and_leaves_the_first(hv, spec):
    hv.define_and_start(build_domain(spec))
    with pytest.raises(SystemFailure, match=r"defining domain.*already exists"):
        hv.define_and_start(build_domain(spec))  # no UUID in our XML: a new one each time
    info = hv.domain(spec.name)
    assert info.state == "running" and parse_job_record(info.metadata) == spec.record


def test_volumes_create_list_path_delete(hv):
    overlay = hv.create_volume(POOL, build_overlay_volume("lvx-job-1.qcow2", "/base/disk.qcow2", 1 << 30))
    seed = hv.create_volume(POOL, build_raw_volume("lvx-job-1-seed.iso", 4096))
    assert overlay.endswith("/lvx-job-1.qcow2") and seed.endswith("/lvx-job-1-seed.iso")
    assert hv.volume_names(POOL) == ["lvx-job-1-seed.iso", "lvx-job-1.qcow2"]
    assert hv.volume_path(POOL, "lvx-job-1.qcow2") == overlay
    assert hv.volume_path(POOL, "missing.qcow2") is None
    assert hv.delete_volume(POOL, "lvx-job-1.qcow2") is True
    assert hv.delete_volume(POOL, "lvx-job-1.qcow2") is False
    assert hv.volume_names(POOL) == ["lvx-job-1-seed.iso"]
    assert hv.delete_volume(POOL, "never-existed.iso") is False


def test_creating_a_volume_twice_is_a_system_failure(hv):
    xml = build_raw_volume("dup.iso", 4096)
    hv.create_volume(POOL, xml)
    with pytest.raises(SystemFailure, match="creating volume"):
        hv.create_volume(POOL, xml)


@pytest.mark.parametrize(
    "call",
    [
        lambda h: h.volume_names("no-such-pool"),
        lambda h: h.volume_path("no-such-pool", "x"),
        lambda h: h.create_volume("no-such-pool", build_raw_volume("x", 1)),
        lambda h: h.delete_volume("no-such-pool", "x"),
        lambda h: h.pool_free_bytes("no-such-pool"),
    ],
)
def test_missing_pool_is_a_config_error_with_a_hint(hv, call):
    with pytest.raises(ConfigError) as info:
        call(hv)
    assert "'no-such-pool' does not exist" in str(info.value)
    assert "libvirt-executor setup" in str(info.value)


def test_inactive_pool_is_a_config_error_with_a_hint(hv):
    side = libvirt.open("test:///default")  # shares the driver state while hv is open
    try:
        side.storagePoolDefineXML(build_dir_pool("idle", "/nonexistent/idle"), 0)
    finally:
        side.close()
    with pytest.raises(ConfigError, match=r"'idle' is not active.*libvirt-executor setup"):
        hv.volume_names("idle")


def test_ensure_pool_is_idempotent(hv):
    xml = build_dir_pool("lvx-pool", "/nonexistent/lvx-pool")
    assert hv.ensure_pool("lvx-pool", xml) is True
    assert hv.ensure_pool("lvx-pool", xml) is False
    assert hv.volume_names("lvx-pool") == []  # exists and is active now
    assert hv.pool_free_bytes("lvx-pool") >= 0


def test_ensure_pool_starts_an_existing_inactive_pool(hv):
    side = libvirt.open("test:///default")
    try:
        side.storagePoolDefineXML(build_dir_pool("idle", "/nonexistent/idle"), 0)
    finally:
        side.close()
    assert hv.ensure_pool("idle", "<ignored/>") is True
    assert hv.ensure_pool("idle", "<ignored/>") is False
    assert hv.volume_names("idle") == []


def test_ensure_network_is_idempotent(hv):
    xml = build_nat_network("lvx-net", "lvxbr9", "192.168.213.1", "255.255.255.0")
    assert hv.network_active("lvx-net") is None
    assert hv.ensure_network("lvx-net", xml) is True
    assert hv.network_active("lvx-net") is True
    assert hv.ensure_network("lvx-net", xml) is False


def test_ensure_network_with_bad_xml_is_a_system_failure(hv):
    with pytest.raises(SystemFailure, match="defining network lvx-net"):
        hv.ensure_network("lvx-net", "<network><bogus/></network>")


def test_predefined_network_is_active(hv):
    assert hv.network_active("default") is True


def test_test_driver_offers_no_kvm(hv):
    assert hv.kvm_offered() is False


@pytest.mark.parametrize("uri", ["bogus:///nothing", "test:///nonexistent/file.xml"])
def test_connect_to_a_bad_uri_is_a_system_failure(uri):
    with pytest.raises(SystemFailure) as info:
        with hypervisor.connect(uri, naming.METADATA_NS):
            pytest.fail("connected to a bad URI")
    assert uri in str(info.value) and "libvirt-executor doctor" in str(info.value)


def test_connect_closes_the_connection(spec):
    with hypervisor.connect("test:///default", naming.METADATA_NS) as h:
        h.define_and_start(build_domain(spec))
        conn = h._conn
    with pytest.raises(libvirt.libvirtError):
        conn.listAllDomains(0)
    # the test driver forgets everything once its last connection closes
    with hypervisor.connect("test:///default", naming.METADATA_NS) as h:
        assert h.domain(spec.name) is None


def test_metadata_pause_and_resume_of_a_running_domain(hv):
    hv.set_metadata("test", "lvx", "<job><vm>test</vm></job>")
    assert "<vm>test</vm>" in hv.domain("test").metadata
    hv.suspend("test")
    assert hv.domain("test").state == "paused"
    hv.resume("test")
    hv.resume("test")  # a running one: nothing to do
    assert hv.domain("test").state == "running"
    assert "<interface" in hv.live_xml("test")
    with pytest.raises(SystemFailure, match="domain lvx-pool-00000000 does not exist"):
        hv.suspend("lvx-pool-00000000")
