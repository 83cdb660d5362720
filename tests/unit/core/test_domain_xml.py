"""executor.core.domain_xml: golden files, escaping, metadata round trips, and libvirt accepting it."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

import pytest

from executor.core import naming
from executor.core.domain_xml import (
    CPU_PERIOD_US,
    Limits,
    build_dir_pool,
    build_domain,
    build_metadata,
    build_nat_network,
    build_overlay_volume,
    build_raw_volume,
    docker_disk_xml,
    interface_with_filter,
    metadata_xml,
    parse_job_record,
    volume_backing_path,
)

NS = "{" + naming.METADATA_NS + "}"
HOSTILE = "</lvx:project><x/>&amp; \"quoted\" 'single' <!-- c --> ]]>"


# --- golden files ----------------------------------------------------------------------------


@pytest.fixture
def make_record(record_factory):
    return record_factory


@pytest.fixture
def make_spec(spec_factory):
    return spec_factory


@pytest.fixture
def make_driver_spec(driver_spec_factory):
    return driver_spec_factory


@pytest.fixture
def kvm_spec(make_spec, make_record):
    return make_spec(record=make_record(accel="kvm"), domain_type="kvm", nwfilter="clean-traffic", limits=LIMITS)


LIMITS = Limits(cpu_quota_us=200_000, disk_bytes_sec=200_000_000, disk_iops_sec=5000, net_kib_sec=12207)


@pytest.fixture
def tcg_spec(make_spec, make_record):
    return make_spec(record=make_record(accel="tcg"), domain_type="qemu", nwfilter="")


def test_golden_domain_kvm(golden, kvm_spec):
    golden("domain-kvm.xml", build_domain(kvm_spec))


def test_golden_domain_tcg(golden, tcg_spec):
    golden("domain-tcg.xml", build_domain(tcg_spec))


def test_golden_overlay_volume(golden):
    golden(
        "overlay-volume.xml",
        build_overlay_volume("lvx-job-4242.qcow2", "/var/lib/libvirt-executor/image/disk.qcow2", 20 * 1024**3),
    )


def test_docker_disk_and_a_scsi_controller_only_when_asked(spec_factory):
    plain = ET.fromstring(build_domain(spec_factory()))
    assert not [d for d in plain.findall("./devices/disk") if d.findtext("serial") == "lvx-docker"]
    assert plain.find("./devices/controller[@type='scsi']") is None
    with_disk = ET.fromstring(build_domain(spec_factory(docker_disk="/cache/lvx-p1-protected.lvx-job-1.qcow2")))
    (disk,) = [d for d in with_disk.findall("./devices/disk") if d.findtext("serial") == "lvx-docker"]
    assert disk.find("source").get("file") == "/cache/lvx-p1-protected.lvx-job-1.qcow2"
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("target").get("bus") == "virtio"
    pool_vm = ET.fromstring(build_domain(spec_factory(scsi_controller=True)))
    assert pool_vm.find("./devices/controller[@type='scsi']").get("model") == "virtio-scsi"
    plugged = ET.fromstring(docker_disk_xml("/c/d.qcow2", Limits(disk_iops_sec=100)))
    assert plugged.find("target").get("bus") == "scsi"
    assert plugged.findtext("serial") == "lvx-docker" and plugged.findtext("iotune/read_iops_sec") == "100"


def test_overlay_volume_without_backing_and_reading_a_backing_back():
    empty = build_overlay_volume("d.qcow2", "", 1024)
    assert "backingStore" not in empty and volume_backing_path(empty) == ""
    over = build_overlay_volume("d.qcow2", "/c/head.qcow2", 1024)
    assert volume_backing_path(over) == "/c/head.qcow2"
    assert volume_backing_path("<volume") == ""


def test_golden_raw_volume(golden):
    golden("raw-volume.xml", build_raw_volume("lvx-job-4242-seed.iso", 374784))


def test_golden_dir_pool(golden):
    golden("dir-pool.xml", build_dir_pool("libvirt-executor", "/var/lib/libvirt-executor/pool"))


def test_golden_nat_network(golden):
    golden("nat-network.xml", build_nat_network("libvirt-executor", "lvxbr0", "192.168.213.1", "255.255.255.0"))


# --- structure the golden files rely on ------------------------------------------------------


def test_kvm_and_tcg_differ_in_type_and_cpu_only(kvm_spec, tcg_spec):
    kvm = ET.fromstring(build_domain(kvm_spec))
    tcg = ET.fromstring(build_domain(tcg_spec))
    assert kvm.get("type") == "kvm" and tcg.get("type") == "qemu"
    assert kvm.find("cpu").get("mode") == "host-passthrough"
    assert tcg.find("cpu") is None


def test_nwfilter_pins_the_vm_address_only_when_configured(kvm_spec, tcg_spec):
    kvm = ET.fromstring(build_domain(kvm_spec))
    ref = kvm.find("devices/interface/filterref")
    assert ref.get("filter") == "clean-traffic"
    assert {p.get("name"): p.get("value") for p in ref.findall("parameter")} == {
        "IP": "192.168.122.10",
        "CTRL_IP_LEARNING": "none",
    }
    assert ET.fromstring(build_domain(tcg_spec)).find("devices/interface/filterref") is None


def test_domain_is_never_restarted_and_disks_are_as_specified(tcg_spec):
    dom = ET.fromstring(build_domain(tcg_spec))
    for tag in ("on_poweroff", "on_reboot", "on_crash"):
        assert dom.findtext(tag) == "destroy"
    disks = dom.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]
    assert disks[0].find("driver").get("type") == "qcow2"
    assert disks[1].find("readonly") is not None
    assert dom.find("devices/interface/port").get("isolated") == "yes"


def test_the_runner_volume_is_a_third_read_only_disk_found_by_its_serial(tcg_spec):
    dom = ET.fromstring(build_domain(dataclasses.replace(tcg_spec, runner_volume="/pool/lvx-runner-ab.iso")))
    runner = dom.findall("devices/disk")[2]
    assert runner.find("source").get("file") == "/pool/lvx-runner-ab.iso"
    assert runner.find("target").get("dev") == "vdc" and runner.findtext("serial") == "lvx-runner"
    assert runner.find("readonly") is not None and runner.find("driver").get("type") == "raw"


def test_limits_cap_the_whole_domain_its_job_disk_and_its_interface(kvm_spec):
    dom = ET.fromstring(build_domain(kvm_spec))
    assert dom.findtext("cputune/global_period") == str(CPU_PERIOD_US)
    assert dom.findtext("cputune/global_quota") == "200000"
    job_disk, seed = dom.findall("devices/disk")[:2]
    assert {el.tag: el.text for el in job_disk.find("iotune")} == {
        "read_bytes_sec": "200000000",
        "write_bytes_sec": "200000000",
        "read_iops_sec": "5000",
        "write_iops_sec": "5000",
    }
    assert seed.find("iotune") is None  # read-only and a few KiB
    bandwidth = dom.find("devices/interface/bandwidth")
    assert [(el.tag, el.get("average")) for el in bandwidth] == [("inbound", "12207"), ("outbound", "12207")]


def test_a_limit_of_zero_leaves_its_element_out(tcg_spec):
    unlimited = ET.fromstring(build_domain(tcg_spec))
    assert unlimited.find("cputune") is None
    assert unlimited.find("devices/disk/iotune") is None
    assert unlimited.find("devices/interface/bandwidth") is None
    disk_only = ET.fromstring(build_domain(dataclasses.replace(tcg_spec, limits=Limits(disk_iops_sec=100))))
    assert [el.tag for el in disk_only.find("devices/disk/iotune")] == ["read_iops_sec", "write_iops_sec"]
    assert disk_only.find("cputune") is None


def test_overlay_names_its_backing_format():
    vol = ET.fromstring(build_overlay_volume("v.qcow2", "/base.qcow2", 1))
    assert vol.findtext("backingStore/path") == "/base.qcow2"
    assert vol.find("backingStore/format").get("type") == "qcow2"


# --- escaping ------------------------------------------------------------------------------


def test_hostile_project_text_is_escaped_and_round_trips(make_record, make_spec):
    record = make_record(project=HOSTILE)
    xml = build_domain(make_spec(record=record))
    assert "<x/>" not in xml and "<x />" not in xml and "<!-- c -->" not in xml
    root = ET.fromstring(xml)  # still well-formed
    assert [el for el in root.iter() if el.tag == "x"] == []
    assert len(root.findall(f"metadata/{NS}job/{NS}project")) == 1
    assert root.findtext(f"metadata/{NS}job/{NS}project") == HOSTILE
    assert parse_job_record(xml) == record


def test_hostile_attribute_values_are_escaped(make_spec):
    path = "/tmp/a\"b'c<d>&e.log"
    dom = ET.fromstring(build_domain(make_spec(console_log=path)))
    assert dom.find("devices/serial/log").get("file") == path


# --- metadata -----------------------------------------------------------------------------


def test_metadata_round_trips(make_record):
    record = make_record()
    assert parse_job_record(metadata_xml(record)) == record
    assert parse_job_record(ET.tostring(build_metadata(record), encoding="unicode")) == record


def test_metadata_with_optional_fields_empty_round_trips(make_record):
    record = make_record(project_id=None, pipeline_id=None, runner_id=None, project="", host_key="")
    assert parse_job_record(metadata_xml(record)) == record


def test_parse_job_record_reads_a_whole_domain(kvm_spec):
    spec = kvm_spec
    assert parse_job_record(build_domain(spec)) == spec.record


def _without_namespace(record) -> str:
    """Our element as virDomainGetMetadata returns it: no namespace on any element."""
    job = ET.Element("job")
    for child in build_metadata(record):
        ET.SubElement(job, child.tag.replace(NS, "")).text = child.text
    return ET.tostring(job, encoding="unicode")


def test_parse_job_record_reads_the_namespace_less_element(make_record):
    record = make_record()
    text = _without_namespace(record)
    assert "xmlns" not in text
    assert parse_job_record(text) == record


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not xml",
        "<job>",
        "<domain/>",
        "<domain><metadata/></domain>",
        "<job/>",
        '<job xmlns="urn:somebody-else"><vm>x</vm><job-id>1</job-id><created>1</created><expires>2</expires></job>',
        "<job><vm>x</vm><job-id>abc</job-id><created>1</created><expires>2</expires></job>",
        "<job><vm>x</vm><job-id>-1</job-id><created>1</created><expires>2</expires></job>",
        "<job><vm>x</vm><job-id>\u00b2</job-id><created>1</created><expires>2</expires></job>",
        "<job><vm>x</vm><job-id>1</job-id><created>\u0661</created><expires>2</expires></job>",
        "<job><vm></vm><job-id>1</job-id><created>1</created><expires>2</expires></job>",
        "<job><vm>x</vm><job-id>1</job-id><expires>2</expires></job>",
        "<job><vm>x</vm><job-id>1</job-id><created>1</created></job>",
        "<other><vm>x</vm><job-id>1</job-id><created>1</created><expires>2</expires></other>",
    ],
)
def test_parse_job_record_returns_none_on_garbage(text):
    assert parse_job_record(text) is None


def test_parse_job_record_ignores_a_job_element_in_another_namespace_inside_a_domain():
    foreign = '<domain><metadata><job xmlns="urn:other"><vm>x</vm><job-id>1</job-id><created>1</created><expires>2</expires></job></metadata></domain>'
    assert parse_job_record(foreign) is None


# --- libvirt accepts it --------------------------------------------------------------------


@pytest.mark.parametrize("nwfilter", ["", "clean-traffic"])
def test_libvirt_test_driver_accepts_the_domain(hv, nwfilter, make_driver_spec):
    spec = make_driver_spec(nwfilter=nwfilter)
    hv.define_and_start(build_domain(spec))
    info = hv.domain(spec.name)
    assert info is not None and info.state == "running"
    assert parse_job_record(info.metadata) == spec.record


def test_libvirt_test_driver_accepts_the_limits(hv, make_driver_spec):
    spec = make_driver_spec(limits=LIMITS)
    hv.define_and_start(build_domain(spec))
    defined = ET.fromstring(hv._conn.lookupByName(spec.name).XMLDesc(0))
    assert defined.findtext("cputune/global_quota") == "200000"
    assert defined.findtext("devices/disk/iotune/write_bytes_sec") == "200000000"
    assert defined.find("devices/interface/bandwidth/inbound").get("average") == "12207"


def test_libvirt_test_driver_accepts_hostile_metadata(hv, make_record, make_driver_spec):
    spec = make_driver_spec(record=make_record(project=HOSTILE))
    hv.define_and_start(build_domain(spec))
    assert parse_job_record(hv.domain(spec.name).metadata).project == HOSTILE


def test_libvirt_test_driver_accepts_the_volumes_pool_and_network(hv):
    hv.create_volume("default-pool", build_overlay_volume("lvx-job-1.qcow2", "/base/disk.qcow2", 1 << 30))
    hv.create_volume("default-pool", build_raw_volume("lvx-job-1-seed.iso", 4096))
    assert hv.volume_names("default-pool") == ["lvx-job-1-seed.iso", "lvx-job-1.qcow2"]
    assert hv.ensure_pool("lvx-pool", build_dir_pool("lvx-pool", "/nonexistent/lvx-pool")) is True
    assert hv.ensure_network("lvx-net", build_nat_network("lvx-net", "lvxbr9", "192.168.213.1", "255.255.255.0"))
    assert hv.network_active("lvx-net") is True


def test_the_network_policy_goes_into_the_filterref_parameters_in_order(make_spec, make_record):
    params = (
        ("IP", "192.168.122.10"),
        ("CTRL_IP_LEARNING", "none"),
        ("GATEWAY", "192.168.122.1"),
        ("HOST_PORT", "53"),
        ("BLOCK_NET", "10.0.0.0"),
        ("BLOCK_MASK", "8"),
    )
    spec = make_spec(record=make_record(), nwfilter="lvx-job", filter_parameters=params)
    ref = ET.fromstring(build_domain(spec)).find("devices/interface/filterref")
    assert ref.get("filter") == "lvx-job"
    assert [(p.get("name"), p.get("value")) for p in ref.findall("parameter")] == list(params)


def test_a_pool_vms_record_round_trips_with_and_without_its_namespace(make_record):
    record = make_record(
        vm="lvx-pool-0a1b2c3d",
        job_id=0,
        pool_state="idle",
        fingerprint="abc123",
        prepulled=("alpine:3.20", "registry.example:5000/tools:1"),
    )
    assert record.source == "pool" and make_record().source == "cold"
    assert parse_job_record(metadata_xml(record)) == record
    plain = metadata_xml(record, namespaced=False)
    assert "xmlns" not in plain  # virDomainSetMetadata adds the namespace itself
    assert parse_job_record(plain) == record


def test_a_live_interfaces_filter_parameters_are_replaced_and_nothing_else(make_spec, make_record):
    spec = make_spec(record=make_record(), nwfilter="lvx-job", filter_parameters=(("IP", "192.168.122.10"),))
    live = build_domain(spec).replace('<model type="virtio" />', '<model type="virtio" /><target dev="vnet7" />')
    updated = ET.fromstring(
        interface_with_filter(live, spec.mac.upper(), "lvx-job", (("IP", "192.168.122.10"), ("ALLOW_NET", "10.9.8.7")))
    )
    assert updated.tag == "interface"
    assert updated.find("target").get("dev") == "vnet7"  # what libvirt added stays
    assert [(p.get("name"), p.get("value")) for p in updated.findall("filterref/parameter")] == [
        ("IP", "192.168.122.10"),
        ("ALLOW_NET", "10.9.8.7"),
    ]
    with pytest.raises(ValueError, match="no interface with MAC 52:54:00:ff:ff:ff"):
        interface_with_filter(live, "52:54:00:ff:ff:ff", "lvx-job", ())
