"""The pool keeper: keeps `pool.size` checked idle VMs on this host (core.pool decides,
jobvm.pool boots and retires).

Every round it re-reads the config (a change of size, prepull or anything that makes a VM
unfit takes effect without a restart), retires what is unfit (dead, frozen, silent, made from
another image, runner binary or config, idle too long, or the pool drained), and boots one VM
when the pool is short, the last failures' backoff is over and admission control leaves room
for that VM and one cold job more. Boots run one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from executor.adapters.hostfiles import load_base_image, load_settings
from executor.adapters.hypervisor import Hypervisor, connect
from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core import pool as decide
from executor.core.baseimage import BaseImage
from executor.core.domain_xml import POOL_BOOTING, POOL_CLAIMED, POOL_IDLE
from executor.core.settings import Settings
from executor.errors import ConfigError, ExecutorError, Interrupted
from executor.jobvm import boot, journal, pool

RUNNING_PROBE_S = 30.0  # how often a running idle VM's SSH is checked
SILENT_PROBES = 2  # failed probes in a row before a running idle VM counts as dead


class Keeper:
    def __init__(self, config_file: str, settings: Settings, say: Callable[[str], None]) -> None:
        self.config_file = config_file
        self.settings = settings
        self.say = say
        self.backoff = decide.Backoff()
        self.boots = 0
        self.boot_failures = 0
        self.last_error = ""
        self.last_boot_s: float | None = None
        self._silent: dict[str, int] = {}
        self._next_probe = 0.0
        self._refused = ""
        self._said = ""

    @property
    def state(self) -> StateDir:
        return StateDir(self.settings.paths.state_dir)

    def reload(self) -> None:
        """Take the config file as it is now; keep the old settings if it became invalid."""
        try:
            fresh = load_settings(self.config_file)
        except ConfigError as exc:
            self._say_once(f"keeping the previous config: {exc}")
            return
        if fresh.vm.name_prefix != self.settings.vm.name_prefix or fresh.paths != self.settings.paths:
            self._say_once("keeping the previous config: vm.name_prefix and [paths] change when the agent restarts")
            return
        self._said = ""
        self.settings = fresh

    def _say_once(self, line: str) -> None:
        """Say a line that every round would repeat only when it changes."""
        if line != self._said:
            self.say(line)
        self._said = line

    def round(self, alive: Callable[[], bool] = lambda: True) -> None:
        """One look at the pool: retire the unfit, boot one VM if it is short."""
        self.reload()
        s = self.settings
        drained = self.state.pool_drained(s.vm.name_prefix)
        with connect(s.libvirt.uri, naming.METADATA_NS) as hv:
            vms = pool.survey(hv, s, self.state)
            if s.pool.size <= 0 and not vms:
                self.write_status(vms, "", drained)  # no pool: nothing to look at (not even the image)
                return
            image = load_base_image(s.image.dir)
            runner_volume = boot.runner_volume(hv, s, self.state, lambda line: None)
            fingerprint = pool.current_fingerprint(s, image, runner_volume)
            unfit = decide.to_retire(vms, fingerprint, time.time(), s.pool.max_idle, drained, s.pool.size)
            unfit += self._silent_ones(hv, vms, {name for name, _ in unfit})
            for vm, why in unfit:
                if pool.retire(hv, s, self.state, vm):
                    self.say(f"removed {vm}: {why}")
            vms = pool.survey(hv, s, self.state)
            self.write_status(vms, fingerprint, drained)
            if (
                decide.to_boot(vms, s.pool.size, drained)
                and self.backoff.ready(time.time())
                and self._admitted(hv, image)
            ):
                self._boot_one(hv, image, fingerprint, runner_volume, alive)
                self.write_status(pool.survey(hv, s, self.state), fingerprint, drained)

    def _admitted(self, hv: Hypervisor, image: BaseImage) -> bool:
        try:
            boot.admit(hv, self.settings, image, vms=2)
        except ExecutorError as exc:
            if str(exc) != self._refused:  # said once, not every round
                self.say(f"not booting a pool VM (room is kept for one cold job besides it): {exc}")
            self._refused = str(exc)
            return False
        self._refused = ""
        return True

    def _boot_one(
        self, hv: Hypervisor, image: BaseImage, fingerprint: str, runner_volume: str, alive: Callable[[], bool]
    ) -> None:
        started = time.monotonic()
        try:
            vm = pool.boot_pool_vm(hv, self.settings, self.state, image, fingerprint, runner_volume, self.say, alive)
        except Interrupted:
            raise
        except (ExecutorError, OSError) as exc:
            self.boot_failures += 1
            self.last_error = str(exc)
            delay = self.backoff.failed(time.time())
            self.say(f"booting a pool VM failed: {exc}; next try in {delay:.0f} s")
            return
        self.backoff.succeeded()
        self.boots += 1
        self.last_boot_s = time.monotonic() - started
        self.say(f"{vm} is ready and idle ({self.settings.pool.idle}) after {self.last_boot_s:.1f}s")

    def _silent_ones(self, hv: Hypervisor, vms: list[decide.PoolVM], leaving: set[str]) -> list[tuple[str, str]]:
        """Running idle VMs that failed SILENT_PROBES SSH probes in a row (probed every
        RUNNING_PROBE_S seconds; paused ones are checked at their claim)."""
        if self.settings.pool.idle != "running" or time.monotonic() < self._next_probe:
            return []
        self._next_probe = time.monotonic() + RUNNING_PROBE_S
        silent = []
        for vm in vms:
            if vm.pool_state != POOL_IDLE or vm.locked or vm.name in leaving:
                continue
            if pool.answers_ssh(hv, self.settings, self.state, vm.name):
                self._silent.pop(vm.name, None)
                continue
            self._silent[vm.name] = self._silent.get(vm.name, 0) + 1
            if self._silent[vm.name] >= SILENT_PROBES:
                silent.append((vm.name, f"it answered no SSH probe {SILENT_PROBES} times in a row"))
                journal.count(self.settings, journal.UNRESPONSIVE_GUESTS_TOTAL)
                del self._silent[vm.name]
        return silent

    def drain(self, why: str) -> None:
        """Remove every idle VM nobody works on (the agent stops)."""
        with connect(self.settings.libvirt.uri, naming.METADATA_NS) as hv:
            for vm, _ in pool.retire_idle(hv, self.settings, self.state):
                self.say(f"removed {vm}: {why}")

    def write_status(self, vms: list[decide.PoolVM], fingerprint: str, drained: bool) -> None:
        counts = {
            state: sum(1 for vm in vms if vm.pool_state == state) for state in (POOL_IDLE, POOL_BOOTING, POOL_CLAIMED)
        }
        s = self.settings
        self.state.write_agent_status(
            s.vm.name_prefix,
            {
                "updated": int(time.time()),
                "size": s.pool.size,
                "idle_mode": s.pool.idle,
                "drained": drained,
                "idle": counts[POOL_IDLE],
                "booting": counts[POOL_BOOTING],
                "in_job": counts[POOL_CLAIMED],
                "fingerprint": fingerprint,
                "boots": self.boots,
                "boot_failures": self.boot_failures,
                "last_error": self.last_error,
                "last_boot_s": self.last_boot_s,
                "next_boot_not_before": int(self.backoff.not_before) or None,
            },
        )
