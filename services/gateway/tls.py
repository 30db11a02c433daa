"""TLS at the gateway's public door: its certificate, key and client CA, re-read when they change on disk.

The files are checked when the gateway starts (a certificate, its own private key, a CA certificate), so a bad
one stops it in one line. Afterwards gRPC asks before each TLS handshake whether the configuration changed
(`grpc.dynamic_ssl_server_credentials`): at most once a second the files' modification times, sizes and inodes
are compared with those last loaded, and new files are loaded once they check out as a whole. Connections that
are open keep the certificate they shook hands with; new ones get the new files. A change that does not check
out (a certificate written before its key) keeps the files in use, with a warning, until a later change does.
Replacing files by renaming new ones into place (as cert-manager, certbot and Kubernetes secret mounts do)
never shows a half-written file.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("lmesh.gateway.tls")

CHECK_INTERVAL_S = 1.0


class TlsFilesError(ValueError):
    """A TLS file that cannot be served; the message names the setting and says why."""


@dataclass(frozen=True)
class TlsMaterial:
    """One consistent set of the files' contents."""

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None
    generation: int


Stamp = tuple[tuple[int, int, int, int], ...]


class PublicTls:
    """The gateway's TLS files and the server credentials built from them (see the module's docstring).

    `labels` name the files in messages: {"cert": "--tls-cert (LMESH_TLS_CERT)", "key": ..., "client_ca": ...}."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None, *,
                 labels: dict[str, str] | None = None, check_interval_s: float = CHECK_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cert, self.key, self.client_ca = Path(cert), Path(key), Path(client_ca) if client_ca else None
        self._labels = {"cert": str(self.cert), "key": str(self.key), "client_ca": str(self.client_ca),
                        **(labels or {})}
        self._interval = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        stamp = self._stamp()
        self._material = self._load(generation=1)
        if self._stamp() != stamp:
            raise TlsFilesError(f"{self._labels['cert']} or {self._labels['key']} changed while being read; "
                                "start again")
        self._seen = stamp
        self._checked_at = clock()

    @property
    def client_auth(self) -> bool:
        """Whether a client CA is configured (the client-certificate port is served)."""
        return self.client_ca is not None

    @property
    def material(self) -> TlsMaterial:
        """The files in use, after looking for a change (at most once per check interval)."""
        with self._lock:
            now = self._clock()
            if now - self._checked_at >= self._interval:
                self._checked_at = now
                self._reload_if_changed()
            return self._material

    def server_credentials(self, *, client_auth: bool = False) -> grpc.ServerCredentials:
        """Credentials that follow the files: server-only TLS, or (`client_auth`) TLS that requires a client
        certificate chaining to the client CA."""
        if client_auth and self.client_ca is None:
            raise ValueError("client certificates need a client CA")
        served = self.material

        def configuration(material: TlsMaterial) -> Any:
            return grpc.ssl_server_certificate_configuration(
                [(material.key_pem, material.cert_pem)], material.client_ca_pem if client_auth else None)

        def fetch() -> Any:
            # gRPC calls this before each handshake; None keeps the configuration it has.
            nonlocal served
            try:
                current = self.material
                if current.generation == served.generation:
                    return None
                new = configuration(current)
            except Exception:  # a bug here must not fail handshakes: keep serving what works
                log.exception("could not build the new TLS configuration; keeping the one in use")
                return None
            served = current
            return new

        return grpc.dynamic_ssl_server_credentials(configuration(served), fetch,
                                                   require_client_authentication=client_auth)

    # -- loading --------------------------------------------------------------------------------------------

    def _paths(self) -> list[Path]:
        return [self.cert, self.key, *([self.client_ca] if self.client_ca else [])]

    def _stamp(self) -> Stamp:
        stamps = []
        for path in self._paths():
            try:
                status = os.stat(path)
            except OSError:
                stamps.append((0, 0, 0, 0))
                continue
            stamps.append((status.st_mtime_ns, status.st_size, status.st_ino, status.st_dev))
        return tuple(stamps)

    def _reload_if_changed(self) -> None:
        stamp = self._stamp()
        if stamp == self._seen:
            return
        try:
            material = self._load(self._material.generation + 1)
        except TlsFilesError as exc:
            if self._stamp() == stamp:  # not caught mid-write: wait for the next change
                self._seen = stamp
                log.warning("keeping the TLS certificate in use: %s", exc)
            return
        if self._stamp() != stamp:  # changed while read: read again at the next check
            return
        previous = self._material
        changed = [self._labels[name] for name, old, new in (
            ("cert", previous.cert_pem, material.cert_pem), ("key", previous.key_pem, material.key_pem),
            ("client_ca", previous.client_ca_pem, material.client_ca_pem)) if old != new]
        self._seen = stamp
        if changed:  # else only touched: the same files, no new configuration
            self._material = material
            log.info("loaded the changed TLS files (%s): new connections use them", ", ".join(changed))

    def _load(self, generation: int) -> TlsMaterial:
        labels = self._labels
        cert = self._read(self.cert, "cert")
        key = self._read(self.key, "key")
        client_ca = self._read(self.client_ca, "client_ca") if self.client_ca else None
        if not _holds_certificate(cert):
            raise TlsFilesError(f"{labels['cert']}: {self.cert} holds no PEM certificate")
        if b"PRIVATE KEY-----" not in key:
            raise TlsFilesError(f"{labels['key']}: {self.key} holds no PEM private key")
        if b"ENCRYPTED" in key:
            raise TlsFilesError(f"{labels['key']}: {self.key} is encrypted; give the key unencrypted (readable by "
                                "this user only): gRPC cannot ask for a passphrase")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key, password=lambda: b"")
        except ssl.SSLError as exc:
            if getattr(exc, "reason", "") == "KEY_VALUES_MISMATCH":
                raise TlsFilesError(f"{labels['key']}: {self.key} is not the private key of the certificate in "
                                    f"{self.cert} ({labels['cert']})") from None
            raise TlsFilesError(f"{labels['cert']} and {labels['key']}: {self.cert} and {self.key} are not a "
                                f"certificate chain and its private key in PEM ({exc.reason or exc})") from None
        if client_ca is not None and not _holds_certificate(client_ca):
            raise TlsFilesError(f"{labels['client_ca']}: {self.client_ca} holds no PEM CA certificate")
        return TlsMaterial(cert, key, client_ca, generation)

    def _read(self, path: Path, name: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise TlsFilesError(f"{self._labels[name]}: cannot read {path} "
                                f"({(exc.strerror or type(exc).__name__).lower()})") from None


def _holds_certificate(pem: bytes) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError):
        return False
    return True
