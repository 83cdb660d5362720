"""The warm pool's pure decisions (core.pool): fit, unfit, how many to boot, backoff, the
clock helper's commands."""

from __future__ import annotations

import subprocess

import pytest

from executor.core import pool
from executor.core.pool import Backoff, PoolVM

NOW = 1_800_000_000
FP = "fingerprint-now"


def vm(name: str, pool_state: str = "idle", state: str = "paused", **kw) -> PoolVM:
    fields = {"fingerprint": FP, "created": NOW - 60, "locked": False, "frozen": False}
    fields.update(kw)
    return PoolVM(name, state, pool_state, **fields)


def test_the_fingerprint_changes_with_the_image_the_runner_binary_and_the_config():
    base = pool.fingerprint("recipe@built", "lvx-runner-aa.iso", "[vm]\nvcpus = 2\n")
    assert base == pool.fingerprint("recipe@built", "lvx-runner-aa.iso", "[vm]\nvcpus = 2\n")
    assert (
        len(
            {
                base,
                pool.fingerprint("recipe@rebuilt", "lvx-runner-aa.iso", "[vm]\nvcpus = 2\n"),
                pool.fingerprint("recipe@built", "lvx-runner-bb.iso", "[vm]\nvcpus = 2\n"),
                pool.fingerprint("recipe@built", "lvx-runner-aa.iso", "[vm]\nvcpus = 4\n"),
                pool.fingerprint("recipe@built", "", "lvx-runner-aa.iso[vm]\nvcpus = 2\n"),  # parts do not run together
            }
        )
        == 5
    )


def test_only_idle_unlocked_vms_of_the_current_fingerprint_are_claimable_oldest_first():
    vms = [
        vm("lvx-pool-0000000a", created=NOW - 10),
        vm("lvx-pool-0000000b", created=NOW - 50),
        vm("lvx-pool-0000000c", locked=True),
        vm("lvx-pool-0000000d", fingerprint="older"),
        vm("lvx-pool-0000000e", pool_state="booting"),
        vm("lvx-pool-0000000f", pool_state="claimed"),
    ]
    assert pool.claimable(vms, FP) == ["lvx-pool-0000000b", "lvx-pool-0000000a"]


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"pool_state": "booting"}, "its boot was abandoned"),
        ({"state": "shutoff"}, "its QEMU is gone (state shutoff)"),
        ({"frozen": True}, "its QEMU process is stopped (frozen)"),
        ({"fingerprint": "older"}, "it was made from another base image, runner binary or config"),
        ({"created": NOW - 3600}, "it has been idle for 3600 s (pool.max_idle = 3600)"),
    ],
)
def test_each_reason_an_unclaimed_vm_is_retired(fields, why):
    (gone,) = pool.to_retire([vm("lvx-pool-00000001", **fields)], FP, NOW, 3600, drained=False, size=1)
    assert gone[0] == "lvx-pool-00000001" and gone[1].startswith(why)


def test_a_fit_idle_vm_stays_a_locked_or_claimed_one_is_never_retired_and_a_drained_pool_empties():
    fit = vm("lvx-pool-00000001")
    locked = vm("lvx-pool-00000002", locked=True, frozen=True)  # a claim is working on it
    claimed = vm("lvx-pool-00000003", pool_state="claimed", fingerprint="older", created=NOW - 99999)
    assert pool.to_retire([fit, locked, claimed], FP, NOW, 3600, drained=False, size=1) == []
    assert pool.to_retire([fit, locked, claimed], FP, NOW, 3600, drained=True, size=1) == [
        ("lvx-pool-00000001", "the pool is drained")
    ]


def test_a_shrunk_pool_retires_its_oldest_fit_idle_vms_beyond_the_size():
    vms = [vm(f"lvx-pool-0000000{i}", created=NOW - 100 * i) for i in range(1, 4)] + [vm("x", state="shutoff")]
    gone = pool.to_retire(vms, FP, NOW, 3600, drained=False, size=1)
    assert gone == [
        ("x", "its QEMU is gone (state shutoff)"),
        ("lvx-pool-00000003", "the pool holds more than pool.size = 1"),
        ("lvx-pool-00000002", "the pool holds more than pool.size = 1"),
    ]
    assert [name for name, _ in pool.to_retire(vms, FP, NOW, 3600, drained=False, size=0)][1:] == [
        "lvx-pool-00000003",
        "lvx-pool-00000002",
        "lvx-pool-00000001",
    ]


def test_to_boot_counts_idle_and_booting_vms_but_not_those_in_a_job():
    vms = [vm("a"), vm("b", pool_state="booting"), vm("c", pool_state="claimed")]
    assert pool.to_boot(vms, 3, drained=False) == 1
    assert pool.to_boot(vms, 2, drained=False) == 0
    assert pool.to_boot([], 2, drained=False) == 2
    assert pool.to_boot([], 2, drained=True) == 0


def test_backoff_doubles_per_failure_up_to_its_cap_and_a_success_resets_it():
    backoff = Backoff(base=5, most=60)
    assert backoff.ready(NOW)
    assert [backoff.failed(NOW) for _ in range(6)] == [5, 10, 20, 40, 60, 60]
    assert not backoff.ready(NOW + 59) and backoff.ready(NOW + 60)
    backoff.succeeded()
    assert backoff.ready(NOW) and backoff.failed(NOW) == 5


def test_the_clock_commands_are_valid_shell_and_quote_the_user():
    for command in (pool.clock_helper_command("runner"), pool.clock_set_command(1_800_000_000.25)):
        assert subprocess.run(["sh", "-n", "-c", command], check=False).returncode == 0, command
    assert "chown runner /run/lvx-clock.in /run/lvx-clock.out" in pool.clock_helper_command("runner")
    assert "1800000000.250" in pool.clock_set_command(1_800_000_000.25)


def test_the_clock_set_falls_back_to_sudo_without_the_helper_fifo(tmp_path):
    # Run the claim's command with the FIFO paths moved under tmp: a present helper gets the
    # time, an absent one means the sudo branch.
    fifo_in, fifo_out = tmp_path / "in", tmp_path / "out"
    command = pool.clock_set_command(1_800_000_000.0)
    command = command.replace(pool.CLOCK_IN, str(fifo_in)).replace(pool.CLOCK_OUT, str(fifo_out))
    absent = subprocess.run(
        ["sh", "-c", command.replace("sudo -n date", "echo sudo-branch").replace(">/dev/null; fi", "; fi")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert absent.stdout.startswith("sudo-branch -u -s @1800000000.000")
    subprocess.run(["mkfifo", str(fifo_in), str(fifo_out)], check=True)
    helper = subprocess.Popen(
        ["sh", "-c", f'read t < {fifo_in} && echo "$t" > {tmp_path / "got"}; echo 0 > {fifo_out}']
    )
    present = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False, timeout=10)
    helper.wait(timeout=10)
    assert present.returncode == 0 and (tmp_path / "got").read_text() == "1800000000.000\n"
