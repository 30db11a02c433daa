"""Accounting: admission against limits, reservations with a lease, settlement with the real usage (no grpc here).

The request path (the gateway drives it):

1. `reserve`: the credential is authenticated and authorized for the model (KeyStore), then the ledger, in one
   atomic step, checks every limit of the key and of its tenant and reserves `prompt_tokens + max_tokens`. A
   refusal is ResourceExhausted naming the limit, with the exact time until it would pass when waiting helps.
2. `renew`: the gateway extends the lease while the generation streams (every third of the lease).
3. `settle`: the real usage replaces the reservation (charged at most what was reserved). Idempotent.

A reservation that is neither renewed nor settled within its lease (its gateway died) expires: the sweeper (and
every admission, for the subjects it touches) charges it in full, prompt + max_tokens, which is never less than
was generated. A late Settle corrects that charge to the real usage. Nothing stays reserved past a lease, nothing
is charged twice.

Every decision is appended to the audit sink: principal (the key id, never the key), tenant, model, token counts
and the trace id.

When the ledger's store cannot be reached (Redis down), admissions fail closed by default (UNAVAILABLE); with
`fail_open`, they are admitted unmetered (audited as such) while it lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    Limit,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from services.common.telemetry import current_trace_id
from services.policy.audit import AuditEvent, AuditSink
from services.policy.keys import ApiKey, CertificateIdentity, KeyStore, Principal, validate_tenant
from services.policy.ledger import Ledger, LedgerUnavailable
from services.policy.limits import (
    WINDOW_MS,
    Clock,
    Limits,
    LimitsUpdate,
    Order,
    Period,
    Refusal,
    Reservation,
    Settlement,
    State,
    SubjectState,
    WindowUse,
    check_reservation_id,
    key_subject,
    now_ms,
    tenant_subject,
    validated,
)

log = logging.getLogger("lmesh.policy")

MAX_PROMPT_TOKENS = 2**31 - 1
T = TypeVar("T")
UNMETERED_PREFIX = "unmetered-"  # reservations admitted while the store was unreachable (fail open)


@dataclass(frozen=True)
class Admitted:
    principal: Principal
    reservation_id: str
    reserved_tokens: int
    lease_ms: int
    key_limits: Limits
    tenant_limits: Limits
    metered: bool = True
    key_window: WindowUse | None = None  # with a rate limit on the key: its window with this request


@dataclass(frozen=True)
class SubjectUsage:
    tenant: str
    key_id: str  # "" for a tenant
    state: SubjectState


class Accounting:
    """Limits, reservations and usage over a ledger (see the module's docstring). `clock` is injectable so tests of
    windows and leases run without waiting."""

    def __init__(self, keys: KeyStore, ledger: Ledger, audit: AuditSink, *, lease_s: float = 30.0,
                 window_ms: int = WINDOW_MS, fail_open: bool = False, clock: Clock | None = None) -> None:
        import time

        self.keys = keys
        self.ledger = ledger
        self.audit = audit
        self.lease_ms = max(1, int(lease_s * 1000))
        self.window_ms = window_ms
        self.fail_open = fail_open
        self._clock: Clock = clock or time.time
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = False

    def now_ms(self) -> int:
        return now_ms(self._clock)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def open(self) -> None:
        await self.ledger.open()

    async def close(self) -> None:
        if self._sweeper is not None:
            # A flag as well as the cancel: a client library may swallow a cancel that lands mid-call (asyncio's
            # timeouts racing it), and shutdown must not wait on the sweeper for ever.
            self._stopping = True
            self._sweeper.cancel()
            await asyncio.wait({self._sweeper}, timeout=5)
            self._sweeper = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ledger.close(), 5)

    def start_sweeper(self, interval_s: float | None = None) -> None:
        """Expires lapsed reservations in the background (every quarter lease, at most every second)."""
        interval = interval_s if interval_s is not None else min(1.0, self.lease_ms / 4000)
        self._sweeper = asyncio.create_task(self._sweep_forever(interval), name="policy-ledger-sweeper")

    async def _sweep_forever(self, interval_s: float) -> None:
        purged_at = 0
        while not self._stopping:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep()
                if self.now_ms() - purged_at > 60_000:
                    purged_at = self.now_ms()
                    await self.ledger.purge(purged_at, self.window_ms)
            except LedgerUnavailable as exc:
                log.warning("ledger sweep skipped: %s", exc)
            except Exception:
                log.exception("ledger sweep failed")

    async def sweep(self) -> list[Reservation]:
        """Expires every reservation whose lease has ended; returns them."""
        expired: list[Reservation] = []
        while True:
            batch = await self.ledger.expire_due(self.now_ms())
            self._audit_expired(batch)
            expired += batch
            if len(batch) < 64:
                return expired

    def _audit_expired(self, expired: Sequence[Reservation]) -> None:
        for r in expired:
            log.info("reservation %s of key %s expired unsettled: charged in full, %d tokens", r.id, r.key_id,
                     r.reserved)
            self.audit.append(AuditEvent(
                action="expire", outcome="charged", principal=r.key_id, tenant=r.tenant, model=r.model,
                tokens={"reserved": r.reserved, "charged": r.reserved, "prompt": r.prompt_tokens},
                trace_id=r.trace_id, detail=f"reservation {r.id}: lease ended unsettled; charged in full"))

    # -- the request path --------------------------------------------------------------------------------------

    async def limits_of(self, principal: Principal) -> tuple[Limits, Limits]:
        found = await self._ledger_call(self.ledger.get_limits(
            [key_subject(principal.key_id), tenant_subject(principal.tenant)]))
        return found[key_subject(principal.key_id)], found[tenant_subject(principal.tenant)]

    async def reserve(self, credential: str | CertificateIdentity, model: str, *, prompt_tokens: int,
                      max_tokens: int, reservation_id: str, resolved_model: str = "",
                      resolved_aliases: Sequence[str] = (), continues: str = "") -> Admitted:
        """Admits a request and reserves its tokens (see policy.proto's Reserve). `continues`: the reservation of
        the admitted request this one is part of (a tool chat's answer, of its plan); it counts no request then."""
        principal = self.keys.authorize(credential, model, resolved_model=resolved_model,
                                        resolved_aliases=resolved_aliases)
        if not 0 <= prompt_tokens <= MAX_PROMPT_TOKENS:
            raise InvalidArgument("prompt_tokens", f"must be 0 or more, got {prompt_tokens}")
        if max_tokens <= 0:
            raise InvalidArgument("max_tokens", f"must be more than 0, got {max_tokens}")
        check_reservation_id(reservation_id)
        if continues:
            check_reservation_id(continues, "continues")
            if continues == reservation_id:
                raise InvalidArgument("continues", "must name another request's reservation, not this one's")
        model_id = resolved_model or model
        now = self.now_ms()
        trace_id = _trace_id()
        order = Order(reservation_id, principal.key_id, principal.tenant, model_id, prompt_tokens, max_tokens, now,
                      self.lease_ms, self.window_ms, trace_id, continues=continues).at(now)
        tokens = {"prompt": prompt_tokens, "max": max_tokens, "reserved": order.tokens}
        try:
            admission = await self.ledger.reserve(order)
        except LedgerUnavailable as exc:
            if not self.fail_open:
                self.audit.append(AuditEvent("reserve", "unavailable", principal.key_id, principal.tenant, model_id,
                                             tokens=tokens, trace_id=trace_id,
                                             detail="ledger unreachable: fail closed"))
                raise Unavailable(f"{exc.message}; admissions fail closed until it is back",
                                  retry_after_s=1.0) from None
            self.audit.append(AuditEvent("reserve", "unmetered", principal.key_id, principal.tenant, model_id,
                                         tokens=tokens, trace_id=trace_id, detail="ledger unreachable: fail open"))
            log.warning("admitted %s unmetered: %s", reservation_id, exc.message)
            return Admitted(principal, UNMETERED_PREFIX + reservation_id, order.tokens, self.lease_ms, Limits(),
                            Limits(), metered=False)
        self._audit_expired(admission.expired)
        if admission.refusal is not None:
            refusal = admission.refusal
            self.audit.append(AuditEvent("reserve", "denied", principal.key_id, principal.tenant, model_id,
                                         tokens=tokens, trace_id=trace_id,
                                         detail=f"{refusal.quota_id} of {refusal.subject}"))
            raise _exhausted(refusal, now)
        reservation = admission.reservation
        assert reservation is not None
        if not admission.repeated:
            part_of = f", part of {continues}'s request" if continues else ""
            self.audit.append(AuditEvent("reserve", "allowed", principal.key_id, principal.tenant, model_id,
                                         tokens=tokens, trace_id=trace_id,
                                         detail=f"reservation {reservation.id}{part_of}"))
        return Admitted(principal, reservation.id, reservation.reserved, self.lease_ms, *admission.limits,
                        key_window=admission.key_window)

    async def renew(self, reservation_id: str) -> Reservation:
        if reservation_id.startswith(UNMETERED_PREFIX):
            return _unmetered(reservation_id)
        check_reservation_id(reservation_id)
        return await self._ledger_call(self.ledger.renew(reservation_id, self.now_ms(), self.lease_ms))

    async def settle(self, reservation_id: str, prompt_tokens: int, completion_tokens: int,
                     ending: str = "") -> Settlement:
        if prompt_tokens < 0:
            raise InvalidArgument("prompt_tokens", f"must not be negative, got {prompt_tokens}")
        if completion_tokens < 0:
            raise InvalidArgument("completion_tokens", f"must not be negative, got {completion_tokens}")
        if reservation_id.startswith(UNMETERED_PREFIX):
            self.audit.append(AuditEvent("settle", "unmetered", tokens={"prompt": prompt_tokens,
                                                                        "completion": completion_tokens},
                                         trace_id=_trace_id(), detail=f"{reservation_id} ({ending})"))
            return Settlement(_unmetered(reservation_id), State.OPEN)
        check_reservation_id(reservation_id)
        used = prompt_tokens + completion_tokens
        settlement = await self._ledger_call(self.ledger.settle(reservation_id, used, self.now_ms()))
        r = settlement.reservation
        if settlement.previous != State.SETTLED:
            over = f"; reported {used} > reserved {r.reserved}, charged the reservation" if used > r.reserved else ""
            self.audit.append(AuditEvent(
                "settle", "charged", r.key_id, r.tenant, r.model,
                tokens={"prompt": prompt_tokens, "completion": completion_tokens, "reserved": r.reserved,
                        "charged": r.charged},
                trace_id=_trace_id() or r.trace_id,
                detail=f"reservation {r.id}: {ending or 'ended'}"
                       f"{'; after expiry, charge corrected' if settlement.previous == State.EXPIRED else ''}{over}"))
        return settlement

    # -- limits ------------------------------------------------------------------------------------------------

    async def set_key_limits(self, key: ApiKey, update: LimitsUpdate, *, created: bool = False) -> Limits:
        """Applies `update` to the key's limits; the next request is judged by them."""
        validated(update)
        if not created and key.revoked:
            raise FailedPrecondition(f"key {key.key_id} is revoked")
        subject = key_subject(key.key_id)
        current = Limits() if created else (await self._ledger_call(self.ledger.get_limits([subject])))[subject]
        limits = update.applied_to(current)
        if created and limits.unlimited:
            return limits
        await self._ledger_call(self.ledger.set_limits(subject, limits, self.now_ms()))
        self.audit.append(AuditEvent("key.limits", "ok", key.key_id, key.tenant,
                                     detail=f"limits: {limits.describe()}"))
        log.info("limits of key %s: %s", key.key_id, limits.describe())
        return limits

    async def set_tenant_limits(self, tenant: str, update: LimitsUpdate) -> Limits:
        validate_tenant(tenant)
        validated(update)
        subject = tenant_subject(tenant)
        current = (await self._ledger_call(self.ledger.get_limits([subject])))[subject]
        limits = update.applied_to(current)
        await self._ledger_call(self.ledger.set_limits(subject, limits, self.now_ms()))
        self.audit.append(AuditEvent("tenant.set", "ok", tenant=tenant, detail=f"limits: {limits.describe()}"))
        log.info("limits of tenant %s: %s", tenant, limits.describe())
        return limits

    async def key_limits(self, key_ids: Sequence[str]) -> dict[str, Limits]:
        found = await self._ledger_call(self.ledger.get_limits([key_subject(k) for k in key_ids]))
        return {k: found[key_subject(k)] for k in key_ids}

    async def usage(self, tenant: str = "") -> list[SubjectUsage]:
        """Every tenant's usage (those with keys or limits); with `tenant`, its own and each of its keys'."""
        now = self.now_ms()
        if tenant:
            validate_tenant(tenant)
            rows = [SubjectUsage(tenant, "", await self._state(tenant_subject(tenant), now))]
            for key in self.keys.list(tenant):
                rows.append(SubjectUsage(tenant, key.key_id, await self._state(key_subject(key.key_id), now)))
            return rows
        tenants = {k.tenant for k in self.keys.list()}
        tenants |= {s.removeprefix("tenant:") for s in await self._ledger_call(self.ledger.limited_subjects("tenant:"))}
        return [SubjectUsage(t, "", await self._state(tenant_subject(t), now)) for t in sorted(tenants)]

    async def _state(self, subject: str, now: int) -> SubjectState:
        return await self._ledger_call(self.ledger.subject_state(subject, now, self.window_ms))

    async def _ledger_call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except LedgerUnavailable as exc:
            raise Unavailable(exc.message, retry_after_s=1.0) from None


def _trace_id() -> str:
    trace_id = current_trace_id()
    return "" if trace_id == "none" else trace_id


def _unmetered(reservation_id: str) -> Reservation:
    return Reservation(reservation_id, "", "", "", 0, 0, 0, 0, State.OPEN, 0, 0)


_LIMIT_NAMES = {"requests_per_minute": "requests per minute", "tokens_per_minute": "tokens per minute",
                "budget_tokens": "token budget"}


def _whose(subject: str) -> str:
    kind, _, name = subject.partition(":")
    return f"{kind} {name}"


def _exhausted(refusal: Refusal, now: int) -> ResourceExhausted:
    """The error a refusal becomes: the message names the limit and says when it frees up."""
    whose = _whose(refusal.subject)
    if refusal.limit == "requests_per_minute":
        what = (f"{whose} is limited to {refusal.value} requests per minute ({refusal.used} in the last 60 s)")
        reason = Reason.RATE_LIMITED
    elif refusal.limit == "tokens_per_minute":
        what = (f"{whose} is limited to {refusal.value} tokens per minute ({refusal.used} in the last 60 s; this "
                f"request reserves {refusal.asked}: its prompt plus max_tokens)")
        reason = Reason.RATE_LIMITED
    else:
        per = {Period.DAY: "a day", Period.MONTH: "a month", Period.NONE: "in all"}[refusal.period]
        what = (f"{whose}'s token budget of {refusal.value} {per} is used up ({refusal.used} spent, {refusal.held} "
                f"reserved by requests in flight; this request reserves {refusal.asked}: its prompt plus max_tokens)")
        reason = Reason.BUDGET_EXHAUSTED
    if refusal.retry_after_ms is None:
        if refusal.asked > refusal.value:
            hint = "; waiting cannot help: lower max_tokens or shorten the prompt"
        else:
            hint = "; it never renews: an operator must raise it"
        message = what + hint
        retry_s = None
    else:
        at = datetime.fromtimestamp((now + refusal.retry_after_ms) / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        message = f"{what}; retry in {refusal.retry_after_ms / 1000:.3f} s (at {at}Z)"
        # A hair over the whole milliseconds, so `retry-after-ms` (whole ms, truncated) is never a millisecond short.
        retry_s = (refusal.retry_after_ms + 0.5) / 1000
    return ResourceExhausted(message, retry_s, reason=reason,
                             limit=Limit(refusal.quota_id, refusal.subject, refusal.value),
                             metadata={"subject": refusal.subject})

