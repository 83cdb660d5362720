"""What goes on the per-job seed disk: validated facts and the files rendered from them.

The seed is a NoCloud-compatible ISO9660 image (written by ``executor.adapters.seed_iso``) that
the executor attaches read-only as the VM's second virtio disk (``/dev/vdb``).
It carries the same facts twice:

* ``meta-data``, ``user-data`` (``#cloud-config``) and ``network-config`` (v2) at the root,
  so a stock cloud-init image configures itself from it (NoCloud datasource, label ``cidata``);
* flat files under ``lvx/`` for the project's own image, whose init (``images/rootfs/usr/sbin/lvx-init``)
  parses them strictly and never sources or evaluates them:

  ``lvx/seed.conf``
      ``key=value`` lines, one fact per line, no quoting: ``format=1``, ``hostname=``, ``mac=``,
      ``address=`` (IPv4 CIDR), ``gateway=``, ``dns=`` (repeated, 0..3 times), ``user=``.
  ``lvx/authorized_keys``           the job user's single public key line
  ``lvx/ssh_host_ed25519_key``      the VM's host private key (Rock Ridge mode 0400)
  ``lvx/ssh_host_ed25519_key.pub``  its public key line
  ``lvx/daemon.json``               dockerd configuration (JSON)
  ``lvx/ca.pem``                    extra CA bundle (only present when given)
  ``lvx/docker-{ca,cert,key}.pem``  dockerd's TLS for its TCP port (key mode 0400; when given)

Pure module: no I/O.
Values partly come from untrusted job input, so ``SeedSpec`` validates every field and raises
``ValueError`` with a message naming the field.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from executor.core.naming import USER_NAME

SEED_FORMAT = 1
VOLUME_LABEL = "cidata"
FLAT_DIR = "lvx"

_HOSTNAME_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
# Key types an OpenSSH server accepts for user authentication (no options prefix allowed).
_AUTH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
_COMMENT = re.compile(r"^[\x20-\x7e]{0,256}$")
_PRIV_BEGIN = "-----BEGIN OPENSSH PRIVATE KEY-----"
_PRIV_END = "-----END OPENSSH PRIVATE KEY-----"
_CERT_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----\n((?:[A-Za-z0-9+/=]{1,76}\n)+)-----END CERTIFICATE-----\n?")
_MAX_DAEMON_JSON = 64 * 1024
_MAX_CA_BUNDLE = 1024 * 1024
_KEY_BLOCK = re.compile(r"-----BEGIN PRIVATE KEY-----\n(?:[A-Za-z0-9+/=]{1,76}\n)+-----END PRIVATE KEY-----\n?")


def _ssh_string(buf: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(buf):
        raise ValueError("truncated")
    (n,) = struct.unpack(">I", buf[pos : pos + 4])
    pos += 4
    if pos + n > len(buf):
        raise ValueError("truncated")
    return buf[pos : pos + n], pos + n


def _parse_public_key(line: str, what: str, allowed_types: frozenset[str]) -> bytes:
    """Validate ``type base64 [comment]`` and return the decoded key blob."""
    if not isinstance(line, str):
        raise ValueError(f"{what}: must be a string")
    line = line.strip(" ")
    if any(c in line for c in "\r\n\0\t"):
        raise ValueError(f"{what}: must be a single line without control characters")
    parts = line.split(" ", 2)
    if len(parts) < 2:
        raise ValueError(f"{what}: expected '<type> <base64> [comment]'")
    ktype, b64 = parts[0], parts[1]
    if ktype not in allowed_types:
        raise ValueError(f"{what}: unsupported key type {ktype!r} (options prefixes are not allowed)")
    if len(parts) == 3 and not _COMMENT.match(parts[2]):
        raise ValueError(f"{what}: comment has non-printable characters or is too long")
    if not _B64.match(b64):
        raise ValueError(f"{what}: key data is not base64")
    try:
        blob = base64.b64decode(b64, validate=True)
        inner_type, _ = _ssh_string(blob, 0)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what}: key data is not a valid SSH public key blob") from None
    if inner_type.decode("ascii", "replace") != ktype:
        raise ValueError(f"{what}: key blob type does not match {ktype!r}")
    return blob


def _parse_private_key(text: str) -> tuple[str, bytes]:
    """Validate an unencrypted OpenSSH-format private key; return (normalised text, public blob)."""
    what = "host_key_private"
    if not isinstance(text, str):
        raise ValueError(f"{what}: must be a string")
    lines = text.replace("\r\n", "\n").strip("\n").split("\n")
    if len(lines) < 3 or lines[0] != _PRIV_BEGIN or lines[-1] != _PRIV_END:
        raise ValueError(f"{what}: expected an OpenSSH private key ({_PRIV_BEGIN} ... {_PRIV_END})")
    body = lines[1:-1]
    if not all(_B64.match(ln) and len(ln) <= 76 for ln in body):
        raise ValueError(f"{what}: key body must be base64 lines only")
    try:
        raw = base64.b64decode("".join(body), validate=True)
    except binascii.Error:
        raise ValueError(f"{what}: key body is not valid base64") from None
    magic = b"openssh-key-v1\0"
    if not raw.startswith(magic):
        raise ValueError(f"{what}: not an openssh-key-v1 key")
    try:
        pos = len(magic)
        cipher, pos = _ssh_string(raw, pos)
        _kdf, pos = _ssh_string(raw, pos)
        _kdfopts, pos = _ssh_string(raw, pos)
        (nkeys,) = struct.unpack(">I", raw[pos : pos + 4])
        pos += 4
        pub_blob, pos = _ssh_string(raw, pos)
    except (ValueError, struct.error):
        raise ValueError(f"{what}: truncated key structure") from None
    if cipher != b"none":
        raise ValueError(f"{what}: must not be passphrase-encrypted")
    if nkeys != 1:
        raise ValueError(f"{what}: must hold exactly one key")
    return "\n".join(lines) + "\n", pub_blob


def _validate_ca_bundle(text: str) -> str:
    if not isinstance(text, str):
        raise ValueError("ca_certificates: must be a string")
    if text == "":
        return ""
    if len(text) > _MAX_CA_BUNDLE:
        raise ValueError("ca_certificates: bundle too large")
    norm = text.replace("\r\n", "\n").strip() + "\n"
    blocks = []
    pos = 0
    while pos < len(norm):
        if norm[pos] in " \n":
            pos += 1
            continue
        m = _CERT_BLOCK.match(norm, pos)
        if not m:
            raise ValueError("ca_certificates: must contain only PEM 'CERTIFICATE' blocks")
        blocks.append(m.group(0).rstrip("\n") + "\n")
        pos = m.end()
    if not blocks:
        raise ValueError("ca_certificates: no certificate found")
    return "".join(blocks)


@dataclass(frozen=True)
class SeedSpec:
    hostname: str  # e.g. "lvx-1234"
    address: str  # "192.168.213.10/24" (IPv4 CIDR)
    gateway: str  # "192.168.213.1"
    dns: tuple[str, ...]  # ("192.168.213.1",)
    mac: str  # "52:54:00:ab:cd:ef"
    user: str  # "runner"
    authorized_key: str  # one OpenSSH public key line for the job user
    host_key_private: str  # OpenSSH-format private key (ed25519), the VM's host key
    host_key_public: str  # its public key line
    daemon_json: dict[str, Any] = field(default_factory=dict)  # dockerd daemon.json content
    ca_certificates: str = ""  # optional extra PEM bundle to trust (system + docker)
    # dockerd's TLS for its TCP port: (CA certificate, server certificate, server key), PEM
    docker_tls: tuple[str, str, str] | None = None

    def __post_init__(self) -> None:
        def set_(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # a frozen dataclass normalising its own fields

        # hostname: RFC 1123, lower case, dotted labels, <= 253 chars
        if not isinstance(self.hostname, str) or not self.hostname:
            raise ValueError("hostname: must be a non-empty string")
        hn = self.hostname.lower()
        if len(hn) > 253 or not all(_HOSTNAME_LABEL.match(label) for label in hn.split(".")):
            raise ValueError(
                f"hostname: {self.hostname!r} is not a valid host name "
                "(letters, digits, '-', dot-separated labels of 1-63 chars)"
            )
        set_("hostname", hn)

        # address: IPv4 interface in CIDR notation, a usable host address
        if not isinstance(self.address, str) or "/" not in self.address:
            raise ValueError(f"address: {self.address!r} must be IPv4 CIDR like 192.168.1.10/24")
        try:
            iface = ipaddress.IPv4Interface(self.address)
        except ValueError:
            raise ValueError(f"address: {self.address!r} is not a valid IPv4 CIDR address") from None
        net = iface.network
        if net.prefixlen > 30 or iface.ip in (net.network_address, net.broadcast_address):
            raise ValueError(f"address: {self.address!r} is not a usable host address in its network")
        set_("address", str(iface))

        # gateway: IPv4, inside the address's network, not the address itself
        try:
            gw = ipaddress.IPv4Address(self.gateway)
        except (ValueError, TypeError):
            raise ValueError(f"gateway: {self.gateway!r} is not a valid IPv4 address") from None
        if gw not in net or gw == iface.ip or gw in (net.network_address, net.broadcast_address):
            raise ValueError(f"gateway: {self.gateway} is not a usable address in {net}")
        set_("gateway", str(gw))

        # dns: 0..3 IPv4 addresses
        if isinstance(self.dns, str) or not isinstance(self.dns, (tuple, list)):
            raise ValueError("dns: must be a tuple of IPv4 address strings")
        if len(self.dns) > 3:
            raise ValueError("dns: at most 3 name servers")
        dns = []
        for d in self.dns:
            try:
                dns.append(str(ipaddress.IPv4Address(d)))
            except (ValueError, TypeError):
                raise ValueError(f"dns: {d!r} is not a valid IPv4 address") from None
        set_("dns", tuple(dns))

        # mac: unicast, colon-separated, normalised to lower case
        mac = self.mac.lower() if isinstance(self.mac, str) else ""
        if not _MAC.match(mac):
            raise ValueError(f"mac: {self.mac!r} must look like 52:54:00:ab:cd:ef")
        if int(mac[:2], 16) & 1:
            raise ValueError(f"mac: {self.mac!r} is a multicast address")
        set_("mac", mac)

        # user: POSIX-ish login name, not root
        if not isinstance(self.user, str) or not USER_NAME.match(self.user) or self.user == "root":
            raise ValueError(f"user: {self.user!r} is not a valid non-root user name")

        # keys
        _parse_public_key(self.authorized_key, "authorized_key", _AUTH_KEY_TYPES)
        set_("authorized_key", self.authorized_key.strip(" "))
        host_pub_blob = _parse_public_key(self.host_key_public, "host_key_public", frozenset({"ssh-ed25519"}))
        set_("host_key_public", self.host_key_public.strip(" "))
        priv_text, priv_pub_blob = _parse_private_key(self.host_key_private)
        if priv_pub_blob != host_pub_blob:
            raise ValueError("host_key_public: does not match host_key_private")
        set_("host_key_private", priv_text)

        # daemon_json: a JSON object of bounded size
        if not isinstance(self.daemon_json, dict):
            raise ValueError("daemon_json: must be a dict (a JSON object)")
        try:
            encoded = json.dumps(self.daemon_json, allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"daemon_json: not JSON-serialisable: {exc}") from None
        if len(encoded) > _MAX_DAEMON_JSON:
            raise ValueError("daemon_json: too large")

        set_("ca_certificates", _validate_ca_bundle(self.ca_certificates))

        if self.docker_tls is not None:
            ca, cert, key = self.docker_tls
            if _validate_ca_bundle(ca).count("BEGIN") != 1 or _validate_ca_bundle(cert).count("BEGIN") != 1:
                raise ValueError("docker_tls: the CA and the server certificate must be one PEM certificate each")
            if not isinstance(key, str) or not _KEY_BLOCK.fullmatch(key.replace("\r\n", "\n").strip() + "\n"):
                raise ValueError("docker_tls: the server key must be one unencrypted PEM 'PRIVATE KEY' block")


# --------------------------------------------------------------------------- rendering


def _q(value: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(value)


def _block(text: str, indent: int) -> str:
    pad = " " * indent
    return "".join(pad + line + "\n" for line in text.rstrip("\n").split("\n"))


def render_meta_data(spec: SeedSpec) -> str:
    return f"instance-id: {_q(spec.hostname)}\nlocal-hostname: {_q(spec.hostname)}\n"


def render_user_data(spec: SeedSpec) -> str:
    out = [
        "#cloud-config",
        f"hostname: {_q(spec.hostname)}",
        "preserve_hostname: false",
        "disable_root: true",
        "ssh_pwauth: false",
        "ssh_deletekeys: true",
        "ssh_genkeytypes: []",
        "users:",
        f"  - name: {_q(spec.user)}",
        "    lock_passwd: true",
        "    shell: /bin/bash",
        f"    sudo: {_q('ALL=(ALL) NOPASSWD:ALL')}",
        "    ssh_authorized_keys:",
        f"      - {_q(spec.authorized_key)}",
        "ssh_keys:",
        "  ed25519_private: |",
        _block(spec.host_key_private, 4).rstrip("\n"),
        f"  ed25519_public: {_q(spec.host_key_public)}",
        "write_files:",
        "  - path: /etc/docker/daemon.json",
        '    permissions: "0644"',
        '    owner: "root:root"',
        f"    content: {_q(json.dumps(spec.daemon_json, indent=2, sort_keys=True) + chr(10))}",
    ]
    if spec.ca_certificates:
        out += ["ca_certs:", "  trusted:", "    - |", _block(spec.ca_certificates, 6).rstrip("\n")]
    return "\n".join(out) + "\n"


def render_network_config(spec: SeedSpec) -> str:
    out = [
        "version: 2",
        "ethernets:",
        "  id0:",
        "    match:",
        f"      macaddress: {_q(spec.mac)}",
        f"    addresses: [{_q(spec.address)}]",
        "    routes:",
        f"      - to: {_q('0.0.0.0/0')}",
        f"        via: {_q(spec.gateway)}",
    ]
    if spec.dns:
        out += ["    nameservers:", f"      addresses: [{', '.join(_q(d) for d in spec.dns)}]"]
    return "\n".join(out) + "\n"


def render_seed_conf(spec: SeedSpec) -> str:
    lines = [
        f"format={SEED_FORMAT}",
        f"hostname={spec.hostname}",
        f"mac={spec.mac}",
        f"address={spec.address}",
        f"gateway={spec.gateway}",
        *(f"dns={d}" for d in spec.dns),
        f"user={spec.user}",
    ]
    return "\n".join(lines) + "\n"


def seed_files(spec: SeedSpec) -> list[tuple[str, bytes, int]]:
    """Every file of the seed as (path, content, mode). Directories are implied."""
    files: list[tuple[str, bytes, int]] = [
        ("meta-data", render_meta_data(spec).encode(), 0o444),
        ("user-data", render_user_data(spec).encode(), 0o444),
        ("network-config", render_network_config(spec).encode(), 0o444),
        (f"{FLAT_DIR}/seed.conf", render_seed_conf(spec).encode(), 0o444),
        (f"{FLAT_DIR}/authorized_keys", (spec.authorized_key + "\n").encode(), 0o444),
        (f"{FLAT_DIR}/ssh_host_ed25519_key", spec.host_key_private.encode(), 0o400),
        (f"{FLAT_DIR}/ssh_host_ed25519_key.pub", (spec.host_key_public + "\n").encode(), 0o444),
        (
            f"{FLAT_DIR}/daemon.json",
            (json.dumps(spec.daemon_json, indent=2, sort_keys=True) + "\n").encode(),
            0o444,
        ),
    ]
    if spec.ca_certificates:
        files.append((f"{FLAT_DIR}/ca.pem", spec.ca_certificates.encode(), 0o444))
    if spec.docker_tls is not None:
        ca, cert, key = spec.docker_tls
        files.append((f"{FLAT_DIR}/docker-ca.pem", ca.encode(), 0o444))
        files.append((f"{FLAT_DIR}/docker-cert.pem", cert.encode(), 0o444))
        files.append((f"{FLAT_DIR}/docker-key.pem", key.encode(), 0o400))
    return files
