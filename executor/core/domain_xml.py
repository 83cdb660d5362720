"""libvirt XML for domains, volumes, the pool and the network: pure functions over ElementTree.

ElementTree escapes every text and attribute value, so job-derived strings (project path) cannot
inject XML. Nothing secret ever goes into these documents: the domain XML is readable by any
local user through libvirt's read-only socket.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from executor.core.layercache import DISK_SERIAL as DOCKER_DISK_SERIAL
from executor.core.naming import METADATA_KEY, METADATA_NS
from executor.core.runnerbinary import DISK_SERIAL as RUNNER_DISK_SERIAL

ET.register_namespace(METADATA_KEY, METADATA_NS)


@dataclass(frozen=True)
class JobRecord:
    """What a domain's metadata says about its job: enough for list, cleanup and reap."""

    vm: str
    job_id: int
    project_id: int | None
    project: str
    pipeline_id: int | None
    runner_id: int | None
    created: int  # Unix seconds
    expires: int  # Unix seconds: after this, reap may destroy the VM
    ip: str
    accel: str  # "kvm" or "tcg"
    host_key: str  # the VM's public SSH host key line, pinned by `run`
    # Warm pool (jobvm.pool): "" for a VM booted for its job; else booting -> idle -> claimed.
    # An unclaimed pool VM has job_id 0 and expires when it has been idle for pool.max_idle.
    pool_state: str = ""
    fingerprint: str = ""  # what a pool VM was made from (image, runner binary, config)
    prepulled: tuple[str, ...] = ()  # images pulled into a pool VM before its job

    @property
    def source(self) -> str:
        """Where the job's VM came from, as the prepare line and `list` say it."""
        return "pool" if self.pool_state else "cold"


POOL_BOOTING, POOL_IDLE, POOL_CLAIMED = "booting", "idle", "claimed"


CPU_PERIOD_US = 100_000  # the CFS period the domain's CPU quota is counted in


@dataclass(frozen=True)
class Limits:
    """What the domain may take of the host (0: unlimited). QEMU throttles the disk; the
    host's cgroups cap the CPU of all the domain's threads together; tc the interface."""

    cpu_quota_us: int = 0  # per CPU_PERIOD_US, for the whole domain
    disk_bytes_sec: int = 0  # reads and writes, each
    disk_iops_sec: int = 0  # reads and writes, each
    net_kib_sec: int = 0  # in and out, each (libvirt counts kibibytes)


@dataclass(frozen=True)
class VMSpec:
    name: str
    memory_mib: int
    vcpus: int
    kernel: str
    initrd: str
    cmdline: str
    overlay_path: str
    seed_path: str
    network: str
    mac: str
    ip: str
    console_log: str
    record: JobRecord
    domain_type: str = "qemu"  # "qemu" is TCG, "kvm" hardware; "test" for libvirt's test driver
    arch: str = "x86_64"
    machine: str | None = "q35"
    nwfilter: str = ""  # e.g. "lvx-job" or "clean-traffic"; empty for none
    # The filter's parameters (core.netpolicy.filter_parameters); () means just IP pinning.
    filter_parameters: tuple[tuple[str, str], ...] = ()
    # the gitlab-runner binary's shared read-only volume (core.runnerbinary); "" for none
    runner_volume: str = ""
    limits: Limits = Limits()
    # the job's Docker layer cache disk (core.layercache); "" for none
    docker_disk: str = ""
    # A virtio-scsi controller, for the Docker disk a warm-pool VM gets at its claim: a SCSI
    # disk is plugged in without a free PCIe slot (libvirt fills every port it adds on q35).
    scsi_controller: bool = False


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def _to_string(root: ET.Element) -> str:
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def build_metadata(record: JobRecord, namespaced: bool = True) -> ET.Element:
    """Our metadata element; without its namespace for virDomainSetMetadata, which adds it."""
    q = f"{{{METADATA_NS}}}" if namespaced else ""
    job = ET.Element(q + "job")
    for tag, value in (
        ("vm", record.vm),
        ("job-id", str(record.job_id)),
        ("project-id", _opt(record.project_id)),
        ("project", record.project),
        ("pipeline-id", _opt(record.pipeline_id)),
        ("runner-id", _opt(record.runner_id)),
        ("created", str(record.created)),
        ("expires", str(record.expires)),
        ("ip", record.ip),
        ("accel", record.accel),
        ("host-key", record.host_key),
    ):
        _sub(job, q + tag, value)
    if record.pool_state:
        _sub(job, q + "pool-state", record.pool_state)
        _sub(job, q + "fingerprint", record.fingerprint)
        for image in record.prepulled:
            _sub(job, q + "prepulled", image)
    return job


def metadata_xml(record: JobRecord, namespaced: bool = True) -> str:
    return _to_string(build_metadata(record, namespaced))


