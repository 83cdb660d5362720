"""The registry mirror through an upstream outage that spans a restart of the mirror (a host
reboot, an upgrade): it serves what it has cached, read-only, and pulls through again by itself
once the upstream answers.

The upstream is a docker-registry on loopback standing in for Docker Hub (there is none here),
holding two images under Docker Hub names; the mirror is the real supervisor (`mirror start`).
Jobs boot one VM at a time and pull in image mode, as a job's `image:` is pulled.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from executor.testing.registry import busybox_files, image_layout, running_registry
from tests.vm.harness import RunnerSim
from tests.vm.test_mirror import cli, mirror_status, mirror_test_config, registry_pids, wait_for

pytestmark = pytest.mark.vm

UPSTREAM = "127.0.0.1:5071"
MIRROR_PORT = 5072
PULLED = re.compile(r"Pulled busybox:one in (?P<seconds>[\d.]+)s")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream")
    with running_registry(root / "registry", UPSTREAM) as reg:
        for tag in ("one", "two"):
            files = busybox_files({"etc/lvx-marker": f"busybox-{tag}\n".encode()})
            reg.push(image_layout(root / tag, files, cmd=["sh"]), f"library/busybox:{tag}", root)
        yield reg


@pytest.fixture(scope="module")
def config(host_settings, tmp_path_factory, upstream):
    directory = tmp_path_factory.mktemp("mirror-outage")
    with mirror_test_config(host_settings, directory, "lvxout", UPSTREAM, MIRROR_PORT) as (path, _storage):
        yield path


def _job(config, tmp_path, job_id, image):
    """prepare, `cat /etc/lvx-marker` in the build container, cleanup: (prepare, run)."""
    sim = RunnerSim(config, tmp_path / f"runner{job_id}", job_id, payload_extra={"image": {"name": image}})
    try:
        prepared = sim.prepare()
        ran = sim.run("cat /etc/lvx-marker") if prepared.rc == 0 else None
    finally:
        sim.cleanup()
    return prepared, ran


def test_the_mirror_serves_its_cache_through_an_outage_and_a_restart_then_pulls_through_again(
    config, upstream, tmp_path, host_settings, leftovers
):
    mirror_url = f"http://{host_settings.gateway}:{MIRROR_PORT}"
    cli(config, "mirror", "start")
    assert mirror_status(config)["mode"] == "proxy"

    # Job 1 pulls through the mirror, which keeps a copy.
    prepared, ran = _job(config, tmp_path, 5701, "busybox:one")
    assert prepared.rc == 0 and ran is not None and ran.stdout == "busybox-one\n", prepared.describe()
    assert "serving its cache only" not in prepared.stdout
    assert "library/busybox" in mirror_status(config)["repositories"]

    # The upstream goes away; the mirror restarts during the outage, as on a reboot.
    upstream.stop()
    cli(config, "mirror", "stop")
    started = cli(config, "mirror", "start")
    assert f"answering at {mirror_url}" in started.stdout, started.stdout  # no panic, no restart loop
    status = mirror_status(config)
    assert status["answering"] and status["mode"] == "cache-only", status
    assert status["cache_only_because"].startswith(f"upstream http://{UPSTREAM} unreachable since "), status
    assert len(registry_pids(Path(status["storage"]))) == 1
    text = cli(config, "mirror", "status", check=False).stdout
    assert "mode        serving its cache only, read-only: upstream" in text, text
    doctor = cli(config, "doctor", check=False).stdout
    assert f"warn  registry mirror {mirror_url} answers, serving its cache only" in doctor, doctor

    # Pushes are refused as always (the cache-only registry allows GET and HEAD only).
    request = urllib.request.Request(f"{mirror_url}/v2/library/pushed/blobs/uploads/", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10)
    assert refused.value.code == 405 and refused.value.headers["Allow"] == "GET, HEAD"

    # Job 2: the cached image comes from the mirror, at once; the job log says why.
    prepared, ran = _job(config, tmp_path, 5702, "busybox:one")
    assert prepared.rc == 0 and ran is not None and ran.stdout == "busybox-one\n", prepared.describe()
    assert f"the registry mirror {mirror_url} is serving its cache only: upstream http://{UPSTREAM}" in (
        prepared.stdout
    ), prepared.describe()
    pulled = PULLED.search(prepared.stdout)
    assert pulled is not None and float(pulled["seconds"]) < 15, prepared.describe()
    print(f"\ncached image pulled from the cache-only mirror in {pulled['seconds']} s")

    # An image the mirror never saw: dockerd asks Docker Hub directly, which is unreachable
    # here, and the job fails saying so after the log said the mirror serves its cache only.
    # A system failure (a registry that does not answer), which gitlab-runner retries.
    prepared, _ = _job(config, tmp_path, 5703, "busybox:two")
    assert prepared.rc == 2, prepared.describe()
    assert "is serving its cache only" in prepared.stdout and "Pulling docker image busybox:two" in prepared.stdout
    assert "error: docker in the job's VM: pulling docker.io/library/busybox: " in prepared.stderr, prepared.describe()

    # The upstream answers again: the mirror pulls through once more, nobody doing anything.
    upstream.start()
    wait_for(lambda: mirror_status(config)["mode"] == "proxy", 60, "the mirror pulling through again")
    prepared, ran = _job(config, tmp_path, 5704, "busybox:two")
    assert prepared.rc == 0 and ran is not None and ran.stdout == "busybox-two\n", prepared.describe()
    assert "serving its cache only" not in prepared.stdout
    assert mirror_status(config)["manifest_misses"] >= 1  # it came from the upstream, through the cache
    assert leftovers(config) == {}
