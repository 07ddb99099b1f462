"""Test credentials made on the spot: token files, JWTs and keys, a CA with certificates."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HS_SECRET = b"0123456789abcdef0123456789abcdef-test-secret"
ISSUER = "https://auth.chat.test"
AUDIENCE = "kvservice"


def write_tokens(path: Path, tokens: dict[str, dict[str, Any]]) -> Path:
    """tokens: {plaintext: {name, roles, [prefixes]}} → a tokens_file holding only hashes."""
    entries = [
        {"sha256": hashlib.sha256(token.encode()).hexdigest(), **entry}
        for token, entry in tokens.items()
    ]
    path.write_text(yaml.safe_dump({"tokens": entries}), encoding="utf-8")
    return path


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class JwtKeys:
    """An HS256 secret file and a JWKS file with one RSA and one EC P-256 key."""

    secret_file: Path
    jwks_file: Path
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey

    @classmethod
    def make(cls, directory: Path) -> JwtKeys:
        secret_file = directory / "jwt.secret"
        secret_file.write_bytes(HS_SECRET)
        keys = cls(
            secret_file,
            directory / "jwks.json",
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ec.generate_private_key(ec.SECP256R1()),
        )
        keys.write_jwks()
        return keys

    def write_jwks(self) -> None:
        rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key()))
        ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key()))
        rsa_jwk["kid"], ec_jwk["kid"] = "rsa-1", "ec-1"
        self.jwks_file.write_text(json.dumps({"keys": [rsa_jwk, ec_jwk]}), encoding="utf-8")

    def token(self, sub: str = "alice", *, alg: str = "HS256", **claims: Any) -> str:
        now = int(time.time())
        payload = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 600}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        if alg == "HS256":
            return jwt.encode(payload, HS_SECRET, algorithm="HS256")
        if alg == "RS256":
            return jwt.encode(payload, self.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
        if alg == "ES256":
            return jwt.encode(payload, self.ec, algorithm="ES256", headers={"kid": "ec-1"})
        raise ValueError(alg)

    def alg_none_token(self, sub: str = "alice") -> str:
        now = int(time.time())
        header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        body = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}
        return f"{header}.{b64url(json.dumps(body).encode())}."

    def confused_token(self, sub: str = "alice") -> str:
        """HS256 signed with the RSA *public* key as the HMAC secret (algorithm confusion)."""
        pem = self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        now = int(time.time())
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
        body = b64url(
            json.dumps({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600}).encode()
        )
        signature = hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
        return f"{header}.{body}.{b64url(signature)}"


def tampered(token: str) -> str:
    """The same token with a changed payload and the old signature."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "mallory"
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, key_cert_sign=True, crl_sign=True,
    content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, encipher_only=False, decipher_only=False,
)  # fmt: skip


@dataclass
class Pki:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    directory: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @classmethod
    def make(cls, directory: Path) -> Pki:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvservice test CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        pki = cls(directory, key, cert)
        pki.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return pki

    def issue(
        self, name: str, *, server: bool, node: bool = False, valid_seconds: float = 86_400
    ) -> tuple[Path, Path]:
        """(cert file, key file) of a new leaf certificate signed by the CA. A `node`
        certificate is for both sides (a node presents its serving certificate when
        it calls its peers, so mTLS peers need the client usage too)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        if node or not server:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(seconds=valid_seconds))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_file = self.directory / f"{name}.pem"
        key_file = self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file