def build_domain(spec: VMSpec) -> str:
    dom = ET.Element("domain", type=spec.domain_type)
    _sub(dom, "name", spec.name)
    _sub(dom, "title", f"GitLab job {spec.record.job_id}" if spec.record.job_id else "libvirt-executor pool VM")
    meta = _sub(dom, "metadata")
    meta.append(build_metadata(spec.record))
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")
    if spec.limits.cpu_quota_us:
        # A global quota also covers QEMU's own threads (disk and network emulation), which a
        # per-vCPU quota would leave free for a job to keep busy.
        cputune = _sub(dom, "cputune")
        _sub(cputune, "global_period", str(CPU_PERIOD_US))
        _sub(cputune, "global_quota", str(spec.limits.cpu_quota_us))

    os_el = _sub(dom, "os")
    type_attrs = {"arch": spec.arch}
    if spec.machine:
        type_attrs["machine"] = spec.machine
    _sub(os_el, "type", "hvm", **type_attrs)
    # Direct kernel boot: no bootloader, no firmware menu, no boot-order probing.
    _sub(os_el, "kernel", spec.kernel)
    _sub(os_el, "initrd", spec.initrd)
    _sub(os_el, "cmdline", spec.cmdline)

    features = _sub(dom, "features")
    _sub(features, "acpi")
    if spec.domain_type == "kvm":
        _sub(dom, "cpu", mode="host-passthrough", check="none", migratable="off")
    _sub(dom, "clock", offset="utc")
    # A job may reboot or crash its VM; either ends it. Never restart a job VM.
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "destroy")
    _sub(dom, "on_crash", "destroy")

    _add_devices(_sub(dom, "devices"), spec)
    return _to_string(dom)


def _add_devices(devices: ET.Element, spec: VMSpec) -> None:
    disk = _sub(devices, "disk", type="file", device="disk")
    # cache=unsafe: the overlay is thrown away with the VM, so flushes buy nothing.
    _sub(disk, "driver", name="qemu", type="qcow2", cache="unsafe", discard="unmap")
    _sub(disk, "source", file=spec.overlay_path)
    _sub(disk, "target", dev="vda", bus="virtio")
    _add_iotune(disk, spec.limits)

    seed = _sub(devices, "disk", type="file", device="disk")
    _sub(seed, "driver", name="qemu", type="raw")
    _sub(seed, "source", file=spec.seed_path)
    _sub(seed, "target", dev="vdb", bus="virtio")
    _sub(seed, "readonly")

    if spec.runner_volume:
        runner = _sub(devices, "disk", type="file", device="disk")
        _sub(runner, "driver", name="qemu", type="raw")
        _sub(runner, "source", file=spec.runner_volume)
        _sub(runner, "target", dev="vdc", bus="virtio")
        _sub(runner, "serial", RUNNER_DISK_SERIAL)  # how the guest finds it, whatever its name
        _sub(runner, "readonly")  # one volume for every VM: read-only disks are never relabelled back

    if spec.docker_disk:
        devices.append(docker_disk_element(spec.docker_disk, spec.limits))
    if spec.scsi_controller:
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")

    iface = _sub(devices, "interface", type="network")
    _sub(iface, "source", network=spec.network)
    _sub(iface, "mac", address=spec.mac)
    _sub(iface, "model", type="virtio")
    if spec.nwfilter:
        # Pin the VM to its assigned address (no IP/MAC/ARP spoofing of other jobs' VMs), and
        # with our filter, the destinations it may reach.
        iface.append(
            _filterref(spec.nwfilter, spec.filter_parameters or (("IP", spec.ip), ("CTRL_IP_LEARNING", "none")))
        )
    # Isolated ports cannot talk to each other, only to the bridge (host) and beyond.
    _sub(iface, "port", isolated="yes")
    if spec.limits.net_kib_sec:
        bandwidth = _sub(iface, "bandwidth")
        for direction in ("inbound", "outbound"):
            _sub(bandwidth, direction, average=str(spec.limits.net_kib_sec))

    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "log", file=spec.console_log, append="off")
    _sub(serial, "target", port="0")
    _sub(devices, "console", type="pty")

    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    # libvirt adds a USB controller and a balloon unless told not to: less device surface.
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")


