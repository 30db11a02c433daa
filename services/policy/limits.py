"""Limits of keys and tenants, budget periods, and what a ledger needs to decide one admission (no grpc here).

A request passes when it passes every limit of its key and of its key's tenant:

- `requests_per_minute`, `tokens_per_minute`: sliding windows of `window_ms` (60 s). Every admission is logged
  with its time and tokens; a request passes when the entries younger than the window, plus itself, fit. When it
  does not, the time until it would fit is exact: the moment the oldest entries that stand in the way leave the
  window (with no other traffic, a retry then passes).
- `budget_tokens` per `budget_period` (a UTC day, a UTC month, or none: a lifetime budget): what was charged in
  the current period plus what open reservations hold plus this request's reservation must fit.

Tokens are prompt plus completion tokens. At admission a request counts its reservation (prompt + max_tokens);
Settle corrects the window entry and the period's charge to the real usage.
"""

from __future__ import annotations

import calendar
import enum
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from services.common.errors import InvalidArgument

MAX_LIMIT = 10**15  # below 2**53: exact as a Lua number in Redis scripts
MAX_RPM = 2**31 - 1  # requests_per_minute is an int32 in the contract
WINDOW_MS = 60_000
RESERVATION_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")

Clock = Callable[[], float]  # seconds since the epoch (time.time); tests inject their own


def now_ms(clock: Clock = time.time) -> int:
    return round(clock() * 1000)  # round, not truncate: 1765022400.739 s is 1765022400739 ms


class Period(enum.StrEnum):
    """A budget's period; `NONE`: the budget never renews."""

    NONE = "none"
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True)
class Limits:
    """One key's or tenant's limits; 0 means no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    budget_tokens: int = 0
    budget_period: Period = Period.NONE

    def __post_init__(self) -> None:
        if not self.budget_tokens and self.budget_period != Period.NONE:
            object.__setattr__(self, "budget_period", Period.NONE)

    @property
    def unlimited(self) -> bool:
        return not (self.requests_per_minute or self.tokens_per_minute or self.budget_tokens)

    def describe(self) -> str:
        parts = []
        if self.requests_per_minute:
            parts.append(f"{self.requests_per_minute} requests/min")
        if self.tokens_per_minute:
            parts.append(f"{self.tokens_per_minute} tokens/min")
        if self.budget_tokens:
            per = {Period.DAY: " a day", Period.MONTH: " a month", Period.NONE: " in all"}[self.budget_period]
            parts.append(f"{self.budget_tokens} tokens{per}")
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class LimitsUpdate:
    """A change of limits: None keeps a value, 0 removes a limit. A budget set where there was none is monthly
    unless a period is given."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    budget_tokens: int | None = None
    budget_period: Period | None = None

    def applied_to(self, current: Limits) -> Limits:
        budget = current.budget_tokens if self.budget_tokens is None else self.budget_tokens
        period = self.budget_period
        if period is None:
            period = current.budget_period if current.budget_tokens else Period.MONTH
        return Limits(
            requests_per_minute=(current.requests_per_minute if self.requests_per_minute is None
                                 else self.requests_per_minute),
            tokens_per_minute=current.tokens_per_minute if self.tokens_per_minute is None else self.tokens_per_minute,
            budget_tokens=budget, budget_period=period if budget else Period.NONE)

    @property
    def empty(self) -> bool:
        return (self.requests_per_minute is None and self.tokens_per_minute is None and self.budget_tokens is None
                and self.budget_period is None)


def check_limit(value: int, field: str, maximum: int = MAX_LIMIT) -> int:
    if value < 0:
        raise InvalidArgument(field, f"must not be negative (0 means no limit), got {value}")
    if value > maximum:
        raise InvalidArgument(field, f"must be at most {maximum}, got {value}")
    return value


def validated(update: LimitsUpdate, prefix: str = "limits") -> LimitsUpdate:
    """The update with every given value checked (InvalidArgument naming the field)."""
    if update.requests_per_minute is not None:
        check_limit(update.requests_per_minute, f"{prefix}.requests_per_minute", MAX_RPM)
    if update.tokens_per_minute is not None:
        check_limit(update.tokens_per_minute, f"{prefix}.tokens_per_minute")
    if update.budget_tokens is not None:
        check_limit(update.budget_tokens, f"{prefix}.budget_tokens")
    if update.budget_period is not None and update.budget_period != Period.NONE and update.budget_tokens == 0:
        raise InvalidArgument(f"{prefix}.budget_period", "a period needs a budget (budget_tokens > 0)")
    return update


def check_reservation_id(reservation_id: str, name: str = "reservation_id") -> str:
    if not RESERVATION_ID.fullmatch(reservation_id):
        raise InvalidArgument(name, "must be 8 to 64 letters, digits, '-' or '_'")
    return reservation_id


# -- subjects and periods ----------------------------------------------------------------------------------------

def key_subject(key_id: str) -> str:
    return f"key:{key_id}"


