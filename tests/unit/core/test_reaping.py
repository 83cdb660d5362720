"""The reaper's selection logic: what is expired, what is orphaned, what is not ours, what is busy."""

from __future__ import annotations

import pytest

from executor.core import reaping
from executor.core.reaping import DomainEntry, Inventory, select
from tests.unit.conftest import make_record

NOW = 1_800_000_000
P = "lvx"


def dom(
    vm: str, *, state: str = "running", created: int = NOW - 600, expires: int = NOW + 3600, metadata: bool = True, **kw
) -> DomainEntry:
    record = make_record(vm=kw.pop("record_vm", vm), created=created, expires=expires) if metadata else None
    return DomainEntry(vm, state, record)


def pieces_for(vm: str) -> dict:
    """Inventory fields holding every kind of piece of `vm`."""
    return {
        "volumes": (f"{vm}.qcow2", f"{vm}-seed.iso"),
        "reservations": {"192.168.213.10": vm},
        "lock_files": (vm,),
        "job_dirs": (vm,),
        "console_logs": (vm,),
    }


def names(plan: reaping.Plan) -> dict[str, str]:
    return {t.vm: t.reason for t in plan.reap}


# --- expiry -------------------------------------------------------------------------------------


def test_running_vm_before_expiry_is_kept_with_its_pieces():
    inv = Inventory(P, domains=(dom("lvx-job-1"),), **pieces_for("lvx-job-1"))
    plan = select(inv, NOW)
    assert plan.reap == ()
    assert [d.name for d in plan.live] == ["lvx-job-1"]


def test_vm_is_reaped_exactly_at_expiry_and_not_a_second_before():
    inv = Inventory(P, domains=(dom("lvx-job-1", expires=NOW),))
    assert names(select(inv, NOW - 1)) == {}
    assert names(select(inv, NOW)) == {"lvx-job-1": reaping.REASON_EXPIRED}


def test_expired_target_lists_all_its_pieces():
    inv = Inventory(P, domains=(dom("lvx-job-1", expires=NOW - 5),), **pieces_for("lvx-job-1"))
    (target,) = select(inv, NOW).reap
    assert target.domain is not None
    assert target.pieces.volumes == ("lvx-job-1-seed.iso", "lvx-job-1.qcow2")
    assert target.pieces.ips == ("192.168.213.10",)
    assert target.pieces.lock_file and target.pieces.job_dir and target.pieces.console_log


def test_older_than_reaps_vms_created_long_enough_ago_only():
    inv = Inventory(P, domains=(dom("lvx-job-1", created=NOW - 7200), dom("lvx-job-2", created=NOW - 60)))
    assert names(select(inv, NOW)) == {}
    assert names(select(inv, NOW, older_than=3600)) == {"lvx-job-1": reaping.REASON_OLDER_THAN}
    assert names(select(inv, NOW, older_than=60)) == {
        "lvx-job-1": reaping.REASON_OLDER_THAN,
        "lvx-job-2": reaping.REASON_OLDER_THAN,
    }


def test_negative_older_than_is_refused():
    with pytest.raises(ValueError):
        select(Inventory(P), NOW, older_than=-1)


@pytest.mark.parametrize("state", ["shutoff", "crashed"])
def test_stopped_vm_of_ours_is_reaped_before_expiry(state):
    inv = Inventory(P, domains=(dom("lvx-job-1", state=state),))
    assert names(select(inv, NOW)) == {"lvx-job-1": reaping.REASON_STOPPED}


@pytest.mark.parametrize("state", ["running", "paused", "blocked"])
def test_active_vm_is_not_stopped(state):
    assert names(select(Inventory(P, domains=(dom("lvx-job-1", state=state),)), NOW)) == {}


# --- busy (a stage holds the lock) --------------------------------------------------------------


def test_busy_vm_is_never_reaped_even_when_expired():
    inv = Inventory(
        P,
        domains=(dom("lvx-job-1", expires=NOW - 9999, state="shutoff"),),
        locked=frozenset({"lvx-job-1"}),
        **pieces_for("lvx-job-1"),
    )
    plan = select(inv, NOW, older_than=0)
    assert plan.reap == ()
    assert plan.busy == ("lvx-job-1",)


def test_pieces_of_a_prepare_in_progress_are_not_orphans():
    # prepare holds the lock and has made the reservation and volumes, no domain yet
    inv = Inventory(P, locked=frozenset({"lvx-job-7"}), **pieces_for("lvx-job-7"))
    plan = select(inv, NOW)
    assert plan.reap == ()
    assert plan.busy == ("lvx-job-7",)


