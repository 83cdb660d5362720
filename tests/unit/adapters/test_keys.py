"""executor.adapters.keys: the per-job Docker TLS material is what dockerd and docker-py need."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from executor.adapters.keys import generate_docker_tls


@pytest.fixture(scope="module")
def tls():
    return generate_docker_tls("lvx-job-7", ("192.168.213.10",), ("localhost", "docker"), 7200)


def load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def test_the_server_certificate_names_the_vm_address_and_is_for_servers_only(tls):
    cert = load(tls.server_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.168.213.10")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "docker"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_the_client_certificate_is_for_clients_only(tls):
    usage = load(tls.client_cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_both_are_issued_by_the_jobs_own_ca_and_verify_against_it(tls):
    ca = load(tls.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    for pem in (tls.server_cert, tls.client_cert):
        cert = load(pem)
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)  # raises if the signature does not verify


def test_validity_covers_the_vm_lifetime_and_a_lagging_guest_clock(tls):
    now = datetime.datetime.now(datetime.UTC)
    for pem in (tls.ca_cert, tls.server_cert, tls.client_cert):
        cert = load(pem)
        assert cert.not_valid_before_utc <= now - datetime.timedelta(minutes=4)
        assert (
            now + datetime.timedelta(seconds=7100) < cert.not_valid_after_utc <= now + datetime.timedelta(seconds=7300)
        )


def test_every_job_gets_a_different_ca():
    a = generate_docker_tls("lvx-job-1", ("10.0.0.1",), (), 60)
    b = generate_docker_tls("lvx-job-1", ("10.0.0.1",), (), 60)
    assert a.ca_cert != b.ca_cert and a.server_key != b.server_key
    assert "PRIVATE KEY" in a.client_key and "ENCRYPTED" not in a.client_key
