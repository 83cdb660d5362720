"""executor.adapters.seed_iso: the per-job NoCloud seed ISO, read back with pycdlib."""

from __future__ import annotations

import io
import json
import re
import stat

import pycdlib
import pytest

from executor.adapters.seed_iso import build_seed_iso
from executor.core.seedspec import SeedSpec
from tests.unit.core.test_seedspec import CA_PEM, CLIENT_PUB, HOST_PRIV, HOST_PUB, make_spec, yaml


class ParsedIso:
    def __init__(self, data: bytes):
        self.iso = pycdlib.PyCdlib()
        self.iso.open_fp(io.BytesIO(data))

    def read(self, path: str) -> bytes:
        out = io.BytesIO()
        self.iso.get_file_from_iso_fp(out, rr_path="/" + path)
        return out.getvalue()

    def read_joliet(self, path: str) -> bytes:
        out = io.BytesIO()
        self.iso.get_file_from_iso_fp(out, joliet_path="/" + path)
        return out.getvalue()

    def mode(self, path: str) -> int:
        rec = self.iso.get_record(rr_path="/" + path)
        return rec.rock_ridge.get_file_mode()

    def names(self, directory: str = "/") -> set[str]:
        names = set()
        for child in self.iso.list_children(rr_path=directory):
            if child.is_dot() or child.is_dotdot():
                continue
            names.add(child.rock_ridge.name().decode())
        return names


@pytest.fixture
def parsed():
    spec = make_spec(ca_certificates=CA_PEM)
    p = ParsedIso(build_seed_iso(spec))
    yield spec, p
    p.iso.close()


# ---------------------------------------------------------------- ISO structure / content


def test_volume_label_is_cidata(parsed):
    _, p = parsed
    assert p.iso.pvd.volume_identifier.decode().strip() == "cidata"
    assert p.iso.joliet_vd is not None


def test_rock_ridge_names_are_kept(parsed):
    _, p = parsed
    assert p.names("/") == {"meta-data", "user-data", "network-config", "lvx"}
    assert p.names("/lvx") == {
        "seed.conf",
        "authorized_keys",
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
        "daemon.json",
        "ca.pem",
    }
    # Joliet carries the same long names (for readers without Rock Ridge)
    assert p.read_joliet("meta-data") == p.read("meta-data")


def test_private_key_is_mode_0400_and_others_world_readable(parsed):
    _, p = parsed
    mode = p.mode("lvx/ssh_host_ed25519_key")
    assert stat.S_ISREG(mode)
    assert stat.S_IMODE(mode) == 0o400
    assert stat.S_IMODE(p.mode("lvx/seed.conf")) == 0o444
    assert stat.S_IMODE(p.mode("lvx/ssh_host_ed25519_key.pub")) == 0o444


def test_flat_files_content(parsed):
    spec, p = parsed
    assert p.read("lvx/seed.conf").decode() == (
        "format=1\n"
        "hostname=lvx-1234\n"
        "mac=52:54:00:ab:cd:ef\n"
        "address=192.168.213.10/24\n"
        "gateway=192.168.213.1\n"
        "dns=192.168.213.1\n"
        "user=runner\n"
    )
    assert p.read("lvx/authorized_keys").decode() == CLIENT_PUB + " job-1234\n"
    assert p.read("lvx/ssh_host_ed25519_key").decode() == HOST_PRIV
    assert p.read("lvx/ssh_host_ed25519_key.pub").decode() == HOST_PUB + "\n"
    assert json.loads(p.read("lvx/daemon.json")) == spec.daemon_json
    assert p.read("lvx/ca.pem").decode() == CA_PEM


def test_seed_conf_is_strict_key_value(parsed):
    _, p = parsed
    for line in p.read("lvx/seed.conf").decode().splitlines():
        assert re.fullmatch(r"[a-z]+=[A-Za-z0-9.:/_-]+", line), line


def test_no_ca_file_without_bundle():
    p = ParsedIso(build_seed_iso(make_spec()))
    assert "ca.pem" not in p.names("/lvx")
    assert "ca_certs" not in p.read("user-data").decode()


def test_meta_data(parsed):
    _, p = parsed
    text = p.read("meta-data").decode()
    assert 'instance-id: "lvx-1234"' in text
    assert 'local-hostname: "lvx-1234"' in text


