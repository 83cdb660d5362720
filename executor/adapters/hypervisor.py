"""The only module that imports libvirt.

It takes and returns plain strings, bytes and small dataclasses; XML is built and parsed in
`domain_xml`. libvirt errors become SystemFailure, except the "it is not there" cases that
cleanup and reap need to treat as success, which are narrowed here by error code.
"""

from __future__ import annotations

import io
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import BinaryIO

import libvirt

from executor.core.domainstate import is_active
from executor.core.waiting import poll
from executor.errors import ConfigError, SystemFailure

log = logging.getLogger(__name__)

# libvirt prints every error to stderr by default; each one also raises, so silence the printer.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


@dataclass(frozen=True)
class DomainInfo:
    name: str
    state: str
    metadata: str | None  # our metadata element as XML text, None if the domain has none
    # QEMU stops a guest whose disk write hit ENOSPC (or another I/O error) and waits forever:
    # for a job that is a dead VM, not a running one.
    io_error: bool = False

    @property
    def active(self) -> bool:
        return is_active(self.state)


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    path: str
    capacity: int  # bytes the guest sees
    allocation: int  # bytes the file takes on the host
    xml: str  # libvirt's description (domain_xml.volume_backing_path reads its backing file)


def _code(exc: libvirt.libvirtError) -> int:
    return int(exc.get_error_code())


def _storage_busy(exc: libvirt.libvirtError, code: int) -> bool:
    """The storage driver refusing because another request is working on the pool or volume:
    INTERNAL_ERROR for "pool has asynchronous jobs running" (refresh while a volume is being
    built), OPERATION_INVALID for "volume is still being allocated" / "still in use"."""
    return _code(exc) == code and exc.get_error_domain() == libvirt.VIR_FROM_STORAGE


def _failure(what: str, exc: libvirt.libvirtError) -> SystemFailure:
    return SystemFailure(f"libvirt: {what}: {exc.get_error_message()}")


