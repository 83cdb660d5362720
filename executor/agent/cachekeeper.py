"""The Docker layer cache's background work in the host agent (jobvm.layercache): flatten
heads deeper than a few overlays, evict lineages over their bounds or made by another image,
delete volumes nothing needs. In a thread of its own: a flattening copies a whole head, which
must not hold up the pool keeper's rounds."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from executor.adapters.hostfiles import load_base_image
from executor.adapters.hypervisor import connect
from executor.adapters.statedir import StateDir
from executor.core import naming
from executor.core.settings import Settings
from executor.errors import describe
from executor.jobvm import layercache

log = logging.getLogger(__name__)

ROUND_S = 30.0


class CacheKeeper:
    def __init__(self, settings: Callable[[], Settings], say: Callable[[str], None]) -> None:
        self.settings = settings
        self.say = say
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="docker-cache", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(ROUND_S):
            try:
                self.round()
                self.last_error = ""
            except Exception as exc:  # one bad round (libvirtd restarting, a bug) must not end the upkeep
                if describe(exc) != self.last_error:
                    self.say(f"Docker layer cache upkeep failed: {describe(exc)}")
                self.last_error = describe(exc)

    def round(self) -> None:
        settings = self.settings()
        if not settings.docker_cache.enabled:
            return
        recipe = str(load_base_image(settings.image.dir).manifest.get("recipe_hash", ""))
        state = StateDir(settings.paths.state_dir)
        with connect(settings.libvirt.uri, naming.METADATA_NS) as hv:
            for line in layercache.flatten_deep_heads(hv, settings, state):
                self.say(f"Docker layer cache: {line}")
            tidied = layercache.tidy(hv, settings, state, recipe)
        for eviction in tidied.evicted:
            self.say(f"Docker layer cache: evicted lineage {eviction.lineage}: {eviction.why}")
        for lineage in tidied.dropped:
            self.say(f"Docker layer cache: dropped lineage {lineage} (another image made it, or its head is gone)")
