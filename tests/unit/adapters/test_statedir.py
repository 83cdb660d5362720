"""executor.adapters.statedir: locks, IP reservations and keys in a tmp state dir, across processes."""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import signal
import stat
import time

import pytest

from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core.waiting import wait_until
from executor.errors import SystemFailure

CTX = multiprocessing.get_context("fork")
SUBNET = ipaddress.IPv4Network("192.168.213.0/24")
CANDIDATES = naming.vm_addresses(SUBNET)


@pytest.fixture
def state(tmp_path):
    return StateDir(tmp_path / "state")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- IP reservations ---------------------------------------------------------------------------


def test_allocate_gives_distinct_addresses_and_the_same_one_again(state):
    a = state.allocate_ip("lvx-job-1", CANDIDATES)
    b = state.allocate_ip("lvx-job-2", CANDIDATES)
    assert a == "192.168.213.10" and b == "192.168.213.11"
    assert state.allocate_ip("lvx-job-1", CANDIDATES) == a
    assert state.reservations() == {a: "lvx-job-1", b: "lvx-job-2"}


def test_allocate_reuses_a_released_address(state):
    state.allocate_ip("lvx-job-1", CANDIDATES)
    state.allocate_ip("lvx-job-2", CANDIDATES)
    assert state.release_ip("lvx-job-1") == ["192.168.213.10"]
    assert state.allocate_ip("lvx-job-3", CANDIDATES) == "192.168.213.10"


def test_allocate_raises_when_exhausted(state):
    few = CANDIDATES[:3]
    got = {state.allocate_ip(f"lvx-job-{i}", few) for i in (1, 2, 3)}
    assert got == {str(ip) for ip in few}
    with pytest.raises(SystemFailure, match="no free IP address"):
        state.allocate_ip("lvx-job-4", few)
    assert state.allocate_ip("lvx-job-2", few) in got  # an existing owner still gets its own


def test_release_only_releases_that_vms_address(state):
    a = state.allocate_ip("lvx-job-1", CANDIDATES)
    b = state.allocate_ip("lvx-job-11", CANDIDATES)
    assert state.release_ip("lvx-job-1") == [a]
    assert state.release_ip("lvx-job-1") == []
    assert state.reservations() == {b: "lvx-job-11"}


def test_reservations_of_an_empty_state_dir(state):
    assert state.reservations() == {}
    assert state.release_ip("lvx-job-1") == []


def _allocate_many(root: str, worker: int, count: int, queue) -> None:
    s = StateDir(root)
    queue.put(
        [(f"lvx-job-{worker}{i:02d}", s.allocate_ip(f"lvx-job-{worker}{i:02d}", CANDIDATES)) for i in range(count)]
    )


def test_concurrent_allocation_never_hands_out_a_duplicate(state):
    queue = CTX.Queue()
    procs = [CTX.Process(target=_allocate_many, args=(str(state.root), w, 5, queue)) for w in range(1, 9)]
    for p in procs:
        p.start()
    results = [pair for _ in procs for pair in queue.get(timeout=20)]
    for p in procs:
        p.join(timeout=20)
        assert p.exitcode == 0
    ips = [ip for _, ip in results]
    assert len(results) == 40 and len(set(ips)) == 40
    assert state.reservations() == {ip: vm for vm, ip in results}


# --- per-job files -------------------------------------------------------------------------


def test_client_key_is_private(state):
    state.write_client_key("lvx-job-1", "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n")
    key = state.job_dir("lvx-job-1") / "client_key"
    assert _mode(key) == 0o600
    assert _mode(state.job_dir("lvx-job-1")) == 0o700
    for d in (state.root, state.jobs, state.locks, state.leases):
        assert _mode(d) == 0o700, d
    assert state.read_client_key("lvx-job-1").startswith("-----BEGIN OPENSSH")


def test_rewriting_a_key_keeps_it_private(state):
    state.write_client_key("lvx-job-1", "old")
    key = state.job_dir("lvx-job-1") / "client_key"
    os.chmod(key, 0o644)
    state.write_client_key("lvx-job-1", "new")
    assert key.read_text() == "new" and _mode(key) == 0o600


