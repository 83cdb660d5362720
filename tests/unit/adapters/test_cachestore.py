"""adapters.cachestore: entries per project, atomic replacement, incomplete entries ignored."""

from __future__ import annotations

import os

from executor.adapters.cachestore import CacheStore
from executor.core.hostcache import entry_name


def _store(store: CacheStore, project: int, path: str, data: bytes, mtime: int = 100):
    with store.receiving(project) as (sink, received):
        sink.write(data)
        sink.flush()
        with store.locked():
            return store.store(project, path, len(data), mtime, received)


def test_an_archive_is_kept_per_project_under_a_hashed_name(tmp_path):
    store = CacheStore(tmp_path / "cache")
    kept = _store(store, 7, "demo/p/key/cache.zip", b"zipdata", mtime=123)
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in (tmp_path / "cache" / "7").iterdir()) == [
        f"{entry_name('demo/p/key/cache.zip')}.json",
        f"{entry_name('demo/p/key/cache.zip')}.zip",
    ]
    (listed,) = store.archives(7)
    assert (listed.path, listed.size, listed.mtime, listed.entry) == ("demo/p/key/cache.zip", 7, 123, kept.entry)
    assert store.archives(8) == [] and [a.project_id for a in store.archives()] == [7]
    with store.open_archive(listed) as f:
        assert f.read() == b"zipdata"


def test_storing_the_same_path_again_replaces_it(tmp_path):
    store = CacheStore(tmp_path)
    _store(store, 1, "p/k/cache.zip", b"old")
    _store(store, 1, "p/k/cache.zip", b"newer", mtime=200)
    (listed,) = store.archives(1)
    assert (listed.size, listed.mtime) == (5, 200)


def test_a_failed_receive_leaves_no_temp_file(tmp_path):
    store = CacheStore(tmp_path)
    try:
        with store.receiving(3) as (sink, _):
            sink.write(b"partial")
            raise OSError("connection lost")
    except OSError:
        pass
    assert list((tmp_path / "3").iterdir()) == []


def test_an_entry_whose_data_does_not_match_its_record_is_ignored(tmp_path):
    store = CacheStore(tmp_path)
    kept = _store(store, 1, "p/k/cache.zip", b"12345")
    (tmp_path / "1" / f"{kept.entry}.zip").write_bytes(b"12")  # truncated behind our back
    assert store.archives(1) == []
    (tmp_path / "1" / f"{kept.entry}.json").write_text("not json")
    assert store.archives(1) == []


def test_use_moves_an_archive_to_the_back_of_the_eviction_queue_and_delete_removes_it(tmp_path):
    store = CacheStore(tmp_path)
    kept = _store(store, 1, "p/k/cache.zip", b"x")
    os.utime(tmp_path / "1" / f"{kept.entry}.zip", (1000, 1000))
    assert store.archives(1)[0].used == 1000
    store.mark_used(kept)
    assert store.archives(1)[0].used > 1000
    store.delete(kept)
    assert store.archives(1) == [] and list((tmp_path / "1").iterdir()) == []
