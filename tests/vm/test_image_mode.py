"""Image mode in a real VM: the job's `image:` and `services:` on the VM's own dockerd, images
made here and pulled from a real registry on this host (there is no Docker Hub).

Images: `lvx/tools` (static busybox, the host's docker CLI with the libraries it needs, a marker
file), `lvx/web` (busybox httpd on 8080 greeting with a service variable), `lvx/silent` (exposes a
port it never opens). One VM for the module; the tests run in file order.
"""

from __future__ import annotations

import re
import time

import pytest

from executor.testing.registry import busybox_files, docker_cli_files, image_layout, running_registry
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim, read_until, terminate_like_runner

pytestmark = pytest.mark.vm

REGISTRY_PORT = 5001
MARKER = "from-the-lvx-tools-image"


@pytest.fixture(scope="module")
def registry(host_settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    with running_registry(root / "registry", f"{host_settings.gateway}:{REGISTRY_PORT}") as reg:
        tools = image_layout(
            root / "tools",
            busybox_files({"etc/lvx-image-marker": MARKER.encode() + b"\n", **docker_cli_files(root / "cli")}),
            env=["PATH=/usr/local/bin:/usr/bin:/bin"],
        )
        web = image_layout(
            root / "web",
            busybox_files(),
            cmd=[
                "sh",
                "-c",
                'mkdir -p /www && echo "hello $GREETING" > /www/index.html && exec httpd -f -p 8080 -h /www',
            ],
            exposed_ports=[8080],
        )
        silent = image_layout(
            root / "silent",
            busybox_files(),
            cmd=["sh", "-c", "echo silent-service-log; exec sleep 3600"],
            exposed_ports=[9999],
        )
        yield {
            "tools": reg.push(tools, "lvx/tools:1", root),
            "web": reg.push(web, "lvx/web:1", root),
            "silent": reg.push(silent, "lvx/silent:1", root),
            "address": reg.address,
        }


@pytest.fixture(scope="module")
def job(host_settings, tmp_path_factory, registry, leftovers):
    root = tmp_path_factory.mktemp("imagemode")
    config = write_test_config(
        host_settings,
        root / "cfg",
        "lvximg",
        allow_host_ports=(REGISTRY_PORT,),
        docker=f'insecure_registries = ["{registry["address"]}"]\nwait_for_services_timeout = 15\n',
    )
    payload = {
        "image": {"name": registry["tools"]},
        "services": [
            {
                "name": registry["web"],
                "alias": "web",
                "variables": [{"key": "GREETING", "value": "from-a-service-variable"}],
            },
            {"name": registry["silent"]},
        ],
    }
    sim = RunnerSim(config, root / "runner", 4343, payload_extra=payload)
    prepared = sim.prepare()
    yield {"sim": sim, "prepared": prepared, "config": config}
    sim.cleanup()


def test_prepare_pulls_the_images_starts_the_services_and_warns_about_the_silent_one(job, registry):
    prepared = job["prepared"]
    assert prepared.rc == 0, prepared.describe()
    for name in ("tools", "web", "silent"):
        assert f"Pulling docker image {registry[name]}" in prepared.stdout, prepared.describe()
    assert f"*** WARNING: Service {registry['silent']} probably didn't start properly." in prepared.stdout
    assert "silent-service-log" in prepared.stdout  # the service's last log lines come with it
    assert f"WARNING: Service {registry['web']}" not in prepared.stdout
    ready = prepared.stdout.splitlines()[-1]
    assert "pulls " in ready and "services " in ready  # the timings line names the phases


def test_the_build_script_sees_the_images_files_and_the_vms_daemon(job):
    result = job["sim"].run(
        "cat /etc/lvx-image-marker\n"
        "test -e /etc/debian_version && echo vm-files || echo no-vm-files\n"
        "docker version --format 'server={{.Server.Version}}'\n"
        "docker ps --format '{{.Names}}' | sort\n"
    )
    assert result.rc == 0, result.describe()
    assert MARKER in result.stdout and "no-vm-files" in result.stdout
    server = re.search(r"server=(\d+)\.", result.stdout)
    assert server and int(server.group(1)) >= 26, result.stdout  # the VM's current engine
    assert "lvximg-job-4343-build" in result.stdout and "lvximg-job-4343-svc-0" in result.stdout


def test_docker_run_from_the_job_uses_the_vms_daemon(job, registry):
    result = job["sim"].run(f"docker run --rm {registry['tools']} cat /etc/lvx-image-marker")
    assert result.rc == 0, result.describe()
    assert MARKER in result.stdout


def test_a_service_answers_by_its_alias_and_its_derived_alias_with_its_variables(job, host_settings):
    derived = f"{host_settings.gateway}__lvx__web"  # GitLab's alias of <gateway>:5001/lvx/web:1
    result = job["sim"].run(f"wget -qO- http://web:8080/\nwget -qO- http://{derived}:8080/\n")
    assert result.rc == 0, result.describe()
    assert result.stdout.count("hello from-a-service-variable") == 2


def test_exit_3_in_the_container_is_build_failure_3(job):
    result = job["sim"].run("echo before; exit 3")
    assert result.rc == 1 and result.build_exit_code == "3\n", result.describe()
    assert "before" in result.stdout


def test_cancel_stops_the_containers_processes_and_after_script_still_runs(job):
    sim = job["sim"]
    proc = sim.start_run("echo started; sleep 300; echo never-printed")
    read_until(proc, "started")
    began = time.monotonic()
    outcome = terminate_like_runner(proc, graceful=60)
    assert outcome == "terminated" and time.monotonic() - began < 30
    assert proc.returncode == 2
    after = sim.run("echo after-script-ran; ps -o args | grep -c '[s]leep 300' || true", stage="after_script")
    assert after.rc == 0, after.describe()
    assert "after-script-ran" in after.stdout
    assert after.stdout.strip().splitlines()[-1] == "0"  # nothing of the cancelled stage is left


def test_helper_stages_run_in_the_vm_and_read_what_the_container_wrote_as_root(job):
    sim = job["sim"]
    wrote = sim.run(
        "mkdir -p /builds/demo/project && echo secret-ish > /builds/demo/project/file && chmod 600 /builds/demo/project/file && id -u"
    )
    assert wrote.rc == 0 and wrote.stdout.strip().endswith("0"), wrote.describe()
    helper = sim.run(
        "cat /builds/demo/project/file; test -e /etc/debian_version && echo in-the-vm",
        stage="upload_artifacts_on_success",
    )
    assert helper.rc == 0, helper.describe()
    assert "secret-ish" in helper.stdout and "in-the-vm" in helper.stdout


def test_no_container_runs_privileged(job):
    result = job["sim"].run(
        "for c in $(docker ps -q); do docker inspect --format '{{.Name}} privileged={{.HostConfig.Privileged}}' $c; done"
    )
    assert result.rc == 0, result.describe()
    lines = [line for line in result.stdout.splitlines() if "privileged=" in line]
    assert len(lines) >= 3 and all(line.endswith("privileged=false") for line in lines), result.stdout


def test_cleanup_leaves_nothing(job, leftovers):
    cleaned = job["sim"].cleanup()
    assert cleaned.rc == 0, cleaned.describe()
    assert leftovers(job["config"]) == {}


def test_a_disallowed_image_is_a_build_failure_before_any_vm_exists(host_settings, tmp_path, registry, leftovers):
    config = write_test_config(
        host_settings, tmp_path / "cfg", "lvxdeny", docker=f'allowed_images = ["{registry["address"]}/lvx/web:*"]\n'
    )
    sim = RunnerSim(config, tmp_path / "runner", 4344, payload_extra={"image": {"name": registry["tools"]}})
    started = time.monotonic()
    result = sim.prepare()
    assert result.rc == 1, result.describe()  # BUILD_FAILURE: the job's fault, not retried
    assert "is not present on list of allowed images" in result.stderr
    assert time.monotonic() - started < 20
    assert leftovers(config) == {}
    assert sim.cleanup().rc == 0


def test_jobs_without_an_image_keep_the_vm_shell(host_settings, tmp_path, leftovers):
    """Shell mode is what the other vm tests drive; here only that `run` does not look for a
    build container when the payload has no image (a missing VM is the error, as before)."""
    config = write_test_config(host_settings, tmp_path / "cfg", "lvxnoimg")
    sim = RunnerSim(config, tmp_path / "runner", 4345)
    ran = sim.run("echo hi")
    assert ran.rc == 2 and "does not exist" in ran.stderr and "build container" not in ran.stderr
    assert leftovers(config) == {}
