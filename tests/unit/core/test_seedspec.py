"""executor.core.seedspec: validation of the seed's facts (the ISO itself: adapters/test_seed_iso)."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from executor.core.seedspec import SeedSpec

try:  # optional: the package itself never depends on PyYAML
    import yaml
except ImportError:  # pragma: no cover - depends on the environment
    yaml = None


def _keypair() -> tuple[str, str]:
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()).decode()
    pub = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return priv, pub


HOST_PRIV, HOST_PUB = _keypair()
_, CLIENT_PUB = _keypair()
OTHER_PRIV, OTHER_PUB = _keypair()

CA_PEM = (
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBszCCAVmgAwIBAgIUQ2xhdWRlVGVzdENBMB4XDTI0MDEwMTAwMDAwMFoXDTM0\n"
    "MDEwMTAwMDAwMFowEjEQMA4GA1UEAwwHdGVzdC1jYTBZMBMGByqGSM49AgEGCCqG\n"
    "-----END CERTIFICATE-----\n"
)


def make_spec(**overrides) -> SeedSpec:
    fields = {
        "hostname": "lvx-1234",
        "address": "192.168.213.10/24",
        "gateway": "192.168.213.1",
        "dns": ("192.168.213.1",),
        "mac": "52:54:00:AB:cd:ef",
        "user": "runner",
        "authorized_key": CLIENT_PUB + " job-1234",
        "host_key_private": HOST_PRIV,
        "host_key_public": HOST_PUB,
        "daemon_json": {
            "registry-mirrors": ["http://192.168.213.1:5000"],
            "insecure-registries": ["192.168.213.1:5000"],
        },
    }
    fields.update(overrides)
    return SeedSpec(**fields)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hostname", "", "hostname"),
        ("hostname", "bad_host", "hostname"),
        ("hostname", "-lead", "hostname"),
        ("hostname", "a" * 64, "hostname"),
        ("hostname", "x;reboot", "hostname"),
        ("hostname", "lvx\n1", "hostname"),
        ("address", "192.168.213.10", "address"),
        ("address", "192.168.213.300/24", "address"),
        ("address", "192.168.213.0/24", "address"),
        ("address", "192.168.213.255/24", "address"),
        ("address", "fd00::5/64", "address"),
        ("address", "192.168.213.10/24\ndns=1.1.1.1", "address"),
        ("gateway", "10.0.0.1", "gateway"),
        ("gateway", "192.168.213.10", "gateway"),
        ("gateway", "gw", "gateway"),
        ("dns", "192.168.213.1", "dns"),
        ("dns", ("1.1.1.1", "not-an-ip"), "dns"),
        ("dns", ("1.1.1.1",) * 4, "dns"),
        ("mac", "52:54:00:ab:cd", "mac"),
        ("mac", "52-54-00-ab-cd-ef", "mac"),
        ("mac", "53:54:00:ab:cd:ef", "multicast"),
        ("user", "root", "user"),
        ("user", "Runner", "user"),
        ("user", "run ner", "user"),
        ("user", "runner\nroot", "user"),
        ("authorized_key", CLIENT_PUB + "\n" + OTHER_PUB, "single line"),
        ("authorized_key", 'command="sh" ' + CLIENT_PUB, "key type"),
        ("authorized_key", "ssh-ed25519 !!!!", "base64"),
        ("authorized_key", "ssh-rsa " + CLIENT_PUB.split()[1], "does not match"),
        ("authorized_key", "ssh-ed25519", "expected"),
        ("authorized_key", CLIENT_PUB + " comment\x07bell", "control|non-printable"),
        ("host_key_public", OTHER_PUB, "does not match host_key_private"),
        ("host_key_public", HOST_PUB + "\nssh-ed25519 AAAA", "single line"),
        ("host_key_private", "not a key", "OpenSSH private key"),
        ("host_key_private", OTHER_PRIV.replace("b3BlbnNzaC1rZXktdjE", "AAAAAAAAAAAAAAAAAAA"), "openssh-key-v1"),
        ("host_key_private", HOST_PRIV.replace("\n", "\n!", 1), "base64"),
        ("daemon_json", ["not", "a", "dict"], "daemon_json"),
        ("daemon_json", {"x": float("nan")}, "daemon_json"),
        ("daemon_json", {"x": object()}, "daemon_json"),
        ("ca_certificates", "garbage", "ca_certificates"),
        ("ca_certificates", CA_PEM + "trailing text\n", "ca_certificates"),
        ("ca_certificates", CA_PEM.replace("CERTIFICATE", "PRIVATE KEY"), "ca_certificates"),
    ],
)
def test_validation_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        make_spec(**{field: value})


def test_encrypted_private_key_rejected():
    from cryptography.hazmat.primitives.serialization import BestAvailableEncryption

    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, BestAvailableEncryption(b"pw")).decode()
    pub = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    with pytest.raises(ValueError, match="encrypted"):
        make_spec(host_key_private=priv, host_key_public=pub)


def test_spec_is_frozen():
    spec = make_spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.hostname = "other"  # type: ignore[misc]


def _docker_tls():
    from executor.adapters.keys import generate_docker_tls

    tls = generate_docker_tls("lvx-1234", ("192.168.213.10",), ("localhost",), 3600)
    return tls.ca_cert, tls.server_cert, tls.server_key


def test_docker_tls_is_validated():
    ca, cert, key = _docker_tls()
    assert make_spec(docker_tls=(ca, cert, key)).docker_tls == (ca, cert, key)
    with pytest.raises(ValueError, match="one PEM certificate each"):
        make_spec(docker_tls=(ca + cert, cert, key))
    with pytest.raises(ValueError, match="PRIVATE KEY"):
        make_spec(docker_tls=(ca, cert, HOST_PRIV))
    with pytest.raises(ValueError, match="PRIVATE KEY"):
        make_spec(docker_tls=(ca, cert, key.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY")))
