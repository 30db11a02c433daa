"""The admin token that guards the mesh's management RPCs (API keys in lmesh-policy, model registration in
lmesh-registry): one token, `LMESH_ADMIN_TOKEN`, read from the environment only (a flag would show it to every
user in `ps`), sent by callers as `authorization: Bearer <token>`."""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass

import grpc

from services.common.config import setting
from services.common.errors import Unauthenticated

ADMIN_TOKEN_ENV = "LMESH_ADMIN_TOKEN"


@dataclass(frozen=True)
class AdminTokenSettings:
    """Settings of a service whose management RPCs the admin token guards (lmesh-policy, lmesh-registry). The
    token is a secret: from the environment only, never a flag, and never in a repr."""

    admin_token: str | None = setting(
        env=ADMIN_TOKEN_ENV, secret=True, default=None,
        help="require this bearer token for key management (policy) and model registration (registry)")


def require_beyond_localhost(service: str, host: str, token: str | None) -> None:
    """Refuses (OSError, one line) to run a guarded service that listens beyond localhost without a token: its
    management RPCs would be open to every caller the mesh lets in."""
    if token:
        return
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise OSError(f"lmesh-{service} listens beyond localhost (--host {host or '0.0.0.0'}) without "
                      f"{ADMIN_TOKEN_ENV}: key management and model registration would be open; set it (e.g. "
                      "`openssl rand -base64 32`), the same for lmesh-policy and lmesh-registry")


class AdminGuard:
    """The admin token check: open when no token is configured."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode("utf-8") if token else None

    @classmethod
    def from_environment(cls) -> AdminGuard:
        return cls(os.environ.get(ADMIN_TOKEN_ENV) or None)

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, authorization: str | None) -> None:
        """Raises Unauthenticated unless `authorization` is `Bearer <admin token>` (or no token is set)."""
        if self._token is None:
            return
        if not authorization:
            raise Unauthenticated("admin token required: send metadata 'authorization: Bearer <token>'")
        scheme, _, presented = authorization.strip().partition(" ")
        presented_bytes = presented.strip().encode("utf-8")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented_bytes, self._token):
            raise Unauthenticated("invalid admin token")

    def check_call(self, context: grpc.aio.ServicerContext) -> None:
        """`check` on the call's `authorization` metadata."""
        self.check(authorization(context))


def authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The call's `authorization` metadata, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return None


def admin_metadata(token: str | None = None) -> list[tuple[str, str]]:
    """Outgoing metadata carrying the admin token (`token`, else LMESH_ADMIN_TOKEN; none when neither is set)."""
    token = token or os.environ.get(ADMIN_TOKEN_ENV) or None
    return [("authorization", f"Bearer {token}")] if token else []
