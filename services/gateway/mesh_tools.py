"""The LLM as a gateway to the mesh's other services: a chat that may use mesh tools runs a tool phase before its
answer.

1. Candidates: the tools named, or with `auto` the key's granted tools most similar to the request
   (tool_retrieval.py). Only granted tools are ever candidates (services.common.access.tool_allowed).
2. Plan: the model writes its calls as JSON, constrained to the candidates' argument schemas (read through each
   tool's reflection, tool_schema.py), each argument also allowed to be a reference to an earlier call's result.
3. Run: the plan is an execution graph (tool_graph.py): each call's start and end stream to the client.
4. Answer: the results join the conversation and the chat goes on as any other; the plan's tokens are added to
   the answer's usage.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import grpc
from lmesh.common.v1 import generation_pb2
from lmesh.policy.v1 import policy_pb2
from opentelemetry import trace

from services.common.access import tool_allowed
from services.common.errors import InvalidArgument, LmeshError, NotFound, PermissionDenied, Reason, Unavailable
from services.gateway.tool_catalog import DEFAULT_CALL_TIMEOUT_S, Tool, ToolCatalog, ToolFailure
from services.gateway.tool_graph import (
    CallFinished,
    CallStarted,
    GraphEvent,
    GraphOutcome,
    PlanError,
    complete_calls,
    parse_plan,
    plan_repeats_itself,
    run_graph,
)
from services.gateway.tool_retrieval import ToolIndex
from services.gateway.tool_schema import BOUNDED_WHITESPACE, compact

if TYPE_CHECKING:
    from services.gateway.chat import ChatParams, ChatService
    from services.gateway.credentials import Credential
    from services.gateway.screen import Screening

log = logging.getLogger("lmesh.gateway.tools")
TOOL_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
MAX_NAMED_TOOLS = 16
DEFAULT_MAX_CALLS, MAX_CALLS = 4, 16
DEFAULT_CANDIDATES, MAX_CANDIDATES = 3, 8
MAX_CALL_TIMEOUT_MS = 60_000
PLAN_MAX_TOKENS = 256
# What a reference looks like where the schema wants another type (the grammar allows either).
REFERENCE_SCHEMA = {"type": "string", "pattern": r"^\$[1-9][0-9]?(\.[A-Za-z_][A-Za-z0-9_]*|\.[0-9]+)*$"}
MAX_RESULT_CHARS = 2000  # of one result, in the conversation the model answers from


@dataclass(frozen=True)
class ToolRequest:
    """ChatStart.tools, checked."""

    auto: bool = False
    names: tuple[str, ...] = ()
    max_calls: int = 0
    call_timeout_ms: int = 0
    candidates: int = 0

    def validate(self) -> None:
        if not self.auto and not self.names:
            raise InvalidArgument("tools", "set auto or names")
        if len(self.names) > MAX_NAMED_TOOLS:
            raise InvalidArgument("tools.names", f"at most {MAX_NAMED_TOOLS} names, got {len(self.names)}")
        for index, name in enumerate(self.names):
            if not TOOL_NAME.fullmatch(name):
                raise InvalidArgument(f"tools.names[{index}]", "must match [a-z][a-z0-9_]{0,47}")
        if not 0 <= self.max_calls <= MAX_CALLS:
            raise InvalidArgument("tools.max_calls", f"must be in [1, {MAX_CALLS}] (0 means {DEFAULT_MAX_CALLS}), "
                                                     f"got {self.max_calls}")
        if not 0 <= self.call_timeout_ms <= MAX_CALL_TIMEOUT_MS:
            raise InvalidArgument("tools.call_timeout_ms", f"must be in [1, {MAX_CALL_TIMEOUT_MS}] (0 means 5000), "
                                                           f"got {self.call_timeout_ms}")
        if not 0 <= self.candidates <= MAX_CANDIDATES:
            raise InvalidArgument("tools.candidates", f"must be in [1, {MAX_CANDIDATES}] (0 means "
                                                      f"{DEFAULT_CANDIDATES}), got {self.candidates}")

    @property
    def calls_allowed(self) -> int:
        return self.max_calls or DEFAULT_MAX_CALLS

    @property
    def call_timeout_s(self) -> float:
        return self.call_timeout_ms / 1000 if self.call_timeout_ms else DEFAULT_CALL_TIMEOUT_S


@dataclass(frozen=True)
class ToolStepEvent:
    """A graph event of a chat, with what the protocols put on their first message."""

    step: GraphEvent
    model: str
    id: str
    admitted: policy_pb2.ReserveResponse  # the plan's admission: the chat's, for the rate-limit headers


@dataclass
class ToolPhaseResult:
    params: ChatParams  # the chat to answer: the conversation with the results, no tools
    usage: generation_pb2.Usage = field(default_factory=generation_pb2.Usage)  # the plan's generation
    # The plan's reservation: the answer's admission continues it (one request against requests_per_minute).
    reservation_id: str = ""


def with_references(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` where every value may also be a reference to an earlier result (`$1.value`)."""
    schema = copy.deepcopy(schema)
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        schema["properties"] = {name: with_references(sub) for name, sub in schema["properties"].items()}
        return schema
    if kind == "array" and "items" in schema:
        schema["items"] = with_references(schema["items"])
        return schema
    if kind == "string":
        return schema  # a string may hold references in its text
    return {"anyOf": [schema, REFERENCE_SCHEMA]}


