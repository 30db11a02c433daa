"""Accounting and limits without the mesh: windows, budgets, leases and settlement on both ledgers (SQLite and a
real Redis), with an injected clock so nothing waits; concurrency; the store failing; hostile input."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.policy.accounting import Accounting
from services.policy.audit import MemoryAudit
from services.policy.keys import KeyStore
from services.policy.ledger import Ledger, SqliteLedger
from services.policy.limits import (
    LimitsUpdate,
    Period,
    State,
    WindowUse,
    key_subject,
    periods_at,
    tenant_subject,
)
from services.policy.redis_ledger import RedisLedger
from tests.redis_server import RedisServer

MODEL = "smollm2-135m-instruct:1"
NOON = datetime(2026, 12, 6, 12, 0, tzinfo=UTC).timestamp()
LEASE_S = 30.0


class FakeClock:
    def __init__(self, t: float = NOON) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Books:
    accounting: Accounting
    keys: KeyStore
    audit: MemoryAudit
    clock: FakeClock
    ledger: Ledger

    def key(self, tenant: str = "acme") -> tuple[str, str]:
        record, plaintext = self.keys.create(tenant)
        return record.key_id, plaintext

    async def reserve(self, api_key: str, prompt: int = 10, max_tokens: int = 20, rid: str = "",
                      continues: str = "") -> str:
        admitted = await self.accounting.reserve(api_key, MODEL, prompt_tokens=prompt, max_tokens=max_tokens,
                                                 reservation_id=rid or new_id(), continues=continues)
        return admitted.reservation_id

    async def refusal(self, api_key: str, prompt: int = 10, max_tokens: int = 20,
                      continues: str = "") -> ResourceExhausted:
        with pytest.raises(ResourceExhausted) as refused:
            await self.reserve(api_key, prompt, max_tokens, continues=continues)
        return refused.value

    async def counters(self, subject: str, period: Period = Period.DAY) -> tuple[int, int]:
        state = await self.ledger.subject_state(subject, self.accounting.now_ms(), self.accounting.window_ms)
        usage = next(c for c in state.periods if c.period.period == period)
        return usage.spent, usage.reserved


def new_id() -> str:
    return "chatcmpl-" + secrets.token_hex(8)


@pytest.fixture(params=["sqlite", "redis"])
def ledger_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_ledger(kind: str, tmp_path: Path, redis_server: RedisServer | None, clock: FakeClock,
                prefix: str = "") -> Ledger:
    if kind == "sqlite":
        return SqliteLedger(tmp_path)
    assert redis_server is not None
    return RedisLedger(redis_server.url, prefix=prefix or f"t{secrets.token_hex(6)}:", clock=clock)


@pytest_asyncio.fixture(loop_scope="session")
async def books(ledger_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Books]:
    redis_server = request.getfixturevalue("redis_server") if ledger_kind == "redis" else None
    clock = FakeClock()
    audit = MemoryAudit()
    keys = KeyStore(tmp_path, audit)
    keys.open()
    ledger = make_ledger(ledger_kind, tmp_path, redis_server, clock)
    accounting = Accounting(keys, ledger, audit, lease_s=LEASE_S, clock=clock)
    await accounting.open()
    yield Books(accounting, keys, audit, clock, ledger)
    await accounting.close()
    keys.close()


# ---- budgets ---------------------------------------------------------------------------------------------------

async def test_a_budget_admits_what_fits_and_holds_reservations_until_settled(books: Books) -> None:
    key_id, key = books.key()
    await books.accounting.set_tenant_limits("acme", LimitsUpdate(budget_tokens=100, budget_period=Period.DAY))
    first = await books.reserve(key)
    second = await books.reserve(key)
    await books.reserve(key)  # 90 of 100 reserved
    refused = await books.refusal(key)
    assert refused.limit is not None and refused.limit.id == "policy.budget_tokens"
    assert refused.limit.subject == "tenant:acme" and refused.limit.value == 100
    assert refused.reason == "BUDGET_EXHAUSTED"
    assert "tenant acme's token budget of 100 a day" in refused.message and "90 reserved" in refused.message
    # Held by open reservations: it frees up when one ends, at the latest when the soonest lease does.
    assert refused.retry_after_s is not None and abs(refused.retry_after_s - LEASE_S) < 0.01
    settled = await books.accounting.settle(first, 10, 3, "finished")  # 13 of its 30 used
    assert (settled.previous, settled.reservation.charged) == (State.OPEN, 13)
    assert await books.counters("tenant:acme") == (13, 60)
    assert await books.counters(key_subject(key_id)) == (13, 60)
    await books.refusal(key)  # 13 spent + 60 reserved + 30 asked = 103 > 100
    await books.accounting.settle(second, 0, 0, "error")  # a queue refused it: nothing used
    assert await books.counters("tenant:acme") == (13, 30)
    await books.reserve(key)  # 13 + 30 + 30 = 73


async def test_a_spent_budget_says_when_its_period_renews(books: Books) -> None:
    _, key = books.key()
    books.clock.t = datetime(2026, 12, 6, 23, 59, 0, tzinfo=UTC).timestamp()
    await books.accounting.set_tenant_limits("acme", LimitsUpdate(budget_tokens=40, budget_period=Period.DAY))
    rid = await books.reserve(key)
    await books.accounting.settle(rid, 10, 20)  # 30 spent
    refused = await books.refusal(key)
    assert refused.retry_after_s is not None
    assert int(refused.retry_after_s * 1000) == 60_000  # at midnight UTC, exactly
    assert "retry in 60.000 s (at 2026-12-07T00:00:00.000Z)" in refused.message
    books.clock.advance(59.999)
    await books.refusal(key)
    books.clock.advance(0.001)
    await books.reserve(key)


async def test_a_budget_without_period_never_renews_and_a_request_larger_than_a_limit_never_fits(books: Books) -> None:
    _, key = books.key()
    await books.accounting.set_tenant_limits("acme", LimitsUpdate(budget_tokens=50, budget_period=Period.NONE))
    refused = await books.refusal(key, prompt=30, max_tokens=30)
    assert refused.retry_after_s is None and "waiting cannot help: lower max_tokens" in refused.message
    rid = await books.reserve(key, prompt=20, max_tokens=20)
    await books.accounting.settle(rid, 20, 20)
    refused = await books.refusal(key)
    assert refused.retry_after_s is None and "never renews" in refused.message
    assert refused.trailing_metadata() == ()


async def test_key_and_tenant_budgets_both_apply_and_the_longest_wait_is_reported(books: Books) -> None:
    key_id, key = books.key()
    _, other = books.key()
    await books.accounting.set_key_limits(books.keys.get(key_id), LimitsUpdate(budget_tokens=60,
                                                                               budget_period=Period.MONTH))
    await books.accounting.set_tenant_limits("acme", LimitsUpdate(budget_tokens=90, budget_period=Period.DAY))
    rid = await books.reserve(key)
    await books.accounting.settle(rid, 10, 20)
    rid = await books.reserve(key)
    await books.accounting.settle(rid, 10, 20)  # the key's 60 of the month are spent
    await books.reserve(other)  # the tenant's day: 60 spent + 30 reserved = 90
    refused = await books.refusal(key)
    # The key's month ends later than the tenant's day: that is what the client must wait for.
    assert refused.limit is not None and refused.limit.subject == f"key:{key_id}"
    month_end = periods_at(books.accounting.now_ms())[Period.MONTH].end_ms
    assert refused.retry_after_s is not None
    assert int(refused.retry_after_s * 1000) == month_end - books.accounting.now_ms()


# ---- rate windows ------------------------------------------------------------------------------------------------

async def test_requests_per_minute_is_a_sliding_window_with_an_exact_retry_after(books: Books) -> None:
    key_id, key = books.key()
    await books.accounting.set_key_limits(books.keys.get(key_id), LimitsUpdate(requests_per_minute=3))
    for _ in range(3):
        await books.reserve(key)
        books.clock.advance(10)
    refused = await books.refusal(key)  # at t=30: the first admission (t=0) leaves the window at t=60
    assert refused.limit is not None and refused.limit.id == "policy.requests_per_minute"
    assert refused.reason == "RATE_LIMITED" and "limited to 3 requests per minute" in refused.message
    wait_ms = int(refused.retry_after_s * 1000)  # type: ignore[operator]
    assert wait_ms == 30_000
    assert dict(refused.trailing_metadata())["retry-after-ms"] == "30000"
    books.clock.advance(wait_ms / 1000 - 0.001)
    assert int((await books.refusal(key)).retry_after_s * 1000) == 1  # type: ignore[operator]
    books.clock.advance(0.001)
    await books.reserve(key)  # t=60: t=0 left, t=10, 20, 60 in the window
    assert int((await books.refusal(key)).retry_after_s * 1000) == 10_000  # type: ignore[operator]


async def test_tokens_per_minute_counts_reservations_then_corrects_them_at_settle(books: Books) -> None:
    key_id, key = books.key()
    await books.accounting.set_key_limits(books.keys.get(key_id), LimitsUpdate(tokens_per_minute=100))
    first = await books.reserve(key, 10, 40)  # 50 at t=0
    books.clock.advance(20)
    await books.reserve(key, 10, 30)  # 40 at t=20: 90 in the window
    refused = await books.refusal(key, 10, 20)  # 30 more: 120 > 100; once t=0's 50 leaves (t=60), it fits
    assert refused.limit is not None and refused.limit.id == "policy.tokens_per_minute"
    assert int(refused.retry_after_s * 1000) == 40_000  # type: ignore[operator]
    await books.accounting.settle(first, 10, 5)  # it used 15 of its 50: 55 in the window now
    await books.reserve(key, 10, 20)
    refused = await books.refusal(key, 100, 1)  # larger than the limit itself
    assert refused.retry_after_s is None


async def test_an_admission_says_where_the_keys_rate_window_stands_with_it(books: Books) -> None:
    key_id, key = books.key()
    await books.accounting.set_key_limits(books.keys.get(key_id), LimitsUpdate(requests_per_minute=5,
                                                                               tokens_per_minute=1000))

    async def window(prompt: int, max_tokens: int, rid: str = "") -> tuple[str, WindowUse | None]:
        admitted = await books.accounting.reserve(key, MODEL, prompt_tokens=prompt, max_tokens=max_tokens,
                                                  reservation_id=rid or new_id())
        return admitted.reservation_id, admitted.key_window

    first, seen = await window(10, 40)
    assert seen == WindowUse(requests=1, tokens=50, oldest_leaves_in_ms=60_000)
    books.clock.advance(20)
    _, seen = await window(10, 30)
    assert seen == WindowUse(requests=2, tokens=90, oldest_leaves_in_ms=40_000)
    await books.accounting.settle(first, 10, 5)  # its real usage from now on: 15
    books.clock.advance(10)
    _, seen = await window(10, 20)
    assert seen == WindowUse(requests=3, tokens=15 + 40 + 30, oldest_leaves_in_ms=30_000)
    assert (await window(10, 20, rid=first))[1] is None  # a repeated Reserve admits nothing new
    books.clock.advance(30)  # the first left; the others stay
    _, seen = await window(1, 1)
    assert seen == WindowUse(requests=3, tokens=40 + 30 + 2, oldest_leaves_in_ms=20_000)
    # Without a rate limit on the key (none, or a budget only), there is no window to tell.
    _, plain = books.key()
    assert (await books.accounting.reserve(plain, MODEL, prompt_tokens=1, max_tokens=1,
                                           reservation_id=new_id())).key_window is None
    budget_id, budgeted = books.key()
    await books.accounting.set_key_limits(books.keys.get(budget_id), LimitsUpdate(budget_tokens=100))
    assert (await books.accounting.reserve(budgeted, MODEL, prompt_tokens=1, max_tokens=1,
                                           reservation_id=new_id())).key_window is None


async def test_a_request_that_continues_an_admitted_one_counts_no_request_but_its_tokens(books: Books) -> None:
    """A tool chat: its plan is admitted as a request, its answer continues it; one request for the key and for
    its tenant, the tokens of both."""
    key_id, key = books.key()
    await books.accounting.set_key_limits(books.keys.get(key_id), LimitsUpdate(requests_per_minute=1,
                                                                               tokens_per_minute=100))
    await books.accounting.set_tenant_limits("acme", LimitsUpdate(requests_per_minute=1))
    plan = await books.accounting.reserve(key, MODEL, prompt_tokens=10, max_tokens=20, reservation_id=new_id())
    assert plan.key_window == WindowUse(requests=1, tokens=30, oldest_leaves_in_ms=60_000)
    books.clock.advance(10)
    answer = await books.accounting.reserve(key, MODEL, prompt_tokens=15, max_tokens=25, reservation_id=new_id(),
                                            continues=plan.reservation_id)
    assert answer.key_window == WindowUse(requests=1, tokens=70, oldest_leaves_in_ms=50_000)
    for subject in (key_subject(key_id), tenant_subject("acme")):
        state = await books.ledger.subject_state(subject, books.accounting.now_ms(), books.accounting.window_ms)
        assert (state.requests_in_window, state.tokens_in_window) == (1, 70)
    refused = await books.refusal(key, 1, 1)  # a new request: the minute's one is taken (key and tenant)
    assert refused.limit is not None and refused.limit.id == "policy.requests_per_minute"
    assert int(refused.retry_after_s * 1000) == 50_000  # type: ignore[operator]
    # Its tokens count as any request's: 31 more do not fit the 30 left, and they free up in order of admission
    # (the plan's 30 at t=60 are not enough, the answer's 40 at t=70 are).
    refused = await books.refusal(key, 1, 30, continues=plan.reservation_id)
    assert refused.limit is not None and refused.limit.id == "policy.tokens_per_minute"
    assert int(refused.retry_after_s * 1000) == 50_000  # type: ignore[operator]
    refused = await books.refusal(key, 31, 30, continues=plan.reservation_id)
    assert int(refused.retry_after_s * 1000) == 60_000  # type: ignore[operator]
    await books.reserve(key, 10, 20, continues=answer.reservation_id)  # a chain is still one request
    await books.accounting.settle(answer.reservation_id, 15, 5)  # settled: its real 20 tokens from now on
    books.clock.advance(50)  # t=60: the plan left the window; the answer and the third stay
    state = await books.ledger.subject_state(key_subject(key_id), books.accounting.now_ms(),
                                             books.accounting.window_ms)
    assert (state.requests_in_window, state.tokens_in_window) == (0, 20 + 30)
    await books.reserve(key, 1, 1)
    assert any(e.action == "reserve" and f"part of {plan.reservation_id}'s request" in e.detail
               for e in books.audit.events)


async def test_what_a_reserve_may_continue(books: Books) -> None:
    key_id, key = books.key()
    _, other = books.key()
    await books.accounting.set_key_limits(books.keys.get(key_id), LimitsUpdate(requests_per_minute=1))
    others = await books.reserve(other)
    for continues, problem in ((others, "another key's reservation"), ("chatcmpl-self-0001", "another request's"),
                               ("no spaces allowed", "8 to 64 letters")):
        with pytest.raises(InvalidArgument) as bad:
            await books.reserve(key, rid="chatcmpl-self-0001", continues=continues)
        assert bad.value.field == "continues" and problem in bad.value.message
    # One the ledger does not hold (admitted unmetered, or long gone) leaves it a request of its own.
    await books.reserve(key, continues="unmetered-chatcmpl-0123456789")
    assert (await books.refusal(key, continues=new_id())).limit.id == "policy.requests_per_minute"  # type: ignore[union-attr]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gaps=st.lists(st.integers(0, 40_000), min_size=1, max_size=40), rpm=st.integers(1, 5))
async def test_no_window_ever_admits_more_than_the_limit_and_a_retry_after_its_delay_passes(
        tmp_path_factory: pytest.TempPathFactory, gaps: list[int], rpm: int) -> None:
    clock = FakeClock()
    audit = MemoryAudit()
    folder = tmp_path_factory.mktemp("window")
    keys = KeyStore(folder, audit)
    keys.open()
    accounting = Accounting(keys, SqliteLedger(folder), audit, clock=clock)
    await accounting.open()
    try:
        record, key = keys.create("acme")
        await accounting.set_key_limits(record, LimitsUpdate(requests_per_minute=rpm))
        admitted: list[int] = []
        for gap in gaps:
            clock.advance(gap / 1000)
            try:
                await accounting.reserve(key, MODEL, prompt_tokens=1, max_tokens=1, reservation_id=new_id())
                admitted.append(accounting.now_ms())
            except ResourceExhausted as refused:
                assert refused.retry_after_s is not None
                wait_ms = int(refused.retry_after_s * 1000)
                later = clock.t + wait_ms / 1000
                probe = Accounting(keys, accounting.ledger, MemoryAudit(), clock=lambda at=later: at)
                await probe.reserve(key, MODEL, prompt_tokens=1, max_tokens=1, reservation_id=new_id())
                admitted.append(probe.now_ms())
                clock.t = later
        for start in admitted:
            assert sum(1 for t in admitted if start <= t < start + 60_000) <= rpm
    finally:
        await accounting.close()
        keys.close()


# ---- leases, expiry and settlement ---------------------------------------------------------------------------

async def test_an_unsettled_reservation_expires_after_its_lease_charged_in_full(books: Books) -> None:
    key_id, key = books.key()
    rid = await books.reserve(key, 10, 20)
    books.clock.advance(LEASE_S - 0.001)
    assert await books.accounting.sweep() == []
    books.clock.advance(0.001)
    expired = await books.accounting.sweep()
    assert [(r.id, r.state, r.charged) for r in expired] == [(rid, State.EXPIRED, 30)]
    assert await books.counters(key_subject(key_id)) == (30, 0)  # never less than could have been generated
    assert await books.accounting.sweep() == []  # once
    assert [e.action for e in books.audit.events].count("expire") == 1
    # The gateway was only cut off: its late Settle corrects the charge to the real usage, once.
    late = await books.accounting.settle(rid, 10, 7)
    assert (late.previous, late.reservation.charged) == (State.EXPIRED, 17)
    assert await books.counters(key_subject(key_id)) == (17, 0)
    again = await books.accounting.settle(rid, 10, 20)
    assert (again.previous, again.reservation.charged) == (State.SETTLED, 17)
    assert await books.counters(key_subject(key_id)) == (17, 0)


async def test_renewing_keeps_a_reservation_open_and_an_admission_expires_lapsed_ones(books: Books) -> None:
    _, key = books.key()
    rid = await books.reserve(key)
    for _ in range(5):
        books.clock.advance(LEASE_S * 0.9)
        assert (await books.accounting.renew(rid)).state == State.OPEN
    lapsed = await books.reserve(key)
    books.clock.advance(LEASE_S * 0.9)
    await books.accounting.renew(rid)
    books.clock.advance(LEASE_S * 0.2)
    await books.reserve(key)  # expires `lapsed` on its way, without waiting for the sweeper
    assert (await books.ledger.get(lapsed)).state == State.EXPIRED
    assert (await books.ledger.get(rid)).state == State.OPEN
    assert (await books.accounting.renew(lapsed)).state == State.EXPIRED


async def test_settle_is_idempotent_and_never_charges_more_than_was_reserved(books: Books) -> None:
    key_id, key = books.key()
    rid = await books.reserve(key, 10, 20)
    first = await books.accounting.settle(rid, 10, 500)
    assert first.reservation.charged == 30
    for _ in range(3):
        again = await books.accounting.settle(rid, 1, 1)
        assert (again.previous, again.reservation.charged) == (State.SETTLED, 30)
    assert await books.counters(key_subject(key_id)) == (30, 0)
    with pytest.raises(NotFound):
        await books.accounting.settle(new_id(), 1, 1)
    with pytest.raises(InvalidArgument):
        await books.accounting.settle(rid, -1, 1)


async def test_a_repeated_reserve_finds_the_same_reservation(books: Books) -> None:
    key_id, key = books.key()
    _, other = books.key()
    rid = await books.reserve(key, rid="chatcmpl-the-same-one")
    assert await books.reserve(key, rid="chatcmpl-the-same-one") == rid
    assert await books.counters(key_subject(key_id)) == (0, 30)
    with pytest.raises(AlreadyExists):
        await books.reserve(other, rid="chatcmpl-the-same-one")


# ---- changes apply to the next request -----------------------------------------------------------------------

async def test_a_lowered_limit_and_a_revoked_key_apply_to_the_next_request(books: Books) -> None:
    key_id, key = books.key()
    record = books.keys.get(key_id)
    await books.accounting.set_key_limits(record, LimitsUpdate(requests_per_minute=10))
    await books.reserve(key)
    await books.reserve(key)
    await books.accounting.set_key_limits(record, LimitsUpdate(requests_per_minute=2))
    await books.refusal(key)
    await books.accounting.set_key_limits(record, LimitsUpdate(requests_per_minute=0))  # 0: no limit
    await books.reserve(key)
    books.keys.revoke(key_id)
    with pytest.raises(Unauthenticated):
        await books.reserve(key)


# ---- never overspent, whatever the concurrency ----------------------------------------------------------------

async def test_concurrent_reservations_on_two_ledger_replicas_never_overspend(books: Books, ledger_kind: str,
                                                                               tmp_path: Path,
                                                                               request: pytest.FixtureRequest) -> None:
    """Two Accounting instances over two ledgers on one store (two policy replicas), 300 admissions at once
    against a budget for 50."""
    _, key = books.key()
    await books.accounting.set_tenant_limits("acme", LimitsUpdate(budget_tokens=50 * 30, budget_period=Period.DAY))
    prefix = getattr(books.ledger, "prefix", "")
    redis_server = request.getfixturevalue("redis_server") if ledger_kind == "redis" else None
    second_ledger = make_ledger(ledger_kind, tmp_path, redis_server, books.clock, prefix)
    second = Accounting(books.keys, second_ledger, books.audit, lease_s=LEASE_S, clock=books.clock)
    await second.open()
    try:
        replicas = itertools.cycle([books.accounting, second])

        async def one(replica: Accounting) -> str | None:
            try:
                return (await replica.reserve(key, MODEL, prompt_tokens=10, max_tokens=20,
                                              reservation_id=new_id())).reservation_id
            except ResourceExhausted:
                return None

        results = await asyncio.gather(*(one(next(replicas)) for _ in range(300)))
        admitted = [r for r in results if r]
        assert len(admitted) == 50
        assert await books.counters("tenant:acme") == (0, 1500)
        # Settled concurrently through both, each with its own usage: the balance is exact to the token.
        used = {rid: 10 + i % 21 for i, rid in enumerate(admitted)}
        await asyncio.gather(*(next(replicas).settle(rid, 10, n - 10) for rid, n in used.items()))
        assert await books.counters("tenant:acme") == (sum(used.values()), 0)
    finally:
        await second.close()


# ---- usage, audit, the store failing ------------------------------------------------------------------------

async def test_usage_reports_spent_reserved_and_remaining_per_period(books: Books) -> None:
    key_id, key = books.key()
    await books.accounting.set_tenant_limits("acme", LimitsUpdate(budget_tokens=1000))  # monthly by default
    rid = await books.reserve(key, 10, 20)
    await books.accounting.settle(rid, 10, 5)
    await books.reserve(key, 10, 20)
    rows = await books.accounting.usage("acme")
    assert [(r.tenant, r.key_id) for r in rows] == [("acme", ""), ("acme", key_id)]
    tenant = rows[0].state
    assert tenant.limits.budget_period == Period.MONTH
    month = next(c for c in tenant.periods if c.period.period == Period.MONTH)
    assert (month.spent, month.reserved) == (15, 30)
    assert (tenant.requests_in_window, tenant.tokens_in_window) == (2, 45)
    everyone = await books.accounting.usage()
    assert [r.tenant for r in everyone] == ["acme"]


async def test_every_decision_is_audited_without_the_key(books: Books) -> None:
    key_id, key = books.key()
    await books.accounting.set_key_limits(books.keys.get(key_id), LimitsUpdate(requests_per_minute=1))
    rid = await books.reserve(key)
    await books.refusal(key)
    await books.accounting.settle(rid, 1, 2, "finished")
    with pytest.raises(Unauthenticated):
        await books.reserve("lmk_" + "x" * 43)
    actions = [(e.action, e.outcome) for e in books.audit.events]
    for wanted in [("key.create", "ok"), ("key.limits", "ok"), ("authorize", "allowed"), ("reserve", "allowed"),
                   ("reserve", "denied"), ("settle", "charged"), ("authorize", "denied")]:
        assert wanted in actions, (wanted, actions)
    settle = next(e for e in books.audit.events if e.action == "settle")
    assert settle.principal == key_id and settle.tenant == "acme" and settle.model == MODEL
    assert dict(settle.tokens) == {"prompt": 1, "completion": 2, "reserved": 30, "charged": 3}
    assert all(key not in repr(e) for e in books.audit.events)


async def test_an_unreachable_redis_fails_closed_by_default_and_open_when_configured(tmp_path: Path) -> None:
    from services.common.consul_agent import free_port

    audit = MemoryAudit()
    keys = KeyStore(tmp_path, audit)
    keys.open()
    _, key = keys.create("acme")
    url = f"redis://127.0.0.1:{free_port()}/0"
    closed = Accounting(keys, RedisLedger(url, timeout_s=0.5), audit)
    opened = Accounting(keys, RedisLedger(url, timeout_s=0.5), audit, fail_open=True)
    await closed.open()
    await opened.open()
    try:
        with pytest.raises(Unavailable) as down:
            await closed.reserve(key, MODEL, prompt_tokens=1, max_tokens=1, reservation_id=new_id())
        assert "unreachable" in down.value.message and "fail closed" in down.value.message
        admitted = await opened.reserve(key, MODEL, prompt_tokens=1, max_tokens=1, reservation_id=new_id())
        assert not admitted.metered
        await opened.renew(admitted.reservation_id)
        await opened.settle(admitted.reservation_id, 1, 1)
        assert ("reserve", "unmetered") in [(e.action, e.outcome) for e in audit.events]
        with pytest.raises(Unavailable):
            await closed.set_tenant_limits("acme", LimitsUpdate(requests_per_minute=1))
    finally:
        await closed.close()
        await opened.close()
        keys.close()


async def test_the_sqlite_ledger_keeps_everything_across_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    audit = MemoryAudit()
    keys = KeyStore(tmp_path, audit)
    keys.open()
    _, key = keys.create("acme")
    first = Accounting(keys, SqliteLedger(tmp_path), audit, clock=clock)
    await first.open()
    await first.set_tenant_limits("acme", LimitsUpdate(budget_tokens=100, budget_period=Period.DAY))
    settled = await first.reserve(key, MODEL, prompt_tokens=10, max_tokens=20, reservation_id=new_id())
    held = await first.reserve(key, MODEL, prompt_tokens=10, max_tokens=20, reservation_id=new_id())
    await first.settle(settled.reservation_id, 10, 10)
    await first.close()
    again = Accounting(keys, SqliteLedger(tmp_path), audit, clock=clock)
    await again.open()
    try:
        state = await again.ledger.subject_state(tenant_subject("acme"), again.now_ms(), again.window_ms)
        day = next(c for c in state.periods if c.period.period == Period.DAY)
        assert (day.spent, day.reserved) == (20, 30)
        assert state.limits.budget_tokens == 100
        await again.settle(held.reservation_id, 10, 1)
        state = await again.ledger.subject_state(tenant_subject("acme"), again.now_ms(), again.window_ms)
        assert next(c for c in state.periods if c.period.period == Period.DAY).spent == 31
    finally:
        await again.close()
        keys.close()


async def test_a_ledger_of_the_first_schema_counts_its_entries_as_requests(tmp_path: Path) -> None:
    """A ledger written before continuations (schema 1, window entries without `requests`) opens with every
    entry it holds still a request."""
    import sqlite3

    from services.policy import ledger as ledger_module

    old_schema = "\n".join(line for line in ledger_module._SCHEMA.splitlines() if "requests       INTEGER" not in line)
    assert old_schema != ledger_module._SCHEMA
    db = sqlite3.connect(tmp_path / ledger_module.DB_NAME)
    db.executescript(old_schema)
    db.execute("PRAGMA user_version=1")
    clock = FakeClock()
    audit = MemoryAudit()
    keys = KeyStore(tmp_path, audit)
    keys.open()
    record, key = keys.create("acme")
    now = int(clock.t * 1000)
    for i in range(2):
        db.execute("INSERT INTO window_entries (subject, reservation_id, at_ms, tokens) VALUES (?, ?, ?, ?)",
                   (key_subject(record.key_id), f"chatcmpl-old-{i:04d}", now - 1000, 5))
    db.commit()
    db.close()
    accounting = Accounting(keys, SqliteLedger(tmp_path), audit, clock=clock)
    await accounting.open()
    try:
        await accounting.set_key_limits(record, LimitsUpdate(requests_per_minute=3))
        admitted = await accounting.reserve(key, MODEL, prompt_tokens=1, max_tokens=1, reservation_id=new_id())
        assert admitted.key_window == WindowUse(requests=3, tokens=12, oldest_leaves_in_ms=59_000)
        with pytest.raises(ResourceExhausted):
            await accounting.reserve(key, MODEL, prompt_tokens=1, max_tokens=1, reservation_id=new_id())
    finally:
        await accounting.close()
        keys.close()


@pytest.mark.parametrize(("update", "field"), [
    (LimitsUpdate(requests_per_minute=-1), "limits.requests_per_minute"),
    (LimitsUpdate(tokens_per_minute=10**16), "limits.tokens_per_minute"),
    (LimitsUpdate(budget_tokens=-5), "limits.budget_tokens"),
    (LimitsUpdate(budget_tokens=0, budget_period=Period.DAY), "limits.budget_period"),
])
async def test_bad_limits_are_invalid_argument_naming_the_field(books: Books, update: LimitsUpdate,
                                                                field: str) -> None:
    with pytest.raises(InvalidArgument) as bad:
        await books.accounting.set_tenant_limits("acme", update)
    assert bad.value.field == field
