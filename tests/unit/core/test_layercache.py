"""executor.core.layercache: lineages, trust, verdicts, what is alive, what is evicted."""

from __future__ import annotations

import pytest

from executor.core import layercache as lc

GIB = 1024**3


def test_names_round_trip_and_foreign_names_are_not_ours():
    name = lc.lineage_name("lvx", 42, True)
    assert name == "lvx-p42-protected"
    assert lc.parse_lineage(name) == ("lvx", 42, True)
    assert lc.parse_lineage("lvx-p42-unprotected") == ("lvx", 42, False)
    for foreign in (
        "lvx-p0-protected",
        "lvx-p42-public",
        "LVX-p42-protected",
        "lvx-p42-protected.x",
        "../p1-protected",
    ):
        assert lc.parse_lineage(foreign) is None
    disk = lc.job_volume_name(name, "lvx-job-7", "0a1b")
    assert disk == "lvx-p42-protected.lvx-job-7.0a1b.qcow2"
    assert lc.volume_lineage(disk) == name and lc.volume_vm(disk) == "lvx-job-7"
    flat = lc.flat_volume_name(name, "ab12")
    assert lc.volume_lineage(flat) == name and lc.volume_vm(flat) is None
    assert lc.volume_lineage("lvx-job-7.qcow2") is None and lc.volume_vm("base.qcow2") is None


def test_a_protected_job_reads_and_writes_only_the_protected_lineage():
    heads = {"lvx-p1-protected": "P", "lvx-p1-unprotected": "U"}
    assert lc.plan("lvx", 1, True, heads) == lc.CachePlan("lvx-p1-protected", "lvx-p1-protected", "P")
    # without a protected head it starts empty: never from the unprotected lineage
    assert lc.plan("lvx", 1, True, {"lvx-p1-unprotected": "U"}) == lc.CachePlan("", "lvx-p1-protected", "")


def test_an_unprotected_job_reads_its_own_lineage_or_the_protected_one_and_writes_its_own():
    assert lc.plan("lvx", 1, False, {"lvx-p1-protected": "P", "lvx-p1-unprotected": "U"}) == lc.CachePlan(
        "lvx-p1-unprotected", "lvx-p1-unprotected", "U"
    )
    assert lc.plan("lvx", 1, False, {"lvx-p1-protected": "P"}) == lc.CachePlan(
        "lvx-p1-protected", "lvx-p1-unprotected", "P"
    )


def test_another_projects_lineage_is_never_read_and_no_project_means_no_cache():
    heads = {"lvx-p2-protected": "P2", "lvx-p2-unprotected": "U2"}
    for protected in (True, False):
        plan = lc.plan("lvx", 1, protected, heads)
        assert plan is not None and plan.base == "" and plan.read == ""
    assert lc.plan("lvx", None, True, heads) is None


def test_describe_says_what_is_read_and_what_is_written():
    assert "read only" in lc.CachePlan("lvx-p1-protected", "lvx-p1-unprotected", "P").describe()
    assert "empty disk" in lc.CachePlan("", "lvx-p1-protected", "").describe()
    assert lc.CachePlan("lvx-p1-protected", "lvx-p1-protected", "P").describe().startswith("the protected lineage")


def test_verdict_only_a_job_whose_every_started_stage_ended_well_may_write():
    v = ""
    assert not lc.may_write(v)  # no stage ran
    v = lc.stage_started(v, "get_sources")
    assert not lc.may_write(v)  # killed during a stage
    v = lc.stage_ended(v, "get_sources", True)
    v = lc.stage_ended(lc.stage_started(v, "build_script"), "build_script", True)
    assert lc.may_write(v)
    # after_script's failure does not fail the job, as in GitLab
    v = lc.stage_ended(lc.stage_started(v, "after_script"), "after_script", False)
    assert lc.may_write(v)
    v = lc.stage_ended(lc.stage_started(v, "upload_artifacts_on_success"), "upload_artifacts_on_success", False)
    assert v == lc.VERDICT_FAILED
    # a failure sticks
    v = lc.stage_ended(lc.stage_started(v, "archive_cache"), "archive_cache", True)
    assert not lc.may_write(v)


def vols(*specs: tuple[str, str, int]) -> dict[str, lc.CacheVolume]:
    return {name: lc.CacheVolume(name, backing, size) for name, backing, size in specs}


def test_chain_follows_backings_and_stops_at_loops_and_gaps():
    v = vols(("c", "b", 1), ("b", "a", 1), ("a", "", 1), ("x", "y", 1), ("y", "x", 1))
    assert lc.chain("c", v) == ["c", "b", "a"]
    assert lc.chain("x", v) == ["x", "y"]
    assert lc.chain("missing", v) == []
    assert lc.needs_flatten("c", v, depth=2) and not lc.needs_flatten("c", v, depth=3)


def test_garbage_keeps_heads_the_disks_of_live_jobs_and_their_backings():
    v = vols(
        ("h2", "h1", 1), ("h1", "", 1), ("j1", "h1", 1), ("dead", "h1", 1), ("old", "", 1), ("l.flat-1.qcow2", "", 1)
    )
    assert lc.garbage(v, ["h2", "j1"], flattening=False) == ["dead", "l.flat-1.qcow2", "old"]
    # a flattened head being written is left to its flattening
    assert lc.garbage(v, ["h2", "j1"], flattening=True) == ["dead", "old"]


def test_evictions_over_max_gib_then_least_recently_used_until_the_total_fits():
    v = vols(("a", "", 3 * GIB), ("b", "", 1 * GIB), ("c", "", 1 * GIB), ("d", "", 1 * GIB))
    heads = {"big": "a", "old": "b", "mid": "c", "new": "d"}
    used = {"big": 9.0, "old": 1.0, "mid": 2.0, "new": 3.0}
    out = lc.evictions(v, heads, used, [], max_lineage_bytes=2 * GIB, max_total_bytes=2 * GIB)
    assert [e.lineage for e in out] == ["big", "old"]
    assert "max_gib" in out[0].why and "max_total_gib" in out[1].why


def test_evictions_count_disks_in_use_and_shared_backings_once():
    # two heads share a base; a running job's disk holds 2 GiB that no eviction can free
    v = vols(("base", "", 2 * GIB), ("h1", "base", 0), ("h2", "base", 0), ("job", "", 2 * GIB))
    heads = {"l1": "h1", "l2": "h2"}
    out = lc.evictions(v, heads, {"l1": 1.0, "l2": 2.0}, ["job"], 10 * GIB, 3 * GIB)
    # evicting l1 alone frees nothing (l2 still holds the base): l2 goes too
    assert [e.lineage for e in out] == ["l1", "l2"]
    assert lc.evictions(v, heads, {}, ["job"], 10 * GIB, 4 * GIB) == []


@pytest.mark.parametrize("stage", sorted(lc.NEUTRAL_STAGES))
def test_neutral_stages_leave_the_verdict_alone(stage):
    assert lc.stage_started(lc.VERDICT_OK, stage) == lc.VERDICT_OK
    assert lc.stage_ended(lc.VERDICT_OK, stage, False) == lc.VERDICT_OK
