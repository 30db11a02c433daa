"""Client-side function calling (OpenAI's `tools` / `tool_choice`): the model may answer with calls of functions
the client declared, which the client runs; the answer then carries them instead of text.

The functions are described to the model in a system turn; its output is constrained so that a call is always a
well-formed JSON plan over the declared functions' parameter schemas:

- `required`, or one function named: the whole answer is `{"calls": [{"name": ..., "arguments": {...}}]}`;
- `auto`: either text (not starting with `<`) or `<tool_call>` followed by that JSON (a Lark grammar with the
  plan's JSON Schema inside);
- `none`: the functions are not shown and the model answers in text.

Earlier turns of the conversation that called functions, and the client's results (role `tool`), are written into
the conversation as text the model reads.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lmesh.common.v1 import generation_pb2

from services.common.errors import InvalidArgument, NotFound
from services.gateway.tool_graph import plan_repeats_itself
from services.gateway.tool_schema import BOUNDED_WHITESPACE, compact

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
MAX_FUNCTIONS = 32
MAX_PARALLEL_CALLS = 8
CALL_MARK = "<tool_call>"
CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class FunctionCall:
    id: str  # `call_` and 24 hex digits
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class FunctionCalling:
    """The functions a request declared and how the model may use them."""

    functions: tuple[FunctionSpec, ...]
    choice: str = "auto"  # auto, none, required, or a declared function's name
    parallel: bool = True  # several calls in one answer

    @classmethod
    def checked(cls, functions: Sequence[tuple[str, str, str]], choice: str, parallel: bool = True,
                field: str = "functions", choice_field: str = "function_choice") -> FunctionCalling:
        """From (name, description, parameters as JSON text); InvalidArgument naming the field."""
        if len(functions) > MAX_FUNCTIONS:
            raise InvalidArgument(field, f"at most {MAX_FUNCTIONS} functions, got {len(functions)}")
        specs: list[FunctionSpec] = []
        for index, (name, description, parameters_json) in enumerate(functions):
            if not FUNCTION_NAME.fullmatch(name):
                raise InvalidArgument(f"{field}[{index}].name", "must be 1 to 64 letters, digits, '_' or '-'")
            if any(spec.name == name for spec in specs):
                continue  # declared twice: the first declaration stands
            try:
                parameters = json.loads(parameters_json) if parameters_json.strip() else {"type": "object"}
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{field}[{index}].parameters", f"is not JSON: {exc}") from None
            if not isinstance(parameters, dict):
                raise InvalidArgument(f"{field}[{index}].parameters", "must be a JSON Schema object")
            specs.append(FunctionSpec(name, description, parameters))
        choice = choice or "auto"
        if not specs and choice not in ("auto", "none"):
            raise InvalidArgument(choice_field, f"'{choice}' needs functions to call")
        if choice not in CHOICES and all(spec.name != choice for spec in specs):
            raise NotFound(f"{choice_field} names function '{choice}', which the request does not declare",
                           metadata={"function": choice})
        return cls(tuple(specs), choice, parallel)

    @property
    def active(self) -> bool:
        """Whether the model may call: functions declared and the choice is not `none`."""
        return bool(self.functions) and self.choice != "none"

    def _callable(self) -> list[FunctionSpec]:
        return [spec for spec in self.functions if self.choice in CHOICES or spec.name == self.choice]

    def plan_schema(self) -> dict[str, Any]:
        options = [{"type": "object", "properties": {"name": {"const": spec.name}, "arguments": spec.parameters},
                    "required": ["name", "arguments"], "additionalProperties": False} for spec in self._callable()]
        item = options[0] if len(options) == 1 else {"anyOf": options}
        return {"type": "object", "properties": {"calls": {"type": "array", "items": item, "minItems": 1,
                                                           "maxItems": MAX_PARALLEL_CALLS if self.parallel else 1}},
                "required": ["calls"], "additionalProperties": False, "x-guidance": BOUNDED_WHITESPACE}

    def constraint(self, answer_schema: str | None = None) -> generation_pb2.OutputConstraint:
        """What the output must match: a plan; with `auto`, a plan or an answer (any text that does not begin with
        `<`, or JSON of `answer_schema`, the request's response_format): the first token decides which."""
        schema = compact(self.plan_schema())
        if self.choice != "auto":
            return generation_pb2.OutputConstraint(json_schema=schema)
        text = f"%json {answer_schema}" if answer_schema else "/[^<][\\s\\S]*/"
        grammar = f'start: text | call\ncall: "{CALL_MARK}" %json {schema}\ntext: {text}\n'
        return generation_pb2.OutputConstraint(lark_grammar=grammar)

    def instructions(self) -> str:
        lines = ["You can call these functions; the user runs them and tells you their results:"]
        for spec in self._callable():
            lines.append(f"- {spec.name}: {spec.description} Parameters: {compact(spec.parameters)}")
        if self.choice == "auto":
            lines.append(f'To call, reply with {CALL_MARK} and then JSON {{"calls": [{{"name": ..., "arguments": '
                         '{...}}]}. Otherwise answer in text.')
        else:
            lines.append('Reply with JSON {"calls": [{"name": ..., "arguments": {...}}]}.')
        return "\n".join(lines)

    def parse(self, text: str) -> list[FunctionCall] | None:
        """The calls the answer makes, or None when it is text (or a call cut short by max_tokens)."""
        body = text.removeprefix(CALL_MARK) if self.choice == "auto" else text
        if self.choice == "auto" and not text.startswith(CALL_MARK):
            return None
        try:
            plan = json.loads(body)
        except json.JSONDecodeError:
            return None
        calls = plan.get("calls") if isinstance(plan, dict) else None
        if not isinstance(calls, list) or not calls:
            return None
        names = {spec.name for spec in self.functions}
        parsed = []
        for call in calls:
            if not isinstance(call, dict) or call.get("name") not in names:
                return None
            parsed.append(FunctionCall(f"call_{uuid.uuid4().hex[:24]}", call["name"],
                                       json.dumps(call.get("arguments", {}), ensure_ascii=False)))
        return parsed


def conversation_with(messages: list[tuple[str, str]], calling: FunctionCalling) -> list[tuple[str, str]]:
    """The conversation the model reads: the functions described in a system turn (after any of the client's)."""
    if not calling.active:
        return messages
    system = [m for m in messages[:1] if m[0] == "system"]
    rest = messages[len(system):]
    return [*system, ("system", calling.instructions()), *rest]


def call_turn(calls: Sequence[tuple[str, str]]) -> str:
    """An assistant turn that called functions ((name, arguments JSON) each), as the model wrote it."""
    plan = []
    for name, arguments in calls:
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            parsed = arguments
        plan.append({"name": name, "arguments": parsed})
    return CALL_MARK + json.dumps({"calls": plan}, ensure_ascii=False)


def result_turn(name: str, call_id: str, content: str) -> str:
    """A function's result, as the turn the model reads."""
    return f"Result of {name or 'the function'} ({call_id}): {content}"


async def calls_or_text(events: AsyncIterator[Any], calling: FunctionCalling,
                        stop: Callable[[], None] = lambda: None) -> AsyncIterator[Any]:
    """The answer's events with the text held back: when it is a call, one ChatEnd carrying the calls
    (FINISH_REASON_TOOL_CALLS); otherwise the text as one delta, then the ChatEnd. A plan that starts writing a
    call it already wrote is cut there (`stop` ends the generation). A call that `max_tokens` cut short ends
    FINISH_REASON_LENGTH with neither text nor calls: its half-written plan is not an answer."""
    from services.gateway.chat import ChatDelta, ChatEnd

    held: list[ChatDelta] = []
    cut: str | None = None
    async for event in events:
        if isinstance(event, ChatDelta):
            held.append(event)
            if cut is None:
                text = "".join(delta.text for delta in held)
                plan = plan_repeats_itself(text.removeprefix(CALL_MARK)) if writes_calls(calling, text) else None
                if plan is not None:
                    cut = CALL_MARK + plan if calling.choice == "auto" else plan
                    stop()
            continue
        if isinstance(event, ChatEnd):
            text = cut if cut is not None else "".join(delta.text for delta in held)
            entries = [entry for delta in held for entry in delta.logprobs]
            complete = cut is not None or event.finish_reason == generation_pb2.FINISH_REASON_STOP
            calls = calling.parse(text) if complete else None
            if calls is not None:
                yield replace(event, finish_reason=generation_pb2.FINISH_REASON_TOOL_CALLS, function_calls=calls,
                              logprobs=[*entries, *event.logprobs])
                return
            cut_short = event.finish_reason == generation_pb2.FINISH_REASON_LENGTH and writes_calls(calling, text)
            if text and not cut_short:
                yield ChatDelta(text, entries)
        yield event


def writes_calls(calling: FunctionCalling, text: str) -> bool:
    """Whether the answer so far is a plan of calls: always when a call is required, else once it opens with the
    call mark."""
    return calling.choice != "auto" or text.startswith(CALL_MARK)
