"""executor.jobvm.layercache against libvirt's test driver: disks made over heads, kept or
deleted, concurrent jobs of one lineage, eviction, flattening, prune.

The test driver keeps volumes in memory, not as files: `sync_file` (an fsync of the kept disk)
is replaced by a recorder here, the only stand-in."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from executor.adapters.statedir import StateDir
from executor.core import layercache as lc
from executor.core.baseimage import BaseImage
from executor.core.jobenv import Job
from executor.core.settings import DockerCacheSettings
from executor.jobvm import cacheverdict, layercache

GIB = 1024**3
POOL = "lvx-dcache"


@pytest.fixture
def settings(tmp_settings, tmp_path):
    return dataclasses.replace(
        tmp_settings,
        vm=dataclasses.replace(tmp_settings.vm, disk_gib=1),  # the test driver allocates it all
        docker_cache=DockerCacheSettings(
            enabled=True, pool=POOL, dir=str(tmp_path / "dcache"), max_gib=4, max_total_gib=8
        ),
    )


@pytest.fixture
def state(settings):
    return StateDir(settings.paths.state_dir)


@pytest.fixture
def synced(monkeypatch):
    paths: list[str] = []
    monkeypatch.setattr(layercache, "sync_file", paths.append)
    return paths


def image(recipe: str = "r1") -> BaseImage:
    p = Path("/img")
    return BaseImage(
        p,
        p / "disk.qcow2",
        p / "vmlinuz",
        p / "initrd.img",
        "",
        "lvx",
        "/builds",
        "/cache",
        GIB,
        {"recipe_hash": recipe},
    )


def job(job_id: int, project_id: int | None = 7, protected: bool = True) -> Job:
    return Job(
        job_id=job_id,
        project_id=project_id,
        project="g/p",
        pipeline_id=1,
        runner_id=1,
        timeout_s=60,
        protected=protected,
    )


def finish(hv, settings, state, vm: str, keep: bool) -> str:
    """What a job's end does to its disk: released (or not) by cleanup, settled by teardown."""
    record = cacheverdict.disk_record(state, vm)
    assert record is not None
    state.write_job_record(vm, cacheverdict.DISK_RECORD, {**record, "keep": keep})
    return layercache.settle(hv, settings, state, vm)


def head(state, lineage: str) -> str:
    return state.read_lineages().get(lineage, {}).get("head", "")


def test_a_retried_prepare_gets_a_new_disk_and_never_touches_the_head(hv, settings, state, synced):
    first = layercache.make_disk(hv, settings, state, image(), job(1), "lvx-job-1")
    finish(hv, settings, state, "lvx-job-1", keep=True)
    again = layercache.make_disk(hv, settings, state, image(), job(1), "lvx-job-1")  # the same job id
    assert again.volume != first.volume and again.plan.base == first.volume
    assert hv.volume_info(POOL, first.volume) is not None


def test_off_or_without_a_project_no_disk(hv, tmp_settings, settings, state):
    assert layercache.make_disk(hv, tmp_settings, state, image(), job(1), "lvx-job-1") is None
    assert layercache.make_disk(hv, settings, state, image(), job(1, project_id=None), "lvx-job-1") is None


def test_first_job_gets_an_empty_disk_and_its_success_makes_the_head(hv, settings, state, synced):
    disk = layercache.make_disk(hv, settings, state, image(), job(1), "lvx-job-1")
    assert disk is not None and disk.plan == lc.CachePlan("", "lvx-p7-protected", "")
    assert disk.volume.startswith("lvx-p7-protected.lvx-job-1.") and lc.volume_vm(disk.volume) == "lvx-job-1"
    info = hv.volume_info(POOL, disk.volume)
    assert info is not None and info.capacity == settings.vm.disk_gib * GIB
    assert "now" in finish(hv, settings, state, "lvx-job-1", keep=True)
    assert head(state, "lvx-p7-protected") == disk.volume
    assert synced == [disk.path]

    second = layercache.make_disk(hv, settings, state, image(), job(2), "lvx-job-2")
    assert second is not None and second.plan.base == disk.volume
    assert lc.chain(second.volume, layercache._cache_volumes(settings, hv.volumes(POOL))) == [
        second.volume,
        disk.volume,
    ]


def test_a_failed_job_writes_nothing_and_its_disk_is_deleted(hv, settings, state, synced):
    first = layercache.make_disk(hv, settings, state, image(), job(1), "lvx-job-1")
    finish(hv, settings, state, "lvx-job-1", keep=True)
    failed = layercache.make_disk(hv, settings, state, image(), job(2), "lvx-job-2")
    assert "deleted" in finish(hv, settings, state, "lvx-job-2", keep=False)
    assert head(state, "lvx-p7-protected") == first.volume
    assert hv.volume_info(POOL, failed.volume) is None


