"""executor.jobvm.teardown against libvirt's test driver."""

from __future__ import annotations

import pytest

from executor.adapters.hostfiles import console_log
from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core.domain_xml import build_domain, build_overlay_volume, build_raw_volume
from executor.core.settings import LibvirtSettings, Settings
from executor.errors import SystemFailure
from executor.jobvm.teardown import teardown

VM = "lvx-job-4242"
POOL = "default-pool"


# --- teardown on the test driver -----------------------------------------------------------------


@pytest.fixture
def state(tmp_settings):
    return StateDir(tmp_settings.paths.state_dir)


def build_vm(hv, settings, state, driver_spec_factory, record_factory, vm=VM):
    """Everything prepare makes for `vm`: domain with our metadata, both volumes, an IP
    reservation, the client key and a console log."""
    ip = state.allocate_ip(vm, naming.vm_addresses(settings.subnet))
    state.write_client_key(vm, "private key")
    console = console_log(settings, vm)
    console.parent.mkdir(parents=True, exist_ok=True)
    console.write_text("booting\n")
    overlay = hv.create_volume(POOL, build_overlay_volume(naming.overlay_volume_name(vm), "/base.qcow2", 1 << 30))
    seed = hv.create_volume(POOL, build_raw_volume(naming.seed_volume_name(vm), 4096))
    job_id = naming.job_id_of("lvx", vm)
    spec = driver_spec_factory(
        record=record_factory(vm=vm, job_id=job_id, ip=ip),
        overlay_path=overlay,
        seed_path=seed,
        console_log=str(console),
    )
    hv.define_and_start(build_domain(spec))
    return ip, console


ALL_STEPS = [
    "domain destroyed",
    "domain undefined",
    "overlay deleted",
    "seed deleted",
    "IP released",
    "key removed",
    "console log removed",
]


def test_teardown_removes_everything_and_is_idempotent(hv, tmp_settings, state, driver_spec_factory, record_factory):
    ip, console = build_vm(hv, tmp_settings, state, driver_spec_factory, record_factory)
    other_ip, other_console = build_vm(hv, tmp_settings, state, driver_spec_factory, record_factory, vm="lvx-job-7")

    assert teardown(hv, tmp_settings, state, VM) == ALL_STEPS
    assert hv.domain(VM) is None
    assert VM + ".qcow2" not in hv.volume_names(POOL) and VM + "-seed.iso" not in hv.volume_names(POOL)
    assert ip not in state.reservations()
    assert not state.job_dir(VM).exists()
    assert not console.exists()

    # a second run finds nothing to do and does not fail
    assert teardown(hv, tmp_settings, state, VM) == []

    # the other job's VM is untouched, as is the test driver's own domain
    assert hv.domain("lvx-job-7").state == "running"
    assert hv.volume_names(POOL) == ["lvx-job-7-seed.iso", "lvx-job-7.qcow2"]
    assert state.reservations() == {other_ip: "lvx-job-7"}
    assert state.read_client_key("lvx-job-7") == "private key"
    assert other_console.exists()
    assert hv.domain("test").state == "running"


def test_teardown_of_nothing_removes_nothing(hv, tmp_settings, state):
    assert teardown(hv, tmp_settings, state, VM) == []


def test_teardown_of_a_half_built_vm(hv, tmp_settings, state):
    # prepare died after the reservation and the seed volume, before the domain existed
    ip = state.allocate_ip(VM, naming.vm_addresses(tmp_settings.subnet))
    hv.create_volume(POOL, build_raw_volume(naming.seed_volume_name(VM), 4096))
    assert teardown(hv, tmp_settings, state, VM) == ["seed deleted", "IP released"]
    assert hv.volume_names(POOL) == [] and ip not in state.reservations()


def test_teardown_of_a_stopped_domain(hv, tmp_settings, state, driver_spec_factory, record_factory):
    build_vm(hv, tmp_settings, state, driver_spec_factory, record_factory)
    hv.destroy(VM)
    assert teardown(hv, tmp_settings, state, VM) == ALL_STEPS[1:]
    assert hv.domain(VM) is None


FOREIGN_XML = """<domain type='test'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <os><type arch='i686'>hvm</type></os>
  {metadata}
</domain>"""


@pytest.mark.parametrize(
    "metadata",
    [
        "",
        "<metadata><other:job xmlns:other='urn:someone-else'><other:vm>lvx-job-4242</other:vm></other:job></metadata>",
        # our namespace, but not a record we could have written
        f"<metadata><lvx:job xmlns:lvx='{naming.METADATA_NS}'><lvx:vm>lvx-job-4242</lvx:vm></lvx:job></metadata>",
    ],
)
def test_teardown_refuses_a_domain_without_our_metadata(hv, tmp_settings, state, metadata):
    hv.define_and_start(FOREIGN_XML.format(name=VM, metadata=metadata))
    ip = state.allocate_ip(VM, naming.vm_addresses(tmp_settings.subnet))
    hv.create_volume(POOL, build_raw_volume(naming.seed_volume_name(VM), 4096))
    with pytest.raises(SystemFailure, match="without libvirt-executor metadata"):
        teardown(hv, tmp_settings, state, VM)
    # left alone entirely, and nothing else was touched either
    assert hv.domain(VM).state == "running"
    assert hv.volume_names(POOL) == [naming.seed_volume_name(VM)]
    assert state.reservations() == {ip: VM}


def test_teardown_reports_a_failing_step_but_still_runs_the_others(hv, tmp_settings, state):
    state.allocate_ip(VM, naming.vm_addresses(tmp_settings.subnet))
    settings = Settings(libvirt=LibvirtSettings(pool="no-such-pool"), paths=tmp_settings.paths)
    with pytest.raises(SystemFailure) as info:
        teardown(hv, settings, state, VM)
    assert "overlay" in str(info.value) and "seed" in str(info.value)
    assert state.reservations() == {}  # later steps ran despite the failures
