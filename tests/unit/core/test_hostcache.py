"""core.hostcache: what a VM's cache listing is allowed to say, what comes back, what is evicted."""

from __future__ import annotations

import pytest

from executor.core import hostcache
from executor.core.hostcache import StoredArchive, VMArchive


@pytest.mark.parametrize(
    "path",
    [
        "demo/project/key-protected/cache.zip",
        "gitlab.example.com/group/sub/project/main-non_protected/cache.zip",
        "project-7-empty/k e y/cache.zip",
    ],
)
def test_runner_cache_paths_are_accepted(path):
    assert hostcache.valid_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "cache.zip",  # no project dir
        "/cache/demo/project/key/cache.zip",
        "demo/../../etc/key/cache.zip",
        "demo/./key/cache.zip",
        "demo//key/cache.zip",
        "demo/project/key/other.zip",
        "demo/project/key/metadata.json",
        "demo/pro\nject/key/cache.zip",
        "demo/" + "x" * 256 + "/cache.zip",
        "/".join(["d"] * 20) + "/cache.zip",
    ],
)
def test_other_paths_are_refused(path):
    assert not hostcache.valid_path(path)


def test_a_listing_is_parsed_and_its_hostile_records_reported():
    output = (
        "1200 1764680000.1234567890 demo/project/key/cache.zip\0"
        "5 1764680001.0 demo/../../../etc/passwd/cache.zip\0"
        "garbage\0"
        "-1 1764680001.0 demo/project/neg/cache.zip\0"
        "7 1764680002.5 demo/project/k2/cache.zip"  # the last record may lack its NUL
    )
    archives, rejected = hostcache.parse_listing(output)
    assert archives == [
        VMArchive("demo/project/key/cache.zip", 1200, 1764680000),
        VMArchive("demo/project/k2/cache.zip", 7, 1764680002),
    ]
    assert rejected == ["demo/../../../etc/passwd/cache.zip", "garbage", "demo/project/neg/cache.zip"]


def test_a_listing_keeps_at_most_max_archives():
    output = "".join(f"1 1 p/k{i}/cache.zip\0" for i in range(hostcache.MAX_ARCHIVES + 3))
    archives, rejected = hostcache.parse_listing(output)
    assert len(archives) == hostcache.MAX_ARCHIVES and len(rejected) == 3


def stored(path: str, size: int, used: float, project: int = 1, mtime: int = 100) -> StoredArchive:
    return StoredArchive(project, hostcache.entry_name(path), path, size, mtime, used)


def test_only_new_or_changed_archives_are_copied_back():
    known = {"p/a/cache.zip": stored("p/a/cache.zip", 10, 1.0), "p/b/cache.zip": stored("p/b/cache.zip", 10, 1.0)}
    vm = [
        VMArchive("p/a/cache.zip", 10, 100),  # as restored
        VMArchive("p/b/cache.zip", 11, 100),  # rewritten
        VMArchive("p/c/cache.zip", 5, 100),  # new
    ]
    assert [a.path for a in hostcache.to_copy_back(vm, known, {})] == ["p/b/cache.zip", "p/c/cache.zip"]


def test_an_archive_restored_into_the_vm_and_evicted_since_does_not_come_back():
    vm = [VMArchive("p/a/cache.zip", 10, 100), VMArchive("p/b/cache.zip", 10, 100)]
    restored = {"p/a/cache.zip": (10, 100), "p/b/cache.zip": (10, 99)}  # b was rewritten
    assert [a.path for a in hostcache.to_copy_back(vm, {}, restored)] == ["p/b/cache.zip"]


def test_a_project_over_its_limit_loses_its_least_recently_used_archives_only():
    archives = [
        stored("p/old/cache.zip", 60, used=1.0),
        stored("p/new/cache.zip", 60, used=3.0),
        stored("q/other/cache.zip", 500, used=0.5, project=2),  # older, but another project
        stored("p/mid/cache.zip", 60, used=2.0),
    ]
    evicted = hostcache.evictions(archives, project_id=1, max_project_bytes=100, max_total_bytes=10_000)
    assert [a.path for a in evicted] == ["p/old/cache.zip", "p/mid/cache.zip"]


def test_over_the_total_the_oldest_of_any_project_go():
    archives = [stored("p/a/cache.zip", 50, used=5.0), stored("q/b/cache.zip", 50, used=1.0, project=2)]
    evicted = hostcache.evictions(archives, project_id=1, max_project_bytes=100, max_total_bytes=60)
    assert [a.path for a in evicted] == ["q/b/cache.zip"]
    assert hostcache.evictions(archives, 1, 100, 100) == []


def test_entry_names_are_hashes_never_the_job_controlled_path():
    name = hostcache.entry_name("demo/../x/cache.zip")
    assert len(name) == 40 and all(c in "0123456789abcdef" for c in name)
