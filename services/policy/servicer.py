"""lmesh.policy.v1.Policy over the KeyStore: validate, call the domain, convert to proto."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import AsyncIterator

import grpc
from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc
from opentelemetry import trace

from services.common.admin import AdminGuard
from services.common.errors import InvalidArgument, Unavailable
from services.policy.accounting import Accounting
from services.policy.accounting_pb import (
    creation_update,
    ending_name,
    limits_pb,
    state_pb,
    update_from_pb,
    usage_pb,
    window_pb,
)
from services.policy.audit import AuditSink, MemoryAudit
from services.policy.keys import (
    ApiKey,
    CertificateIdentity,
    KeyStore,
    Principal,
    validate_allowed_tools,
    validate_max_priority,
)
from services.policy.limits import Limits, State, validated
from services.policy.rules import RulesSource, record_screening


def _credential(request: policy_pb2.AuthenticateRequest | policy_pb2.AuthorizeRequest | policy_pb2.ReserveRequest,
                ) -> str | CertificateIdentity:
    """The request's credential: its API key, or the verified client certificate it carries."""
    if request.WhichOneof("credential") == "client_certificate":
        certificate = request.client_certificate
        return CertificateIdentity(certificate.subject, certificate.sha256_fingerprint)
    return request.api_key  # empty when none is set: the store refuses it as UNAUTHENTICATED


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(self, store: KeyStore, admin: AdminGuard, rules: RulesSource | None = None,
                 audit: AuditSink | None = None, *, accounting: Accounting) -> None:
        self._store = store
        self._admin = admin
        self._accounting = accounting
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
        key_limits, tenant_limits = await self._accounting.limits_of(principal)
        return policy_pb2.AuthorizeResponse(principal=_principal_pb(principal), limits=limits_pb(key_limits),
                                            tenant_limits=limits_pb(tenant_limits))

    async def CreateApiKey(self, request: policy_pb2.CreateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> policy_pb2.CreateApiKeyResponse:
        self._admin.check_call(context)
        limits = validated(creation_update(request.limits))  # before the key exists: a bad limit creates none
        record, plaintext = self._store.create(request.tenant, request.allowed_models, request.display_name,
                                               client_cert_subject=request.client_cert_subject,
                                               client_cert_sha256=request.client_cert_sha256,
                                               max_priority=request.max_priority,
                                               allowed_tools=request.allowed_tools)
        try:
            applied = await self._accounting.set_key_limits(record, limits, created=True)
        except Unavailable:
            self._store.revoke(record.key_id)  # a key without its limits must not authenticate
            raise
        return policy_pb2.CreateApiKeyResponse(key=_api_key_pb(record, applied), api_key=plaintext)

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
        # Limits of the keys a page can hold at most (a page stops short at MAX_PAGE_BYTES).
        limits = await self._accounting.key_limits([k.key_id for k in keys[start:start + limit]])
        while index < len(keys) and len(page.keys) < limit:
            key = _api_key_pb(keys[index], limits.get(keys[index].key_id))
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
        record = self._store.revoke(request.key_id)
        limits = None
        with contextlib.suppress(Unavailable):  # the revocation stands whether or not the ledger answers
            limits = (await self._accounting.key_limits([record.key_id]))[record.key_id]
        return policy_pb2.RevokeApiKeyResponse(key=_api_key_pb(record, limits))

    # -- accounting and limits (services/policy/accounting.py) ---------------------------------------------------

    async def Reserve(self, request: policy_pb2.ReserveRequest,
                      context: grpc.aio.ServicerContext) -> policy_pb2.ReserveResponse:
        admitted = await self._accounting.reserve(
            _credential(request), request.model, prompt_tokens=request.prompt_tokens, max_tokens=request.max_tokens,
            reservation_id=request.reservation_id, resolved_model=request.resolved_model,
            resolved_aliases=request.resolved_aliases, continues=request.continues)
        return policy_pb2.ReserveResponse(
            principal=_principal_pb(admitted.principal), reservation_id=admitted.reservation_id,
            reserved_tokens=admitted.reserved_tokens, lease_ms=admitted.lease_ms,
            limits=limits_pb(admitted.key_limits), tenant_limits=limits_pb(admitted.tenant_limits),
            metered=admitted.metered, key_window=window_pb(admitted.key_window))

    async def RenewReservation(self, request: policy_pb2.RenewReservationRequest,
                               context: grpc.aio.ServicerContext) -> policy_pb2.RenewReservationResponse:
        reservation = await self._accounting.renew(request.reservation_id)
        still_open = reservation.state == State.OPEN
        return policy_pb2.RenewReservationResponse(state=state_pb(reservation.state),
                                                   lease_ms=self._accounting.lease_ms if still_open else 0)

    async def Settle(self, request: policy_pb2.SettleRequest,
                     context: grpc.aio.ServicerContext) -> policy_pb2.SettleResponse:
        settlement = await self._accounting.settle(request.reservation_id, request.prompt_tokens,
                                                   request.completion_tokens, ending_name(request.ending))
        return policy_pb2.SettleResponse(charged_tokens=settlement.reservation.charged,
                                         reserved_tokens=settlement.reservation.reserved,
                                         previous_state=state_pb(settlement.previous))

    async def UpdateApiKey(self, request: policy_pb2.UpdateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> policy_pb2.UpdateApiKeyResponse:
        self._admin.check_call(context)
        update = validated(update_from_pb(request.limits))
        priority = request.max_priority if request.HasField("max_priority") else None
        # Unset: unchanged; set (even with no entries, which clears the grant): replaced whole.
        tools = request.tools.allowed_tools if request.HasField("tools") else None
        if priority is not None:
            validate_max_priority(priority)  # before anything changes
        if tools is not None:
            validate_allowed_tools(tools, "tools.allowed_tools")
        record = self._store.get(request.key_id)
        if priority is not None:
            record = self._store.set_max_priority(record.key_id, priority)
        if tools is not None:
            record = self._store.set_allowed_tools(record.key_id, tools)
        if (priority is not None or tools is not None) and update.empty:
            limits = (await self._accounting.key_limits([record.key_id]))[record.key_id]
        else:
            limits = await self._accounting.set_key_limits(record, update)
        return policy_pb2.UpdateApiKeyResponse(key=_api_key_pb(record, limits))

    async def SetTenantLimits(self, request: policy_pb2.SetTenantLimitsRequest,
                              context: grpc.aio.ServicerContext) -> policy_pb2.SetTenantLimitsResponse:
        self._admin.check_call(context)
        limits = await self._accounting.set_tenant_limits(request.tenant, update_from_pb(request.limits))
        return policy_pb2.SetTenantLimitsResponse(tenant=request.tenant, limits=limits_pb(limits))

    async def GetUsage(self, request: policy_pb2.GetUsageRequest,
                       context: grpc.aio.ServicerContext) -> policy_pb2.GetUsageResponse:
        self._admin.check_call(context)
        if request.page_size < 0:
            raise InvalidArgument("page_size", f"must not be negative, got {request.page_size}")
        start = _page_start(request.page_token, request.tenant)
        rows = await self._accounting.usage(request.tenant)
        end = len(rows) if not request.page_size else min(len(rows), start + request.page_size)
        page = policy_pb2.GetUsageResponse(usage=[usage_pb(row) for row in rows[start:end]])
        if end < len(rows):
            page.next_page_token = _page_token(end, request.tenant)
        return page

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
                                allowed_models=list(principal.allowed_models), max_priority=principal.max_priority,
                                allowed_tools=list(principal.allowed_tools))


def _api_key_pb(record: ApiKey, limits: Limits | None = None) -> policy_pb2.ApiKey:
    return policy_pb2.ApiKey(key_id=record.key_id, tenant=record.tenant,
                             allowed_models=list(record.allowed_models), display_name=record.display_name,
                             create_time_unix_ms=record.create_time_unix_ms, revoked=record.revoked,
                             client_cert_subject=record.client_cert_subject,
                             client_cert_sha256=record.client_cert_sha256, limits=limits_pb(limits or Limits()),
                             max_priority=record.max_priority, allowed_tools=list(record.allowed_tools))
