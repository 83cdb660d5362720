"""The per-project Docker layer cache in real VMs: a protected job's build is cached for the
next protected job, an unprotected job cannot change what protected jobs get, another project
gets nothing, a failing job writes nothing, two jobs at once leave a usable head, a lineage over
`max_gib` is evicted; in an unchanged dind pipeline from the warm pool, BuildKit says CACHED.

Images are made here (no Docker Hub): shell-mode jobs build `FROM scratch` with the VM's static
busybox; the dind pipeline's build image is `lvx/tools` (busybox and Debian's docker CLI) from a
docker-registry on the host, as in test_dind.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from executor.adapters.hostfiles import load_settings
from executor.admin.listing import leftovers_once_removed
from executor.admin.reap import reap
from executor.core.dind import DEFAULT_DIND_IMAGES
from executor.testing.runnersim import RunnerSim
from tests.vm.conftest import write_test_config
from tests.vm.harness import Agent
from tests.vm.test_dind import REGISTRY_PORT, executor_cli, registry  # noqa: F401 (the module's registry fixture)
from tests.vm.test_pool import wait_idle

pytestmark = pytest.mark.vm

CACHE = 'pool = "lvxtest-docker-cache"\ndir = "/var/lib/libvirt-executor/test-docker-cache"\n'
PROJECT_A, PROJECT_B, PROJECT_C, PROJECT_D = 71, 72, 73, 74

# Two RUN steps: the first takes measurable time and leaves the job's MARK. Shell jobs use the
# legacy builder (DOCKER_BUILDKIT=0: the VM's docker CLI has no buildx), where a cached step
# says "Using cache"; the dind pipeline BuildKit (BUILD_FLAGS=--progress=plain), "CACHED".
BUILD = """
set -e
mkdir -p /tmp/ctx && cp /bin/busybox /tmp/ctx/
cat > /tmp/ctx/Dockerfile <<EOF
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "sleep 4; echo $MARK > /marker"]
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox seq 1 20000 > /numbers"]
EOF
start=$(tr -d . < /proc/uptime | cut -d" " -f1)  # centiseconds (busybox date has no %N)
docker build $BUILD_FLAGS -t ${TAG:-lvx-cached:1} /tmp/ctx 2>&1
echo "build took $(( ($(tr -d . < /proc/uptime | cut -d" " -f1) - start) * 10 )) ms"
docker run --rm ${TAG:-lvx-cached:1} /bin/busybox cat /marker
"""


def cache_config(host_settings, directory: Path, prefix: str, extra: str = "", **kwargs) -> Path:
    return write_test_config(
        host_settings, directory, prefix, extra=f"\n[docker_cache]\nenabled = true\n{CACHE}{extra}", **kwargs
    )


def lineages(cfg: Path) -> dict[str, dict]:
    listing = json.loads(executor_cli(cfg, "list", "--json").stdout)
    return {lineage["name"]: lineage for lineage in listing["docker_cache"]["lineages"]}


class Job:
    def __init__(self, cfg: Path, workdir: Path, job_id: int, project: int, protected: bool, **variables: str):
        self.sim = RunnerSim(
            cfg,
            workdir / str(job_id),
            job_id,
            payload_extra={
                "job_info": {"id": job_id, "project_id": project, "project_name": f"p{project}"},
                "git_info": {"protected": protected},
            },
            variables={"DOCKER_BUILDKIT": "0", **variables},
        )

    def prepare(self):
        prepared = self.sim.prepare()
        assert prepared.rc == 0, prepared.describe()
        return prepared

    def run(self, script: str):
        return self.sim.run(script)

    def cleanup(self):
        """Cleanup, then its detached remover: only then is the job's disk a head or gone."""
        cleaned = self.sim.cleanup()
        assert cleaned.rc == 0, cleaned.describe()
        assert leftovers_once_removed(load_settings(self.sim.config_path)) == {}


def one_job(cfg, workdir, job_id, project, protected, script, **variables):
    job = Job(cfg, workdir, job_id, project, protected, **variables)
    prepared = job.prepare()
    try:
        return prepared, job.run(script)
    finally:
        job.cleanup()


@pytest.fixture(scope="module")
def shell_cfg(host_settings, tmp_path_factory):
    cfg = cache_config(host_settings, tmp_path_factory.mktemp("layercache") / "cfg", "lvxlc")
    yield cfg
    pruned = executor_cli(cfg, "docker-cache", "prune")
    assert pruned.returncode == 0, pruned.stderr
    assert lineages(cfg) == {}