def test_client_key_is_not_written_through_a_symlink(state, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    state.job_dir("lvx-job-1").mkdir(parents=True)
    (state.job_dir("lvx-job-1") / "client_key").symlink_to(target)
    with pytest.raises(OSError):
        state.write_client_key("lvx-job-1", "key")
    assert target.read_text() == "precious"


def test_missing_key_is_a_system_failure(state):
    with pytest.raises(SystemFailure, match="no SSH key for lvx-job-9"):
        state.read_client_key("lvx-job-9")


def test_remove_job_dir_is_idempotent(state):
    state.write_client_key("lvx-job-1", "k")
    state.write_client_key("lvx-job-2", "k")
    assert state.job_dir_vms() == ["lvx-job-1", "lvx-job-2"]
    assert state.remove_job_dir("lvx-job-1") is True
    assert state.remove_job_dir("lvx-job-1") is False
    assert state.job_dir_vms() == ["lvx-job-2"]


# --- locks ---------------------------------------------------------------------------------


def _hold_lock(root: str, vm: str, ready, release, hold_s: float) -> None:
    s = StateDir(root)
    with s.job_lock(vm, timeout=5):
        ready.set()
        release.wait(hold_s)


def _hold_forever(root: str, vm: str, ready) -> None:
    s = StateDir(root)
    with s.job_lock(vm, timeout=5):
        ready.set()
        while True:
            time.sleep(10)


def _wait_for_lock(root: str, vm: str, opened, queue) -> None:
    s = StateDir(root)
    opened.set()
    with s.job_lock(vm, timeout=10):
        queue.put(("acquired", time.monotonic()))
        time.sleep(0.3)
        queue.put(("released", time.monotonic()))


def _open_files(pid: int, path) -> list[str]:
    """What process `pid` has open at `path`: the path itself, or "path (deleted)" for a file
    that was unlinked while open."""
    fd_dir = f"/proc/{pid}/fd"
    targets = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            targets.append(target)
    return targets


def _start(target, *args):
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def test_job_lock_blocks_another_process_until_it_lets_go(state):
    ready, release = CTX.Event(), CTX.Event()
    holder = _start(_hold_lock, str(state.root), "lvx-job-1", ready, release, 0.4)
    assert ready.wait(5)
    start = time.monotonic()
    with state.job_lock("lvx-job-1", timeout=5):
        waited = time.monotonic() - start
    holder.join(5)
    assert 0.2 <= waited < 2.0  # blocked until the holder's 0.4 s were over
    assert holder.exitcode == 0


def test_job_lock_times_out_with_system_failure(state):
    ready, release = CTX.Event(), CTX.Event()
    holder = _start(_hold_lock, str(state.root), "lvx-job-1", ready, release, 5)
    try:
        assert ready.wait(5)
        start = time.monotonic()
        with pytest.raises(SystemFailure, match="lvx-job-1"):
            with state.job_lock("lvx-job-1", timeout=0.3):
                pytest.fail("got a lock another process holds")
        assert 0.3 <= time.monotonic() - start < 1.5
        with state.job_lock("lvx-job-2", timeout=0.3):  # other VMs are not affected
            pass
    finally:
        release.set()
        holder.join(5)


def test_lock_if_free_sees_a_holder_and_a_sigkilled_holder_frees_it(state):
    ready = CTX.Event()
    holder = _start(_hold_forever, str(state.root), "lvx-job-1", ready)
    try:
        assert ready.wait(5)
        with state.lock_if_free("lvx-job-1") as free:
            assert free is False
        with state.lock_if_free("lvx-job-2") as free:
            assert free is True
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(5)
    assert holder.exitcode == -signal.SIGKILL
    with state.lock_if_free("lvx-job-1") as free:
        assert free is True  # the kernel dropped the dead process's flock
    assert state.locked_vms() == ["lvx-job-1", "lvx-job-2"]


def test_a_second_lock_in_the_same_process_conflicts(state):
    with state.job_lock("lvx-job-1", timeout=1):
        with state.lock_if_free("lvx-job-1") as free:
            assert free is False  # a second open file description conflicts, even in-process


def _hold_then_remove(root: str, vm: str, ready, remove, removed, release) -> None:
    """The last stage of a job: holds the lock, removes the file while still holding it."""
    s = StateDir(root)
    with s.job_lock(vm, timeout=5):
        ready.set()
        remove.wait(5)
        s.remove_lock_file(vm)
        removed.set()
        release.wait(5)


def test_removing_the_lock_file_while_held_never_gives_two_holders(state):
    # All processes are forked before anyone holds a lock: a forked child would inherit the
    # parent's open lock file description and with it the flock.
    vm = "lvx-job-1"
    ready, remove, removed, release = CTX.Event(), CTX.Event(), CTX.Event(), CTX.Event()
    opened, queue = CTX.Event(), CTX.Queue()
    holder = _start(_hold_then_remove, str(state.root), vm, ready, remove, removed, release)
    assert ready.wait(5)
    waiter = _start(_wait_for_lock, str(state.root), vm, opened, queue)
    try:
        assert opened.wait(5)
        # the waiter has opened the old lock file and polls flock on it
        assert wait_until(lambda: _open_files(waiter.pid, state.lock_path(vm)) == [str(state.lock_path(vm))], 5, "open")
        remove.set()
        assert removed.wait(5) and not state.lock_path(vm).exists()
        with state.lock_if_free(vm) as newcomer:  # a newcomer locks a new file at the same path
            assert newcomer is True
            release.set()  # the old holder lets go of the old, unlinked file
            holder.join(5)
            assert holder.exitcode == 0
            # the waiter gets the old inode's flock, which must not count: it drops that file and
            # polls the newcomer's file at the same path instead
            lock = str(state.lock_path(vm))
            assert wait_until(lambda: _open_files(waiter.pid, state.lock_path(vm)) == [lock], 5, "reopen")
            assert queue.empty(), "the waiter holds the lock while the newcomer does too"
            released_at = time.monotonic()
        event, acquired_at = queue.get(timeout=5)
        assert event == "acquired" and acquired_at >= released_at
        assert queue.get(timeout=5)[0] == "released"
        waiter.join(5)
        assert waiter.exitcode == 0
    finally:
        release.set()
        for p in (holder, waiter):
            if p.is_alive():
                p.kill()


def test_locked_vms_lists_lock_files(state):
    assert state.locked_vms() == []
    with state.job_lock("lvx-job-2", timeout=1):
        pass
    with state.job_lock("lvx-job-1", timeout=1):
        state.remove_lock_file("lvx-job-1")
    assert state.locked_vms() == ["lvx-job-2"]
    state.remove_lock_file("lvx-job-2")
    state.remove_lock_file("lvx-job-2")  # idempotent
    assert state.locked_vms() == []


def _hold_admission(root: str, ready, release) -> None:
    with StateDir(root).admission_lock(timeout=5):
        ready.set()
        release.wait(10)


def test_the_admission_lock_is_one_for_all_prepares_and_times_out_with_the_reason(state):
    ready, release = CTX.Event(), CTX.Event()
    holder = _start(_hold_admission, str(state.root), ready, release)
    try:
        assert ready.wait(5)
        with pytest.raises(SystemFailure, match="another prepare has been checking the host's room for a VM"):
            with state.admission_lock(timeout=0.3):
                pytest.fail("got the admission lock another process holds")
    finally:
        release.set()
        holder.join(5)
    with state.admission_lock(timeout=5):  # free again once the holder let go
        pass


def test_claims_map_a_jobs_cold_name_to_its_pool_vm_until_released(state):
    assert state.claimed_vm("lvx-job-1") is None and state.claims() == {}
    state.write_claim("lvx-job-1", "lvx-pool-0000000a")
    state.write_claim("lvx-job-2", "lvx-pool-0000000b")
    assert state.claimed_vm("lvx-job-1") == "lvx-pool-0000000a"
    assert state.claims() == {"lvx-job-1": "lvx-pool-0000000a", "lvx-job-2": "lvx-pool-0000000b"}
    assert _mode(state.claims_dir / "lvx-job-1") == 0o600 and _mode(state.claims_dir) == 0o700
    assert state.release_claims("lvx-pool-0000000a") == ["lvx-job-1"]
    assert state.release_claims("lvx-pool-0000000a") == []
    assert state.claims() == {"lvx-job-2": "lvx-pool-0000000b"}


def test_the_pool_drained_marker_and_the_agents_status_are_per_prefix(state):
    assert not state.pool_drained("lvx")
    assert state.set_pool_drained("lvx", True) is True
    assert state.set_pool_drained("lvx", True) is False
    assert state.pool_drained("lvx") and not state.pool_drained("other")
    assert state.set_pool_drained("lvx", False) is True and not state.pool_drained("lvx")
    assert state.read_agent_status("lvx") is None
    state.write_agent_status("lvx", {"idle": 1})
    assert state.read_agent_status("lvx") == {"idle": 1} and state.read_agent_status("other") is None
