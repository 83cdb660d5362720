"""The warm pool's decisions, pure: which idle VMs are fit to hand out, which must go, how many
to boot, and when to try again after failed boots. `jobvm.pool` claims, `agent.keeper` keeps.

A pool VM is a job VM that has not met its job yet: booted on its own (own seed, keys,
certificates, address), checked, then idle (paused or running) until one prepare claims it.
Its metadata says where it is in that life (core.domain_xml POOL_*), and its fingerprint what
it was made from: a VM made from another base image, runner binary or config is never handed
out and is replaced.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from executor.core.domain_xml import POOL_BOOTING, POOL_IDLE
from executor.core.domainstate import is_active


@dataclass(frozen=True)
class PoolVM:
    """One pool VM as the keeper or a claim sees it now."""

    name: str
    state: str  # libvirt's state name
    pool_state: str  # booting, idle or claimed
    fingerprint: str
    created: int  # Unix seconds
    locked: bool = False  # a process works on it (the keeper booting it, a prepare claiming it)
    frozen: bool = False  # its QEMU process is stopped by a signal


def fingerprint(image_identity: str, runner_volume: str, config_text: str) -> str:
    """What an idle VM must have been made from to be handed out: the base image (its recipe
    and build time), the gitlab-runner binary's volume and the executor's config."""
    digest = hashlib.sha256()
    for part in (image_identity, runner_volume, config_text):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def claimable(vms: Iterable[PoolVM], current: str) -> list[str]:
    """Idle VMs fit for a job, oldest first (they are the nearest to max_idle)."""
    fit = [vm for vm in vms if vm.pool_state == POOL_IDLE and vm.fingerprint == current and not vm.locked]
    return [vm.name for vm in sorted(fit, key=lambda vm: (vm.created, vm.name))]


def to_retire(
    vms: Iterable[PoolVM], current: str, now: float, max_idle: float, drained: bool, size: int
) -> list[tuple[str, str]]:
    """(name, why) of the unclaimed VMs nobody works on that must go now: the unfit ones, and
    the oldest fit ones beyond `size` (the operator shrank the pool)."""
    gone = []
    fit = []
    for vm in sorted(vms, key=lambda v: v.name):
        if vm.locked or vm.pool_state not in (POOL_IDLE, POOL_BOOTING):
            continue
        why = _unfit(vm, current, now, max_idle, drained)
        if why:
            gone.append((vm.name, why))
        else:
            fit.append(vm)
    surplus = sorted(fit, key=lambda v: (v.created, v.name))[: max(0, len(fit) - size)]
    gone += [(vm.name, f"the pool holds more than pool.size = {size}") for vm in surplus]
    return gone


def _unfit(vm: PoolVM, current: str, now: float, max_idle: float, drained: bool) -> str:
    if vm.pool_state == POOL_BOOTING:
        return "its boot was abandoned (the process booting it is gone)"
    if not is_active(vm.state):
        return f"its QEMU is gone (state {vm.state})"
    if vm.frozen:
        return "its QEMU process is stopped (frozen)"
    if vm.fingerprint != current:
        return "it was made from another base image, runner binary or config"
    if now - vm.created >= max_idle:
        return f"it has been idle for {now - vm.created:.0f} s (pool.max_idle = {max_idle:g})"
    if drained:
        return "the pool is drained"
    return ""


def to_boot(vms: Sequence[PoolVM], size: int, drained: bool) -> int:
    """How many VMs to boot now so that idle + booting reaches `size`."""
    if drained:
        return 0
    coming = sum(1 for vm in vms if vm.pool_state in (POOL_IDLE, POOL_BOOTING))
    return max(0, size - coming)


@dataclass
class Backoff:
    """After a failed boot, wait before the next: `base` seconds, doubling per failure in a row
    up to `most`; a success resets it. No churn loop when boots cannot succeed."""

    base: float = 5.0
    most: float = 300.0
    failures: int = 0
    not_before: float = 0.0

    def failed(self, now: float) -> float:
        self.failures += 1
        delay: float = min(self.base * 2.0 ** (self.failures - 1), self.most)
        self.not_before = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.not_before


# Setting a resumed VM's clock without paying for sudo at the claim (a third of a second in a
# TCG guest): before it is paused, the pool VM starts a one-shot root helper that waits on a
# FIFO only the job user may write; the claim writes the time and reads the helper's status.
CLOCK_IN, CLOCK_OUT = "/run/lvx-clock.in", "/run/lvx-clock.out"


def clock_helper_command(user: str) -> str:
    """Run as the job user (it sudoes): start the helper."""
    helper = f'read t < {CLOCK_IN} && date -u -s "@$t" >/dev/null; echo $? > {CLOCK_OUT}; rm -f {CLOCK_IN} {CLOCK_OUT}'
    root = (
        f"umask 077; rm -f {CLOCK_IN} {CLOCK_OUT} && mkfifo {CLOCK_IN} {CLOCK_OUT} && "
        f"chown {shlex.quote(user)} {CLOCK_IN} {CLOCK_OUT} && "
        f"setsid -f sh -c {shlex.quote(helper)} </dev/null >/dev/null 2>&1"
    )
    return f"sudo -n sh -c {shlex.quote(root)}"


def clock_set_command(epoch: float) -> str:
    """Run as the job user at the claim: the time to the helper, or, when there is none (the
    FIFO is missing: the job user cannot create files in /run), through sudo."""
    when = f"{epoch:.3f}"
    return (
        f"if [ -p {CLOCK_IN} ]; then printf '%s\\n' {when} > {CLOCK_IN} && read rc < {CLOCK_OUT} && exit $rc; "
        f"else sudo -n date -u -s @{when} >/dev/null; fi"
    )