def test_unprotected_jobs_read_the_protected_head_but_never_write_it(hv, settings, state, synced):
    protected = layercache.make_disk(hv, settings, state, image(), job(1), "lvx-job-1")
    finish(hv, settings, state, "lvx-job-1", keep=True)
    mr = layercache.make_disk(hv, settings, state, image(), job(2, protected=False), "lvx-job-2")
    assert mr.plan == lc.CachePlan("lvx-p7-protected", "lvx-p7-unprotected", protected.volume)
    finish(hv, settings, state, "lvx-job-2", keep=True)
    assert head(state, "lvx-p7-protected") == protected.volume
    assert head(state, "lvx-p7-unprotected") == mr.volume
    # the protected head stays alive as the unprotected head's backing, and the next protected
    # job still gets exactly what the protected job left
    nxt = layercache.make_disk(hv, settings, state, image(), job(3), "lvx-job-3")
    assert nxt.plan.base == protected.volume
    # another project gets nothing of project 7
    other = layercache.make_disk(hv, settings, state, image(), job(4, project_id=8), "lvx-job-4")
    assert other.plan.base == ""


def test_two_jobs_of_one_lineage_at_once_the_later_commit_wins(hv, settings, state, synced):
    layercache.make_disk(hv, settings, state, image(), job(1), "lvx-job-1")
    finish(hv, settings, state, "lvx-job-1", keep=True)
    # both VMs run (their locks are held, as prepare and teardown hold them) while each ends
    with state.job_lock("lvx-job-2", 1), state.job_lock("lvx-job-3", 1):
        a = layercache.make_disk(hv, settings, state, image(), job(2), "lvx-job-2")
        b = layercache.make_disk(hv, settings, state, image(), job(3), "lvx-job-3")
        assert a.plan.base == b.plan.base
        finish(hv, settings, state, "lvx-job-3", keep=True)
        finish(hv, settings, state, "lvx-job-2", keep=True)
    assert head(state, "lvx-p7-protected") == a.volume
    layercache.tidy(hv, settings, state)
    names = {v.name for v in hv.volumes(POOL)}
    assert b.volume not in names  # the loser is garbage once its job has ended
    assert a.plan.base in names  # the winner's backing stays


def test_a_head_made_by_another_image_is_not_read(hv, settings, state, synced):
    layercache.make_disk(hv, settings, state, image("r1"), job(1), "lvx-job-1")
    finish(hv, settings, state, "lvx-job-1", keep=True)
    disk = layercache.make_disk(hv, settings, state, image("r2"), job(2), "lvx-job-2")
    assert disk.plan.base == ""
    tidied = layercache.tidy(hv, settings, state, recipe="r2")
    assert tidied.dropped == ["lvx-p7-protected"]


def test_tidy_evicts_least_recently_used_lineages_over_the_total(hv, settings, state, synced):
    # the test driver allocates a volume's whole capacity: 3 GiB per disk
    small = dataclasses.replace(settings, vm=dataclasses.replace(settings.vm, disk_gib=3))
    for number, project in enumerate((1, 2, 3), start=1):
        layercache.make_disk(hv, small, state, image(), job(number, project_id=project), f"lvx-job-{number}")
        finish(hv, small, state, f"lvx-job-{number}", keep=True)
    # 9 GiB > 8: the least recently used (project 1) went at the last settle
    assert sorted(state.read_lineages()) == ["lvx-p2-protected", "lvx-p3-protected"]
    assert all(lc.volume_lineage(v.name) != "lvx-p1-protected" for v in hv.volumes(POOL))


def test_a_lineage_over_max_gib_is_evicted(hv, settings, state, synced):
    big = dataclasses.replace(settings, vm=dataclasses.replace(settings.vm, disk_gib=5))
    layercache.make_disk(hv, big, state, image(), job(1), "lvx-job-1")
    finish(hv, big, state, "lvx-job-1", keep=True)
    assert state.read_lineages() == {}
    assert hv.volumes(POOL) == []


def test_flattening_replaces_a_deep_head_by_one_volume(hv, settings, state, synced):
    for number in range(1, 5):
        layercache.make_disk(hv, settings, state, image(), job(number), f"lvx-job-{number}")
        finish(hv, settings, state, f"lvx-job-{number}", keep=True)
    deep = head(state, "lvx-p7-protected")
    assert len(lc.chain(deep, layercache._cache_volumes(settings, hv.volumes(POOL)))) == 4
    done = layercache.flatten_deep_heads(hv, settings, state, depth=3)
    assert len(done) == 1 and "4 overlays" in done[0]
    flat = head(state, "lvx-p7-protected")
    assert lc.FLAT_MARK in flat
    # the old chain is gone; the flat head stands alone
    assert [v.name for v in hv.volumes(POOL)] == [flat]
    assert layercache.flatten_deep_heads(hv, settings, state, depth=3) == []


