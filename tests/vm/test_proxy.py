"""A corporate network: job VMs reach the company's web only through its HTTP proxy, which wants a
password that never enters a VM.

On this host: a port-less bridge `lvxproxy0` holding 10.255.254.1, an address in a network the
VMs' policy blocks, serving the company's internal web there (an HTTP page, a git repository, a
docker-registry); a stand-in for the company's proxy on loopback (Debian's tinyproxy asking for
a user and password), which VMs cannot reach either; and the real host agent for the test
config, which runs the executor's forwarder on the VM network. One VM: its curl, git clone and
dockerd pull go through the forwarder; then the credentials file gets a wrong password.
"""

from __future__ import annotations

import re
import secrets
import signal
import socket
import subprocess
import sys

import libvirt
import pytest

from executor.adapters.hostfiles import load_settings
from executor.admin.demo import served_repository
from executor.admin.doctor import _check_proxy
from executor.core.waiting import poll
from executor.testing.company_proxy import company_proxy
from executor.testing.registry import busybox_files, image_layout, running_registry
from tests.vm.conftest import write_test_config
from tests.vm.harness import RunnerSim
from tests.vm.test_network_policy import http_listener, ip

pytestmark = pytest.mark.vm

BRIDGE = "lvxproxy0"
COMPANY = "10.255.254.1"  # blocked for VMs (10.0.0.0/8), reachable from the host
REGISTRY_PORT = 5081
FORWARDER_PORT = 3138
MARKER = "pulled-through-the-proxy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def company(tmp_path_factory):
    """The company's network: its web on the bridge address, its proxy on loopback."""
    root = tmp_path_factory.mktemp("company")
    password = "pw-" + secrets.token_hex(8)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    ip("link", "add", "name", BRIDGE, "type", "bridge")
    try:
        ip("link", "set", BRIDGE, "up")
        ip("addr", "add", f"{COMPANY}/32", "dev", BRIDGE)
        with (
            company_proxy("127.0.0.1", _free_port(), "bot", password) as (proxy_url, access_log),
            http_listener(COMPANY, 0, "the-company-web") as web_port,
            served_repository(root / "repo", COMPANY, {"README": "from the company's git server\n"}) as (git_url, _),
            running_registry(root / "registry", f"{COMPANY}:{REGISTRY_PORT}") as registry,
        ):
            files = busybox_files({"etc/lvx-marker": MARKER.encode() + b"\n"})
            image = registry.push(image_layout(root / "img", files, cmd=["sh"]), "lvx/proxied:1", root)
            yield {
                "proxy": proxy_url,
                "password": password,
                "web": f"http://{COMPANY}:{web_port}/",
                "git": git_url,
                "image": image,
                "log": access_log,
            }
    finally:
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


@pytest.fixture(scope="module")
def config(host_settings, tmp_path_factory, company):
    root = tmp_path_factory.mktemp("proxycfg")
    credentials = root / "proxy-credentials"
    credentials.write_text(f"bot:{company['password']}\n")
    credentials.chmod(0o600)
    path = write_test_config(
        host_settings,
        root / "cfg",
        "lvxproxy",
        network=(
            f'proxy = "{company["proxy"]}"\nproxy_credentials_file = "{credentials}"\nproxy_port = {FORWARDER_PORT}'
        ),
        docker=f'insecure_registries = ["{COMPANY}:{REGISTRY_PORT}"]\n',
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "executor", "--config", str(path), "agent"],
        stdout=open(root / "agent.log", "wb"),  # noqa: SIM115 (the process keeps it)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    settings = load_settings(str(path))
    try:
        assert poll(lambda: _check_proxy(settings, target=f"{COMPANY}:{REGISTRY_PORT}").ok, 60, interval=0.5), (
            root / "agent.log"
        ).read_text()
        yield {"path": path, "credentials": credentials, "agent_log": root / "agent.log", "settings": settings}
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)


def test_a_jobs_http_git_and_docker_go_through_the_proxy_and_its_password_never_enters_the_vm(
    config, company, tmp_path, host_settings, leftovers
):
    sim = RunnerSim(config["path"], tmp_path / "runner", 6201)
    forwarder = f"http://{host_settings.gateway}:{FORWARDER_PORT}"
    half = len(company["password"]) // 2
    try:
        prepared = sim.prepare()
        assert prepared.rc == 0, prepared.describe()
        conn = libvirt.open("qemu:///system")
        try:
            domain_xml = conn.lookupByName(f"lvxproxy-job-{sim.job_id}").XMLDesc(0)
        finally:
            conn.close()
        assert f"HTTP and HTTPS go through the host's proxy forwarder {forwarder} to {company['proxy']}" in (
            prepared.stdout
        )
        ran = sim.run(
            f"curl -sf {company['web']}; echo\n"
            f"curl -s -m 5 --noproxy '*' {company['web']} || echo direct-is-blocked\n"
            f"git clone -q {company['git']} /tmp/repo && cat /tmp/repo/README\n"
            f"docker pull -q {company['image']} >/dev/null && docker run --rm {company['image']} cat /etc/lvx-marker\n"
            'echo "env: $HTTPS_PROXY $no_proxy"\n'
            "echo ---secrets---\n"
            "env; ps -eo args; sudo cat /etc/docker/daemon.json; "
            'sudo sh -c \'for f in /proc/[0-9]*/environ; do tr "\\0" "\\n" < $f; done\' 2>/dev/null || true\n'
            # The password split in two, so that this script and its argv do not hold it whole:
            f"p1={company['password'][:half]}; p2={company['password'][half:]}\n"
            'sudo grep -rIl --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev "$p1$p2" / 2>/dev/null'
            " | head -3 || true\n"
            "echo ---end---\n"
        )
        assert ran.rc == 0, ran.describe()
        out = ran.stdout
        assert "the-company-web" in out and "direct-is-blocked" in out
        assert "from the company's git server" in out and MARKER in out
        assert f"env: {forwarder} localhost,127.0.0.1,{host_settings.subnet}" in out
        found = out.split("---secrets---", 1)[1]
        assert company["password"] not in found, "the proxy password is inside the VM"
        seen = company["log"].read_text()  # squid's access log: ... METHOD URL USER ...
        assert f"GET {company['web']} bot " in seen and "/v2/lvx/proxied/manifests/1 bot " in seen, seen

        # The credentials go wrong: the agent picks the file up, doctor and the job say so.
        config["credentials"].write_text("bot:not-the-password\n")
        refusal = f"{company['proxy']} refused the forwarder's credentials"

        def refused() -> bool:  # once the agent restarted the forwarder (it does not answer meanwhile)
            return refusal in _check_proxy(config["settings"], target=f"{COMPANY}:{REGISTRY_PORT}").detail

        assert poll(refused, 30, interval=0.5), config["agent_log"].read_text()
        failed = sim.run(f"curl -sS -f {company['web']}")
        assert failed.rc == 1, failed.describe()  # the job's own command failed
        assert re.search(r"error: (401|407)", failed.stderr), failed.describe()
    finally:
        config["credentials"].write_text(f"bot:{company['password']}\n")
        sim.cleanup()
    for text in (prepared.stdout, prepared.stderr, ran.stderr, domain_xml, config["agent_log"].read_text()):
        assert company["password"] not in text
    assert leftovers(config["path"]) == {}
