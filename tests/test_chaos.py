"""`make chaos` in short: the verdict logic on synthetic results, and two of its scenarios on a real mesh."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import (
    BUDGET_TARGETS,
    COMMON_TARGETS,
    OK,
    SCENARIOS,
    ChatRecord,
    Target,
    budget_drift,
    judge,
    render,
    run,
    select,
    summarize,
)
from services.common.consul_agent import find_consul

FAULT = 100.0


def ok(started: float, ended: float, tokens: int = 8, usage: int | None = None) -> ChatRecord:
    return ChatRecord(started, ended, OK, tokens, tokens if usage is None else usage, started + 0.1)


def failed(started: float, ended: float, code: str = "UNAVAILABLE") -> ChatRecord:
    return ChatRecord(started, ended, code)


def test_a_clean_fault_is_measured_from_the_fault_and_passes() -> None:
    records = [ok(98.0, 99.5), failed(99.0, 100.4), failed(100.5, 100.6), ok(100.7, 101.9), ok(101.0, 102.0)]
    measured = summarize(records, FAULT, restored_at=104.0)
    assert measured["sent"] == 5 and measured["completed"] == 3 and measured["failed"] == 2
    assert measured["recover_s"] == 0.6  # the last failure ended 0.6 s after the fault
    assert measured["in_flight_failed"] == 1 and measured["in_flight_fail_s"] == 0.4
    assert measured["slowest_failure_s"] == 0.4  # the in-flight one, counted from the fault, not its start
    assert measured["after_restore_s"] == 0.0  # nothing failed after the restore
    assert measured["completed_after_fault"] == 2
    scenario = next(s for s in SCENARIOS if s.name == "kill-inference")
    result = judge("kill-inference", records, measured, (*COMMON_TARGETS, *scenario.targets))
    assert result.passed, render([result])
    assert result.failed == {"UNAVAILABLE": 2} and result.completed == 3 and result.recover_s == 0.6
    assert "PASS" in render([result])


def test_lost_and_duplicated_tokens_are_counted_on_completed_answers_only() -> None:
    records = [ok(100.0, 101.0, tokens=8, usage=10), ok(100.0, 101.0, tokens=12, usage=10),
               failed(100.0, 100.5)]  # a failed stream's tokens are not judged against a usage it never got
    measured = summarize(records, 99.0)
    assert measured["tokens_lost"] == 2 and measured["tokens_duplicated"] == 2
    result = judge("x", records, measured, COMMON_TARGETS)
    assert not result.passed
    assert (result.tokens_lost, result.tokens_duplicated) == (2, 2)
    line = render([result]).splitlines()[-1]
    assert "FAIL" in line and "tokens_lost=2 (== 0) MISS" in line and "tokens_duplicated=2 (== 0) MISS" in line


def test_a_hang_a_slow_failure_and_a_wrong_code_each_miss_their_target() -> None:
    records = [failed(99.0, 129.0, "DEADLINE_EXCEEDED"), failed(101.0, 104.5, "INTERNAL"), ok(105.0, 106.0)]
    measured = summarize(records, FAULT, restored_at=103.0)
    assert measured["hung"] == 1 and measured["failed_not_unavailable"] == 2
    assert measured["recover_s"] == 29.0 and measured["in_flight_fail_s"] == 29.0
    assert measured["slowest_failure_s"] == 29.0
    assert measured["after_restore_s"] == 26.0
    targets = (*COMMON_TARGETS, *next(s for s in SCENARIOS if s.name == "kill-tokenizer").targets,
               Target("recover_s", "<=", 2.0))
    result = judge("kill-tokenizer", records, measured, targets)
    missed = {c.target.metric for c in result.checks if not c.ok}
    assert missed == {"hung", "failed_not_unavailable", "slowest_failure_s", "after_restore_s", "recover_s"}
    assert not result.passed and result.failed == {"DEADLINE_EXCEEDED": 1, "INTERNAL": 1}


def chat(code: str, content: str, tokens: int, prompt: int | None = None) -> ChatRecord:
    record = ChatRecord(1.0, 2.0, code, tokens, tokens if code == OK else None, content=content)
    record.prompt_tokens = prompt
    return record


def test_budget_drift_is_exact_without_failures_and_bounded_by_what_failures_may_be_charged() -> None:
    clean = [chat(OK, "a", 8, prompt=30), chat(OK, "b", 24, prompt=40)]
    assert budget_drift(clean, 102, max_tokens=24) == {"charged_tokens": 102, "budget_drift": 0,
                                                       "drift_over_bound": 0}
    assert budget_drift(clean, 103, max_tokens=24)["drift_over_bound"] == 1  # a token charged that nobody got
    under = budget_drift(clean, 90, max_tokens=24)
    assert under["budget_drift"] == -12
    assert not all(t.holds(under[t.metric]) for t in BUDGET_TARGETS)  # generated and not charged: a miss
    # A chat cut after 5 tokens (prompt from its content's completed twin) may be charged up to its reservation;
    # one that failed before any token, anywhere from nothing to its whole reservation.
    failures = [*clean, chat("UNAVAILABLE", "a", 5), chat("UNAVAILABLE", "b", 0)]
    least = 102 + 30 + 5
    assert budget_drift(failures, least, 24)["budget_drift"] == 0
    most = least + (24 - 5) + (40 + 24)
    assert budget_drift(failures, most, 24)["drift_over_bound"] == 0
    assert budget_drift(failures, most + 1, 24)["drift_over_bound"] == 1


def test_no_failure_means_no_recovery_time_and_nothing_in_flight_failed() -> None:
    measured = summarize([ok(99.0, 101.0), ok(101.0, 102.0)], FAULT, restored_at=None)
    assert measured["recover_s"] == 0.0 and measured["in_flight_failed"] == 0
    assert measured["in_flight_fail_s"] is None and measured["after_restore_s"] is None
    # A target on a measurement that was not taken is a miss, not a pass.
    result = judge("kill-gateway", [], measured, (Target("in_flight_fail_s", "<=", 2.0),))
    assert not result.passed and "in_flight_fail_s=n/a (<= 2) MISS" in render([result])


def test_nothing_completed_after_the_fault_misses_even_without_failures() -> None:
    records = [ok(98.0, 99.0)]
    result = judge("x", records, summarize(records, FAULT), COMMON_TARGETS)
    assert [c.target.metric for c in result.checks if not c.ok] == ["completed_after_fault"]


def test_a_scenario_that_could_not_run_fails_its_row_with_the_reason() -> None:
    result = judge("restart-consul", [], {}, ())
    result.error = "TimeoutError: the Consul agent elected no leader within 30 s"
    assert not result.passed
    assert "FAIL" in render([result]) and "no leader" in render([result])


def test_target_operators_and_bounds() -> None:
    assert Target("a", "<=", 2).holds(2.0) and not Target("a", "<=", 2).holds(2.01)
    assert Target("a", ">=", 1).holds(1) and not Target("a", ">=", 1).holds(0)
    assert Target("a", "==", 0).holds(0) and not Target("a", "==", 0).holds(1)
    assert not Target("a", "==", 0).holds(None)
    with pytest.raises(ValueError, match="unknown operator"):
        Target("a", "<", 1).holds(0)


def test_scenarios_are_selected_by_name_in_the_order_given() -> None:
    assert [s.name for s in select("freeze-inference,kill-inference")] == ["freeze-inference", "kill-inference"]
    assert [s.name for s in select("")] == [s.name for s in SCENARIOS]
    with pytest.raises(ValueError, match="unknown scenario"):
        select("kill-inference,kill-everything")
    assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)


async def test_a_killed_and_a_frozen_replica_under_load_meet_their_targets(built_model: Path) -> None:
    try:
        find_consul()
    except FileNotFoundError:
        pytest.skip("no consul binary: run `make consul`")
    results = await run(built_model, select("kill-inference,freeze-inference"), streams=6, max_tokens=12)
    table = render(results)
    assert [r.name for r in results] == ["kill-inference", "freeze-inference"], table
    assert all(r.passed for r in results), table
    assert all(r.completed > 0 for r in results), table
