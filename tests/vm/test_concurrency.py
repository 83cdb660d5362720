"""Two jobs at once: distinct names, addresses and keys; neither sees the other."""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim

pytestmark = pytest.mark.vm


def test_two_jobs_at_once_do_not_collide(host_settings, tmp_path, leftovers):
    config = write_test_config(host_settings, tmp_path / "cfg", "lvxpair")
    sims = [RunnerSim(config, tmp_path / f"runner{i}", 9000 + i) for i in (1, 2)]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            prepared = list(pool.map(lambda s: s.prepare(), sims))
        for result in prepared:
            assert result.rc == 0, result.describe()
        seen = []
        for sim in sims:
            result = sim.run("echo host=$(hostname) ip=$(ip -4 -o addr show scope global | awk '{print $4}')")
            assert result.rc == 0, result.describe()
            line = [l for l in result.stdout.splitlines() if l.startswith("host=")][0]
            assert line.startswith(f"host=lvxpair-job-{sim.job_id} ")
            seen.append(line.split("ip=")[1])
        assert len(set(seen)) == 2, seen
    finally:
        for sim in sims:
            cleaned = sim.cleanup()
            assert cleaned.rc == 0, cleaned.describe()
    assert leftovers(config) == {}