def test_prune_drops_lineages_and_a_running_job_cannot_bring_one_back(hv, settings, state, synced):
    layercache.make_disk(hv, settings, state, image(), job(1), "lvx-job-1")
    finish(hv, settings, state, "lvx-job-1", keep=True)
    layercache.make_disk(hv, settings, state, image(), job(2, project_id=8), "lvx-job-2")
    finish(hv, settings, state, "lvx-job-2", keep=True)
    running = layercache.make_disk(hv, settings, state, image(), job(3), "lvx-job-3")
    assert layercache.prune(hv, settings, state, project_id=7) == ["lvx-p7-protected"]
    assert head(state, "lvx-p8-protected")
    assert "pruned while the job ran" in finish(hv, settings, state, "lvx-job-3", keep=True)
    assert head(state, "lvx-p7-protected") == "" and hv.volume_info(POOL, running.volume) is None
    assert [v.name for v in layercache.inventory(hv, settings, state).lineages] == ["lvx-p8-protected"]


def test_another_prefixs_volumes_and_lineages_are_left_alone(hv, settings, state, synced):
    other = dataclasses.replace(settings, vm=dataclasses.replace(settings.vm, name_prefix="ci"))
    theirs = layercache.make_disk(hv, other, state, image(), job(1), "ci-job-1")
    finish(hv, other, state, "ci-job-1", keep=True)
    layercache.prune(hv, settings, state)
    layercache.tidy(hv, settings, state, recipe="another")
    assert head(state, "ci-p7-protected") == theirs.volume
    assert hv.volume_info(POOL, theirs.volume) is not None


def test_release_keeps_nothing_of_a_failed_or_unfinished_job(hv, settings, state):
    layercache.make_disk(hv, settings, state, image(), job(1), "lvx-job-1")
    assert layercache.release(hv, settings, state, "lvx-job-1").endswith("no stage of it ran")
    state.write_job_record("lvx-job-1", cacheverdict.VERDICT_RECORD, lc.stage_started("", "build_script"))
    assert layercache.release(hv, settings, state, "lvx-job-1").endswith("its build_script stage never ended")
    state.write_job_record("lvx-job-1", cacheverdict.VERDICT_RECORD, lc.VERDICT_FAILED)
    assert layercache.release(hv, settings, state, "lvx-job-1").endswith("the job failed")
    assert not cacheverdict.disk_record(state, "lvx-job-1").get("keep")
    assert layercache.release(hv, settings, state, "lvx-job-2") == ""  # no Docker disk


def test_stage_watched_keeps_the_verdict_and_says_a_failure_once(settings, state):
    said: list[str] = []
    with cacheverdict.stage_watched(state, "lvx-job-1", "build_script", said.append):
        pass  # a job without a Docker disk: nothing recorded
    assert cacheverdict.verdict(state, "lvx-job-1") == ""
    state.write_job_record("lvx-job-1", cacheverdict.DISK_RECORD, {"volume": "v", "write": "lvx-p7-protected"})
    with cacheverdict.stage_watched(state, "lvx-job-1", "build_script", said.append):
        assert cacheverdict.verdict(state, "lvx-job-1") == lc.RUNNING + "build_script"
    assert cacheverdict.verdict(state, "lvx-job-1") == lc.VERDICT_OK
    for stage in ("step_release", "archive_cache"):
        with pytest.raises(RuntimeError), cacheverdict.stage_watched(state, "lvx-job-1", stage, said.append):
            raise RuntimeError("exit 1")
    assert cacheverdict.verdict(state, "lvx-job-1") == lc.VERDICT_FAILED
    assert said == ["the step_release stage failed: this job's Docker layers are not kept for lvx-p7-protected"]


def test_cli_docker_cache_prune(hv, settings, state, synced, tmp_path, capsys):
    from executor import cli

    layercache.make_disk(hv, settings, state, image(), job(1), "lvx-job-1")
    finish(hv, settings, state, "lvx-job-1", keep=True)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[libvirt]\nuri = "test:///default"\npool = "default-pool"\nnetwork = "default"\n'
        f'[paths]\nstate_dir = "{settings.paths.state_dir}"\nconsole_log_dir = "{settings.paths.console_log_dir}"\n'
        f'[docker_cache]\nenabled = true\npool = "{POOL}"\ndir = "{settings.docker_cache.dir}"\n'
    )
    for args, code, out in (
        (["--project", "0"], 2, ""),
        (["--project", "8"], 0, "docker-cache: no lineages of project 8\n"),
        (["--project", "7"], 0, "docker-cache: dropped lvx-p7-protected (1.00 GiB)\n"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--config", str(config), "docker-cache", "prune", *args])
        assert exit_info.value.code == code
        assert capsys.readouterr().out == out
    assert hv.volumes(POOL) == []
