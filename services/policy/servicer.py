"""lmesh.policy.v1.Policy over the KeyStore: validate, call the domain, convert to proto."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator

import grpc
from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc
from opentelemetry import trace

from services.common.admin import AdminGuard
from services.common.errors import InvalidArgument
from services.policy.audit import AuditSink, MemoryAudit
from services.policy.keys import ApiKey, CertificateIdentity, KeyStore, Principal
from services.policy.rules import RulesSource, record_screening


def _credential(request: policy_pb2.AuthenticateRequest | policy_pb2.AuthorizeRequest,
                ) -> str | CertificateIdentity:
    """The request's credential: its API key, or the verified client certificate it carries."""
    if request.WhichOneof("credential") == "client_certificate":
        certificate = request.client_certificate
        return CertificateIdentity(certificate.subject, certificate.sha256_fingerprint)
    return request.api_key  # empty when none is set: the store refuses it as UNAUTHENTICATED


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(self, store: KeyStore, admin: AdminGuard, rules: RulesSource | None = None,
                 audit: AuditSink | None = None) -> None:
        self._store = store
        self._admin = admin
        self._rules = rules if rules is not None else RulesSource(None)
        self._audit: AuditSink = audit if audit is not None else MemoryAudit()

    async def Authenticate(self, request: policy_pb2.AuthenticateRequest,
                           context: grpc.aio.ServicerContext) -> policy_pb2.AuthenticateResponse:
        principal = self._store.authenticate(_credential(request))
        return policy_pb2.AuthenticateResponse(principal=_principal_pb(principal))

    async def Authorize(self, request: policy_pb2.AuthorizeRequest,
                        context: grpc.aio.ServicerContext) -> policy_pb2.AuthorizeResponse:
        principal = self._store.authorize(_credential(request), request.model, request.input_tokens,
                                          request.max_tokens, resolved_model=request.resolved_model,
                                          resolved_aliases=request.resolved_aliases)
        # Limits are reserved in the contract; zero means no limit.
        return policy_pb2.AuthorizeResponse(principal=_principal_pb(principal), limits=policy_pb2.Limits())

    async def CreateApiKey(self, request: policy_pb2.CreateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> policy_pb2.CreateApiKeyResponse:
        self._admin.check_call(context)
        record, plaintext = self._store.create(request.tenant, request.allowed_models, request.display_name,
                                               client_cert_subject=request.client_cert_subject,
                                               client_cert_sha256=request.client_cert_sha256)
        return policy_pb2.CreateApiKeyResponse(key=_api_key_pb(record), api_key=plaintext)

    async def ListApiKeys(self, request: policy_pb2.ListApiKeysRequest,
                          context: grpc.aio.ServicerContext) -> policy_pb2.ListApiKeysResponse:
        self._admin.check_call(context)
        if request.page_size < 0:
            raise InvalidArgument("page_size", f"must not be negative, got {request.page_size}")
        start = _page_start(request.page_token, request.tenant)
        keys = self._store.list(request.tenant)
        limit = request.page_size or len(keys)
        page = policy_pb2.ListApiKeysResponse()
        size, index = 0, start
        while index < len(keys) and len(page.keys) < limit:
            key = _api_key_pb(keys[index])
            size += key.ByteSize() + 8  # and its field framing
            if page.keys and size > MAX_PAGE_BYTES:
                break
            page.keys.append(key)
            index += 1
        if index < len(keys):
            page.next_page_token = _page_token(index, request.tenant)
        return page

    async def RevokeApiKey(self, request: policy_pb2.RevokeApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> policy_pb2.RevokeApiKeyResponse:
        self._admin.check_call(context)
        return policy_pb2.RevokeApiKeyResponse(key=_api_key_pb(self._store.revoke(request.key_id)))

    async def WatchRules(self, request: policy_pb2.WatchRulesRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[policy_pb2.RuleSet]:
        async for rules in self._rules.watch():
            yield rules.to_proto()

    async def RecordScreening(self, request: policy_pb2.RecordScreeningRequest,
                              context: grpc.aio.ServicerContext) -> policy_pb2.RecordScreeningResponse:
        span = trace.get_current_span().get_span_context()
        record_screening(self._audit, request, format(span.trace_id, "032x") if span.is_valid else "")
        return policy_pb2.RecordScreeningResponse()


# A page stays below every gRPC client's default 4 MiB receive limit (a key may hold 256 patterns: ~66 KB).
MAX_PAGE_BYTES = 3 * 1024 * 1024


def _page_token(offset: int, tenant: str) -> str:
    # Keys are only ever added (revoking keeps them), oldest first: an offset stays a valid position.
    return base64.urlsafe_b64encode(json.dumps({"offset": offset, "tenant": tenant}).encode()).decode()


def _page_start(token: str, tenant: str) -> int:
    if not token:
        return 0
    try:
        position = json.loads(base64.urlsafe_b64decode(token.encode()))
        offset, token_tenant = int(position["offset"]), str(position["tenant"])
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise InvalidArgument("page_token", "is not a token from ListApiKeys") from None
    if token_tenant != tenant or offset < 0:
        raise InvalidArgument("page_token", "belongs to another listing (pass the same tenant)")
    return offset


def _principal_pb(principal: Principal) -> policy_pb2.Principal:
    return policy_pb2.Principal(key_id=principal.key_id, tenant=principal.tenant,
                                allowed_models=list(principal.allowed_models))


def _api_key_pb(record: ApiKey) -> policy_pb2.ApiKey:
    return policy_pb2.ApiKey(key_id=record.key_id, tenant=record.tenant,
                             allowed_models=list(record.allowed_models), display_name=record.display_name,
                             create_time_unix_ms=record.create_time_unix_ms, revoked=record.revoked,
                             client_cert_subject=record.client_cert_subject,
                             client_cert_sha256=record.client_cert_sha256)
