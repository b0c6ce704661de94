"""Certificates and keys for a federation you run yourself (a test federation, or one whose
parties trust your CA): a local CA, the SuperLink's TLS certificate signed by it, and one
EC key pair per party for Flower's SuperNode authentication. `fedllm certs OUT --host H
--parties N` writes them; in production use your organisation's CA instead."""
from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def _write(path: Path, data: bytes, private: bool) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _certificate(subject: str, issuer: str, public_key, signer, ca: bool, hosts: list[str] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_certificates(out: Path, hosts: list[str], parties: int) -> Path:
    """out/ca.crt and out/signing.pub (give both to every party), out/server.{pem,key} (the
    SuperLink's), out/signing.key (signs the app `fedllm serve` submits), out/party_<i>{,.pub}
    (party i's SuperNode key pair; the server registers the .pub). The folder is private (0700)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("fedllm local CA", "fedllm local CA", ca_key.public_key(), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _certificate(hosts[0], "fedllm local CA", server_key.public_key(), ca_key, ca=False, hosts=hosts)
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "server.pem", server.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "server.key", _pem_key(server_key), private=True)
    write_signing_key(out)
    for i in range(parties):
        key = ec.generate_private_key(ec.SECP384R1())  # a NIST curve, as SuperNode authentication asks
        _write(out / f"party_{i}", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption()), private=True)
        _write(out / f"party_{i}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                     serialization.PublicFormat.OpenSSH), private=False)
    return out


def write_signing_key(out: Path) -> None:
    """out/signing.key and out/signing.pub: the Ed25519 pair the served app is signed with."""
    key = ed25519.Ed25519PrivateKey.generate()
    _write(Path(out) / "signing.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                        serialization.NoEncryption()), private=True)
    _write(Path(out) / "signing.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                  serialization.PublicFormat.OpenSSH), private=False)
