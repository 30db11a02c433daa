"""Who calls the public API: the bearer API key a call carries, else the client certificate its connection
presented on the gateway's client-certificate port (`--tls-client-ca`), which gRPC verified during the handshake.

Policy turns either into a principal: a certificate authenticates as the active key bound to its fingerprint or
subject. Only the subject and the SHA-256 fingerprint leave this module; the certificate itself is never logged,
put in a span or sent on.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from lmesh.policy.v1 import policy_pb2

from services.common.errors import Unauthenticated

MISSING_KEY = "missing API key: send metadata 'authorization: Bearer <key>'"


@dataclass(frozen=True)
class Credential:
    """One of an API key or a verified client certificate, as policy's Authenticate and Authorize take it."""

    api_key: str = ""
    client_certificate: policy_pb2.ClientCertificate | None = None

    @property
    def kind(self) -> str:
        """`api_key` or `client_certificate` (safe to record: says how, not who)."""
        return "client_certificate" if self.client_certificate is not None else "api_key"

    def fields(self) -> dict[str, Any]:
        """The request fields that carry it (the `credential` oneof of AuthenticateRequest and AuthorizeRequest)."""
        if self.client_certificate is not None:
            return {"client_certificate": self.client_certificate}
        return {"api_key": self.api_key}


def credential_fields(credential: Credential | str) -> dict[str, Any]:
    """A credential's request fields; a plain string is an API key."""
    return credential.fields() if isinstance(credential, Credential) else {"api_key": credential}


def bearer_key(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            break
    raise Unauthenticated(MISSING_KEY)


def verified_client_certificate(context: grpc.aio.ServicerContext) -> policy_pb2.ClientCertificate | None:
    """The subject and fingerprint of the client certificate the call's connection presented, or None.

    gRPC reports a peer certificate (`x509_pem_cert`) only where the port asked for one, and the gateway asks
    only on its client-certificate port, which requires a certificate chaining to --tls-client-ca: a certificate
    seen here is a verified one."""
    try:
        auth = context.auth_context()
    except Exception:  # a context without a transport
        return None
    pems = auth.get("x509_pem_cert") or ()
    if not pems:
        return None
    pem = pems[0].decode("ascii", "replace") if isinstance(pems[0], bytes) else str(pems[0])
    try:
        der = ssl.PEM_cert_to_DER_cert(pem)
    except ValueError:
        return None
    subjects = auth.get("x509_subject") or (b"",)
    subject = subjects[0].decode("utf-8", "replace") if isinstance(subjects[0], bytes) else str(subjects[0])
    return policy_pb2.ClientCertificate(subject=subject, sha256_fingerprint=hashlib.sha256(der).hexdigest())


def caller_credential(context: grpc.aio.ServicerContext) -> Credential:
    """The call's credential: its `authorization` metadata when it sends one (a bearer key, checked as before),
    else its verified client certificate; UNAUTHENTICATED when it has neither."""
    metadata = context.invocation_metadata()
    if not any(key.lower() == "authorization" for key, _ in metadata or ()):
        certificate = verified_client_certificate(context)
        if certificate is not None:
            return Credential(client_certificate=certificate)
    return Credential(api_key=bearer_key(metadata))


def credential_digest(credential: Credential | str) -> bytes:
    """What the gateway knows a credential by in memory: a SHA-256 digest of it, never the key itself."""
    request = policy_pb2.AuthenticateRequest(**credential_fields(credential))
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


DEFAULT_PRINCIPAL_TTL_S = 2.0
MAX_REMEMBERED_PRINCIPALS = 10_000


class RecentPrincipals:
    """The principals of credentials that authenticated in the last `ttl_s` seconds, by a hash of the credential
    (never the key itself), at most MAX_REMEMBERED_PRINCIPALS of them.

    It spares a chat one call to policy before its prompt is rendered; it decides nothing. Policy's Reserve
    authenticates the credential again before any token is generated, so a key revoked or changed within `ttl_s`
    gets at most its prompt rendered, then the refusal. A credential that failed is never remembered."""

    def __init__(self, ttl_s: float = DEFAULT_PRINCIPAL_TTL_S, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, policy_pb2.Principal]] = OrderedDict()

    def get(self, credential: Credential | str) -> policy_pb2.Principal | None:
        key = credential_digest(credential)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[0]:
            del self._entries[key]
            return None
        return entry[1]

    def forget(self, credential: Credential | str) -> None:
        """After policy refused the credential: its next chat authenticates again before anything else."""
        self._entries.pop(credential_digest(credential), None)

    def remember(self, credential: Credential | str, principal: policy_pb2.Principal) -> None:
        if self._ttl_s <= 0:
            return
        key = credential_digest(credential)
        self._entries[key] = (self._clock() + self._ttl_s, principal)
        self._entries.move_to_end(key)
        while len(self._entries) > MAX_REMEMBERED_PRINCIPALS:
            self._entries.popitem(last=False)