def tenant_subject(tenant: str) -> str:
    return f"tenant:{tenant}"


@dataclass(frozen=True)
class PeriodWindow:
    """The current period of one kind: its counter label ("d:2026-12-06", "m:2026-12", "all") and end."""

    period: Period
    label: str
    end_ms: int  # 0: never ends

    @property
    def shown(self) -> str:
        return self.label.split(":", 1)[-1]


def periods_at(at_ms: int) -> dict[Period, PeriodWindow]:
    """The day, month and all-time periods that contain `at_ms` (UTC)."""
    moment = datetime.fromtimestamp(at_ms / 1000, UTC)
    day_start = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    day_end = int(day_start.timestamp() * 1000) + 86_400_000
    days = calendar.monthrange(moment.year, moment.month)[1]
    month_end = int(datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp() * 1000) + days * 86_400_000
    return {
        Period.DAY: PeriodWindow(Period.DAY, f"d:{moment:%Y-%m-%d}", day_end),
        Period.MONTH: PeriodWindow(Period.MONTH, f"m:{moment:%Y-%m}", month_end),
        Period.NONE: PeriodWindow(Period.NONE, "all", 0),
    }


# -- what a ledger decides on, and what it answers -----------------------------------------------------------------

@dataclass(frozen=True)
class Order:
    """One admission to decide: reserve `tokens` for `reservation_id` against the key's and the tenant's limits."""

    reservation_id: str
    key_id: str
    tenant: str
    model: str
    prompt_tokens: int
    max_tokens: int
    now_ms: int  # the caller's clock; a ledger may take its own (Redis: the server's)
    lease_ms: int
    window_ms: int = WINDOW_MS
    trace_id: str = ""
    periods: dict[Period, PeriodWindow] = field(default_factory=dict)
    continues: str = ""  # the reservation of the admitted request this one is part of ('' a new request)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens

    @property
    def subjects(self) -> tuple[str, str]:
        return key_subject(self.key_id), tenant_subject(self.tenant)

    def at(self, now: int) -> Order:
        return replace(self, now_ms=now, periods=periods_at(now))


class State(enum.StrEnum):
    OPEN = "open"
    SETTLED = "settled"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Reservation:
    id: str
    key_id: str
    tenant: str
    model: str
    prompt_tokens: int
    max_tokens: int
    reserved: int
    charged: int
    state: State
    created_ms: int
    lease_until_ms: int
    trace_id: str = ""


LIMIT_IDS = {"requests_per_minute": "policy.requests_per_minute", "tokens_per_minute": "policy.tokens_per_minute",
             "budget_tokens": "policy.budget_tokens"}


@dataclass(frozen=True)
class Refusal:
    """A limit the order does not fit: which (`limit`: a Limits field name), whose, its value, what stands in the
    way, and when it would fit (`retry_after_ms`; None: waiting cannot help)."""

    subject: str
    limit: str
    value: int
    used: int  # in the window, or spent in the period
    held: int  # budget only: held by open reservations
    asked: int  # 1 request, or the order's tokens
    retry_after_ms: int | None
    period: Period = Period.NONE

    @property
    def quota_id(self) -> str:
        return LIMIT_IDS[self.limit]


@dataclass(frozen=True)
class Admission:
    """A ledger's answer to an order: the reservation made (or found: a repeated order), or the refusal that
    waits longest; plus the reservations it expired on the way (for the audit trail)."""

    reservation: Reservation | None
    refusal: Refusal | None = None
    expired: tuple[Reservation, ...] = ()
    repeated: bool = False
    limits: tuple[Limits, Limits] = (Limits(), Limits())  # the key's and the tenant's, as the step read them
    key_window: WindowUse | None = None  # a new admission of a key with a rate limit: its window with it


@dataclass(frozen=True)
class WindowUse:
    """A subject's rate window just after an admission: the requests in it (the admitted one counted), the tokens
    they hold, and in how many milliseconds the oldest of them leaves it (by the ledger's clock)."""

    requests: int
    tokens: int
    oldest_leaves_in_ms: int


@dataclass(frozen=True)
class Settlement:
    reservation: Reservation  # as it is now (settled)
    previous: State


@dataclass(frozen=True)
class CounterUsage:
    period: PeriodWindow
    spent: int
    reserved: int


@dataclass(frozen=True)
class SubjectState:
    """A subject's limits, counters of its current periods and rate window."""

    subject: str
    limits: Limits
    periods: tuple[CounterUsage, ...]
    requests_in_window: int
    tokens_in_window: int


def most_waiting(refusals: list[Refusal]) -> Refusal | None:
    """The refusal to report: one that waiting cannot cure, else the one that frees up last (so a retry after its
    delay passes every limit, as far as the ledger knows)."""
    if not refusals:
        return None
    never = [r for r in refusals if r.retry_after_ms is None]
    if never:
        return never[0]
    return max(refusals, key=lambda r: r.retry_after_ms or 0)