def plan_schema(tools: list[tuple[Tool, dict[str, Any]]], max_calls: int) -> dict[str, Any]:
    """The JSON Schema of a plan over `tools` (each with its arguments' schema): the first call's arguments are
    values, a later call's may also be references to earlier results."""

    def call(referring: bool) -> dict[str, Any]:
        options = [{"type": "object", "properties": {
            "tool": {"const": tool.name},
            "arguments": with_references(parameters) if referring else parameters},
            "required": ["tool", "arguments"], "additionalProperties": False} for tool, parameters in tools]
        return options[0] if len(options) == 1 else {"anyOf": options}

    calls: dict[str, Any] = {"type": "array", "prefixItems": [call(False)], "minItems": 1, "maxItems": max_calls}
    if max_calls > 1:
        calls["items"] = call(True)
    else:
        calls["items"] = False
    return {"type": "object", "properties": {"calls": calls}, "required": ["calls"], "additionalProperties": False,
            "x-guidance": BOUNDED_WHITESPACE}


def plan_instructions(tools: list[tuple[Tool, dict[str, Any]]]) -> str:
    """The planning turn's instructions: each tool as a signature and its description. The schemas themselves are
    not shown: the constraint holds the model to them, and a small model reads a short prompt better."""
    lines = ['You call tools to answer the user. Reply with JSON only: {"calls": [{"tool": NAME, "arguments": '
             '{...}}]}. Copy values from the user\'s message exactly. A later call can use an earlier result: '
             '"$1.value" is the field value of call 1\'s result.', "Tools:"]
    for tool, parameters in tools:
        lines.append(f"- {signature(tool.name, parameters)}: {tool.description}")
    return "\n".join(lines)


def signature(name: str, schema: dict[str, Any]) -> str:
    """`name(a: string, b?: integer)`: a tool's arguments as a call's signature (`?`: may be left out)."""
    required = set(schema.get("required", ()))
    arguments = [f"{field}{'' if field in required else '?'}: {type_text(sub)}"
                 for field, sub in schema.get("properties", {}).items()]
    return f"{name}({', '.join(arguments)})"


