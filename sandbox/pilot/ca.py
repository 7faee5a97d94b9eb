"""The pilot's own CA and serving certificate (istiod's self-signed root, in miniature).

Kept in the state directory so a restarted pilot serves with the same root: clients hold the
root from ConfigMap istio-ca-root-cert and must keep verifying after a restart.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServingCert:
    root_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def dns_names(namespace: str, revision: str) -> list[str]:
    """istiod's serving SANs (pilot/pkg/bootstrap/server.go getDNSNames) plus the revision."""
    names = [f"istiod.{namespace}.svc", f"istiod-remote.{namespace}.svc", f"istio-pilot.{namespace}.svc"]
    if revision and revision != "default":
        names.append(f"istiod-{revision}.{namespace}.svc")
    return names + ["localhost"]


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    tmp.replace(path)


def load_or_create(state_dir: Path, namespace: str, revision: str) -> ServingCert:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    state_dir.mkdir(parents=True, exist_ok=True)
    ca_key_path, root_path = state_dir / "ca-key.pem", state_dir / "root-cert.pem"
    now = datetime.datetime.now(datetime.UTC)
    pem = serialization.Encoding.PEM
    if ca_key_path.exists() and root_path.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        root = x509.load_pem_x509_certificate(root_path.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
        root = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write(ca_key_path, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        _write(root_path, root.public_bytes(pem))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names(namespace, revision)]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(pem)
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(state_dir / "cert-chain.pem", cert_pem)
    _write(state_dir / "key.pem", key_pem)
    return ServingCert(root_pem=root.public_bytes(pem), cert_pem=cert_pem, key_pem=key_pem)