class Hypervisor:
    def __init__(self, conn: libvirt.virConnect, metadata_ns: str) -> None:
        self._conn = conn
        self._ns = metadata_ns

    # --- domains -------------------------------------------------------------------------

    def _lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self._conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise _failure(f"looking up domain {name}", exc) from None

    def _metadata(self, dom: libvirt.virDomain) -> str | None:
        try:
            return str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, self._ns, 0))
        except libvirt.libvirtError as exc:
            if _code(exc) in (libvirt.VIR_ERR_NO_DOMAIN_METADATA, libvirt.VIR_ERR_NO_DOMAIN):
                return None
            raise _failure("reading domain metadata", exc) from None

    def _info(self, dom: libvirt.virDomain) -> DomainInfo:
        state, reason = dom.state()
        io_error = state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR
        return DomainInfo(dom.name(), _STATE_NAMES.get(state, "unknown"), self._metadata(dom), io_error)

    def domain(self, name: str) -> DomainInfo | None:
        dom = self._lookup(name)
        if dom is None:
            return None
        try:
            return self._info(dom)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # destroyed between lookup and state()
            raise _failure(f"reading domain {name}", exc) from None

    def domains(self) -> list[DomainInfo]:
        try:
            doms = self._conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise _failure("listing domains", exc) from None
        infos = []
        for dom in doms:
            try:
                infos.append(self._info(dom))
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                    raise _failure("reading a domain", exc) from None
        return infos

    def running_memory(self) -> list[tuple[int, int]]:
        """(memory, resident) in bytes of every running domain: what its guest may use, and what
        its QEMU holds now (0 when libvirt cannot tell: the whole memory counts as still to come)."""
        try:
            doms = self._conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as exc:
            raise _failure("listing domains", exc) from None
        sizes = []
        for dom in doms:
            try:
                memory_kib = int(dom.info()[1])
            except libvirt.libvirtError:
                continue  # gone since the listing
            try:
                resident_kib = int(dom.memoryStats().get("rss", 0))
            except libvirt.libvirtError:
                resident_kib = 0
            sizes.append((memory_kib * 1024, resident_kib * 1024))
        return sizes

    def define_and_start(self, xml: str) -> None:
        """Define a persistent domain and start it. On a start failure the definition stays for
        the caller's rollback to remove (it knows the name and cleans up volumes too)."""
        try:
            dom = self._conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise _failure("defining domain", exc) from None
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            raise _failure(f"starting domain {dom.name()}", exc) from None

    def _existing(self, name: str) -> libvirt.virDomain:
        dom = self._lookup(name)
        if dom is None:
            raise SystemFailure(f"domain {name} does not exist")
        return dom

    def set_metadata(self, name: str, key: str, xml: str) -> None:
        """Replace our metadata element of a running domain, live and in its definition."""
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        try:
            self._existing(name).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, key, self._ns, flags)
        except libvirt.libvirtError as exc:
            raise _failure(f"writing the metadata of {name}", exc) from None

    def suspend(self, name: str) -> None:
        try:
            self._existing(name).suspend()
        except libvirt.libvirtError as exc:
            raise _failure(f"pausing {name}", exc) from None

    def resume(self, name: str) -> None:
        """Let a paused domain run again (nothing to do for one that runs)."""
        dom = self._existing(name)
        try:
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
        except libvirt.libvirtError as exc:
            raise _failure(f"resuming {name}", exc) from None

    def live_xml(self, name: str) -> str:
        try:
            return str(self._existing(name).XMLDesc(0))
        except libvirt.libvirtError as exc:
            raise _failure(f"describing {name}", exc) from None

    def update_device(self, name: str, xml: str) -> None:
        """Change a device of a running domain, live and in its definition (e.g. an
        interface's nwfilter parameters, which libvirt re-applies at once)."""
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        try:
            self._existing(name).updateDeviceFlags(xml, flags)
        except libvirt.libvirtError as exc:
            raise _failure(f"updating a device of {name}", exc) from None

    def attach_disk(self, name: str, xml: str) -> None:
        """Plug a disk into the running domain (live only: the VM is never started again)."""
        try:
            self._existing(name).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            raise _failure(f"attaching a disk to {name}", exc) from None

    def destroy(self, name: str) -> bool:
        """Hard power-off (never a shutdown request a hostile guest could ignore).
        Returns False if there was nothing to destroy."""
        dom = self._lookup(name)
        if dom is None:
            return False
        try:
            dom.destroy()
            return True
        except libvirt.libvirtError as exc:
            if _code(exc) in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                return False  # already gone, or not running
            raise _failure(f"destroying domain {name}", exc) from None

    def undefine(self, name: str) -> bool:
        dom = self._lookup(name)
        if dom is None:
            return False
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        try:
            dom.undefineFlags(flags)
            return True
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            if _code(exc) in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG):
                try:
                    dom.undefine()
                    return True
                except libvirt.libvirtError as exc2:
                    if _code(exc2) == libvirt.VIR_ERR_NO_DOMAIN:
                        return False
                    raise _failure(f"undefining domain {name}", exc2) from None
            raise _failure(f"undefining domain {name}", exc) from None

    # --- storage -------------------------------------------------------------------------

    def _pool(self, pool: str) -> libvirt.virStoragePool:
        try:
            p = self._conn.storagePoolLookupByName(pool)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise ConfigError(f"storage pool {pool!r} does not exist (run `libvirt-executor setup`)") from None
            raise _failure(f"looking up pool {pool}", exc) from None
        if not p.isActive():
            raise ConfigError(f"storage pool {pool!r} is not active (run `libvirt-executor setup`)")
        return p

    def _refresh(self, p: libvirt.virStoragePool) -> None:
        """Rescan the pool's directory. libvirt refuses while a volume is being built there
        (another job's prepare is creating its overlay); its own list is current for volumes
        it creates and deletes, so go on without the rescan."""
        try:
            p.refresh(0)
        except libvirt.libvirtError as exc:
            if not _storage_busy(exc, libvirt.VIR_ERR_INTERNAL_ERROR):
                raise

    def volume_names(self, pool: str) -> list[str]:
        p = self._pool(pool)
        try:
            self._refresh(p)
            return sorted(p.listVolumes())
        except libvirt.libvirtError as exc:
            raise _failure(f"listing volumes of pool {pool}", exc) from None

    def volume_path(self, pool: str, name: str) -> str | None:
        try:
            return str(self._pool(pool).storageVolLookupByName(name).path())
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise _failure(f"looking up volume {name}", exc) from None

    def create_volume(self, pool: str, xml: str) -> str:
        try:
            return str(self._pool(pool).createXML(xml, 0).path())
        except libvirt.libvirtError as exc:
            raise _failure("creating volume", exc) from None

    def clone_volume(self, pool: str, xml: str, source: str) -> str:
        """A new volume (`xml`) with the contents of `source`, read through its backing chain:
        a flattened copy, made by libvirt's storage driver (qemu-img convert)."""
        try:
            p = self._pool(pool)
            return str(p.createXMLFrom(xml, p.storageVolLookupByName(source), 0).path())
        except libvirt.libvirtError as exc:
            raise _failure(f"copying volume {source}", exc) from None

    def volumes(self, pool: str) -> list[VolumeInfo]:
        """Every volume of the pool, as of a fresh rescan (one deleted meanwhile is left out)."""
        return [info for name in self.volume_names(pool) if (info := self.volume_info(pool, name)) is not None]

    def volume_info(self, pool: str, name: str) -> VolumeInfo | None:
        try:
            vol = self._pool(pool).storageVolLookupByName(name)
            _, capacity, allocation = vol.info()
            return VolumeInfo(name, str(vol.path()), int(capacity), int(allocation), str(vol.XMLDesc(0)))
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise _failure(f"reading volume {name}", exc) from None

    def pool_exists(self, pool: str) -> bool:
        try:
            self._conn.storagePoolLookupByName(pool)
            return True
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_POOL:
                return False
            raise _failure(f"looking up pool {pool}", exc) from None

    def upload_volume(self, pool: str, name: str, data: bytes | BinaryIO, length: int | None = None) -> None:
        """Write `data` (bytes, or `length` bytes read from a file) into the volume `name`."""
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        size = len(data) if isinstance(data, bytes) else length
        if size is None:
            raise ValueError("upload_volume: a file needs its length")
        try:
            vol = self._pool(pool).storageVolLookupByName(name)
            stream = self._conn.newStream(0)
            vol.upload(stream, 0, size, 0)
            while chunk := source.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    sent = stream.send(bytes(view))
                    if sent < 0:
                        raise SystemFailure(f"libvirt: upload to volume {name} failed")
                    view = view[sent:]
            stream.finish()
        except libvirt.libvirtError as exc:
            raise _failure(f"uploading volume {name}", exc) from None

    def delete_volume(self, pool: str, name: str, building_wait: float = 30.0) -> bool:
        """Delete a volume; False if it is not there. A volume whose creation a killed prepare
        left running in libvirtd ("still being allocated") is waited for, up to `building_wait`."""
        busy: list[libvirt.libvirtError] = []

        def attempt() -> str | None:
            try:
                vol = self._pool(pool).storageVolLookupByName(name)
                vol.delete(0)
                return "deleted"
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                    return "absent"
                if _storage_busy(exc, libvirt.VIR_ERR_OPERATION_INVALID):
                    busy[:] = [exc]
                    return None
                raise _failure(f"deleting volume {name}", exc) from None

        outcome = poll(attempt, building_wait, interval=0.2, max_interval=1.0)
        if outcome is None:
            raise _failure(f"deleting volume {name} (still busy after {building_wait:.0f} s)", busy[0])
        return outcome == "deleted"

    # --- host set-up and checks ------------------------------------------------------------

    def ensure_pool(self, name: str, xml: str) -> bool:
        """Define, build, start and autostart a pool if needed. True if anything changed."""
        changed = False
        try:
            p = self._conn.storagePoolLookupByName(name)
        except libvirt.libvirtError as exc:
            if _code(exc) != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise _failure(f"looking up pool {name}", exc) from None
            try:
                p = self._conn.storagePoolDefineXML(xml, 0)
                p.build(0)
            except libvirt.libvirtError as exc2:
                raise _failure(f"defining pool {name}", exc2) from None
            changed = True
        try:
            return _start_with_autostart(p, lambda: p.create(0)) or changed
        except libvirt.libvirtError as exc:
            raise _failure(f"starting pool {name}", exc) from None

    def ensure_network(self, name: str, xml: str) -> bool:
        changed = False
        try:
            net = self._conn.networkLookupByName(name)
        except libvirt.libvirtError as exc:
            if _code(exc) != libvirt.VIR_ERR_NO_NETWORK:
                raise _failure(f"looking up network {name}", exc) from None
            try:
                net = self._conn.networkDefineXML(xml)
            except libvirt.libvirtError as exc2:
                raise _failure(f"defining network {name}", exc2) from None
            changed = True
        try:
            return _start_with_autostart(net, net.create) or changed
        except libvirt.libvirtError as exc:
            raise _failure(f"starting network {name}", exc) from None

    def network_active(self, name: str) -> bool | None:
        """True/False, or None if the network does not exist."""
        try:
            return bool(self._conn.networkLookupByName(name).isActive())
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_NETWORK:
                return None
            raise _failure(f"looking up network {name}", exc) from None

    def pool_free_bytes(self, pool: str) -> int:
        try:
            p = self._pool(pool)
            self._refresh(p)
            return int(p.info()[3])
        except libvirt.libvirtError as exc:
            raise _failure(f"reading pool {pool}", exc) from None

    def pool_volume_sizes(self, pool: str) -> list[tuple[int, int]]:
        """(capacity, allocation) in bytes of every volume in the pool, as of a fresh rescan."""
        p = self._pool(pool)
        sizes = []
        for name in self.volume_names(pool):
            try:
                _, capacity, allocation = p.storageVolLookupByName(name).info()
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                    continue  # deleted since the listing (another job's cleanup)
                raise _failure(f"reading volume {name}", exc) from None
            sizes.append((int(capacity), int(allocation)))
        return sizes

    def nwfilter_exists(self, name: str) -> bool:
        return self.nwfilter_xml(name) is not None

    def nwfilter_xml(self, name: str) -> str | None:
        """The definition of nwfilter `name`, None if there is none."""
        try:
            return str(self._conn.nwfilterLookupByName(name).XMLDesc(0))
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_NWFILTER:
                return None
            raise _failure(f"looking up nwfilter {name}", exc) from None

    def define_nwfilter(self, xml: str) -> None:
        """Define (or redefine: libvirt updates running VMs' rules at once) an nwfilter. A
        redefinition must carry the existing filter's uuid, so it is added here."""
        root = ET.fromstring(xml)
        try:
            existing = self._conn.nwfilterLookupByName(root.get("name", ""))
        except libvirt.libvirtError as exc:
            if _code(exc) != libvirt.VIR_ERR_NO_NWFILTER:
                raise _failure("looking up nwfilter", exc) from None
        else:
            for old in root.findall("uuid"):
                root.remove(old)
            uuid = ET.Element("uuid")
            uuid.text = existing.UUIDString()
            root.insert(0, uuid)
            xml = ET.tostring(root, encoding="unicode")
        try:
            self._conn.nwfilterDefineXML(xml)
        except libvirt.libvirtError as exc:
            raise _failure("defining nwfilter", exc) from None

    def kvm_offered(self, arch: str = "x86_64") -> bool:
        """Whether libvirt offers KVM for `arch`. Necessary, not sufficient: a paravirtual
        /dev/kvm is offered but may not boot a stock kernel (see core.accel.decide)."""
        try:
            caps = self._conn.getDomainCapabilities(None, arch, None, "kvm", 0)
        except libvirt.libvirtError as exc:
            # "KVM is not supported on this host" is INVALID_ARG; drivers without domain
            # capabilities (the test driver) say NO_SUPPORT. A lost connection is neither.
            if _code(exc) in (
                libvirt.VIR_ERR_INVALID_ARG,
                libvirt.VIR_ERR_NO_SUPPORT,
                libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
            ):
                return False
            raise _failure("reading domain capabilities", exc) from None
        return ET.fromstring(caps).findtext("domain") == "kvm"


def _start_with_autostart(obj: libvirt.virStoragePool | libvirt.virNetwork, start: Callable[[], object]) -> bool:
    """Start a pool or network if inactive and mark it autostart; True if anything changed."""
    changed = False
    if not obj.isActive():
        start()
        changed = True
    if not obj.autostart():
        obj.setAutostart(1)
        changed = True
    return changed


@contextmanager
def connect(uri: str, metadata_ns: str) -> Iterator[Hypervisor]:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise SystemFailure(
            f"cannot connect to libvirt at {uri}: {exc.get_error_message()} "
            "(is libvirtd running? `libvirt-executor doctor` checks the host)"
        ) from None
    try:
        yield Hypervisor(conn, metadata_ns)
    finally:
        with suppress(libvirt.libvirtError):
            conn.close()