def _check_user_data(doc: dict, spec: SeedSpec) -> None:
    assert doc["hostname"] == spec.hostname
    assert doc["ssh_pwauth"] is False
    (user,) = doc["users"]
    assert user["name"] == "runner"
    assert user["lock_passwd"] is True
    assert user["ssh_authorized_keys"] == [spec.authorized_key]
    assert doc["ssh_keys"]["ed25519_private"] == HOST_PRIV
    assert doc["ssh_keys"]["ed25519_public"] == HOST_PUB
    (wf,) = doc["write_files"]
    assert wf["path"] == "/etc/docker/daemon.json"
    assert json.loads(wf["content"]) == spec.daemon_json


def test_user_data_is_cloud_config(parsed):
    spec, p = parsed
    text = p.read("user-data").decode()
    assert text.startswith("#cloud-config\n")
    assert "\t" not in text
    if yaml is not None:
        doc = yaml.safe_load(text)
        _check_user_data(doc, spec)
        assert doc["ca_certs"]["trusted"] == [CA_PEM]
    else:
        # no PyYAML: check the structure line by line
        lines = text.splitlines()
        assert '  - name: "runner"' in lines
        assert f'      - "{spec.authorized_key}"' in lines
        assert "  ed25519_private: |" in lines
        i = lines.index("  ed25519_private: |")
        key_lines = HOST_PRIV.rstrip("\n").split("\n")
        assert lines[i + 1 : i + 1 + len(key_lines)] == ["    " + k for k in key_lines]
        assert f'  ed25519_public: "{HOST_PUB}"' in lines
        # every top-level key is a plain identifier followed by ':'
        for line in lines[1:]:
            if line and not line.startswith(" "):
                assert re.fullmatch(r"[a-z_]+:( .*)?", line), line


def test_network_config_v2_static(parsed):
    _spec, p = parsed
    text = p.read("network-config").decode()
    if yaml is not None:
        doc = yaml.safe_load(text)
        assert doc["version"] == 2
        eth = doc["ethernets"]["id0"]
        assert eth["match"]["macaddress"] == "52:54:00:ab:cd:ef"
        assert eth["addresses"] == ["192.168.213.10/24"]
        assert eth["routes"] == [{"to": "0.0.0.0/0", "via": "192.168.213.1"}]
        assert eth["nameservers"]["addresses"] == ["192.168.213.1"]
    else:
        assert text.splitlines() == [
            "version: 2",
            "ethernets:",
            "  id0:",
            "    match:",
            '      macaddress: "52:54:00:ab:cd:ef"',
            '    addresses: ["192.168.213.10/24"]',
            "    routes:",
            '      - to: "0.0.0.0/0"',
            '        via: "192.168.213.1"',
            "    nameservers:",
            '      addresses: ["192.168.213.1"]',
        ]


def test_network_config_without_dns_has_no_nameservers():
    p = ParsedIso(build_seed_iso(make_spec(dns=())))
    assert "nameservers" not in p.read("network-config").decode()
    assert "dns=" not in p.read("lvx/seed.conf").decode()


def test_multiple_dns_lines():
    p = ParsedIso(build_seed_iso(make_spec(dns=("192.168.213.1", "9.9.9.9"))))
    conf = p.read("lvx/seed.conf").decode().splitlines()
    assert [line for line in conf if line.startswith("dns=")] == ["dns=192.168.213.1", "dns=9.9.9.9"]


def test_normalisation():
    spec = make_spec(hostname="LVX-1", mac="52:54:00:AB:CD:EF", host_key_private=HOST_PRIV.rstrip("\n"))
    assert spec.hostname == "lvx-1"
    assert spec.mac == "52:54:00:ab:cd:ef"
    assert spec.host_key_private.endswith("-----END OPENSSH PRIVATE KEY-----\n")


def test_docker_tls_files_are_on_the_seed_with_the_key_root_only():
    from tests.unit.core.test_seedspec import _docker_tls

    ca, cert, key = _docker_tls()
    p = ParsedIso(build_seed_iso(make_spec(docker_tls=(ca, cert, key))))
    assert p.read("lvx/docker-ca.pem").decode() == ca
    assert p.read("lvx/docker-cert.pem").decode() == cert
    assert p.read("lvx/docker-key.pem").decode() == key
    assert stat.S_IMODE(p.mode("lvx/docker-key.pem")) == 0o400
    assert stat.S_IMODE(p.mode("lvx/docker-cert.pem")) == 0o444
    p.iso.close()
