"""lmesh.policy.v1.Policy with its decisions audited, and the audit log's RPCs (TailAudit, FollowAudit, VerifyAudit).

AuditedPolicyServicer extends PolicyServicer without changing it: each decision RPC it has today records what was
decided (authenticate, authorize, key.create, key.list, key.revoke, key.tools; refused admin calls too, under the
action they attempted). Every unary RPC of the Policy service, those added later included, runs inside
`AuditLog.decisions()`, so whatever it appends is durable before its answer is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from lmesh.policy.v1 import policy_pb2

from services.common.admin import AdminGuard
from services.common.connect import parse_spiffe_id, peer_spiffe_id
from services.common.errors import (
    AlreadyExists,
    InvalidArgument,
    LmeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.policy.accounting import Accounting
from services.policy.audit import (
    EDITED,
    MALFORMED,
    MAX_TAIL,
    MISSING,
    REORDERED,
    REWRITTEN,
    TRUNCATED,
    AuditEvent,
    AuditLog,
    AuditRecord,
    Verification,
)
from services.policy.keys import CertificateIdentity, KeyStore
from services.policy.rules import RulesSource
from services.policy.servicer import PolicyServicer, _credential

DEFAULT_TAIL = 20
MAX_FILTER_LEN = 256
_KINDS = {EDITED: policy_pb2.AuditProblem.KIND_EDITED, MISSING: policy_pb2.AuditProblem.KIND_MISSING,
          REORDERED: policy_pb2.AuditProblem.KIND_REORDERED, REWRITTEN: policy_pb2.AuditProblem.KIND_REWRITTEN,
          MALFORMED: policy_pb2.AuditProblem.KIND_MALFORMED, TRUNCATED: policy_pb2.AuditProblem.KIND_TRUNCATED}
_OUTCOMES: tuple[tuple[type[LmeshError], str], ...] = (
    (Unauthenticated, "denied"), (PermissionDenied, "denied"), (ResourceExhausted, "limited"),
    (InvalidArgument, "invalid"), (NotFound, "not_found"), (AlreadyExists, "conflict"), (Unavailable, "unavailable"))

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def outcome_of(exc: BaseException) -> str:
    """How a refused decision is recorded."""
    for kind, outcome in _OUTCOMES:
        if isinstance(exc, kind):
            return outcome
    return "error"


def _caller(context: grpc.aio.ServicerContext) -> str:
    """Who made an admin call, as far as the transport says: its mesh identity."""
    spiffe = peer_spiffe_id(context)
    identity = parse_spiffe_id(spiffe) if spiffe else None
    return f"caller {identity.service}" if identity else "caller without a mesh identity"


def _credential_kind(credential: str | CertificateIdentity) -> str:
    if isinstance(credential, CertificateIdentity):
        which = (f"sha256 {credential.sha256_fingerprint}" if credential.sha256_fingerprint
                 else f"subject {credential.subject}")
        return f"client certificate {which}"
    return "API key" if credential else "no credential"


class AuditedPolicyServicer(PolicyServicer):
    """PolicyServicer whose decisions go to `audit`, with the audit RPCs."""

    def __init__(self, store: KeyStore, admin: AdminGuard, audit: AuditLog, rules: RulesSource | None = None, *,
                 accounting: Accounting) -> None:
        super().__init__(store, admin, rules, audit, accounting=accounting)
        self._audit_log = audit  # the durable log (the parent knows it only as an AuditSink)
        for method in policy_pb2.DESCRIPTOR.services_by_name["Policy"].methods:
            if not method.client_streaming and not method.server_streaming:
                setattr(self, method.name, self._durable(getattr(self, method.name)))

    def _durable(self, handler: Handler) -> Handler:
        audit = self._audit_log

        @functools.wraps(handler)
        async def decide(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with audit.decisions():
                return await handler(request, context)

        return decide

    def _record(self, action: str, exc: BaseException | None, *, principal: Any = None, tenant: str = "",
                model: str = "", tokens: dict[str, int] | None = None, notes: tuple[str, ...] = (),
                allowed: str = "allowed") -> None:
        """Appends one decision: `exc` None for a decision that went through (`allowed`), else the error it ended
        with (its code and message, which never hold a key). `principal`: a key id, or anything with `key_id`
        and `tenant`."""
        if principal is not None and not isinstance(principal, str):
            principal, tenant = principal.key_id, principal.tenant
        detail = list(notes)
        if exc is not None:
            detail.append(f"{exc.code.name}: {exc.message}" if isinstance(exc, LmeshError) else "internal error")
        self._audit_log.append(AuditEvent(action, allowed if exc is None else outcome_of(exc),
                                          principal=principal or "", tenant=tenant, model=model, tokens=tokens or {},
                                          detail="; ".join(detail)))

    def _known(self, credential: str | CertificateIdentity) -> Any:
        """The principal behind a credential that authenticated but was refused later, for the record."""
        try:
            return self._store.authenticate(credential)
        except LmeshError:
            return None

    def _admin_check(self, context: grpc.aio.ServicerContext, action: str) -> None:
        try:
            self._admin.check_call(context)
        except Unauthenticated as exc:
            self._record(action, exc, notes=(_caller(context),))
            raise

    # -- decisions ---------------------------------------------------------------------------------------------

    async def Authenticate(self, request: policy_pb2.AuthenticateRequest,
                           context: grpc.aio.ServicerContext) -> policy_pb2.AuthenticateResponse:
        credential = _credential(request)
        try:
            response = await super().Authenticate(request, context)
        except Exception as exc:
            self._record("authenticate", exc, notes=(_credential_kind(credential),))
            raise
        self._record("authenticate", None, principal=response.principal, notes=(_credential_kind(credential),))
        return response

    async def Authorize(self, request: policy_pb2.AuthorizeRequest,
                        context: grpc.aio.ServicerContext) -> policy_pb2.AuthorizeResponse:
        credential = _credential(request)
        model = request.resolved_model or request.model
        tokens = {"input": request.input_tokens, "max": request.max_tokens}
        try:
            response = await super().Authorize(request, context)
        except Exception as exc:
            known = self._known(credential) if not isinstance(exc, Unauthenticated) else None
            self._record("authorize", exc, principal=known, model=model, tokens=tokens,
                         notes=(_credential_kind(credential),))
            raise
        self._record("authorize", None, principal=response.principal, model=model, tokens=tokens,
                     notes=(_credential_kind(credential),))
        return response

    async def CreateApiKey(self, request: policy_pb2.CreateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> policy_pb2.CreateApiKeyResponse:
        try:
            response = await super().CreateApiKey(request, context)
        except Exception as exc:
            self._record("key.create", exc, tenant=request.tenant, notes=(_caller(context),))
            raise
        key = response.key
        binding = (f"; client certificate subject {key.client_cert_subject}" if key.client_cert_subject else
                   f"; client certificate sha256 {key.client_cert_sha256}" if key.client_cert_sha256 else "")
        self._record("key.create", None, principal=key, allowed="ok", notes=(
            _caller(context), f"models {','.join(key.allowed_models) or 'all'}{binding}",
            f"tools {','.join(key.allowed_tools) or 'none'}"))
        return response

    async def UpdateApiKey(self, request: policy_pb2.UpdateApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> policy_pb2.UpdateApiKeyResponse:
        """A change of a key's tool grant is recorded (`key.tools`), refused or not; its limits, by accounting."""
        granting = request.HasField("tools")
        try:
            response = await super().UpdateApiKey(request, context)
        except Exception as exc:
            if granting:
                self._record("key.tools", exc, principal=request.key_id, notes=(_caller(context),))
            raise
        if granting:
            self._record("key.tools", None, principal=response.key, allowed="ok", notes=(
                _caller(context), f"tools: {', '.join(response.key.allowed_tools) or 'none'}"))
        return response

    async def ListApiKeys(self, request: policy_pb2.ListApiKeysRequest,
                          context: grpc.aio.ServicerContext) -> policy_pb2.ListApiKeysResponse:
        try:
            response = await super().ListApiKeys(request, context)
        except Exception as exc:
            self._record("key.list", exc, tenant=request.tenant, notes=(_caller(context),))
            raise
        self._record("key.list", None, tenant=request.tenant, allowed="ok",
                     notes=(_caller(context), f"{len(response.keys)} keys"))
        return response

    async def RevokeApiKey(self, request: policy_pb2.RevokeApiKeyRequest,
                           context: grpc.aio.ServicerContext) -> policy_pb2.RevokeApiKeyResponse:
        try:
            response = await super().RevokeApiKey(request, context)
        except Exception as exc:
            self._record("key.revoke", exc, principal=request.key_id, notes=(_caller(context),))
            raise
        self._record("key.revoke", None, principal=response.key, allowed="ok", notes=(_caller(context),))
        return response

    # -- the audit log -----------------------------------------------------------------------------------------

    async def TailAudit(self, request: policy_pb2.TailAuditRequest,
                        context: grpc.aio.ServicerContext) -> policy_pb2.TailAuditResponse:
        self._admin_check(context, "audit.tail")
        limit = _count(request.limit, "limit", default=DEFAULT_TAIL)
        match = _matcher(request.filter)
        records, head = await asyncio.to_thread(self._audit_log.tail, limit, match)
        return policy_pb2.TailAuditResponse(records=[record_pb(r) for r in records], head_seq=head)

    async def FollowAudit(self, request: policy_pb2.FollowAuditRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[policy_pb2.FollowAuditResponse]:
        async with self._audit_log.decisions():  # a refusal is recorded like any other
            self._admin_check(context, "audit.follow")
        backlog = _count(request.backlog, "backlog", default=0)
        match = _matcher(request.filter)
        if backlog:
            records, head = await asyncio.to_thread(self._audit_log.tail, backlog, match)
        else:
            records, head = [], self._audit_log.head[0]
        yield policy_pb2.FollowAuditResponse(records=[record_pb(r) for r in records], head_seq=head)
        async with contextlib.aclosing(self._audit_log.follow(head)) as batches:
            async for batch in batches:
                chosen = [record_pb(r) for r in batch if match is None or match(r)]
                if chosen:
                    yield policy_pb2.FollowAuditResponse(records=chosen, head_seq=batch[-1].seq)

    async def VerifyAudit(self, request: policy_pb2.VerifyAuditRequest,
                          context: grpc.aio.ServicerContext) -> policy_pb2.VerifyAuditResponse:
        self._admin_check(context, "audit.verify")
        result = await asyncio.to_thread(self._audit_log.verify)
        self._audit_log.append(AuditEvent("audit.verify", "ok" if result.ok else "failed",
                                      detail=f"{_caller(context)}; {result.summary()}"))
        return verification_pb(result)


def _count(value: int, field: str, *, default: int) -> int:
    if value == 0:
        return default
    if not 0 < value <= MAX_TAIL:
        raise InvalidArgument(field, f"must be from 0 to {MAX_TAIL}, got {value}")
    return value


def _matcher(selection: policy_pb2.AuditFilter) -> Callable[[AuditRecord], bool] | None:
    """The records a filter selects (None: every record); INVALID_ARGUMENT for a malformed field."""
    action, principal, tenant = selection.action, selection.principal, selection.tenant
    for name, value in (("action", action), ("principal", principal), ("tenant", tenant)):
        if len(value) > MAX_FILTER_LEN:
            raise InvalidArgument(f"filter.{name}", f"must be at most {MAX_FILTER_LEN} characters")
        if not value.isprintable():
            raise InvalidArgument(f"filter.{name}", "must not contain control characters")
    if not (action or principal or tenant):
        return None
    prefix = action + "."

    def match(record: AuditRecord) -> bool:
        return ((not action or record.action == action or record.action.startswith(prefix))
                and (not principal or record.principal == principal) and (not tenant or record.tenant == tenant))

    return match


def record_pb(record: AuditRecord) -> policy_pb2.AuditRecord:
    return policy_pb2.AuditRecord(
        seq=record.seq, time_unix_ms=record.time_unix_ms, action=record.action, outcome=record.outcome,
        principal=record.principal, tenant=record.tenant, model=record.model, rule_id=record.rule_id,
        tokens=dict(record.tokens), trace_id=record.trace_id, detail=record.detail, prev_hash=record.prev,
        hash=record.hash)


def verification_pb(result: Verification) -> policy_pb2.VerifyAuditResponse:
    response = policy_pb2.VerifyAuditResponse(ok=result.ok, records=result.records, first_seq=result.first_seq,
                                              last_seq=result.last_seq, head_hash=result.head_hash,
                                              note=result.note)
    if result.problem is not None:
        response.problem.CopyFrom(policy_pb2.AuditProblem(seq=result.problem.seq, kind=_KINDS[result.problem.kind],
                                                          message=result.summary()))
    return response
