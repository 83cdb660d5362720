"""The only module that imports cryptography: per-job SSH key pairs and Docker TLS certificates.

Every job gets two fresh ed25519 pairs: the client key the executor logs in with, and the VM's
host key, which the executor pins; and a CA of its own with a certificate for the VM's dockerd
and one for the executor, so the daemon's TCP port answers no one else. None outlives the job.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def generate_ed25519(comment: str) -> tuple[str, str]:
    """Return (private key in OpenSSH format, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode("ascii")
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
    )
    return private, f"{public} {comment}"


@dataclass(frozen=True)
class DockerTLS:
    """A job's Docker TLS material, PEM text: its own CA, the daemon's certificate (for the
    VM's address) and the executor's client certificate. The CA key is not kept."""

    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    lifetime: datetime.timedelta,
    *,
    ca: bool = False,
    server_names: tuple[str, ...] = (),
    server_ips: tuple[str, ...] = (),
    client: bool = False,
) -> str:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # guest clocks may lag a little
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in server_ips]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def generate_docker_tls(
    job: str, server_ips: tuple[str, ...], server_names: tuple[str, ...], lifetime_s: float
) -> DockerTLS:
    """Fresh TLS material for one job's dockerd: valid for `lifetime_s` (the VM's), for the
    given addresses and names, issued by a CA that exists only for this job."""
    lifetime = datetime.timedelta(seconds=lifetime_s)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = f"{job} docker CA"
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    return DockerTLS(
        ca_cert=_certificate(ca_name, ca_key, ca_name, ca_key, lifetime, ca=True),
        server_cert=_certificate(
            f"{job} dockerd", server_key, ca_name, ca_key, lifetime, server_names=server_names, server_ips=server_ips
        ),
        server_key=_pem_key(server_key),
        client_cert=_certificate(f"{job} client", client_key, ca_name, ca_key, lifetime, client=True),
        client_key=_pem_key(client_key),
    )
