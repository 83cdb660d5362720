"""`executor.admin.listing.inventory` and `executor.admin.reap` against libvirt's test driver and a tmp state directory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from executor.adapters.statedir import StateDir
from executor.admin import listing
from executor.admin import reap as reap_module
from executor.admin.listing import inventory
from executor.admin.reap import reap
from executor.core import reaping
from executor.core.domain_xml import build_domain, build_raw_volume
from executor.errors import SystemFailure
from tests.unit.conftest import make_driver_spec, make_record

POOL = "default-pool"


class Host:
    """Creates the pieces of a job VM the way prepare does, on the test driver and in tmp."""

    def __init__(self, hv, settings):
        self.hv = hv
        self.settings = settings
        self.state = StateDir(settings.paths.state_dir)
        self.state.ensure()
        self.console = Path(settings.paths.console_log_dir)
        self.console.mkdir(parents=True, exist_ok=True)
        self._ip = 10

    def pieces(self, vm: str, *, lock_file: bool = True) -> None:
        self.hv.create_volume(POOL, build_raw_volume(f"{vm}.qcow2", 4096))
        self.hv.create_volume(POOL, build_raw_volume(f"{vm}-seed.iso", 4096))
        (self.state.leases / f"192.168.213.{self._ip}").write_text(vm + "\n")
        self._ip += 1
        self.state.write_client_key(vm, "KEY")
        (self.console / f"{vm}.console.log").write_text("boot\n")
        if lock_file:
            with self.state.job_lock(vm, 0):
                pass

    def domain(self, vm: str, *, expires: int, created: int | None = None, metadata: bool = True) -> None:
        now = int(time.time())
        record = make_record(vm=vm, job_id=int(vm.rsplit("-", 1)[1]), created=created or now - 60, expires=expires)
        xml = build_domain(make_driver_spec(record, name=vm))
        if not metadata:
            xml = xml[: xml.index("<metadata>")] + xml[xml.index("</metadata>") + len("</metadata>") :]
        self.hv.define_and_start(xml)

    def job(self, vm: str, *, expires: int, **kw) -> None:
        self.pieces(vm)
        self.domain(vm, expires=expires, **kw)

    def leftovers(self, vm: str) -> list[str]:
        found = []
        if self.hv.domain(vm) is not None:
            found.append("domain")
        found += [v for v in self.hv.volume_names(POOL) if v.startswith(vm + ".") or v.startswith(vm + "-")]
        found += [f"ip {ip}" for ip, owner in self.state.reservations().items() if owner == vm]
        if self.state.lock_path(vm).exists():
            found.append("lock")
        if self.state.job_dir(vm).exists():
            found.append("job dir")
        if (self.console / f"{vm}.console.log").exists():
            found.append("console log")
        return found


@pytest.fixture
def host(hv, tmp_settings):
    return Host(hv, tmp_settings)


NOW = int(time.time())


def test_inventory_sees_domains_pieces_and_held_locks(host):
    host.job("lvx-job-1", expires=NOW + 3600)
    host.pieces("lvx-job-2")
    with host.state.job_lock("lvx-job-2", 0):
        inv = inventory(host.settings)
    assert inv.prefix == "lvx"
    names = {d.name: d for d in inv.domains}
    assert names["lvx-job-1"].record.vm == "lvx-job-1" and names["lvx-job-1"].state == "running"
    assert names["test"].record is None  # the test driver's own domain: not ours
    assert {"lvx-job-1.qcow2", "lvx-job-1-seed.iso", "lvx-job-2.qcow2", "lvx-job-2-seed.iso"} <= set(inv.volumes)
    assert sorted(inv.reservations.values()) == ["lvx-job-1", "lvx-job-2"]
    assert set(inv.lock_files) == {"lvx-job-1", "lvx-job-2"}
    assert set(inv.job_dirs) == set(inv.console_logs) == {"lvx-job-1", "lvx-job-2"}
    assert inv.locked == {"lvx-job-2"}
    assert inventory(host.settings).locked == frozenset()  # released again


def test_lock_probe_creates_no_lock_file(host):
    host.pieces("lvx-job-3", lock_file=False)
    inv = inventory(host.settings)
    assert inv.lock_files == () and inv.locked == frozenset()
    assert not host.state.lock_path("lvx-job-3").exists()


def test_reap_removes_expired_vm_and_orphans_keeps_live_and_foreign(host):
    host.job("lvx-job-1", expires=NOW - 1)  # expired: runner died before cleanup
    host.job("lvx-job-2", expires=NOW + 3600)  # a running job
    host.pieces("lvx-job-3")  # prepare killed before the domain existed
    host.pieces("lvx-job-4")
    host.domain("lvx-job-4", expires=NOW - 1, metadata=False)  # our name, not our metadata
    result = reap(host.settings)
    assert result.failures == []
    assert host.leftovers("lvx-job-1") == []
    assert host.leftovers("lvx-job-3") == []
    assert len(host.leftovers("lvx-job-2")) == 7  # domain, 2 volumes, IP, lock, job dir, console log
    assert host.hv.domain("lvx-job-4") is not None and len(host.leftovers("lvx-job-4")) == 7
    assert host.hv.domain("test") is not None
    assert any(line.startswith("removed lvx-job-1 (expired") for line in result.actions)
    assert any(line.startswith("removed lvx-job-3 (orphaned") for line in result.actions)
    assert len(result.actions) == 2
    # and a second run finds nothing
    again = reap(host.settings)
    assert again.actions == [] and again.failures == []


def test_crashed_runner_job_is_reaped_after_expiry_and_not_before(host):
    expires = NOW + 600
    host.job("lvx-job-5", expires=expires)
    early = reap(host.settings, now=expires - 1)
    assert early.actions == [] and host.hv.domain("lvx-job-5").active
    late = reap(host.settings, now=expires)
    assert [a.split(" (")[0] for a in late.actions] == ["removed lvx-job-5"]
    assert host.leftovers("lvx-job-5") == []


def test_older_than_reaps_a_live_vm(host):
    host.job("lvx-job-6", expires=NOW + 3600, created=NOW - 7200)
    assert reap(host.settings, older_than=3 * 3600).actions == []
    assert reap(host.settings, older_than=3600).actions != []
    assert host.leftovers("lvx-job-6") == []


def test_reap_never_touches_a_vm_whose_lock_is_held(host):
    host.job("lvx-job-7", expires=NOW - 100)
    host.pieces("lvx-job-8")
    with host.state.job_lock("lvx-job-7", 0), host.state.job_lock("lvx-job-8", 0):
        result = reap(host.settings)
        assert result.actions == []
        assert len(host.leftovers("lvx-job-7")) == 7
        assert len(host.leftovers("lvx-job-8")) == 6
    assert {a.split(" (")[0] for a in reap(host.settings).actions} == {"removed lvx-job-7", "removed lvx-job-8"}
    assert host.leftovers("lvx-job-7") == host.leftovers("lvx-job-8") == []


def test_reap_rechecks_under_the_lock(host, monkeypatch):
    """The inventory said "orphan", but by the time the reaper holds the lock a prepare has
    defined the domain: nothing may be removed."""
    host.pieces("lvx-job-9")
    stale = inventory(host.settings)
    host.domain("lvx-job-9", expires=NOW + 3600)
    real = listing.inventory

    def first_stale(settings, hv=None, state=None, **kw):
        return stale if not kw.get("only") else real(settings, hv, state, **kw)

    monkeypatch.setattr(reap_module, "inventory", first_stale)
    result = reap(host.settings)
    assert result.actions == [] and result.failures == []
    assert result.skipped == ["lvx-job-9: no longer due (it changed while the reaper looked)"]
    assert len(host.leftovers("lvx-job-9")) == 7


def test_dry_run_changes_nothing(host):
    host.job("lvx-job-10", expires=NOW - 1)
    host.pieces("lvx-job-11")
    (host.state.leases / "192.168.213.99").write_text("")
    result = reap(host.settings, dry_run=True, now=NOW + 5)
    assert result.actions == [
        "would remove lvx-job-10 (expired 6s ago)",
        "would remove lvx-job-11 (orphaned: volume lvx-job-11-seed.iso, volume lvx-job-11.qcow2, "
        "IP reservation 192.168.213.11, job directory, console log, lock file)",
        "would release unowned IP reservation 192.168.213.99",
    ]
    assert len(host.leftovers("lvx-job-10")) == 7 and len(host.leftovers("lvx-job-11")) == 6
    assert "192.168.213.99" in host.state.reservations()


def test_unowned_reservation_is_released(host):
    (host.state.leases / "192.168.213.50").write_text("")
    (host.state.leases / "192.168.213.51").write_text("lvxother-job-1\n")  # another executor's
    result = reap(host.settings)
    assert result.actions == ["released unowned IP reservation 192.168.213.50"]
    assert host.state.reservations() == {"192.168.213.51": "lvxother-job-1"}


def test_stopped_vm_of_ours_is_reaped(host):
    host.job("lvx-job-12", expires=NOW + 3600)
    host.hv.destroy("lvx-job-12")  # shut off, still defined (e.g. prepare killed before start)
    result = reap(host.settings)
    assert result.actions and "not running (shutoff)" in result.actions[0]
    assert host.leftovers("lvx-job-12") == []


def test_reap_reports_a_failure_and_keeps_the_lock(host, monkeypatch):
    host.pieces("lvx-job-13")

    def broken(hv, settings, state, vm):
        raise SystemFailure(f"cleanup of {vm} incomplete: overlay: disk on fire")

    monkeypatch.setattr(reap_module, "teardown", broken)
    result = reap(host.settings)
    assert result.failures == ["lvx-job-13: cleanup of lvx-job-13 incomplete: overlay: disk on fire"]
    assert host.state.lock_path("lvx-job-13").exists()  # the next run retries


def test_select_and_reap_agree(host):
    host.job("lvx-job-14", expires=NOW - 1)
    host.pieces("lvx-job-15")
    planned = {t.vm for t in reaping.select(inventory(host.settings), time.time()).reap}
    done = {a.split(" ")[1] for a in reap(host.settings).actions}
    assert planned == done == {"lvx-job-14", "lvx-job-15"}


def test_reap_ends_the_history_rows_of_jobs_gone_without_a_trace(host):
    """A prepare killed after writing its row but before making anything, its runner dead too:
    nothing is left to reap, and the row is ended once no job VM could still live."""
    from executor.jobvm import journal

    settings = host.settings
    h = journal.job_history(settings)
    h.prepare_started(31, "p", None, NOW - settings.timeouts.max_lifetime - 60)
    h.prepare_started(32, "p", None, NOW - 60)  # may still be preparing
    result = reap(settings, now=NOW)
    assert "ended job 31's row in the job history (no cleanup came)" in result.actions
    assert h.open_jobs() == [32]
    assert {r.job_id: (r.outcome, r.reason) for r in h.jobs()}[31] == ("system_failure", "no_cleanup")
    assert reap(settings, now=NOW, dry_run=True).actions == []  # a dry run ends nothing
