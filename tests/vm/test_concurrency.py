"""Two jobs at once: distinct names, addresses and keys, and neither VM can reach the other."""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim

pytestmark = pytest.mark.vm

# bash's /dev/tcp: "open" if a TCP connection to $1:$2 succeeds within 5 s, else "closed".
TCP_PROBE = 'probe() {{ timeout 5 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null && echo "$3=open" || echo "$3=closed"; }}\n{calls}'


def test_two_jobs_at_once_do_not_collide_and_cannot_reach_each_other(host_settings, tmp_path, leftovers):
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
            line = next(out for out in result.stdout.splitlines() if out.startswith("host="))
            assert line.startswith(f"host=lvxpair-job-{sim.job_id} ")
            seen.append(line.split("ip=")[1].split("/")[0])
        assert len(set(seen)) == 2, seen
        for sim, other_ip in zip(sims, reversed(seen), strict=True):
            # Its own sshd answers (the probe works), the other VM's sshd does not (port isolation).
            probe = TCP_PROBE.format(calls=f"probe 127.0.0.1 22 own\nprobe {other_ip} 22 other\n")
            result = sim.run(probe, stage="probe")
            assert result.rc == 0, result.describe()
            assert "own=open" in result.stdout, result.describe()
            assert "other=closed" in result.stdout, result.describe()
    finally:
        for sim in sims:
            cleaned = sim.cleanup()
            assert cleaned.rc == 0, cleaned.describe()
    assert leftovers(config) == {}
