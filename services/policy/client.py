"""Calling lmesh-policy's key management and audit RPCs (for `lmesh keys`, `lmesh audit`, dev set-up and tests).

CreateApiKey goes to one instance without failover: it is not idempotent, and a retry after an UNAVAILABLE that
the server did process would mint a second key. The admin token is the peer's (`Mesh(admin_token=...)`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Sequence

from lmesh.policy.v1 import policy_pb2
from lmesh.policy.v1.policy_pb2_grpc import PolicyStub

from services.common.peers import Peer

DEFAULT_TIMEOUT_S = 10.0


async def create_key(policy: Peer[PolicyStub], tenant: str, allowed_models: Iterable[str] = (),
                     display_name: str = "", timeout_s: float = DEFAULT_TIMEOUT_S, *, client_cert_subject: str = "",
                     client_cert_sha256: str = "", limits: policy_pb2.Limits | None = None, max_priority: int = 0,
                     allowed_tools: Iterable[str] = ()) -> policy_pb2.CreateApiKeyResponse:
    """Creates an API key (bound to a client certificate subject or fingerprint when given, with `limits` when
    given, its chats allowed up to `max_priority` and to the mesh tools `allowed_tools` matches, none by default);
    the response holds the plaintext key (`.api_key`), shown this once."""
    request = policy_pb2.CreateApiKeyRequest(tenant=tenant, allowed_models=list(allowed_models),
                                             display_name=display_name, client_cert_subject=client_cert_subject,
                                             client_cert_sha256=client_cert_sha256, limits=limits,
                                             max_priority=max_priority, allowed_tools=list(allowed_tools))
    response: policy_pb2.CreateApiKeyResponse = await policy.call(lambda p: p.CreateApiKey, request, admin=True,
                                                                  retry=False, timeout=timeout_s)
    return response


async def list_keys(policy: Peer[PolicyStub], tenant: str = "",
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> policy_pb2.ListApiKeysResponse:
    """Every key's public record (of `tenant` only, when given), all pages of them."""
    everything = policy_pb2.ListApiKeysResponse()
    token = ""
    while True:
        page: policy_pb2.ListApiKeysResponse = await policy.call(
            lambda p: p.ListApiKeys, policy_pb2.ListApiKeysRequest(tenant=tenant, page_token=token), admin=True,
            timeout=timeout_s)
        everything.keys.extend(page.keys)
        token = page.next_page_token
        if not token:
            return everything


async def revoke_key(policy: Peer[PolicyStub], key_id: str,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> policy_pb2.RevokeApiKeyResponse:
    """Revokes a key by id (NOT_FOUND when there is no such key)."""
    response: policy_pb2.RevokeApiKeyResponse = await policy.call(
        lambda p: p.RevokeApiKey, policy_pb2.RevokeApiKeyRequest(key_id=key_id), admin=True, retry=False,
        timeout=timeout_s)
    return response


# ---- the audit log (`lmesh audit`) ----------------------------------------------------------------------------

async def tail_audit(policy: Peer[PolicyStub], limit: int = 20, selection: policy_pb2.AuditFilter | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> policy_pb2.TailAuditResponse:
    """The audit log's last `limit` records (matching `selection`), oldest first."""
    response: policy_pb2.TailAuditResponse = await policy.call(
        lambda p: p.TailAudit, policy_pb2.TailAuditRequest(limit=limit, filter=selection), admin=True,
        timeout=timeout_s)
    return response


async def follow_audit(policy: Peer[PolicyStub], backlog: int = 0, selection: policy_pb2.AuditFilter | None = None,
                       ) -> AsyncGenerator[policy_pb2.FollowAuditResponse, None]:
    """The audit log as it grows: a first message (the last `backlog` records), then records as they become
    durable, until the caller stops iterating (the call is cancelled then) or policy ends the stream."""
    async with policy.lease() as lease:
        call = lease.stub.FollowAudit(policy_pb2.FollowAuditRequest(backlog=backlog, filter=selection),
                                      **lease.options(None, admin=True))
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()


async def verify_audit(policy: Peer[PolicyStub], timeout_s: float = 600.0) -> policy_pb2.VerifyAuditResponse:
    """Asks policy to verify its audit log's hash chain (which reads the whole log: allow it time)."""
    response: policy_pb2.VerifyAuditResponse = await policy.call(
        lambda p: p.VerifyAudit, policy_pb2.VerifyAuditRequest(), admin=True, timeout=timeout_s)
    return response


async def update_key(policy: Peer[PolicyStub], key_id: str, limits: policy_pb2.LimitsUpdate,
                     timeout_s: float = DEFAULT_TIMEOUT_S, *, max_priority: int | None = None,
                     allowed_tools: Sequence[str] | None = None) -> policy_pb2.UpdateApiKeyResponse:
    """Changes a key's limits (unset fields keep theirs) and, when given, its max priority and its tool grant
    (`allowed_tools` replaces it whole: `[]` clears it, None leaves it); idempotent."""
    tools = None if allowed_tools is None else policy_pb2.ToolGrant(allowed_tools=list(allowed_tools))
    response: policy_pb2.UpdateApiKeyResponse = await policy.call(
        lambda p: p.UpdateApiKey, policy_pb2.UpdateApiKeyRequest(key_id=key_id, limits=limits,
                                                                 max_priority=max_priority, tools=tools),
        admin=True, timeout=timeout_s)
    return response


async def set_tenant_limits(policy: Peer[PolicyStub], tenant: str, limits: policy_pb2.LimitsUpdate,
                            timeout_s: float = DEFAULT_TIMEOUT_S) -> policy_pb2.SetTenantLimitsResponse:
    """Changes a tenant's limits (unset fields keep theirs); idempotent."""
    response: policy_pb2.SetTenantLimitsResponse = await policy.call(
        lambda p: p.SetTenantLimits, policy_pb2.SetTenantLimitsRequest(tenant=tenant, limits=limits), admin=True,
        timeout=timeout_s)
    return response


async def get_usage(policy: Peer[PolicyStub], tenant: str = "",
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> policy_pb2.GetUsageResponse:
    """Every tenant's usage (or one tenant's and its keys'), all pages of it."""
    everything = policy_pb2.GetUsageResponse()
    token = ""
    while True:
        page: policy_pb2.GetUsageResponse = await policy.call(
            lambda p: p.GetUsage, policy_pb2.GetUsageRequest(tenant=tenant, page_token=token), admin=True,
            timeout=timeout_s)
        everything.usage.extend(page.usage)
        token = page.next_page_token
        if not token:
            return everything
