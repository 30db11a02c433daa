"""A plan of tool calls run as an execution graph.

The model writes its calls as one JSON plan, `{"calls": [{"tool": ..., "arguments": {...}}, ...]}`. An argument
may use an earlier call's result: `$2` is call 2's whole result, `$2.value` a field of it (a path of field names
and list indexes, `$3.people.0.email`). A string argument holding references has each replaced by the value's
text (`"$1.value * 3"`); an argument that is a reference alone takes the value as it is (a number stays a number).
Calls are numbered from 1 in the order written; a reference to a call not before it is an error of that call.

Calls whose references are satisfied run at once, concurrently; a call waits only for the calls it names. Each has
its own deadline, and the plan's size is bounded (`max_calls`). A call that fails, or depends on one that failed,
is reported as failed; the others still run. Every call's start and end are events, in the order they happen.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from services.gateway.tool_catalog import ToolFailure

REFERENCE = re.compile(r"\$([1-9][0-9]{0,2})((?:\.[A-Za-z_][A-Za-z0-9_]*|\.[0-9]{1,4})*)")
WHOLE_REFERENCE = re.compile(rf"^{REFERENCE.pattern}$")
DEFAULT_MAX_CALLS = 8
MAX_ARGUMENT_BYTES = 16 * 1024

# (tool name, arguments) -> the result as JSON, or why there is none
Invoke = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | ToolFailure]]


@dataclass(frozen=True)
class PlannedCall:
    number: int  # 1-based, as references name it
    tool: str
    arguments: dict[str, Any]

    @property
    def depends_on(self) -> frozenset[int]:
        return frozenset(int(m.group(1)) for text in _strings(self.arguments) for m in REFERENCE.finditer(text))


@dataclass(frozen=True)
class CallStarted:
    number: int
    tool: str
    arguments: dict[str, Any]  # with references resolved


@dataclass(frozen=True)
class CallFinished:
    number: int
    tool: str
    arguments: dict[str, Any]
    result: dict[str, Any] | None
    failure: ToolFailure | None
    latency_s: float


GraphEvent = CallStarted | CallFinished


@dataclass
class GraphOutcome:
    """Every call's end, by number, once the graph has run."""

    finished: dict[int, CallFinished] = field(default_factory=dict)


class PlanError(ValueError):
    """A plan that is not a list of calls (the constrained model never writes one; a client might)."""


def parse_plan(plan: Any, max_calls: int = DEFAULT_MAX_CALLS) -> list[PlannedCall]:
    """The calls of a plan (its JSON text or its parsed object)."""
    if isinstance(plan, str):
        try:
            plan = json.loads(plan)
        except json.JSONDecodeError as exc:
            raise PlanError(f"the plan is not JSON: {exc}") from exc
    calls = plan.get("calls") if isinstance(plan, dict) else None
    if not isinstance(calls, list):
        raise PlanError("the plan has no list `calls`")
    if len(calls) > max_calls:
        raise PlanError(f"the plan has {len(calls)} calls; at most {max_calls} are run")
    planned = []
    first_of: dict[str, int] = {}  # a call, as JSON -> the number of its first occurrence
    same_as: dict[int, int] = {}  # a repeated call's number -> that first one's
    for number, call in enumerate(calls, start=1):
        if not isinstance(call, dict) or not isinstance(call.get("tool"), str):
            raise PlanError(f"call {number} names no tool")
        arguments = call.get("arguments", {})
        if not isinstance(arguments, dict):
            raise PlanError(f"call {number}'s arguments are not an object")
        if len(json.dumps(arguments)) > MAX_ARGUMENT_BYTES:
            raise PlanError(f"call {number}'s arguments are over {MAX_ARGUMENT_BYTES} bytes")
        arguments = _renumbered(arguments, same_as)
        # A call written again (small models repeat themselves) runs once; references to it name the first.
        key = json.dumps([call["tool"], arguments], sort_keys=True)
        if key in first_of:
            same_as[number] = first_of[key]
            continue
        first_of[key] = number
        planned.append(PlannedCall(number, call["tool"], arguments))
    return planned


def _renumbered(value: Any, same_as: Mapping[int, int]) -> Any:
    if not same_as:
        return value
    if isinstance(value, str):
        return REFERENCE.sub(lambda m: f"${same_as.get(int(m.group(1)), int(m.group(1)))}{m.group(2)}", value)
    if isinstance(value, dict):
        return {key: _renumbered(item, same_as) for key, item in value.items()}
    if isinstance(value, list):
        return [_renumbered(item, same_as) for item in value]
    return value


