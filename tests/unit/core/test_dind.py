"""core.dind: which services are dind, their TLS directory, hosts entries, proxies, certificates."""

from __future__ import annotations

import io
import tarfile

import pytest

from executor.core import dind
from executor.core.images import ServiceSpec, service_aliases


def service(name, alias="", variables=()):
    return ServiceSpec(name, tuple(alias.split()) if alias else (), None, None, tuple(variables))


@pytest.mark.parametrize(
    ("name", "is_dind"),
    [
        ("docker:dind", True),
        ("docker:27-dind", True),
        ("docker:27.3.1-dind-rootless", True),
        ("docker.io/library/docker:dind", True),
        ("docker:27-cli", False),
        ("docker", False),
        ("registry.example.com/docker:dind", False),  # not the Docker Hub image
        ("postgres:16", False),
    ],
)
def test_default_dind_images(name, is_dind):
    assert dind.is_dind(name, dind.DEFAULT_DIND_IMAGES) is is_dind


def test_no_patterns_means_no_dind():
    assert dind.is_dind("docker:dind", ()) is False


def test_dind_services_with_their_aliases_and_certdir():
    services = [service("postgres:16"), service("docker:27-dind", "engine")]
    aliases, _ = service_aliases(services)
    found = dind.dind_services(services, aliases, dind.DEFAULT_DIND_IMAGES, [("DOCKER_TLS_CERTDIR", "/certs/")])
    assert found == [dind.DindService(1, "docker:27-dind", ("docker", "engine"), "/certs")]


@pytest.mark.parametrize(
    ("job", "svc", "expected"),
    [
        ([], [], "/certs"),  # the dind image's own default
        ([("DOCKER_TLS_CERTDIR", "")], [], ""),
        ([("DOCKER_TLS_CERTDIR", "/certs")], [("DOCKER_TLS_CERTDIR", "")], ""),  # the service's wins
        ([("DOCKER_TLS_CERTDIR", "/my-certs/x")], [], "/my-certs/x"),
    ],
)
def test_certdir(job, svc, expected):
    assert dind.certdir(job, svc) == expected


@pytest.mark.parametrize("bad", ["certs", "/certs/../etc", "/c:/x", "/c d", "/certs;rm -rf /", "/"])
def test_a_certdir_that_is_not_a_plain_absolute_path_is_refused(bad):
    with pytest.raises(dind.DindError, match="DOCKER_TLS_CERTDIR"):
        dind.certdir([("DOCKER_TLS_CERTDIR", bad)], [])


def test_hosts_point_every_alias_at_the_gateway_which_must_be_an_address():
    served = [dind.DindService(0, "docker:dind", ("docker", "engine"), "/certs")]
    assert dind.host_entries(served, "172.18.0.1") == {"docker": "172.18.0.1", "engine": "172.18.0.1"}
    with pytest.raises(ValueError):
        dind.host_entries(served, "172.18.0.1; rm -rf /")
    assert dind.tls_names(served) == ("docker", "localhost", "engine")


def test_proxies_bind_the_gateway_only_and_tls_verifies_clients():
    plain, tls = dind.proxy_commands("172.18.0.1", tls=True)
    assert plain[-2:] == ["TCP-LISTEN:2375,bind=172.18.0.1,reuseaddr,fork", "UNIX-CONNECT:/var/run/docker.sock"]
    assert tls[-2].startswith("OPENSSL-LISTEN:2376,bind=172.18.0.1,") and "verify=1" in tls[-2]
    assert dind.proxy_commands("172.18.0.1", tls=False) == [plain]
    with pytest.raises(ValueError):
        dind.proxy_commands("0.0.0.0,fork EXEC:sh", tls=False)


def test_cert_archive_has_the_dind_layout_and_keeps_the_server_key_private():
    data = dind.cert_archive("CA", "SRV", "SRVKEY", "CLI", "CLIKEY")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        content = {name: tar.extractfile(m).read().decode() for name, m in members.items()}
    assert content == {
        "ca/cert.pem": "CA",
        "server/ca.pem": "CA",
        "server/cert.pem": "SRV",
        "server/key.pem": "SRVKEY",
        "client/ca.pem": "CA",
        "client/cert.pem": "CLI",
        "client/key.pem": "CLIKEY",
    }
    assert members["server/key.pem"].mode == 0o600 and members["client/key.pem"].mode == 0o644