def test_protected_cache_is_reused_never_poisoned_never_shared_and_failures_write_nothing(
    shell_cfg, tmp_path, leftovers
):
    protected = f"lvxlc-p{PROJECT_A}-protected"
    unprotected = f"lvxlc-p{PROJECT_A}-unprotected"
    # 1. the first protected job builds everything and writes the protected lineage
    prepared, first = one_job(shell_cfg, tmp_path, 7201, PROJECT_A, True, BUILD, MARK="release-1")
    assert f"Docker layer cache: no cached layers yet for protected lineage {protected}" in prepared.stdout
    assert first.rc == 0, first.describe()
    assert "Using cache" not in first.stdout and first.stdout.rstrip().endswith("release-1")
    assert lineages(shell_cfg)[protected]["writes"] == 1

    # 2. the next protected job: every step is cached
    prepared, second = one_job(shell_cfg, tmp_path, 7202, PROJECT_A, True, BUILD, MARK="release-1")
    assert f"Docker layer cache: the protected lineage {protected};" in prepared.stdout
    assert second.rc == 0, second.describe()
    assert second.stdout.count("Using cache") == 3, second.stdout  # COPY and both RUN steps
    print(
        "cold build:",
        re.findall(r"build took \d+ ms", first.stdout),
        "warm:",
        re.findall(r"build took \d+ ms", second.stdout),
    )

    # 3. an unprotected job rebuilds the same tag with other content: it reads the protected
    #    lineage (its own is empty) and writes only its own
    prepared, mr = one_job(shell_cfg, tmp_path, 7203, PROJECT_A, False, BUILD, MARK="poisoned")
    assert "read only: this job's own has no head yet" in prepared.stdout
    assert mr.rc == 0 and mr.stdout.rstrip().endswith("poisoned"), mr.describe()
    assert lineages(shell_cfg)[unprotected]["writes"] == 1

    # 4. a failing protected job builds an image, then fails: nothing of it is kept
    failing = BUILD.replace("${TAG:-lvx-cached:1}", "lvx-failed:1") + "exit 3\n"
    _, failed = one_job(shell_cfg, tmp_path, 7204, PROJECT_A, True, failing, MARK="failed-job")
    assert failed.rc == 1, failed.describe()
    assert f"this job's Docker layers are not kept for {protected}" in failed.stderr
    assert lineages(shell_cfg)[protected]["writes"] == 2

    # 5. the next protected job gets what the protected jobs left: not the poison, not the failure
    check = "docker run --rm lvx-cached:1 /bin/busybox cat /marker\ndocker image inspect lvx-failed:1 >/dev/null 2>&1 || echo no-failed-image\n"
    _, got = one_job(shell_cfg, tmp_path, 7205, PROJECT_A, True, check)
    assert got.rc == 0, got.describe()
    assert got.stdout.split() == ["release-1", "no-failed-image"]

    # 6. another project: none of project A's images or layers
    empty = "docker images -aq | wc -l\ndocker image inspect lvx-cached:1 >/dev/null 2>&1 || echo no-image\n"
    prepared, other = one_job(shell_cfg, tmp_path, 7206, PROJECT_B, True, empty)
    assert f"no cached layers yet for protected lineage lvxlc-p{PROJECT_B}-protected" in prepared.stdout
    assert other.stdout.split() == ["0", "no-image"], other.describe()

    found = lineages(shell_cfg)
    assert set(found) == {protected, unprotected, f"lvxlc-p{PROJECT_B}-protected"}
    assert found[protected]["writes"] == 3 and found[unprotected]["writes"] == 1
    assert leftovers(shell_cfg) == {}  # every job's disk is a head or deleted


def test_two_jobs_of_one_lineage_at_once_leave_a_usable_head(shell_cfg, tmp_path, leftovers):
    jobs = {
        tag: Job(shell_cfg, tmp_path, job_id, PROJECT_C, True, TAG=f"lvx-{tag}:1", MARK=tag)
        for job_id, tag in ((7211, "left"), (7212, "right"))
    }
    for job in jobs.values():  # two VMs at once, each with an overlay of the same (empty) head
        job.prepare()
    try:
        for tag, job in jobs.items():
            result = job.run(BUILD)
            assert result.rc == 0 and result.stdout.rstrip().endswith(tag), result.describe()
    finally:
        cleanups = [threading.Thread(target=job.cleanup) for job in jobs.values()]
        for thread in cleanups:
            thread.start()
        for thread in cleanups:
            thread.join()
    assert leftovers(shell_cfg) == {}
    head = lineages(shell_cfg)[f"lvxlc-p{PROJECT_C}-protected"]
    assert head["writes"] == 2
    winner = "left" if ".lvxlc-job-7211." in head["head"] else "right"
    look = (
        "for t in left right; do docker image inspect lvx-$t:1 >/dev/null 2>&1 && echo has-$t; done\n"
        f"docker run --rm lvx-{winner}:1 /bin/busybox cat /marker\n"
        "docker system df >/dev/null && echo daemon-ok\n"
    )
    _, seen = one_job(shell_cfg, tmp_path, 7213, PROJECT_C, True, look)
    assert seen.stdout.split() == [f"has-{winner}", winner, "daemon-ok"], seen.describe()


