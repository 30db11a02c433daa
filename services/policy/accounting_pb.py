"""Conversions between lmesh.policy.v1's limits, reservations and usage and the accounting domain's types."""

from __future__ import annotations

from lmesh.policy.v1 import policy_pb2

from services.common.errors import InvalidArgument
from services.policy.accounting import SubjectUsage
from services.policy.limits import Limits, LimitsUpdate, Period, State, WindowUse, key_subject, tenant_subject

PERIOD_TO_PB = {Period.NONE: policy_pb2.BUDGET_PERIOD_NONE, Period.DAY: policy_pb2.BUDGET_PERIOD_DAY,
                Period.MONTH: policy_pb2.BUDGET_PERIOD_MONTH}
PERIOD_FROM_PB = {v: k for k, v in PERIOD_TO_PB.items()}
STATE_TO_PB = {State.OPEN: policy_pb2.RESERVATION_STATE_OPEN, State.SETTLED: policy_pb2.RESERVATION_STATE_SETTLED,
               State.EXPIRED: policy_pb2.RESERVATION_STATE_EXPIRED}
ENDINGS = {policy_pb2.ENDING_UNSPECIFIED: "ended", policy_pb2.ENDING_FINISHED: "finished",
           policy_pb2.ENDING_CANCELLED: "cancelled", policy_pb2.ENDING_CLIENT_GONE: "client gone",
           policy_pb2.ENDING_DEADLINE: "deadline", policy_pb2.ENDING_ERROR: "error"}


def window_pb(window: WindowUse | None) -> policy_pb2.RateWindow | None:
    if window is None:
        return None
    return policy_pb2.RateWindow(requests=window.requests, tokens=window.tokens,
                                 oldest_leaves_in_ms=max(0, window.oldest_leaves_in_ms))


def limits_pb(limits: Limits) -> policy_pb2.Limits:
    """No limits at all is the empty message (the budget's period is UNSPECIFIED without a budget)."""
    period = PERIOD_TO_PB[limits.budget_period] if limits.budget_tokens else policy_pb2.BUDGET_PERIOD_UNSPECIFIED
    return policy_pb2.Limits(requests_per_minute=limits.requests_per_minute,
                             tokens_per_minute=limits.tokens_per_minute, budget_tokens=limits.budget_tokens,
                             budget_period=period)


def _period(value: int, field: str) -> Period | None:
    if value == policy_pb2.BUDGET_PERIOD_UNSPECIFIED:
        return None
    if value not in PERIOD_FROM_PB:
        raise InvalidArgument(field, f"must be NONE, DAY or MONTH, got {value}")
    return PERIOD_FROM_PB[value]


def creation_update(limits: policy_pb2.Limits, prefix: str = "limits") -> LimitsUpdate:
    """A new key's limits as an update of none: every field is given (0: no limit)."""
    return LimitsUpdate(requests_per_minute=limits.requests_per_minute, tokens_per_minute=limits.tokens_per_minute,
                        budget_tokens=limits.budget_tokens,
                        budget_period=_period(limits.budget_period, f"{prefix}.budget_period"))


def update_from_pb(update: policy_pb2.LimitsUpdate, prefix: str = "limits") -> LimitsUpdate:
    return LimitsUpdate(
        requests_per_minute=update.requests_per_minute if update.HasField("requests_per_minute") else None,
        tokens_per_minute=update.tokens_per_minute if update.HasField("tokens_per_minute") else None,
        budget_tokens=update.budget_tokens if update.HasField("budget_tokens") else None,
        budget_period=_period(update.budget_period, f"{prefix}.budget_period"))


def state_pb(state: State) -> policy_pb2.ReservationState.ValueType:
    return STATE_TO_PB[state]


def ending_name(value: int) -> str:
    if value not in ENDINGS:
        raise InvalidArgument("ending", f"unknown ending {value}")
    return ENDINGS[value]


def usage_pb(row: SubjectUsage) -> policy_pb2.SubjectUsage:
    state = row.state
    usage = policy_pb2.SubjectUsage(
        subject=key_subject(row.key_id) if row.key_id else tenant_subject(row.tenant), tenant=row.tenant,
        key_id=row.key_id, limits=limits_pb(state.limits), requests_in_window=state.requests_in_window,
        tokens_in_window=state.tokens_in_window)
    for counter in state.periods:
        period = policy_pb2.PeriodUsage(period=PERIOD_TO_PB[counter.period.period], label=counter.period.shown,
                                        spent_tokens=counter.spent, reserved_tokens=counter.reserved,
                                        end_unix_ms=counter.period.end_ms)
        if state.limits.budget_tokens and state.limits.budget_period == counter.period.period:
            period.remaining_tokens = max(0, state.limits.budget_tokens - counter.spent - counter.reserved)
        usage.periods.append(period)
    return usage
