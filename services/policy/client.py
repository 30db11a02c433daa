"""Calling lmesh-policy's key management RPCs (for `lmesh keys`, dev set-up and tests).

These calls go to one instance without failover: CreateApiKey is not idempotent, and a retry after an
UNAVAILABLE that the server did process would mint a second key.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.discovery import ServiceResolver
from services.common.rpc import call_options

DEFAULT_TIMEOUT_S = 10.0


async def _admin_call(resolver: ServiceResolver, method: str, request: Any, admin_token: str | None,
                      timeout_s: float) -> Any:
    endpoint = await resolver.pick()
    rpc: Callable[..., Awaitable[Any]] = getattr(endpoint.stub(policy_pb2_grpc.PolicyStub), method)
    options = call_options(timeout_s)
    if admin_token:
        options["metadata"] = [*options["metadata"], ("authorization", f"Bearer {admin_token}")]
    endpoint.outstanding += 1
    try:
        return await rpc(request, **options)
    finally:
        endpoint.outstanding -= 1


async def create_key(resolver: ServiceResolver, tenant: str, allowed_models: Iterable[str] = (),
                     display_name: str = "", admin_token: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> policy_pb2.CreateApiKeyResponse:
    """Creates an API key; the response holds the plaintext key (`.api_key`), shown this once."""
    request = policy_pb2.CreateApiKeyRequest(tenant=tenant, allowed_models=list(allowed_models),
                                             display_name=display_name)
    response: policy_pb2.CreateApiKeyResponse = await _admin_call(resolver, "CreateApiKey", request,
                                                                  admin_token, timeout_s)
    return response


async def list_keys(resolver: ServiceResolver, tenant: str = "", admin_token: str | None = None,
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> policy_pb2.ListApiKeysResponse:
    """Every key's public record (of `tenant` only, when given), all pages of them."""
    everything = policy_pb2.ListApiKeysResponse()
    token = ""
    while True:
        page: policy_pb2.ListApiKeysResponse = await _admin_call(
            resolver, "ListApiKeys", policy_pb2.ListApiKeysRequest(tenant=tenant, page_token=token), admin_token,
            timeout_s)
        everything.keys.extend(page.keys)
        token = page.next_page_token
        if not token:
            return everything


async def revoke_key(resolver: ServiceResolver, key_id: str, admin_token: str | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> policy_pb2.RevokeApiKeyResponse:
    """Revokes a key by id (NOT_FOUND when there is no such key)."""
    response: policy_pb2.RevokeApiKeyResponse = await _admin_call(
        resolver, "RevokeApiKey", policy_pb2.RevokeApiKeyRequest(key_id=key_id), admin_token, timeout_s)
    return response