def type_text(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return "|".join(json.dumps(value) for value in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        return f"{type_text(schema.get('items', {}))}[]"
    if kind == "object" and "properties" in schema:
        return "{" + ", ".join(f"{field}: {type_text(sub)}" for field, sub in schema["properties"].items()) + "}"
    return kind if isinstance(kind, str) else "any"


def describe_failure(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return exc.message if isinstance(exc, LmeshError) else str(exc)


def results_message(finished: list[CallFinished], request: str) -> str:
    """The turn the model answers from: each call with its result or error, then the request again (a small model
    answers the last thing it read)."""
    lines = ["Tool results:"]
    for end in finished:
        arguments = json.dumps(end.arguments, ensure_ascii=False, separators=(", ", ": "))
        if end.result is not None:
            outcome = json.dumps(end.result, ensure_ascii=False, separators=(", ", ": "))
        else:
            assert end.failure is not None
            outcome = f"error {end.failure.code}: {end.failure.message}"
        lines.append(f"{end.number}. {end.tool} {arguments} returned {outcome[:MAX_RESULT_CHARS]}")
    lines.append(f"\nUsing these results, answer: {request}")
    return "\n".join(lines)


def last_user_text(messages: list[tuple[str, str]]) -> str:
    return next((content for role, content in reversed(messages) if role == "user"), messages[-1][1])


class MeshTools:
    """The gateway's tool phase: the catalog, the retrieval index and the flow above."""

    def __init__(self, catalog: ToolCatalog, index: ToolIndex, tracer: trace.Tracer) -> None:
        self.catalog = catalog
        self.index = index
        self._tracer = tracer

    async def candidates(self, request: ToolRequest, granted: Callable[[str], bool], text: str) -> list[Tool]:
        tools = await self.catalog.tools()
        if request.names:
            chosen = []
            for name in dict.fromkeys(request.names):
                if not granted(name):
                    raise PermissionDenied(f"this key may not use tool '{name}'", reason=Reason.TOOL_NOT_ALLOWED,
                                           metadata={"tool": name})
                if name not in tools:
                    raise NotFound(f"no passing service offers tool '{name}'", reason=Reason.TOOL_NOT_FOUND,
                                   metadata={"tool": name})
                chosen.append(tools[name])
            return chosen
        allowed = sorted((tool for name, tool in tools.items() if granted(name)), key=lambda tool: tool.name)
        wanted = request.candidates or DEFAULT_CANDIDATES
        if len(allowed) <= 1:
            return allowed
        # Ranked even when every granted tool fits: the candidates are shown to the model best first, and a small
        # model leans to the first one it is shown.
        with self._tracer.start_as_current_span("retrieve_tools") as span:
            try:
                ranked = [c.tool for c in await self.index.rank(text, allowed, min(wanted, len(allowed)))]
            except (LmeshError, grpc.aio.AioRpcError) as exc:
                if len(allowed) > wanted:
                    raise
                # All of them are candidates anyway: only their order is lost.
                span.add_event("ranking_failed", {"error.type": type(exc).__name__})
                ranked = allowed
            span.set_attributes({"lmesh.tools.considered": len(allowed),
                                 "lmesh.tools.candidates": [tool.name for tool in ranked]})
        return ranked

    async def run(self, chat: ChatService, caller: Credential, params: ChatParams, completion_id: str,
                  screening: Screening | None, cancel: asyncio.Event, result: ToolPhaseResult,
                  ) -> AsyncGenerator[ToolStepEvent, None]:
        """The tool phase of a chat: its steps as events; `result` then holds the chat to answer."""
        assert params.tools is not None
        request = params.tools
        # Asked of policy now, not remembered: a grant an operator took back applies from the next chat on.
        patterns = list((await chat.authenticate(caller)).allowed_tools)
        tools = await self.candidates(request, lambda name: tool_allowed(patterns, name),
                                      last_user_text(params.messages))
        answer_params = replace(params, tools=None, cache_read=False, cache_store=False)
        if not tools:
            result.params = answer_params
            return
        described = []
        for tool in tools:
            try:
                described.append((tool, (await self.catalog.method(tool)).parameters))
            except (LmeshError, grpc.aio.AioRpcError) as exc:
                if request.names:  # asked for by name: say why it cannot be used
                    raise Unavailable(f"tool '{tool.name}' cannot be used: {describe_failure(exc)}",
                                      metadata={"tool": tool.name}) from exc
                # Chosen by retrieval: left out, the chat goes on with the others.
                trace.get_current_span().add_event("tool_schema_failed", {"gen_ai.tool.name": tool.name,
                                                                          "error.type": type(exc).__name__})
        if not described:
            result.params = answer_params
            return
        schema = plan_schema(described, request.calls_allowed)
        plan_params = replace(
            answer_params, messages=[("system", plan_instructions(described)), *params.messages],
            max_tokens=PLAN_MAX_TOKENS, temperature=0.0, top_p=0.0, top_k=0, stop=[], logprobs=False,
            top_logprobs=0, response_format=generation_pb2.OutputConstraint(json_schema=compact(schema)))
        with self._tracer.start_as_current_span("plan_tools"):
            plan = await chat.complete(caller, plan_params, f"{completion_id}-plan", screening,
                                       enough=plan_repeats_itself)
        text, model_id = plan.text, plan.model
        result.usage, result.reservation_id = plan.usage, plan.admitted.reservation_id
        try:
            calls = parse_plan(text, request.calls_allowed)
        except PlanError as exc:
            # Only a plan cut by its token bound gets here: the calls it finished still run; with none, the model
            # answers without results.
            whole = complete_calls(text)
            if whole is None:
                log.info("tool plan of %s unusable (%s): answering without tools", completion_id, exc)
                trace.get_current_span().add_event("tool_plan_unusable", {"error.type": str(exc)[:200]})
                result.params = answer_params
                return
            calls = parse_plan(whole, request.calls_allowed)
        by_name = {tool.name: tool for tool, _ in described}

        async def invoke(name: str, arguments: dict[str, Any]) -> dict[str, Any] | ToolFailure:
            tool = by_name.get(name)
            if tool is None:
                return ToolFailure("NOT_FOUND", f"'{name}' is not one of this chat's tools")
            return await self.catalog.call(tool, arguments, request.call_timeout_s)

        outcome = GraphOutcome()
        async for step in run_graph(calls, invoke, self._tracer, outcome):
            yield ToolStepEvent(step, model_id, completion_id, plan.admitted)
            if cancel.is_set():
                break
        finished = [outcome.finished[n] for n in sorted(outcome.finished)]
        # The results join the conversation as the user's next turn; the plan itself is not shown (the model
        # would copy it).
        result.params = replace(answer_params, messages=[
            *params.messages, ("user", results_message(finished, last_user_text(params.messages)))])


def add_usage(answer: generation_pb2.Usage, plan: generation_pb2.Usage) -> generation_pb2.Usage:
    """The answer's usage with the plan's tokens added (the prompt and cached tokens of both generations)."""
    total = generation_pb2.Usage()
    total.CopyFrom(answer)
    total.prompt_tokens += plan.prompt_tokens
    total.completion_tokens += plan.completion_tokens
    total.total_tokens += plan.total_tokens
    total.cached_prompt_tokens += plan.cached_prompt_tokens
    return total


def tool_step_json(event: ToolStepEvent) -> dict[str, Any]:
    """A step as the HTTP API shows it: the fields of the gRPC ToolStep, state in lower case."""
    step = event.step
    shown: dict[str, Any] = {"call": step.number, "tool": step.tool, "arguments": step.arguments}
    if isinstance(step, CallStarted):
        return {**shown, "state": "started"}
    shown["latency_ms"] = round(step.latency_s * 1000)
    if step.result is not None:
        return {**shown, "state": "succeeded", "result": step.result}
    assert step.failure is not None
    return {**shown, "state": "failed", "error": {"code": step.failure.code, "message": step.failure.message}}
