"""Real X.509 certificates for TLS tests, made with the openssl command line in a temporary folder."""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


def openssl(*args: str, cwd: Path) -> str:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: TLS tests make their certificates with it")
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path

    @property
    def subject(self) -> str:
        """RFC 4514 form, as gRPC reports it (`CN=alice,O=acme`)."""
        return openssl("x509", "-in", str(self.cert), "-noout", "-subject", "-nameopt", "RFC2253",
                       cwd=self.cert.parent).strip().removeprefix("subject=")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(self.cert.read_text())).hexdigest()

    def pair(self) -> tuple[bytes, bytes]:
        """(certificate chain, private key) as gRPC's channel credentials take them."""
        return self.cert.read_bytes(), self.key.read_bytes()


class Pki:
    """CAs and the certificates they issue, all under `folder` (EC P-256, valid for two days)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def ca(self, name: str, subject: str | None = None) -> Issued:
        issued = Issued(self.folder / f"{name}.pem", self.folder / f"{name}.key")
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                "-keyout", issued.key.name, "-out", issued.cert.name, "-subj", subject or f"/CN={name}",
                cwd=self.folder)
        return issued

    def issue(self, name: str, ca: Issued, subject: str, *, server: bool = False) -> Issued:
        """A leaf signed by `ca`: a server certificate for 127.0.0.1 and localhost, or a client certificate."""
        issued = Issued(self.folder / f"{name}.pem", self.folder / f"{name}.key")
        extensions = self.folder / f"{name}.ext"
        extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n" if server
                              else "extendedKeyUsage=clientAuth\n")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", issued.key.name,
                "-out", f"{name}.csr", "-subj", subject, cwd=self.folder)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", ca.cert.name, "-CAkey", ca.key.name,
                "-CAcreateserial", "-days", "2", "-out", issued.cert.name, "-extfile", extensions.name,
                cwd=self.folder)
        return issued
