"""A private image pulled with the payload's registry credentials: the password (a canary) is in
no argv, no log, no domain XML and no file in the VM."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from pathlib import Path

import libvirt
import pytest

from executor.testing.registry import busybox_files, image_layout, running_registry
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim

pytestmark = pytest.mark.vm

PORT = 5002


def _cmdlines() -> list[str]:
    found = []
    for pid in Path("/proc").iterdir():
        if pid.name.isdigit():
            with contextlib.suppress(OSError):
                found.append((pid / "cmdline").read_bytes().decode("utf-8", "replace"))
    return found


def test_a_private_image_pulls_with_payload_credentials_and_the_password_leaks_nowhere(
    host_settings, tmp_path, leftovers
):
    canary = "canary-" + secrets.token_hex(12)
    with running_registry(tmp_path / "registry", f"{host_settings.gateway}:{PORT}", auth=("ci-user", canary)) as reg:
        image = reg.push(
            image_layout(tmp_path / "img", busybox_files({"etc/private": b"private-image\n"})),
            "team/private:1",
            tmp_path,
        )
        config = write_test_config(
            host_settings,
            tmp_path / "cfg",
            "lvxpriv",
            allow_host_ports=(PORT,),
            docker=f'insecure_registries = ["{reg.address}"]\n',
        )
        payload = {
            "image": {"name": image},
            "credentials": [
                {"type": "registry", "url": f"http://{reg.address}", "username": "ci-user", "password": canary}
            ],
        }
        sim = RunnerSim(config, tmp_path / "runner", 4346, payload_extra=payload)
        seen: list[str] = []
        stop = threading.Event()

        def watch() -> None:  # every process's argv while prepare runs
            while not stop.is_set():
                seen.extend(c for c in _cmdlines() if canary in c)
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            prepared = sim.prepare()
        finally:
            stop.set()
            watcher.join(5)
        try:
            assert prepared.rc == 0, prepared.describe()
            assert "(with credentials)" in prepared.stdout
            ran = sim.run("cat /etc/private", stage="build_script")
            assert "private-image" in ran.stdout, ran.describe()
            # Every file of the VM (the build container's layers under /var/lib/docker too),
            # but the stage scripts that carry this very search.
            vm_search = sim.run(
                f"{{ sudo grep -rlsF {canary} / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev 2>/dev/null "
                "| grep -v '^/run/lvx-scripts/' | head -5; } || true; echo grep-done",
                stage="get_sources",
            )
            assert vm_search.rc == 0, vm_search.describe()
            conn = libvirt.open("qemu:///system")
            try:
                xml = conn.lookupByName("lvxpriv-job-4346").XMLDesc(0)
            finally:
                conn.close()
        finally:
            cleaned = sim.cleanup()
    assert seen == [], "the password was on a command line"
    assert canary not in prepared.stdout + prepared.stderr
    assert canary not in xml
    assert "grep-done" in vm_search.stdout, vm_search.describe()
    found_in_vm = [line for line in vm_search.stdout.splitlines() if line != "grep-done"]
    assert found_in_vm == [], f"the password is in files of the VM: {found_in_vm}"
    assert cleaned.rc == 0, cleaned.describe()
    assert leftovers(config) == {}
