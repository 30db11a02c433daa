"""The execution graph of a tool plan: references, dependencies, concurrency, failures, bounds."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace

from services.gateway.mesh_tools import REFERENCE_SCHEMA, plan_instructions, plan_schema, signature, with_references
from services.gateway.tool_catalog import Tool, ToolFailure
from services.gateway.tool_graph import (
    CallFinished,
    CallStarted,
    GraphOutcome,
    PlanError,
    UnresolvedReference,
    complete_calls,
    parse_plan,
    resolve,
    run_graph,
)

TRACER = trace.get_tracer("test")


async def run(plan: Any, invoke: Any) -> tuple[list[Any], GraphOutcome]:
    outcome = GraphOutcome()
    events = [event async for event in run_graph(parse_plan(plan), invoke, TRACER, outcome)]
    return events, outcome


async def arithmetic(tool: str, arguments: dict[str, Any]) -> dict[str, Any] | ToolFailure:
    if tool == "add":
        return {"value": arguments["a"] + arguments["b"]}
    if tool == "echo":
        return {"text": arguments["text"]}
    if tool == "fail":
        return ToolFailure("INVALID_ARGUMENT", "no")
    return ToolFailure("NOT_FOUND", tool)


async def test_a_second_call_uses_the_first_result() -> None:
    plan = {"calls": [{"tool": "add", "arguments": {"a": 2, "b": 3}},
                      {"tool": "add", "arguments": {"a": "$1.value", "b": 10}},
                      {"tool": "echo", "arguments": {"text": "total $2.value, first $1.value"}}]}
    events, outcome = await run(plan, arithmetic)
    assert outcome.finished[2].result == {"value": 15}
    assert outcome.finished[2].arguments == {"a": 5, "b": 10}  # a whole reference keeps the number a number
    assert outcome.finished[3].result == {"text": "total 15, first 5"}
    order = [(type(e).__name__, e.number) for e in events]
    assert order.index(("CallFinished", 1)) < order.index(("CallStarted", 2))
    assert order.index(("CallFinished", 2)) < order.index(("CallStarted", 3))


async def test_independent_calls_run_concurrently() -> None:
    running = 0
    most = 0

    async def slow(tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.2)
        running -= 1
        return {"value": arguments["a"]}

    plan = {"calls": [{"tool": "t", "arguments": {"a": i}} for i in range(4)]}
    started = time.monotonic()
    _, outcome = await run(plan, slow)
    assert most == 4
    assert time.monotonic() - started < 0.6  # not 4 x 0.2 s
    assert sorted(e.result["value"] for e in outcome.finished.values() if e.result) == [0, 1, 2, 3]


async def test_a_failure_fails_its_dependents_and_spares_the_rest() -> None:
    plan = {"calls": [{"tool": "fail", "arguments": {}},
                      {"tool": "add", "arguments": {"a": "$1.value", "b": 1}},
                      {"tool": "add", "arguments": {"a": 1, "b": 1}}]}
    events, outcome = await run(plan, arithmetic)
    assert outcome.finished[1].failure == ToolFailure("INVALID_ARGUMENT", "no")
    assert outcome.finished[2].failure is not None and outcome.finished[2].failure.code == "FAILED_PRECONDITION"
    assert not any(isinstance(e, CallStarted) and e.number == 2 for e in events)  # never sent
    assert outcome.finished[3].result == {"value": 2}


async def test_references_forward_or_to_missing_fields_are_errors_of_that_call() -> None:
    plan = {"calls": [{"tool": "add", "arguments": {"a": "$2.value", "b": 1}},
                      {"tool": "add", "arguments": {"a": 1, "b": 1}},
                      {"tool": "add", "arguments": {"a": "$2.nope", "b": 1}}]}
    _, outcome = await run(plan, arithmetic)
    assert outcome.finished[1].failure is not None and "not before it" in outcome.finished[1].failure.message
    assert outcome.finished[3].failure is not None and "no `nope`" in outcome.finished[3].failure.message


async def test_a_hanging_tool_is_cut_by_its_own_deadline_not_the_graph() -> None:
    async def hangs(tool: str, arguments: dict[str, Any]) -> dict[str, Any] | ToolFailure:
        if tool == "hang":
            try:
                async with asyncio.timeout(0.2):
                    await asyncio.Event().wait()
            except TimeoutError:
                return ToolFailure("DEADLINE_EXCEEDED", "no answer within 0.2 s")
        return {"value": 1}

    started = time.monotonic()
    events, outcome = await run({"calls": [{"tool": "hang", "arguments": {}}, {"tool": "ok", "arguments": {}}]},
                                hangs)
    assert time.monotonic() - started < 2
    assert outcome.finished[1].failure is not None and outcome.finished[1].failure.code == "DEADLINE_EXCEEDED"
    assert sum(isinstance(e, CallFinished) for e in events) == 2


def test_plans_are_bounded_and_well_formed() -> None:
    with pytest.raises(PlanError):
        parse_plan({"calls": [{"tool": "a", "arguments": {}}] * 9}, max_calls=8)
    for bad in ("not json", {"calls": "x"}, {"calls": [{"arguments": {}}]}, {"calls": [{"tool": "a",
                                                                                         "arguments": []}]}):
        with pytest.raises(PlanError):
            parse_plan(bad)


async def test_a_call_written_twice_runs_once_and_references_to_it_name_the_first() -> None:
    plan = {"calls": [{"tool": "add", "arguments": {"a": 1, "b": 2}}, {"tool": "add", "arguments": {"a": 1, "b": 2}},
                      {"tool": "add", "arguments": {"a": "$2.value", "b": 10}}]}
    calls = parse_plan(plan)
    assert [(c.number, c.arguments) for c in calls] == [(1, {"a": 1, "b": 2}), (3, {"a": "$1.value", "b": 10})]
    _, outcome = await run(plan, arithmetic)
    assert sorted(outcome.finished) == [1, 3] and outcome.finished[3].result == {"value": 13}


def test_a_plan_cut_short_keeps_the_calls_it_finished() -> None:
    text = '{"calls": [{"tool": "a", "arguments": {"x": 1}}, {"tool": "b", "arguments": {"s": "never clo'
    assert json.loads(complete_calls(text) or "") == {"calls": [{"tool": "a", "arguments": {"x": 1}}]}
    assert complete_calls('{"calls": [{"tool": "a", "arguments": {"s": "}}}') is None
    assert complete_calls("") is None


def test_resolve_paths_into_lists() -> None:
    results = {1: {"people": [{"email": "a@x"}, {"email": "b@x"}]}}
    assert resolve({"to": "$1.people.1.email"}, results) == {"to": "b@x"}
    with pytest.raises(UnresolvedReference):
        resolve({"to": "$1.people.5.email"}, results)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_resolve_never_fails_on_text_without_references(text: str) -> None:
    if "$" not in text:
        assert resolve({"x": text}, {}) == {"x": text}


def test_tools_are_shown_to_the_model_as_signatures() -> None:
    parameters = {"type": "object", "properties": {
        "expression": {"type": "string"}, "decimal_places": {"type": "integer"},
        "unit": {"type": "string", "enum": ["km", "mi"]}, "tags": {"type": "array", "items": {"type": "string"}},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}}}}, "required": ["expression"]}
    assert signature("calc", parameters) == ('calc(expression: string, decimal_places?: integer, unit?: "km"|"mi", '
                                             "tags?: string[], where?: {lat: number})")
    text = plan_instructions([(Tool("calc", "p", "x.Y/Z", "Adds numbers."), parameters)])
    assert text.endswith("- calc(expression: string, decimal_places?: integer, unit?: \"km\"|\"mi\", tags?: "
                         "string[], where?: {lat: number}): Adds numbers.")


def test_plan_schema_allows_references_where_values_go() -> None:
    parameters = {"type": "object", "properties": {"a": {"type": "integer"}, "s": {"type": "string"}},
                  "required": ["a", "s"], "additionalProperties": False}
    referenced = with_references(parameters)
    assert referenced["properties"]["a"] == {"anyOf": [{"type": "integer"}, REFERENCE_SCHEMA]}
    assert referenced["properties"]["s"] == {"type": "string"}
    tools = [(Tool("add", "p", "x.Y/Add", "adds"), parameters), (Tool("echo", "p", "x.Y/Echo", "echo"), parameters)]
    schema = plan_schema(tools, 3)
    calls = schema["properties"]["calls"]
    assert [option["properties"]["tool"]["const"] for option in calls["items"]["anyOf"]] == ["add", "echo"]
    assert calls["maxItems"] == 3
    # The first call has nothing to refer to: its arguments are plain values.
    assert calls["prefixItems"][0]["anyOf"][0]["properties"]["arguments"] == parameters
    assert calls["items"]["anyOf"][0]["properties"]["arguments"] == referenced
