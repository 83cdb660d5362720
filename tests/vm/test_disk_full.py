"""A job that fills the storage pool: QEMU pauses the VM on ENOSPC and waits forever, so `run`
must notice the pause and end as a system failure instead of hanging until the job timeout.

The pool is a small tmpfs of its own, so the real pool and the host's disk are never filled.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import libvirt
import pytest

from executor.adapters.hypervisor import connect
from executor.core import naming
from executor.core.domain_xml import build_dir_pool
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim

pytestmark = pytest.mark.vm

POOL = "lvxfull"
POOL_MIB = 160  # room for the seed and a booted overlay (~4 MiB), not for the job's writes
JOB_ID = 5151


@pytest.fixture
def small_pool(host_settings):
    # Beside the real pool, not under pytest's tmp dir: QEMU runs as libvirt-qemu and must be
    # able to traverse the path (pytest's tmp dirs are root-only).
    path = Path(host_settings.libvirt.pool_path).parent / "test-full-pool"
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={POOL_MIB}m,mode=0755", "lvxfull", str(path)], check=True)
    try:
        with connect(host_settings.libvirt.uri, naming.METADATA_NS) as hv:
            hv.ensure_pool(POOL, build_dir_pool(POOL, str(path)))
        yield POOL, str(path)
    finally:
        conn = libvirt.open(host_settings.libvirt.uri)
        try:
            pool = conn.storagePoolLookupByName(POOL)
            if pool.isActive():
                pool.destroy()
            pool.undefine()
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
        subprocess.run(["umount", str(path)], check=False)
        path.rmdir()


def test_a_job_filling_the_pool_is_a_system_failure_not_a_hang(host_settings, tmp_path, small_pool, leftovers):
    # Admission control would refuse a job this pool cannot hold; here the point is that one
    # that got through anyway (a pool filled by something else) is caught.
    config = write_test_config(
        host_settings, tmp_path / "cfg", "lvxfull", pool=small_pool, extra="[admission]\nenabled = false\n"
    )
    sim = RunnerSim(config, tmp_path / "runner", JOB_ID)
    try:
        prepared = sim.prepare()
        assert prepared.rc == 0, prepared.describe()
        # More than the pool holds; conv=fsync so the writes reach the overlay, not just the
        # guest's page cache. Without the pause check this run never returns.
        ran = sim.run("dd if=/dev/zero of=/builds/fill bs=1M count=1024 conv=fsync; echo dd-returned-$?", timeout=600)
        assert ran.rc == 2, ran.describe()  # SYSTEM_FAILURE_EXIT_CODE: the host's pool, not the script
        assert "paused on a disk I/O error" in ran.stderr, ran.describe()
        assert "dd-returned" not in ran.stdout
        assert ran.build_exit_code is None
    finally:
        cleaned = sim.cleanup()
    assert cleaned.rc == 0, cleaned.describe()
    assert leftovers(config) == {}