# --- orphans ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("volumes", ("lvx-job-3.qcow2",)),
        ("volumes", ("lvx-job-3-seed.iso",)),
        ("reservations", {"192.168.213.11": "lvx-job-3"}),
        ("lock_files", ("lvx-job-3",)),
        ("job_dirs", ("lvx-job-3",)),
        ("console_logs", ("lvx-job-3",)),
    ],
)
def test_each_kind_of_piece_without_a_domain_is_an_orphan(field, value):
    plan = select(Inventory(P, **{field: value}), NOW)
    assert names(plan) == {"lvx-job-3": reaping.REASON_ORPHANED}
    assert plan.reap[0].domain is None
    assert bool(plan.reap[0].pieces)


def test_orphans_are_reaped_regardless_of_older_than():
    plan = select(Inventory(P, **pieces_for("lvx-job-3")), NOW, older_than=10**9)
    assert names(plan) == {"lvx-job-3": reaping.REASON_ORPHANED}


def test_pieces_of_a_live_vm_are_not_orphans():
    inv = Inventory(P, domains=(dom("lvx-job-1"),), **pieces_for("lvx-job-1"))
    assert names(select(inv, NOW)) == {}


def test_unowned_reservation_is_reported_separately():
    inv = Inventory(P, reservations={"192.168.213.12": "", "192.168.213.13": "lvx-job-1"}, domains=(dom("lvx-job-1"),))
    plan = select(inv, NOW)
    assert plan.unowned_ips == ("192.168.213.12",)
    assert plan.reap == ()


# --- not ours -----------------------------------------------------------------------------------


def test_domain_without_metadata_is_not_ours_even_with_our_name():
    inv = Inventory(P, domains=(dom("lvx-job-1", metadata=False, state="shutoff"),), **pieces_for("lvx-job-1"))
    plan = select(inv, NOW, older_than=0)
    assert plan.reap == ()  # neither the domain nor the volumes/IP/lock named after it
    assert plan.not_ours == ("lvx-job-1",)
    assert plan.live == ()


def test_domain_whose_metadata_names_another_vm_is_not_ours():
    inv = Inventory(P, domains=(dom("lvx-job-1", record_vm="lvx-job-2", expires=NOW - 1),))
    plan = select(inv, NOW)
    assert plan.reap == () and plan.not_ours == ("lvx-job-1",)


@pytest.mark.parametrize(
    "name", ["test", "lvxx-job-1", "other-job-1", "lvx-job-01", "lvx-job-1x", "lvx-job-", "LVX-job-1"]
)
def test_names_outside_our_prefix_are_ignored(name):
    inv = Inventory(
        P,
        domains=(dom(name, expires=NOW - 1, state="shutoff"),),
        volumes=(f"{name}.qcow2", f"{name}-seed.iso", "base.qcow2", "lvx-job-5.img"),
        reservations={"192.168.213.14": name},
        lock_files=(name,),
        job_dirs=(name,),
        console_logs=(name,),
    )
    plan = select(inv, NOW, older_than=0)
    assert plan.reap == ()
    assert plan.live == ()
    assert plan.not_ours == ()  # foreign names are not even reported


def test_another_prefix_on_the_same_host_is_left_alone():
    inv = Inventory("lvxcrash", domains=(dom("lvx-job-1", expires=NOW - 1),), **pieces_for("lvx-job-2"))
    assert select(inv, NOW).reap == ()


