"""`services: [docker:dind]` pipelines as users write them, in real VMs, both ways the executor
serves them: by the VM's own dockerd (`dind = "vm-daemon"`, the default: no privileged container,
no nested daemon) and by a privileged dind container in the VM (`dind = "privileged"`).

No Docker Hub here: the build image (`lvx/tools`: static busybox and Debian's docker CLI) and the
dind stand-in for `privileged` mode (`lvx/docker:27-dind`: Debian's dockerd, containerd, runc and
an entrypoint with docker:dind's certificate layout, `executor.testing.registry.dind_image`) are
made here and served by a docker-registry on the host. The jobs build their own images FROM
scratch. Three VMs, one after the other.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest

from executor.core.dind import DEFAULT_DIND_IMAGES
from executor.testing.registry import busybox_files, dind_image, docker_cli_files, image_layout, running_registry
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim

pytestmark = pytest.mark.vm

REGISTRY_PORT = 5005
TLS_VARIABLES = {
    "DOCKER_HOST": "tcp://docker:2376",
    "DOCKER_TLS_CERTDIR": "/certs",
    "DOCKER_TLS_VERIFY": "1",
    "DOCKER_CERT_PATH": "/certs/client",
}
# What a dind pipeline does: ask the daemon, build an image, run it.
BUILD_AND_RUN = """\
set -e
docker info --format 'daemon={{.ServerVersion}} os={{.OperatingSystem}}'
mkdir -p /tmp/ctx && cp /bin/busybox /tmp/ctx/
printf 'FROM scratch\\nCOPY busybox /bin/busybox\\nCMD ["/bin/busybox", "echo", "the-built-image-runs"]\\n' > /tmp/ctx/Dockerfile
docker build -q -t lvx-built:1 /tmp/ctx
docker run --rm lvx-built:1
"""


@pytest.fixture(scope="module")
def registry(host_settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("dind-registry")
    with running_registry(root / "registry", f"{host_settings.gateway}:{REGISTRY_PORT}") as reg:
        tools = image_layout(root / "tools", busybox_files(docker_cli_files(root / "cli")))
        dind = dind_image(root / "dind", root / "debs")
        yield {
            "tools": reg.push(tools, "lvx/tools:1", root),
            "dind": reg.push(dind, "lvx/docker:27-dind", root),
            "address": reg.address,
            "docker_cli": root / "cli" / "tree" / "usr" / "bin" / "docker",  # the host's Debian CLI
        }


def config(host_settings, directory, registry, mode):
    return write_test_config(
        host_settings,
        directory,
        "lvxdind",
        allow_host_ports=(REGISTRY_PORT,),
        docker=(
            f'insecure_registries = ["{registry["address"]}"]\nwait_for_services_timeout = 180\n'
            f'dind = "{mode}"\ndind_images = {json.dumps([*DEFAULT_DIND_IMAGES, "**/lvx/docker:*dind*"])}\n'
        ),
    )


def run_job(cfg, workdir, job_id, payload, variables, script, leftovers, during=None):
    sim = RunnerSim(cfg, workdir, job_id, payload_extra=payload, variables=variables)
    try:
        prepared = sim.prepare()
        assert prepared.rc == 0, prepared.describe()
        result = sim.run(script)
        if during is not None:
            during()
        return prepared, result
    finally:
        sim.cleanup()
        assert leftovers(cfg) == {}


def executor_cli(cfg, *args):
    return subprocess.run(
        [sys.executable, "-m", "executor", "--config", str(cfg), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_vm_daemon_tls_build_run_published_port_and_nothing_privileged(host_settings, registry, tmp_path, leftovers):
    cfg = config(host_settings, tmp_path / "cfg", registry, "vm-daemon")
    payload = {"image": {"name": registry["tools"]}, "services": [{"name": "docker:dind"}]}
    script = BUILD_AND_RUN + (
        "ls /certs/client\n"
        "printf 'FROM scratch\\nCOPY busybox /bin/busybox\\nCOPY index.html /www/index.html\\n"
        'CMD ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/www"]\\n\' > /tmp/ctx/Dockerfile\n'
        "echo published-port-answers > /tmp/ctx/index.html\n"
        "docker build -q -t lvx-web:1 /tmp/ctx\n"
        "docker run -d --name web -p 8080:80 lvx-web:1\n"
        "for i in $(seq 30); do wget -qO- http://docker:8080/ && break; sleep 1; done\n"
        "docker ps -aq | xargs docker inspect --format 'container {{.Name}} privileged={{.HostConfig.Privileged}}'\n"
        "hostname -i; grep docker /etc/hosts\n"
    )
    prepared, result = run_job(cfg, tmp_path / "runner", 6101, payload, TLS_VARIABLES, script, leftovers)
    assert prepared.stdout.count("served by this job's own dockerd in the VM") == 1, prepared.stdout
    assert "tcp://docker:2376 (TLS, client certificates in /certs/client)" in prepared.stdout
    assert "Pulling docker image docker:dind" not in prepared.stdout  # never pulled, never started
    assert result.rc == 0, result.describe()
    assert re.search(r"daemon=2\d\.", result.stdout), result.stdout  # the VM's Docker 26, not a nested one
    assert "the-built-image-runs" in result.stdout
    assert {"ca.pem", "cert.pem", "key.pem"} <= set(result.stdout.split())
    assert "published-port-answers" in result.stdout
    containers = re.findall(r"container (\S+) privileged=(\w+)", result.stdout)
    assert any(name.endswith("-build") for name, _ in containers) and any(n == "/web" for n, _ in containers)
    assert all(flag == "false" for _, flag in containers), containers
    # The plain port is for the job's containers: the VM's own address (reachable from the host
    # through the bridge) does not answer on it.
    vm_ip = re.search(r"ready at (\d+\.\d+\.\d+\.\d+)", prepared.stdout).group(1)
    with pytest.raises(OSError):
        socket.create_connection((vm_ip, 2375), timeout=5).close()


def test_vm_daemon_without_tls_on_2375(host_settings, registry, tmp_path, leftovers):
    cfg = config(host_settings, tmp_path / "cfg", registry, "vm-daemon")
    payload = {"image": {"name": registry["tools"]}, "services": [{"name": "docker:27-dind", "alias": "dockerd"}]}
    variables = {"DOCKER_HOST": "tcp://docker:2375", "DOCKER_TLS_CERTDIR": ""}
    script = (
        f"docker run --rm {registry['tools']} echo plain-2375-runs\n"
        "DOCKER_HOST=tcp://dockerd:2375 docker version --format 'alias={{.Server.Version}}'\n"
        "test -e /certs/client/key.pem && echo certs-present || echo no-certs\n"
    )
    seen = {}

    def operator_access():  # while the job runs: what an operator gets, like docker-machine
        seen["env"] = executor_cli(cfg, "env", "6102")
        seen["ssh"] = executor_cli(cfg, "ssh", "6102", "id -un; docker info --format '{{.ServerVersion}}'; exit 7")
        # The printed lines, evaluated by a shell, for the docker CLI (as an operator would).
        seen["cli"] = subprocess.run(
            [
                "sh",
                "-c",
                f"{seen['env'].stdout}\nexec {registry['docker_cli']} version --format '{{{{.Server.Version}}}}'",
            ],
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    prepared, result = run_job(cfg, tmp_path / "runner", 6102, payload, variables, script, leftovers, operator_access)
    assert "tcp://docker:2375;" in prepared.stdout and "2376" not in prepared.stdout
    assert result.rc == 0, result.describe()
    assert "plain-2375-runs" in result.stdout and "alias=2" in result.stdout and "no-certs" in result.stdout
    assert seen["env"].returncode == 0 and "export DOCKER_TLS_VERIFY=1" in seen["env"].stdout, seen["env"]
    assert seen["cli"].returncode == 0, seen["cli"]  # the printed DOCKER_* lines reach the job's daemon
    assert seen["cli"].stdout.startswith("2"), seen["cli"]
    assert seen["ssh"].returncode == 7 and seen["ssh"].stdout.splitlines()[0] == "runner", seen["ssh"]
    gone = executor_cli(cfg, "env", "6102")
    assert gone.returncode == 2 and "job 6102: the job's VM lvxdind-job-6102 does not exist" in gone.stderr


def test_privileged_mode_runs_a_real_dind_container_for_the_same_job(host_settings, registry, tmp_path, leftovers):
    cfg = config(host_settings, tmp_path / "cfg", registry, "privileged")
    payload = {"image": {"name": registry["tools"]}, "services": [{"name": registry["dind"], "alias": "docker"}]}
    script = BUILD_AND_RUN + (
        # the VM's own daemon (its socket is in the build container), without the dind TLS settings
        "env -u DOCKER_TLS_VERIFY -u DOCKER_CERT_PATH DOCKER_HOST=unix:///var/run/docker.sock "
        "docker inspect --format 'outer privileged={{.HostConfig.Privileged}}' "
        "lvxdind-job-6103-svc-0\n"
    )
    prepared, result = run_job(cfg, tmp_path / "runner", 6103, payload, TLS_VARIABLES, script, leftovers)
    assert 'a privileged container with its own dockerd in the VM (docker.dind = "privileged")' in prepared.stdout
    assert "WARNING: Service" not in prepared.stdout, prepared.stdout  # it answered within the wait
    assert result.rc == 0, result.describe()
    assert re.search(r"daemon=20\.10\.", result.stdout), result.stdout  # the nested Debian dockerd
    assert "the-built-image-runs" in result.stdout
    assert "outer privileged=true" in result.stdout