def docker_disk_element(path: str, limits: Limits, bus: str = "virtio") -> ET.Element:
    """The job's Docker disk: virtio when the VM boots with it, "scsi" when it is plugged in.
    cache=unsafe as for the overlay: the guest unmounts it (a flush) before it is kept, and the
    host syncs the file when it becomes a head."""
    disk = ET.Element("disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="qcow2", cache="unsafe", discard="unmap")
    _sub(disk, "source", file=path)
    _sub(disk, "target", dev="vdd" if bus == "virtio" else "sda", bus=bus)
    _sub(disk, "serial", DOCKER_DISK_SERIAL)
    _add_iotune(disk, limits)
    return disk


def docker_disk_xml(path: str, limits: Limits) -> str:
    """The Docker disk as a device document, to plug into a running VM's SCSI controller."""
    return _to_string(docker_disk_element(path, limits, bus="scsi"))


def _filterref(nwfilter: str, parameters: tuple[tuple[str, str], ...]) -> ET.Element:
    ref = ET.Element("filterref", filter=nwfilter)
    for name, value in parameters:
        _sub(ref, "parameter", name=name, value=value)
    return ref


def interface_with_filter(domain_xml: str, mac: str, nwfilter: str, parameters: tuple[tuple[str, str], ...]) -> str:
    """The live domain's interface `mac`, as libvirt described it, with its filter's
    parameters replaced: the device XML for a live update (a warm-pool VM gets its job's
    network allowances). ValueError if the domain has no such interface."""
    root = ET.fromstring(domain_xml)
    for iface in root.findall("./devices/interface"):
        mac_el = iface.find("mac")
        if mac_el is None or (mac_el.get("address") or "").lower() != mac.lower():
            continue
        old = iface.find("filterref")
        position = len(iface)
        if old is not None:
            position = list(iface).index(old)
            iface.remove(old)
        iface.insert(position, _filterref(nwfilter, parameters))
        return ET.tostring(iface, encoding="unicode")
    raise ValueError(f"the domain has no interface with MAC {mac}")


def _add_iotune(disk: ET.Element, limits: Limits) -> None:
    pairs = [
        (name, value)
        for names, value in (
            (("read_bytes_sec", "write_bytes_sec"), limits.disk_bytes_sec),
            (("read_iops_sec", "write_iops_sec"), limits.disk_iops_sec),
        )
        if value
        for name in names
    ]
    if pairs:
        iotune = _sub(disk, "iotune")
        for name, value in pairs:
            _sub(iotune, name, str(value))


def build_overlay_volume(name: str, backing_path: str, capacity_bytes: int) -> str:
    """A qcow2 volume over `backing_path` (a qcow2 file); with "" an empty one of its own."""
    vol = ET.Element("volume", type="file")
    _sub(vol, "name", name)
    _sub(vol, "capacity", str(capacity_bytes), unit="bytes")
    target = _sub(vol, "target")
    _sub(target, "format", type="qcow2")
    perms = _sub(target, "permissions")
    _sub(perms, "mode", "0600")
    if not backing_path:
        return _to_string(vol)
    backing = _sub(vol, "backingStore")
    _sub(backing, "path", backing_path)
    # Always name the backing format: probing it lets a guest forge a qcow2 header.
    _sub(backing, "format", type="qcow2")
    return _to_string(vol)


def volume_backing_path(xml_text: str) -> str:
    """The backing file a volume's description names; "" for none (or unreadable XML)."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        return ""
    return (root.findtext("./backingStore/path") or "").strip()


def build_raw_volume(name: str, capacity_bytes: int) -> str:
    vol = ET.Element("volume", type="file")
    _sub(vol, "name", name)
    _sub(vol, "capacity", str(capacity_bytes), unit="bytes")
    _sub(vol, "allocation", str(capacity_bytes), unit="bytes")
    target = _sub(vol, "target")
    _sub(target, "format", type="raw")
    perms = _sub(target, "permissions")
    _sub(perms, "mode", "0600")
    return _to_string(vol)


def build_dir_pool(name: str, path: str) -> str:
    pool = ET.Element("pool", type="dir")
    _sub(pool, "name", name)
    target = _sub(pool, "target")
    _sub(target, "path", path)
    perms = _sub(target, "permissions")
    _sub(perms, "mode", "0711")
    return _to_string(pool)


def build_nat_network(name: str, bridge: str, gateway: str, netmask: str) -> str:
    """A NAT network without DHCP: the executor assigns every VM's address itself."""
    net = ET.Element("network")
    _sub(net, "name", name)
    _sub(net, "forward", mode="nat")
    _sub(net, "bridge", name=bridge, stp="off", delay="0")
    _sub(net, "ip", address=gateway, netmask=netmask)
    return _to_string(net)


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.isascii() and text.isdigit() else None


def parse_job_record(xml_text: str) -> JobRecord | None:
    """Read our metadata element (alone, or inside a whole domain XML); None if absent or malformed."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        return None
    q = f"{{{METADATA_NS}}}"
    if root.tag == "job":  # virDomainGetMetadata returns the element without its namespace
        q = ""
    job = root if root.tag == q + "job" else root.find(f"./metadata/{q}job")
    if job is None:
        return None

    def text(tag: str) -> str:
        el = job.find(q + tag)
        return (el.text or "").strip() if el is not None else ""

    job_id = _int_or_none(text("job-id"))
    created = _int_or_none(text("created"))
    expires = _int_or_none(text("expires"))
    if not text("vm") or job_id is None or created is None or expires is None:
        return None
    return JobRecord(
        vm=text("vm"),
        job_id=job_id,
        project_id=_int_or_none(text("project-id")),
        project=text("project"),
        pipeline_id=_int_or_none(text("pipeline-id")),
        runner_id=_int_or_none(text("runner-id")),
        created=created,
        expires=expires,
        ip=text("ip"),
        accel=text("accel"),
        host_key=text("host-key"),
        pool_state=text("pool-state"),
        fingerprint=text("fingerprint"),
        prepulled=tuple((el.text or "").strip() for el in job.findall(q + "prepulled") if (el.text or "").strip()),
    )