def test_mixed_inventory():
    inv = Inventory(
        P,
        domains=(
            dom("lvx-job-1", expires=NOW - 1),  # expired
            dom("lvx-job-2"),  # live
            dom("lvx-job-3", metadata=False),  # not ours
            dom("lvx-job-4", expires=NOW - 1),  # expired but busy
            dom("test"),
        ),
        volumes=("lvx-job-1.qcow2", "lvx-job-2.qcow2", "lvx-job-3.qcow2", "lvx-job-5.qcow2", "lvx-job-6-seed.iso"),
        reservations={"192.168.213.10": "lvx-job-2", "192.168.213.15": "lvx-job-5", "192.168.213.16": ""},
        lock_files=("lvx-job-2", "lvx-job-4", "lvx-job-5", "lvx-job-6"),
        locked=frozenset({"lvx-job-4", "lvx-job-6"}),
    )
    plan = select(inv, NOW)
    assert names(plan) == {"lvx-job-1": reaping.REASON_EXPIRED, "lvx-job-5": reaping.REASON_ORPHANED}
    assert plan.target("lvx-job-5").pieces.ips == ("192.168.213.15",)
    assert plan.busy == ("lvx-job-4", "lvx-job-6")
    assert plan.not_ours == ("lvx-job-3",)
    assert [d.name for d in plan.live] == ["lvx-job-2", "lvx-job-4"]
    assert plan.unowned_ips == ("192.168.213.16",)
    assert reaping.orphans(inv).keys() == {"lvx-job-5", "lvx-job-6"}
    assert [d.name for d in reaping.our_domains(inv)] == ["lvx-job-1", "lvx-job-2", "lvx-job-4"]


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("90", 90),
        ("90s", 90),
        ("30m", 1800),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1w", 604800),
        (" 2H ", 7200),
    ],
)
def test_parse_duration(text, seconds):
    assert reaping.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1x", "-5m", "1.5h", "1h 30m", "abc"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        reaping.parse_duration(text)


@pytest.mark.parametrize(
    "seconds,text", [(0, "0s"), (59, "59s"), (61, "1m01s"), (3600, "1h00m"), (90061, "1d01h"), (-65, "1m05s")]
)
def test_format_duration(seconds, text):
    assert reaping.format_duration(seconds) == text


# --- warm-pool VMs ------------------------------------------------------------------------------


def pool_dom(vm: str, pool_state: str, **kw) -> DomainEntry:
    record = make_record(vm=vm, job_id=0, pool_state=pool_state, created=NOW - 60, expires=NOW + 3600)
    return DomainEntry(vm, kw.get("state", "paused"), record)


def test_an_idle_pool_vm_is_kept_while_an_agent_runs_and_reaped_when_none_does():
    inv = {"domains": (pool_dom("lvx-pool-0000000a", "idle"),), **pieces_for("lvx-pool-0000000a")}
    assert names(select(Inventory(P, agent_running=True, **inv), NOW)) == {}
    assert names(select(Inventory(P, agent_running=False, **inv), NOW)) == {
        "lvx-pool-0000000a": reaping.REASON_AGENT_GONE
    }


def test_a_booting_pool_vm_is_busy_while_its_booter_holds_the_lock_and_abandoned_after():
    inv = {"domains": (pool_dom("lvx-pool-0000000b", "booting", state="running"),), "agent_running": True}
    assert names(select(Inventory(P, locked=frozenset({"lvx-pool-0000000b"}), **inv), NOW)) == {}
    assert names(select(Inventory(P, **inv), NOW)) == {"lvx-pool-0000000b": reaping.REASON_ABANDONED}


def test_a_claimed_pool_vm_lives_like_a_job_vm_until_its_expiry_and_its_claim_is_one_of_its_pieces():
    claimed = DomainEntry(
        "lvx-pool-0000000c",
        "running",
        make_record(vm="lvx-pool-0000000c", job_id=7, pool_state="claimed", expires=NOW + 60),
    )
    inv = Inventory(P, domains=(claimed,), claims={"lvx-job-7": "lvx-pool-0000000c"})
    assert names(select(inv, NOW)) == {}  # no agent needed for a VM in a job
    (target,) = select(inv, NOW + 60).reap
    assert target.reason == reaping.REASON_EXPIRED and target.pieces.claims == ("lvx-job-7",)


def test_a_claim_whose_pool_vm_is_gone_is_an_orphan_and_never_a_piece_of_the_jobs_own_name():
    inv = Inventory(P, claims={"lvx-job-8": "lvx-pool-0000000d"})
    plan = select(inv, NOW)
    assert names(plan) == {"lvx-pool-0000000d": reaping.REASON_ORPHANED}
    assert plan.reap[0].pieces.describe() == ["claim of lvx-job-8"]


def test_a_vm_its_cleanup_stopped_is_busy_while_its_remover_works_and_reaped_if_it_did_not_finish():
    vm = "lvx-job-31"
    inv = {"domains": (dom(vm, state="paused"),), "removing": frozenset({vm}), **pieces_for(vm)}
    assert names(select(Inventory(P, locked=frozenset({vm}), **inv), NOW)) == {}
    assert names(select(Inventory(P, **inv), NOW)) == {vm: reaping.REASON_CLEANED_UP}
    # the same paused VM without cleanup's mark is a job's, kept until its expiry
    assert names(select(Inventory(P, **{**inv, "removing": frozenset()}), NOW)) == {}