def test_a_lineage_grown_over_max_gib_is_evicted(host_settings, tmp_path, leftovers):
    cfg = cache_config(host_settings, tmp_path / "cfg", "lvxlcev", extra="max_gib = 0.1\n")
    grow = "dd if=/dev/urandom of=/tmp/big bs=1M count=150 status=none\n" + BUILD.replace(
        "COPY busybox /bin/busybox", "COPY busybox /bin/busybox\nCOPY big /big"
    ).replace("cp /bin/busybox /tmp/ctx/", "cp /bin/busybox /tmp/big /tmp/ctx/")
    _, grew = one_job(cfg, tmp_path, 7221, PROJECT_D, True, grow, MARK="big")
    assert grew.rc == 0, grew.describe()
    assert leftovers(cfg) == {}
    assert lineages(cfg) == {}
    remover_log = (tmp_path / "cfg" / "console" / "remover-lvxlcev.log").read_text()
    assert re.search(
        rf"evicted lineage lvxlcev-p{PROJECT_D}-protected: [0-9.]+ [MG]iB is over docker_cache.max_gib", remover_log
    )
    _, after = one_job(cfg, tmp_path, 7222, PROJECT_D, True, "docker images -aq | wc -l\n")
    assert after.stdout.split() == ["0"], after.describe()
    executor_cli(cfg, "docker-cache", "prune")


def test_an_unchanged_dind_pipeline_from_the_warm_pool_gets_buildkit_cache_hits(
    host_settings,
    registry,  # noqa: F811 (the fixture imported above)
    tmp_path,
    leftovers,
):
    cfg = cache_config(
        host_settings,
        tmp_path / "cfg",
        "lvxlcdind",
        extra="[pool]\nsize = 1\n",
        allow_host_ports=(REGISTRY_PORT,),
        docker=(
            f'insecure_registries = ["{registry["address"]}"]\nwait_for_services_timeout = 180\n'
            'pull_policy = ["if-not-present"]\n'
            f"dind_images = {json.dumps([*DEFAULT_DIND_IMAGES, '**/lvx/docker:*dind*'])}\n"
        ),
    )
    payload_variables = {
        "DOCKER_HOST": "tcp://docker:2376",
        "DOCKER_TLS_CERTDIR": "/certs",
        "DOCKER_TLS_VERIFY": "1",
        "DOCKER_CERT_PATH": "/certs/client",
        "DOCKER_BUILDKIT": "1",
        "BUILD_FLAGS": "--progress=plain",
        "MARK": "built",
    }
    agent = Agent(cfg, tmp_path / "agent.log")
    try:
        outputs = []
        for job_id in (7231, 7232):
            wait_idle(cfg)
            sim = RunnerSim(
                cfg,
                tmp_path / str(job_id),
                job_id,
                payload_extra={
                    "image": {"name": registry["tools"]},
                    "services": [{"name": "docker:dind"}],
                    "job_info": {"id": job_id, "project_id": PROJECT_A + 100, "project_name": "dind"},
                    "git_info": {"protected": True},
                },
                variables=payload_variables,
            )
            try:
                prepared = sim.prepare()
                assert prepared.rc == 0, prepared.describe()
                assert re.search(r"ready at \S+ \(pool, .*docker-disk [0-9.]+s", prepared.stdout), prepared.stdout
                # the job's own image comes out of the lineage, unpacked, from the second job on
                pulled = f"Pulling docker image {registry['tools']}" in prepared.stdout
                assert pulled is (job_id == 7231), prepared.stdout
                result = sim.run(BUILD)
                assert result.rc == 0 and result.stdout.rstrip().endswith("built"), result.describe()
                outputs.append(result.stdout)
            finally:
                sim.cleanup()
        cold, warm = outputs
        assert "CACHED" not in cold
        steps = re.findall(r"^#\d+ \[\d/\d\] (?:COPY|RUN).*$", warm, re.M)
        assert len(steps) == 3, warm
        for step in steps:
            number = step.split()[0]
            assert re.search(rf"^{number} CACHED$", warm, re.M), f"{step} not cached:\n{warm}"
    finally:
        agent.stop()
        reap(load_settings(str(cfg)))
        executor_cli(cfg, "docker-cache", "prune")
    assert leftovers(cfg) == {}
