"""Fixtures for the unit tier: no daemon, libvirt's in-process test driver, tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from executor.adapters import hypervisor
from executor.core import naming
from executor.core.domain_xml import JobRecord, VMSpec
from executor.core.settings import LibvirtSettings, MirrorSettings, PathSettings, Settings

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TEST_URI = "test:///default"


@pytest.fixture
def hv():
    """A FRESH connection to libvirt's built-in test driver. Its state lives as long as some
    connection to it is open in this process, so closing it after each test resets it."""
    with hypervisor.connect(TEST_URI, naming.METADATA_NS) as h:
        yield h


@pytest.fixture
def golden(request):
    """golden(name, text): compare `text` byte for byte with tests/data/<name>, or rewrite the
    file when pytest runs with --regenerate-golden."""
    regenerate = request.config.getoption("--regenerate-golden")

    def check(name: str, text: str) -> None:
        path = DATA_DIR / name
        if regenerate:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text.encode("utf-8"))
        if not path.exists():
            pytest.fail(f"golden file {path} is missing: run pytest with --regenerate-golden")
        expected = path.read_bytes()
        assert text.encode("utf-8") == expected, (
            f"output differs from golden file {path.name} "
            "(if the change is intended, run pytest with --regenerate-golden and review the diff)"
        )

    return check


def make_record(**overrides) -> JobRecord:
    fields = {
        "vm": "lvx-job-4242",
        "job_id": 4242,
        "project_id": 17,
        "project": "group/project",
        "pipeline_id": 900,
        "runner_id": 3,
        "created": 1_700_000_000,
        "expires": 1_700_005_400,
        "ip": "192.168.122.10",
        "accel": "tcg",
        "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyForTests lvx-job-4242",
    }
    fields.update(overrides)
    return JobRecord(**fields)


def make_spec(record: JobRecord | None = None, **overrides) -> VMSpec:
    record = record or make_record()
    name = overrides.pop("name", record.vm)
    fields = {
        "name": name,
        "memory_mib": 2048,
        "vcpus": 2,
        "kernel": "/var/lib/libvirt-executor/image/vmlinuz",
        "initrd": "/var/lib/libvirt-executor/image/initrd.img",
        "cmdline": "console=ttyS0 root=/dev/vda rw quiet",
        "overlay_path": f"/var/lib/libvirt-executor/pool/{name}.qcow2",
        "seed_path": f"/var/lib/libvirt-executor/pool/{name}-seed.iso",
        "network": "libvirt-executor",
        "mac": "52:54:00:a8:7a:0a",
        "ip": record.ip,
        "console_log": f"/var/log/libvirt-executor/{name}.console.log",
        "record": record,
    }
    fields.update(overrides)
    return VMSpec(**fields)


def make_driver_spec(record: JobRecord | None = None, **overrides) -> VMSpec:
    """A spec libvirt's test driver accepts: domain type "test", i686, no machine, network default."""
    base = {"domain_type": "test", "arch": "i686", "machine": None, "network": "default", "memory_mib": 256, "vcpus": 1}
    base.update(overrides)
    return make_spec(record, **base)


@pytest.fixture
def record_factory():
    return make_record


@pytest.fixture
def spec_factory():
    return make_spec


@pytest.fixture
def driver_spec_factory():
    return make_driver_spec


@pytest.fixture
def tmp_settings(tmp_path) -> Settings:
    """Defaults, but the test driver's pool and every host path under tmp_path."""
    return Settings(
        libvirt=LibvirtSettings(uri=TEST_URI, pool="default-pool", network="default"),
        paths=PathSettings(state_dir=str(tmp_path / "state"), console_log_dir=str(tmp_path / "console")),
        mirror=MirrorSettings(enabled=False, storage=str(tmp_path / "mirror")),  # tests that want one say so
    )