def plan_repeats_itself(text: str) -> str | None:
    """The plan so far, when its text has just closed a call that repeats an earlier one (a small model writes
    the same call again and again until the plan's bound): the calls before it, as a whole plan."""
    if not text.rstrip().endswith("}"):
        return None
    try:
        plan = json.loads(text + "]}")
    except json.JSONDecodeError:
        return None
    calls = plan.get("calls") if isinstance(plan, dict) else None
    if not isinstance(calls, list) or len(calls) < 2 or calls[-1] not in calls[:-1]:
        return None
    return json.dumps({"calls": calls[:-1]}, ensure_ascii=False)


def complete_calls(text: str) -> str | None:
    """The calls a plan cut short (by its token bound) had finished, as a whole plan; None when it finished none."""
    end = len(text)
    while (end := text.rfind("}", 0, end)) > 0:
        try:
            plan = json.loads(text[:end + 1] + "]}")
        except json.JSONDecodeError:
            continue
        calls = plan.get("calls") if isinstance(plan, dict) else None
        if isinstance(calls, list) and calls and all(isinstance(c, dict) for c in calls):
            return json.dumps({"calls": calls}, ensure_ascii=False)
    return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


class UnresolvedReference(LookupError):
    pass


def _lookup(results: Mapping[int, dict[str, Any]], number: int, path: str) -> Any:
    if number not in results:
        raise UnresolvedReference(f"${number} names no earlier call with a result")
    value: Any = results[number]
    for step in path.split(".")[1:]:
        if isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        elif isinstance(value, dict) and step in value:
            value = value[step]
        else:
            raise UnresolvedReference(f"${number}{path}: call {number}'s result has no `{step}` there")
    return value


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def resolve(arguments: Any, results: Mapping[int, dict[str, Any]]) -> Any:
    """`arguments` with every reference replaced by the value it names."""
    if isinstance(arguments, str):
        whole = WHOLE_REFERENCE.match(arguments)
        if whole:
            return copy.deepcopy(_lookup(results, int(whole.group(1)), whole.group(2)))
        return REFERENCE.sub(lambda m: _as_text(_lookup(results, int(m.group(1)), m.group(2))), arguments)
    if isinstance(arguments, dict):
        return {key: resolve(value, results) for key, value in arguments.items()}
    if isinstance(arguments, list):
        return [resolve(value, results) for value in arguments]
    return arguments


async def run_graph(calls: list[PlannedCall], invoke: Invoke, tracer: trace.Tracer,
                    outcome: GraphOutcome | None = None) -> AsyncIterator[GraphEvent]:
    """Runs the calls, each as soon as the calls it names have results; yields each start and end as it happens.
    `invoke` bounds each call's time (the catalog's deadline). `outcome` collects every end."""
    outcome = outcome if outcome is not None else GraphOutcome()
    events: asyncio.Queue[GraphEvent] = asyncio.Queue()
    done: dict[int, asyncio.Event] = {call.number: asyncio.Event() for call in calls}
    results: dict[int, dict[str, Any]] = {}

    async def run(call: PlannedCall) -> None:
        started = time.monotonic()
        arguments: dict[str, Any] = call.arguments
        failure: ToolFailure | None = None
        result: dict[str, Any] | None = None
        try:
            later = sorted(n for n in call.depends_on if n >= call.number)
            if later:
                failure = ToolFailure("INVALID_ARGUMENT", f"call {call.number} refers to call {later[0]}, which is "
                                                          "not before it")
            else:
                for number in sorted(call.depends_on):
                    await done[number].wait()
                failed = sorted(n for n in call.depends_on if n not in results)
                if failed:
                    failure = ToolFailure("FAILED_PRECONDITION", f"call {call.number} needs the result of call "
                                                                 f"{failed[0]}, which failed")
                else:
                    try:
                        arguments = resolve(call.arguments, results)
                    except UnresolvedReference as exc:
                        failure = ToolFailure("INVALID_ARGUMENT", str(exc))
            if failure is None:
                events.put_nowait(CallStarted(call.number, call.tool, arguments))
                with tracer.start_as_current_span(f"execute_tool {call.tool}", record_exception=False,
                                                  set_status_on_exception=False) as span:
                    span.set_attributes({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": call.tool,
                                         "gen_ai.tool.call.id": f"call_{call.number}"})
                    answer = await invoke(call.tool, arguments)
                    if isinstance(answer, ToolFailure):
                        failure = answer
                        span.set_status(Status(StatusCode.ERROR, answer.code))
                        span.set_attribute("error.type", answer.code)
                    else:
                        result = answer
        finally:
            if result is not None:
                results[call.number] = result
            finished = CallFinished(call.number, call.tool, arguments, result, failure, time.monotonic() - started)
            outcome.finished[call.number] = finished
            events.put_nowait(finished)
            done[call.number].set()

    tasks = [asyncio.create_task(run(call), name=f"tool-call-{call.number}") for call in calls]
    try:
        for _ in range(len(calls) * 2):
            event = await events.get()
            yield event
            if len(outcome.finished) == len(calls) and events.empty():
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
