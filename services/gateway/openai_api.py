"""The OpenAI-compatible HTTP API's protocol: request bodies into the request path's ChatParams, its events into
OpenAI's JSON and Server-Sent Events, lmesh's errors into OpenAI's error JSON with the matching HTTP status, and
the OpenAPI document of all of it. The transport (ASGI app, uvicorn, disconnects, drain) is http_server.py.

One declaration, two uses: the request schemas below are both the OpenAPI document served at /openapi.json and
what `check` enforces (an interpreter of the small part of JSON Schema they use), so the document cannot drift
from the behaviour. Past the form, a request goes through the same checks as a gRPC Chat
(request_path.chat_events: `validate`, policy, guardrails, the prompt's fit).

Per token the work is small: a chunk is the bytes of a template made once per choice around the delta's text
(json.dumps of the text and nothing else, unless logprobs were asked for).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from lmesh.common.v1 import generation_pb2
from lmesh.embeddings.v1 import embeddings_pb2
from lmesh.registry.v1 import registry_pb2
from opentelemetry import trace

from services.common.errors import InvalidArgument, Reason, capped
from services.common.references import MAX_REFERENCE_CHARS
from services.common.rpc import bounded, details_for, status_for
from services.gateway.chat import DEFAULT_MODEL, MAX_PRIORITY, MIN_PRIORITY, ChatParams
from services.gateway.functions import FunctionCall, FunctionCalling, call_turn, result_turn
from services.gateway.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from services.gateway.mesh_tools import ToolRequest
from services.inference.sampling import LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS, PENALTY_RANGE

MAX_BODY_BYTES = 4 * 1024 * 1024  # as the gRPC API's 4 MiB message limit
MAX_CHOICES = 8  # `n`: parallel generations of one request
MAX_USER_CHARS = 512
INT32_MAX = 2**31 - 1
INT64 = (-(2**63), 2**63 - 1)
# `max_tokens` left out of a chat completion: the rest of the model's context, as OpenAI does (prepare clips it).
UNSET_CHAT_MAX_TOKENS = INT32_MAX
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_TEMPERATURE = 1.0  # OpenAI's (the gRPC API's default, 0, is greedy)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
    generation_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    generation_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    # Only a client that cancels sees it, and an HTTP client cancels by leaving: kept for completeness.
    generation_pb2.FINISH_REASON_CANCELLED: "cancelled",
}
UNKNOWN_LOGPROB = -9999.0  # OpenAI's stand-in for a logprob JSON cannot carry (-inf)

# ---- the request schemas (OpenAPI 3.1, i.e. JSON Schema 2020-12) ---------------------------------------------

# A model reference as services.common.references checks it: `name:version`, a name or an alias.
REFERENCE_PATTERN = (r"^(?:[a-z0-9][a-z0-9._-]{0,127}:[A-Za-z0-9][A-Za-z0-9._-]{0,63}|[a-z0-9][a-z0-9._-]{0,127}"
                     r"|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema`, or null (an enum lists null too: JSON Schema checks `enum` whatever the type allows)."""
    nullable = {**schema, "type": [schema["type"], "null"]}
    if "enum" in schema:
        nullable["enum"] = [*schema["enum"], None]
    return nullable


def _unsupported(schema: dict[str, Any], why: str) -> dict[str, Any]:
    """A field accepted only with the values that change nothing (`why` says what is missing)."""
    return {**schema, "x-lmesh-unsupported": why}


MODEL = {"type": "string", "maxLength": MAX_REFERENCE_CHARS, "pattern": REFERENCE_PATTERN,
         "x-lmesh-invalid": "is not `name:version`, an alias or a name",
         "description": "A model reference: a name (its newest version that is not a variant), `name:version` or an "
                        "alias. Left out: `default`."}
TEXT_PART = {"type": "object", "required": ["type", "text"], "properties": {
    "type": _unsupported({"type": "string", "enum": ["text"]}, "only text parts are supported (no images, audio "
                                                                "or files)"),
    "text": {"type": "string"}}}
TOOL_CALL = {"type": "object", "required": ["id", "function"], "properties": {
    "id": {"type": "string", "maxLength": 64},
    "type": {"type": "string", "enum": ["function"]},
    "function": {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 64}, "arguments": {"type": "string"}}}}}
MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": [*ROLES, "tool"],
             "x-lmesh-invalid": "must be system, developer (the same as system), user, assistant or tool"},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}, {"type": "null"}],
                "description": "The turn's text, or text parts (joined with a newline); null: none (an "
                               "assistant turn with tool_calls)."},
    "tool_calls": _nullable({"type": "array", "items": TOOL_CALL,
                             "description": "An assistant turn's calls of the request's functions (history)."}),
    "tool_call_id": {"type": "string", "maxLength": 64, "description": "Role tool: the call this is the result of."},
    "name": {"type": "string", "description": "Accepted and ignored."}},
    # Only an assistant turn may leave its content out (one that called tools).
    "allOf": [{"if": {"properties": {"role": {"type": "string", "enum": ["system", "developer", "user", "tool"]}},
                      "required": ["role"]},
               "then": {"required": ["content"], "x-lmesh-field": ".content", "x-lmesh-invalid": "is required"}}]}
FUNCTION_TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": _unsupported({"type": "string", "enum": ["function"]}, "only function tools are supported"),
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_-]+$"},
        "description": {"type": "string"}, "parameters": {"type": "object"},
        "strict": _nullable({"type": "boolean"})}}}}
STOP_STRING = {"type": "string", "minLength": 1, "maxLength": 64}
STOP = {"anyOf": [STOP_STRING, {"type": "array", "maxItems": 4, "items": STOP_STRING}, {"type": "null"}],
        "description": "Up to 4 strings, each 1 to 64 characters, that end the answer; it never contains them."}
SAMPLING = {
    "model": MODEL,
    "max_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": INT32_MAX}),
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2,
                              "description": "0 decodes greedily. Left out: 1, as OpenAI."}),
    "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1, "description": "0 or 1: off."}),
    "seed": _nullable({"type": "integer", "minimum": INT64[0], "maximum": INT64[1],
                       "description": "The same seed and request give the same answer; 0 or left out: a random one. "
                                      "With n > 1, choice i uses seed + i."}),
    "stop": STOP,
    "n": _nullable(_unsupported({"type": "integer", "minimum": 1, "maximum": MAX_CHOICES},
                                f"must be 1 to {MAX_CHOICES} (choices are generated in parallel)")),
    "stream": _nullable({"type": "boolean"}),
    "stream_options": _nullable({"type": "object", "properties": {
        "include_usage": _nullable({"type": "boolean"})}}),
    "user": _nullable({"type": "string", "maxLength": MAX_USER_CHARS,
                       "description": "The caller's end user or session: its requests go to the inference replica "
                                      "that served it before (its prompt prefix is cached there) while that replica "
                                      "has room; kept only as a hash, per tenant."}),
    "priority": _nullable({"type": "integer", "minimum": MIN_PRIORITY, "maximum": MAX_PRIORITY,
                           "description": "lmesh (as vLLM's extension): scheduling priority, higher served first "
                                          "and shed last when the replicas' queues are full; clipped to the key's "
                                          "max priority. Left out: the key's max priority."}),
    "top_k": _nullable({"type": "integer", "minimum": 0, "maximum": INT32_MAX,
                        "description": "lmesh: sample among the k most likely tokens; 0: off."}),
    "repetition_penalty": _nullable({"type": "number", "minimum": 0, "maximum": 2,
                                     "description": "lmesh: penalty for repeated tokens; 0 or 1: off."}),
    "presence_penalty": _nullable({"type": "number", "minimum": -PENALTY_RANGE, "maximum": PENALTY_RANGE,
                                   "description": "Subtracted from the logit of every token the answer already "
                                                  "holds; 0: off."}),
    "frequency_penalty": _nullable({"type": "number", "minimum": -PENALTY_RANGE, "maximum": PENALTY_RANGE,
                                    "description": "Subtracted from a token's logit once for each time the answer "
                                                   "already holds it; 0: off."}),
    "logit_bias": _nullable({"type": "object", "maxProperties": MAX_LOGIT_BIAS,
                             "propertyNames": {"type": "string", "pattern": "^(0|[1-9][0-9]{0,8})$"},
                             "additionalProperties": {"type": "number", "minimum": -LOGIT_BIAS_RANGE,
                                                      "maximum": LOGIT_BIAS_RANGE},
                             "description": "Token ids (the model's own, as strings) mapped to a bias added to "
                                            "their logits before sampling: -100 bans a token, 100 all but forces "
                                            "it. Ids outside the model's vocabulary: 400."}),
}
CHAT_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["messages"],
    "description": "OpenAI's chat completion request; fields not listed are ignored.",
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
        **SAMPLING,
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": INT32_MAX,
                                            "description": "Wins over max_tokens. Neither: the rest of the "
                                                           "model's context."}),
        "logprobs": _nullable({"type": "boolean"}),
        "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                                   "description": "More than 0 needs logprobs."}),
        "response_format": _nullable({
            "type": "object", "required": ["type"],
            "properties": {
                "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
                "json_schema": {"type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 64},
                    "schema": {"type": "object"}, "strict": _nullable({"type": "boolean"}),
                    "description": {"type": "string"}}}},
            "description": "json_schema (structured outputs): the answer matches `json_schema.schema`, every token "
                           "that would leave it masked; json_object: the answer is a JSON object."}),
        "tools": _nullable({"type": "array", "maxItems": 32, "items": FUNCTION_TOOL,
                            "description": "Functions the model may call (the answer's message then has tool_calls "
                                           "and finish_reason tool_calls); its arguments always fit the function's "
                                           "parameters. With tools, a streamed answer comes in one chunk."}),
        "tool_choice": {"anyOf": [{"type": "string", "enum": ["none", "auto", "required"]},
                                  {"type": "object", "required": ["type", "function"], "properties": {
                                      "type": {"type": "string", "enum": ["function"]},
                                      "function": {"type": "object", "required": ["name"], "properties": {
                                          "name": {"type": "string"}}}}},
                                  {"type": "null"}]},
        "parallel_tool_calls": _nullable({"type": "boolean"}),
        "functions": _nullable(_unsupported({"type": "array", "maxItems": 0},
                                            "the deprecated `functions` is not supported; use tools")),
        "function_call": {"anyOf": [_unsupported({"type": "string", "enum": ["none", "auto"]},
                                                 "the deprecated `function_call` is not supported; use tool_choice"),
                                    {"type": "null"}]},
        "mesh_tools": _nullable({"type": "object", "properties": {
            "auto": {"type": "boolean"},
            "names": {"type": "array", "maxItems": 16,
                      "items": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,47}$"}},
            "max_calls": {"type": "integer", "minimum": 0, "maximum": 16},
            "call_timeout_ms": {"type": "integer", "minimum": 0, "maximum": 60000},
            "candidates": {"type": "integer", "minimum": 0, "maximum": 8}},
            "description": "lmesh: mesh tools the gateway may call before answering, as the gRPC ChatStart.tools "
                           "(neither auto nor names: none); "
                           "each step comes as `lmesh_tool_step` in a streamed delta, or in the message's "
                           "`lmesh_tool_steps`."}),
    },
    # OpenAI's rules, and the gRPC API's: alternatives only with the chosen tokens' logprobs; a tool_choice that
    # forces a call only with tools to call.
    "allOf": [
        {"if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
         "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"],
                  "x-lmesh-field": "top_logprobs", "x-lmesh-invalid": "needs logprobs set to true"}},
        {"if": {"properties": {"tool_choice": {"anyOf": [{"type": "object"}, {"type": "string", "const": "required"}]}},
                "required": ["tool_choice"]},
         "then": {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"],
                  "x-lmesh-field": "tool_choice", "x-lmesh-invalid": "needs tools to call"}},
        {"if": {"properties": {"response_format": {"type": "object", "properties": {
            "type": {"type": "string", "const": "json_schema"}}, "required": ["type"]}},
                "required": ["response_format"]},
         "then": {"properties": {"response_format": {"type": "object", "required": ["json_schema"]}},
                  "x-lmesh-field": "response_format.json_schema",
                  "x-lmesh-invalid": "is required with type json_schema"}}],
}
MAX_EMBED_INPUTS, MAX_EMBED_CHARS = 256, 100_000  # lmesh-embeddings' bounds
EMBED_TEXT = {"type": "string", "maxLength": MAX_EMBED_CHARS}
EMBEDDINGS_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["input"],
    "description": "OpenAI's embeddings request, answered by lmesh-embeddings (all-MiniLM-L6-v2: 384 dimensions, "
                   "unit length); fields not listed are ignored.",
    "properties": {
        "input": {"anyOf": [EMBED_TEXT, {"type": "array", "minItems": 1, "maxItems": MAX_EMBED_INPUTS,
                                         "items": EMBED_TEXT}],
                  "x-lmesh-invalid": f"must be a string or an array of 1 to {MAX_EMBED_INPUTS} strings (token ids "
                                     "are not supported)",
                  "description": "Each text is truncated to the model's 256 wordpieces."},
        "model": {"type": "string", "maxLength": 128,
                  "description": "The embedding model's name: `all-minilm-l6-v2` (the default when left out or "
                                 "empty), or `all-minilm-l6-v2-tools`, tuned to match requests to tool "
                                 "descriptions."},
        "encoding_format": _nullable({"type": "string", "enum": ["float", "base64"]}),
        "dimensions": _nullable(_unsupported({"type": "integer", "minimum": 384, "maximum": 384},
                                             "only the model's own 384 dimensions are supported")),
        "user": _nullable({"type": "string", "maxLength": MAX_USER_CHARS}),
    },
}
COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["prompt"],
    "description": "OpenAI's (legacy) completion request; fields not listed are ignored. The prompt is rendered "
                   "as one user turn with the model's chat template (the served models are chat-tuned).",
    "properties": {
        "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "maxItems": MAX_CHOICES,
                                                   "items": {"type": "string"}}],
                   "x-lmesh-invalid": f"must be a string or an array of 1 to {MAX_CHOICES} strings (token ids are "
                                      "not supported)",
                   "description": f"One prompt, or several answered in one response: choice p * n + i is prompt p's "
                                  f"i-th (with a seed, it uses seed + i); n times the prompts: at most {MAX_CHOICES}."},
        **SAMPLING,
        "max_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": INT32_MAX,
                                 "description": f"Left out: {DEFAULT_COMPLETION_MAX_TOKENS}, as OpenAI."}),
        "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                               "description": "Each token's logprob and this many most likely alternatives."}),
        "echo": _nullable(_unsupported({"type": "boolean", "enum": [False]}, "is not supported")),
        "suffix": _nullable(_unsupported({"type": "string", "maxLength": 0}, "is not supported")),
        "best_of": _nullable(_unsupported({"type": "integer", "minimum": 1, "maximum": 1},
                                          "only 1 is supported; use n")),
    },
    # n times the number of prompts: at most MAX_CHOICES, one rule per number of prompts.
    "allOf": [
        {"if": {"properties": {"prompt": {"type": "array", "minItems": count, "maxItems": count}},
                "required": ["prompt"]},
         "then": {"properties": {"n": {"maximum": MAX_CHOICES // count}},
                  "x-lmesh-field": "n", "x-lmesh-invalid": f"must be at most {MAX_CHOICES // count} with {count} "
                                                           f"prompts ({MAX_CHOICES} choices at most, generated in "
                                                           "parallel)"}}
        for count in range(2, MAX_CHOICES + 1)],
}

# ---- checking a body against a schema -----------------------------------------------------------------------

_JSON_TYPES = {"null": "null", "boolean": "a boolean", "integer": "an integer", "number": "a number",
               "string": "a string", "array": "an array", "object": "an object"}


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _types(schema: Mapping[str, Any]) -> list[str]:
    kind = schema.get("type")
    return [kind] if isinstance(kind, str) else list(kind or ())


def _type_ok(value: Any, schema: Mapping[str, Any]) -> bool:
    kinds = _types(schema)
    if not kinds:
        return True
    actual = json_type(value)
    return actual in kinds or (actual == "integer" and "number" in kinds)


def _describe(schema: Mapping[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(_describe(branch) for branch in schema["anyOf"])
    return " or ".join(_JSON_TYPES[kind] for kind in _types(schema))


def _join(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


def check(value: Any, schema: Mapping[str, Any], path: str = "") -> None:
    """Raises InvalidArgument naming the first place where `value` breaks `schema` (the JSON Schema keywords the
    request schemas use; properties not declared are allowed)."""
    if "anyOf" in schema:
        for branch in schema["anyOf"]:
            if _type_ok(value, branch):
                _constrained(value, branch, path, schema)
                return
        raise InvalidArgument(path, f"must be {_describe(schema)}, got {json_type(value)}")
    if not _type_ok(value, schema):
        raise InvalidArgument(path, f"must be {_describe(schema)}, got {json_type(value)}")
    _constrained(value, schema, path, schema)


def _constrained(value: Any, schema: Mapping[str, Any], path: str, outer: Mapping[str, Any]) -> None:
    """The constraints past the type. A value of the right type that breaks them gets the node's own message
    where it has one: `x-lmesh-unsupported` (what is missing) for any failure within the node, `x-lmesh-invalid`
    for one of the node itself."""
    unsupported = schema.get("x-lmesh-unsupported") or outer.get("x-lmesh-unsupported")
    invalid = schema.get("x-lmesh-invalid") or outer.get("x-lmesh-invalid")
    try:
        _check_constraints(value, schema, path)
    except InvalidArgument as exc:
        if unsupported is not None:
            raise InvalidArgument(path, unsupported) from None
        if invalid is not None and exc.field == path:
            raise InvalidArgument(path, _with_value(invalid, value)) from None
        raise


def _with_value(problem: str, value: Any) -> str:
    """The problem, and the value (cut short) when it is a string or a number, as the gRPC API's messages say it."""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return f"{problem}, got {capped(json.dumps(value), 80)}"
    return problem


def _check_constraints(value: Any, schema: Mapping[str, Any], path: str) -> None:
    if value is None:
        return
    if "enum" in schema and not any(value == option and type(value) is type(option) for option in schema["enum"]):
        shown = ", ".join(json.dumps(option) for option in schema["enum"])
        raise InvalidArgument(path, f"must be one of {shown}, got {capped(json.dumps(value))}")
    if "const" in schema and not (value == schema["const"] and type(value) is type(schema["const"])):
        raise InvalidArgument(path, f"must be {json.dumps(schema['const'])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        if (low is not None and not value >= low) or (high is not None and not value <= high):
            raise InvalidArgument(path, f"must be in [{low}, {high}], got {value}")
    elif isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidArgument(path, "must be valid Unicode (it holds a lone surrogate)") from None
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if len(value) < low or (high is not None and len(value) > high):
            raise InvalidArgument(path, f"must be {low} to {high} characters, got {len(value)}" if high is not None
                                  else f"must be at least {low} characters")
        pattern = schema.get("pattern")
        if pattern is not None and re.fullmatch(pattern.removeprefix("^").removesuffix("$"), value) is None:
            raise InvalidArgument(path, f"does not match {pattern}")
    elif isinstance(value, list):
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if len(value) < low:
            raise InvalidArgument(path, "must not be empty" if low == 1 else f"must hold at least {low} items")
        if high is not None and len(value) > high:
            raise InvalidArgument(path, f"must hold at most {high} items, got {len(value)}")
        items = schema.get("items")
        if items is not None:
            for index, item in enumerate(value):
                check(item, items, _join(path, index))
    elif isinstance(value, dict):
        for name, member in schema.get("properties", {}).items():  # first: a part of type image_url says so
            if name in value:
                check(value[name], member, _join(path, name))
        for name in schema.get("required", ()):
            if name not in value:
                raise InvalidArgument(_join(path, name), "is required")
        most = schema.get("maxProperties")
        if most is not None and len(value) > most:
            raise InvalidArgument(path, f"must have at most {most} members")
        names, others = schema.get("propertyNames"), schema.get("additionalProperties")
        if names is not None or isinstance(others, Mapping):
            declared = schema.get("properties", {})
            for name, member in value.items():
                if name in declared:
                    continue
                if names is not None and not _valid(name, names):
                    raise InvalidArgument(_join(path, name), "is not an allowed member name"
                                          + (f" (it must match {names['pattern']})" if "pattern" in names else ""))
                if isinstance(others, Mapping):
                    check(member, others, _join(path, name))
        for rule in [schema, *schema.get("allOf", ())]:
            condition = rule.get("if")
            if condition is not None and _valid(value, condition):
                then = rule["then"]
                if not _valid(value, then):
                    field = then.get("x-lmesh-field", path)  # `.name`: a member of the object checked
                    raise InvalidArgument(path + field if field.startswith(".") else field,
                                          then.get("x-lmesh-invalid", "is invalid"))


def _valid(value: Any, schema: Mapping[str, Any]) -> bool:
    try:
        check(value, schema)
    except InvalidArgument:
        return False
    return True


def parse_body(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; InvalidArgument (`request`) for anything else."""

    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(body, parse_constant=refuse_constant)
    except RecursionError:
        raise InvalidArgument("request", "the body nests too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise InvalidArgument("request", f"the body is not JSON ({capped(str(exc), 120)})") from None
    if not isinstance(value, dict):
        raise InvalidArgument("request", f"the body must be a JSON object, got {json_type(value)}")
    return value


# ---- requests into ChatParams ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ApiRequest:
    """A checked request: what the request path runs (once per choice) and how to answer."""

    params: ChatParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    completion: bool = False  # /v1/completions: `text` choices, the legacy logprobs form
    # The request path's field names as this request spelled them (`max_tokens` given as max_completion_tokens;
    # a completion's `prompt` is the path's `messages`), for errors.
    names: Mapping[str, str] = field(default_factory=dict)
    # /v1/completions given several prompts: each is asked n times (`params` holds the first).
    prompts: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        """How many choices the answer has: n for each prompt."""
        return self.n * max(1, len(self.prompts))

    def choices(self) -> list[ChatParams]:
        """One ChatParams per choice, prompt by prompt: choice p·n + i asks prompt p and samples with seed + i (a
        seed of 0 stays random)."""
        asked = [replace(self.params, messages=[("user", prompt)]) for prompt in self.prompts] or [self.params]
        return [choice for params in asked for choice in self._seeded(params)]

    def _seeded(self, params: ChatParams) -> list[ChatParams]:
        seed = params.seed
        if self.n == 1 or seed == 0:
            return [params] * self.n
        seeds = [((seed + i - INT64[0]) % 2**64) + INT64[0] for i in range(self.n)]
        return [replace(params, seed=s or 1) for s in seeds]

    def param(self, name: str) -> str | None:
        """The request's own name for a field the request path names (None: the body as a whole)."""
        if name == "request":
            return None
        for prefix, spelled in self.names.items():
            if name == prefix or name.startswith((f"{prefix}[", f"{prefix}.")):
                return spelled if self.completion and prefix == "messages" else spelled + name[len(prefix):]
        return name


def _get(body: Mapping[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value


def _sampling(body: Mapping[str, Any], max_tokens: int) -> dict[str, Any]:
    stop = body.get("stop")
    return {
        "model": _get(body, "model", DEFAULT_MODEL),
        "max_tokens": int(max_tokens),
        "temperature": float(_get(body, "temperature", DEFAULT_TEMPERATURE)),
        "top_p": float(_get(body, "top_p", 0.0)),
        "top_k": int(_get(body, "top_k", 0)),
        "seed": int(_get(body, "seed", 0)),
        "repetition_penalty": float(_get(body, "repetition_penalty", 0.0)),
        "presence_penalty": float(_get(body, "presence_penalty", 0.0)),
        "frequency_penalty": float(_get(body, "frequency_penalty", 0.0)),
        "logit_bias": tuple(sorted((int(token), float(bias)) for token, bias in _get(body, "logit_bias", {}).items())),
        "stop": [stop] if isinstance(stop, str) else list(stop or []),
        "session": _get(body, "user", ""),
        "priority": None if body.get("priority") is None else int(body["priority"]),
    }


def _streaming(body: Mapping[str, Any]) -> dict[str, Any]:
    options = body.get("stream_options") or {}
    return {"n": int(_get(body, "n", 1)), "stream": bool(body.get("stream")),
            "include_usage": bool(options.get("include_usage"))}


def chat_request(body: dict[str, Any]) -> ApiRequest:
    """POST /v1/chat/completions: InvalidArgument naming the field for a body its schema refuses."""
    check(body, CHAT_REQUEST)
    messages = []
    names: dict[str, str] = {}
    for turn in body["messages"]:
        content = turn.get("content")
        text = (content if isinstance(content, str) else
                "" if content is None else "\n".join(part["text"] for part in content))
        calls = turn.get("tool_calls") or []
        if turn["role"] == "tool":
            call_id = turn.get("tool_call_id", "")
            messages.append(("user", result_turn(names.get(call_id, ""), call_id, text)))
        elif calls:
            names.update((call["id"], call["function"]["name"]) for call in calls)
            written = call_turn([(call["function"]["name"], call["function"]["arguments"]) for call in calls])
            messages.append(("assistant", f"{text}\n{written}" if text else written))
        else:
            messages.append((ROLES[turn["role"]], text))
    spelled = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params = ChatParams(messages=messages, logprobs=bool(body.get("logprobs")),
                        top_logprobs=int(_get(body, "top_logprobs", 0)),
                        response_format=output_constraint(body.get("response_format")),
                        functions=function_calling(body), tools=mesh_tools(body.get("mesh_tools")),
                        **_sampling(body, _get(body, spelled, UNSET_CHAT_MAX_TOKENS)))
    return ApiRequest(params, **_streaming(body), names={
        "max_tokens": spelled, "tools": "mesh_tools", "functions": "tools", "function_choice": "tool_choice",
        "response_format.json_schema": "response_format.json_schema.schema"})


def function_calling(body: Mapping[str, Any]) -> FunctionCalling | None:
    """OpenAI's tools, tool_choice and parallel_tool_calls."""
    tools, choice = body.get("tools") or [], body.get("tool_choice")
    if not tools and choice in (None, "none", "auto"):
        return None
    name = choice["function"]["name"] if isinstance(choice, dict) else (choice or "auto")
    return FunctionCalling.checked(
        [(t["function"]["name"], t["function"].get("description", ""),
          json.dumps(t["function"].get("parameters") or {"type": "object"})) for t in tools],
        name, body.get("parallel_tool_calls") is not False, field="tools", choice_field="tool_choice")


def mesh_tools(value: Mapping[str, Any] | None) -> ToolRequest | None:
    if value is None or not (value.get("auto") or value.get("names")):
        return None
    return ToolRequest(auto=bool(value.get("auto")), names=tuple(value.get("names") or ()),
                       max_calls=int(value.get("max_calls") or 0),
                       call_timeout_ms=int(value.get("call_timeout_ms") or 0),
                       candidates=int(value.get("candidates") or 0))


def output_constraint(response_format: Mapping[str, Any] | None) -> generation_pb2.OutputConstraint | None:
    """OpenAI's response_format as the engine's constraint (None: free text)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "json_object":
        return generation_pb2.OutputConstraint(json_schema='{"type": "object"}')
    if kind == "json_schema":
        assert response_format is not None
        if "json_schema" not in response_format:
            raise InvalidArgument("response_format.json_schema", "is required with type json_schema")
        schema = response_format["json_schema"].get("schema") or {"type": "object"}
        return generation_pb2.OutputConstraint(json_schema=json.dumps(schema, separators=(",", ":")))
    return None


def completion_request(body: dict[str, Any]) -> ApiRequest:
    """POST /v1/completions: the prompt as one user turn (the served models are chat-tuned)."""
    prompt = body.get("prompt")
    token_ids = isinstance(prompt, list) and any(isinstance(i, (int, list)) and not isinstance(i, bool) for i in prompt)
    if token_ids:
        raise InvalidArgument("prompt", "token ids are not supported: send the prompt as text")
    check(body, COMPLETION_REQUEST)
    prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
    logprobs = body.get("logprobs")
    params = ChatParams(messages=[("user", prompts[0])],
                        logprobs=logprobs is not None, top_logprobs=int(logprobs or 0),
                        **_sampling(body, _get(body, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)))
    return ApiRequest(params, **_streaming(body), completion=True,
                      names={"messages": "prompt", "top_logprobs": "logprobs"},
                      prompts=tuple(prompts) if len(prompts) > 1 else ())


def embeddings_request(body: dict[str, Any]) -> tuple[embeddings_pb2.EmbedRequest, bool]:
    """POST /v1/embeddings: lmesh-embeddings' request, and whether the vectors go as base64."""
    check(body, EMBEDDINGS_REQUEST)
    given = body["input"]
    texts = [given] if isinstance(given, str) else list(given)
    return (embeddings_pb2.EmbedRequest(inputs=texts, model=body.get("model") or ""),
            body.get("encoding_format") == "base64")


def embeddings_json(response: embeddings_pb2.EmbedResponse, base64_vectors: bool) -> bytes:
    """OpenAI's embeddings answer; base64: each vector's float32 values, little-endian, as OpenAI sends them."""
    data = []
    for embedding in response.embeddings:
        values = np.asarray(embedding.values, dtype="<f4")
        vector: Any = base64.b64encode(values.tobytes()).decode() if base64_vectors else values.tolist()
        data.append({"object": "embedding", "index": embedding.index, "embedding": vector})
    return dumps({"object": "list", "data": data, "model": response.model,
                  "usage": {"prompt_tokens": response.usage.prompt_tokens,
                            "total_tokens": response.usage.total_tokens}})


# ---- answers ---------------------------------------------------------------------------------------------------

def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else UNKNOWN_LOGPROB


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")  # part of a character shows as U+FFFD, as in the gRPC API


def chat_logprobs(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's `choices[].logprobs.content`."""
    return [{"token": _text(e.chosen.data), "logprob": _logprob(e.chosen.logprob), "bytes": list(e.chosen.data),
             "top_logprobs": [{"token": _text(a.data), "logprob": _logprob(a.logprob), "bytes": list(a.data)}
                              for a in e.top]} for e in entries]


class LegacyLogprobs:
    """A completion choice's `logprobs` in the legacy form (tokens, token_logprobs, top_logprobs, text_offset),
    its offsets counted in characters of the choice's text across chunks."""

    def __init__(self, top: bool) -> None:
        self._top = top
        self._offset = 0

    def __call__(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        tokens, offsets = [], []
        for entry in entries:
            token = _text(entry.chosen.data)
            tokens.append(token)
            offsets.append(self._offset)
            self._offset += len(token)
        return {"tokens": tokens, "token_logprobs": [_logprob(e.chosen.logprob) for e in entries],
                "top_logprobs": [{_text(a.data): _logprob(a.logprob) for a in e.top} for e in entries]
                if self._top else None,
                "text_offset": offsets}


def usage_json(prompt: generation_pb2.Usage, completion_tokens: int, cached_response: bool = False,
               ) -> dict[str, Any]:
    """OpenAI's usage: each prompt once (a prompt's choices share it), the completion tokens of all choices;
    lmesh's extension `lmesh.cached_response` (every choice answered from the response cache)."""
    return {"prompt_tokens": prompt.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": prompt.cached_prompt_tokens},
            "lmesh": {"cached_response": cached_response}}


@dataclass
class Choice:
    """One choice of an answer being assembled (non-streaming) or streamed."""

    index: int
    text: list[str] = field(default_factory=list)
    entries: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: generation_pb2.Usage | None = None
    started: bool = False  # streaming: its first chunk (with the role) went out
    tool_calls: list[FunctionCall] = field(default_factory=list)
    tool_steps: list[dict[str, Any]] = field(default_factory=list)  # lmesh: the mesh tools' steps


class Answer:
    """The JSON of one request's answer: a whole response, or its Server-Sent Events chunk by chunk."""

    def __init__(self, request: ApiRequest, completion_id: str, model: str, created: int) -> None:
        self.request = request
        self.completion = request.completion
        self.id = f"cmpl-{completion_id.removeprefix('chatcmpl-')}" if self.completion else completion_id
        self.model = model
        self.created = created
        self.choices = [Choice(i) for i in range(request.count)]
        self.cache_results: dict[int, str] = {}  # each choice's response cache result (request_path.ChatStarted)
        self._legacy = [LegacyLogprobs(request.params.top_logprobs > 0) for _ in range(request.count)]
        kind = "text_completion" if self.completion else "chat.completion.chunk"
        self._head = (f'data: {{"id":{json.dumps(self.id)},"object":"{kind}","created":{created},'
                      f'"model":{json.dumps(model)},"system_fingerprint":null,"choices":[').encode()
        self._tail = b'],"usage":null}\n\n' if request.include_usage else b"]}\n\n"

    def _logprobs(self, index: int, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if not self.request.params.logprobs:
            return None
        if self.completion:
            return self._legacy[index](entries)
        return {"content": chat_logprobs(entries), "refusal": None}

    def _logprobs_json(self, index: int, entries: Sequence[TokenLogprob]) -> bytes:
        return b"null" if not self.request.params.logprobs else dumps(self._logprobs(index, entries))

    # -- streaming

    def chunk(self, index: int, text: str, entries: Sequence[TokenLogprob], finish: str | None = None) -> bytes:
        """One Server-Sent Event: a choice's delta (and, on its last chunk, its finish reason)."""
        reason = b"null" if finish is None else f'"{finish}"'.encode()
        logprobs = self._logprobs_json(index, entries)
        if self.completion:
            body = (b'{"text":' + dumps(text) + b',"index":' + str(index).encode() + b',"logprobs":' + logprobs
                    + b',"finish_reason":' + reason + b"}")
        else:
            choice = self.choices[index]
            if not choice.started:
                delta = b'{"role":"assistant","content":' + dumps(text) + b"}"
                choice.started = True
            elif text or finish is None:
                delta = b'{"content":' + dumps(text) + b"}"
            else:
                delta = b"{}"
            body = (b'{"index":' + str(index).encode() + b',"delta":' + delta + b',"logprobs":' + logprobs
                    + b',"finish_reason":' + reason + b"}")
        return self._head + body + self._tail

    def tool_calls_chunk(self, index: int, calls: Sequence[FunctionCall]) -> bytes:
        """The calls of a choice, whole, in one chunk (OpenAI's streamed `delta.tool_calls`)."""
        choice = self.choices[index]
        delta: dict[str, Any] = {"role": "assistant", "content": None} if not choice.started else {}
        choice.started = True
        delta["tool_calls"] = tool_calls_json(calls, streamed=True)
        return self._head + dumps({"index": index, "delta": delta, "logprobs": None,
                                   "finish_reason": None}) + self._tail

    def tool_step_chunk(self, index: int, step: dict[str, Any]) -> bytes:
        """lmesh: a mesh tool's step, as a chunk whose delta carries `lmesh_tool_step` and no text."""
        choice = self.choices[index]
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if not choice.started else {}
        choice.started = True
        delta["lmesh_tool_step"] = step
        return self._head + dumps({"index": index, "delta": delta, "logprobs": None,
                                   "finish_reason": None}) + self._tail

    def usage_chunk(self) -> bytes:
        """The last event with `stream_options.include_usage`: no choices, the usage."""
        kind = "text_completion" if self.completion else "chat.completion.chunk"
        return b"data: " + dumps({"id": self.id, "object": kind, "created": self.created, "model": self.model,
                                  "system_fingerprint": None, "choices": [], "usage": self.usage()}) + b"\n\n"

    def usage(self) -> dict[str, Any] | None:
        if self.choices[0].usage is None:
            return None
        usages = [c.usage for c in self.choices if c.usage is not None]
        n = self.request.n
        # Each prompt once, as its first choice with a usage counted it.
        asked = [next((c.usage for c in self.choices[p:p + n] if c.usage is not None), None)
                 for p in range(0, len(self.choices), n)]
        prompts = generation_pb2.Usage(prompt_tokens=sum(u.prompt_tokens for u in asked if u is not None),
                                       cached_prompt_tokens=sum(u.cached_prompt_tokens for u in asked if u is not None))
        return usage_json(prompts, sum(u.completion_tokens for u in usages), all(u.cached_response for u in usages))

    def cache_header(self) -> tuple[bytes, bytes]:
        """`x-lmesh-cache`: hit when every choice was answered from the response cache, bypass when the request
        did not read it (opted out, or not deterministic), miss otherwise (choices not started yet count as
        misses)."""
        results = set(self.cache_results.values())
        value = ("bypass" if "bypass" in results else
                 "hit" if results == {"hit"} and len(self.cache_results) == len(self.choices) else "miss")
        return b"x-lmesh-cache", value.encode()

    # -- whole

    def whole(self) -> bytes:
        """The non-streaming response."""
        choices = []
        for choice in self.choices:
            logprobs = self._logprobs(choice.index, choice.entries)
            text = "".join(choice.text)
            if self.completion:
                choices.append({"text": text, "index": choice.index, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})
            else:
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                if choice.tool_calls:
                    message.update(content=text or None, tool_calls=tool_calls_json(choice.tool_calls))
                if choice.tool_steps:
                    message["lmesh_tool_steps"] = choice.tool_steps
                choices.append({"index": choice.index, "message": message,
                                "logprobs": logprobs, "finish_reason": choice.finish_reason})
        return dumps({"id": self.id, "object": "text_completion" if self.completion else "chat.completion",
                      "created": self.created, "model": self.model, "system_fingerprint": None,
                      "choices": choices, "usage": self.usage()})


DONE = b"data: [DONE]\n\n"


def tool_calls_json(calls: Sequence[FunctionCall], streamed: bool = False) -> list[dict[str, Any]]:
    return [{**({"index": i} if streamed else {}), "id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}} for i, call in enumerate(calls)]


def model_json(version: registry_pb2.ModelVersion, served: set[str]) -> dict[str, Any]:
    model_id = f"{version.name}:{version.version}"
    return {"id": model_id, "object": "model", "created": version.create_time_unix_ms // 1000, "owned_by": "lmesh",
            "aliases": list(version.aliases), "context_length": version.context_length,
            "served": model_id in served}


# ---- errors ---------------------------------------------------------------------------------------------------

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 503,  # a dependency cancelled the call (the caller itself never gets an answer)
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error"}
# OpenAI's spelling where it has one for the same thing; otherwise lmesh's ErrorInfo reason in lower case.
ERROR_CODES = {Reason.INVALID_FIELD: "invalid_value", Reason.UNAUTHENTICATED: "invalid_api_key",
               Reason.MODEL_NOT_FOUND: "model_not_found"}


@dataclass(frozen=True)
class HttpError:
    status: int
    body: bytes  # {"error": {"message", "type", "param", "code"}}
    headers: tuple[tuple[bytes, bytes], ...] = ()
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN  # what the error is as a gRPC status (metrics, spans)

    def event(self) -> bytes:
        """The error as the Server-Sent Event that ends a stream already under way."""
        return b"event: error\ndata: " + self.body + b"\n\n"


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
    # ASCII (\u escapes): a message may echo what a caller sent, lone surrogates included.
    return json.dumps({"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                                 "param": param, "code": code}}, separators=(",", ":")).encode()


def plain_error(status: int, message: str, code: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> HttpError:
    """An error of the HTTP layer itself (no route, wrong method, body too large)."""
    return HttpError(status, error_body(status, message, code), headers)


def _error_info(details: Sequence[Message]) -> error_details_pb2.ErrorInfo | None:
    for detail in details:
        if isinstance(detail, error_details_pb2.ErrorInfo):
            return detail
        if isinstance(detail, any_pb2.Any):
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info
    return None


def http_error(exc: BaseException, span: trace.Span | None = None, request: ApiRequest | None = None) -> HttpError:
    """What an HTTP client gets for `exc`: the status, OpenAI's error JSON (`code`: OpenAI's spelling or lmesh's
    ErrorInfo reason in lower case; `param`: the field as the request spelled it), and `Retry-After` (whole
    seconds) with `retry-after-ms` when the error says when to retry. A bug is 500 with the trace id."""
    code, message, trailers = status_for(exc, span)
    details = details_for(exc, code, span)
    info = _error_info(details)
    reason = info.reason if info is not None else code.name
    status = HTTP_STATUS.get(code, 500)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or reason == Reason.DEPENDENCY_TIMEOUT:
        # Over HTTP there is no caller deadline: a dependency that ran out of time is a gateway timeout.
        status, reason = 504, Reason.DEPENDENCY_TIMEOUT
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message = f"a dependency did not answer in time ({message}); retry"
    param = None
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        named = (info.metadata.get("field") if info is not None else None) or getattr(exc, "field", None)
        if named:
            param = request.param(named) if request is not None else (None if named == "request" else named)
            if param != named and message.startswith(f"{named}:"):
                message = f"{param}:{message[len(named) + 1:]}" if param else message[len(named) + 2:]
    headers: list[tuple[bytes, bytes]] = []
    retry_ms = dict(trailers).get("retry-after-ms")
    if retry_ms is not None and retry_ms.isdigit():
        headers += [(b"retry-after", str(math.ceil(int(retry_ms) / 1000)).encode()),
                    (b"retry-after-ms", retry_ms.encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    body = error_body(status, bounded(message), ERROR_CODES.get(reason, reason.lower()), param)
    return HttpError(status, body, tuple(headers), code)


# ---- the OpenAPI document ------------------------------------------------------------------------------------

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"},
        "type": {"type": "string", "enum": sorted({*ERROR_TYPES.values(), "server_error"})},
        "param": {"type": ["string", "null"], "description": "The field at fault, as the request spelled it."},
        "code": {"type": ["string", "null"],
                 "description": "OpenAI's code where it has one (invalid_value, invalid_api_key, model_not_found); "
                                "otherwise lmesh's ErrorInfo reason in lower case (queue_full, gateway_busy, "
                                "content_blocked, model_not_allowed, draining, dependency_timeout, unavailable, "
                                "internal, ...)."}}}}}
USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"},
    "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}},
    "lmesh": {"type": "object", "description": "lmesh's extension.", "properties": {"cached_response": {
        "type": "boolean", "description": "The gateway answered from its response cache: no model ran (every "
                                          "choice, with n > 1)."}}}}}
FINISH = {"type": ["string", "null"], "enum": [*FINISH_REASONS.values(), None]}
TOKEN = {"token": {"type": "string"}, "logprob": {"type": "number"},
         "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}}
TOP_LOGPROB = {"type": "object", "required": ["token", "logprob", "bytes"], "properties": TOKEN}
CHAT_LOGPROBS = {"type": ["object", "null"], "properties": {
    "content": {"type": "array", "items": {
        "type": "object", "required": ["token", "logprob", "bytes", "top_logprobs"],
        "properties": {**TOKEN, "top_logprobs": {"type": "array", "items": TOP_LOGPROB}}}},
    "refusal": {"type": "null"}}}
LEGACY_LOGPROBS = {"type": ["object", "null"], "properties": {
    "tokens": {"type": "array", "items": {"type": "string"}},
    "token_logprobs": {"type": "array", "items": {"type": "number"}},
    "top_logprobs": {"type": ["array", "null"],
                     "items": {"type": "object", "additionalProperties": {"type": "number"}}},
    "text_offset": {"type": "array", "items": {"type": "integer"}}}}


def _answer(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices"], "properties": {
        "id": {"type": "string"}, "object": {"type": "string", "enum": [kind]}, "created": {"type": "integer"},
        "model": {"type": "string", "description": "The concrete version that answered, `name:version`."},
        "system_fingerprint": {"type": "null"}, "choices": {"type": "array", "items": choice},
        "usage": {"anyOf": [USAGE, {"type": "null"}]}}}


CHAT_COMPLETION = _answer("chat.completion", {
    "type": "object", "required": ["index", "message", "finish_reason"], "properties": {
        "index": {"type": "integer"}, "finish_reason": FINISH, "logprobs": CHAT_LOGPROBS,
        "message": {"type": "object", "required": ["role", "content"], "properties": {
            "role": {"type": "string", "enum": ["assistant"]}, "content": {"type": "string"},
            "refusal": {"type": "null"}}}}})
COMPLETION = _answer("text_completion", {
    "type": "object", "required": ["text", "index", "finish_reason"], "properties": {
        "text": {"type": "string"}, "index": {"type": "integer"}, "finish_reason": FINISH,
        "logprobs": LEGACY_LOGPROBS}})
MODEL_OBJECT = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
    "id": {"type": "string", "description": "`name:version`: a model reference chats take."},
    "object": {"type": "string", "enum": ["model"]}, "created": {"type": "integer"},
    "owned_by": {"type": "string"}, "aliases": {"type": "array", "items": {"type": "string"}},
    "context_length": {"type": "integer"},
    "served": {"type": "boolean", "description": "Whether a passing inference replica serves it now."}}}
EMBEDDING_LIST = {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
    "object": {"const": "list"}, "model": {"type": "string"},
    "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"], "properties": {
        "object": {"const": "embedding"}, "index": {"type": "integer"},
        "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]}}}},
    "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"], "properties": {
        "prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}}}}
MODEL_LIST = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"type": "string", "enum": ["list"]}, "data": {"type": "array", "items": MODEL_OBJECT}}}
# One Server-Sent Event (OpenAPI 3.1 describes a text/event-stream by its events).
SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "properties": {
        "event": {"type": "string", "enum": ["message", "error"],
                  "description": "`error`: the data is an error object (Error), and the stream ends."},
        "data": {"type": "string", "description": "A chunk object (`chat.completion.chunk` or `text_completion`) as "
                                                  "JSON, or `[DONE]`, the last event."}},
    "description": "With `stream`: one event per delta (a chunk with one choice), a last chunk per choice with its "
                   "finish_reason, with `stream_options.include_usage` a chunk with no choices and the usage, then "
                   "`[DONE]`."}}}


def _errors(*statuses: int) -> dict[str, Any]:
    why = {400: "A malformed or out-of-range field (`param` names it), or a prompt that does not fit the context.",
           401: "No API key, or a wrong or revoked one.",
           403: "The model is not allowed for the key, or a message matched a guardrail rule that blocks.",
           404: "Unknown model (or one the key may not use), or no such route.",
           413: "A body over 4 MiB.",
           429: "A limit, the queue of every replica serving the model is full, or this gateway has its bound of "
                "chats in flight (code gateway_busy).",
           500: "A bug: a generic message with the trace id.",
           503: "A dependency is down, or this gateway is draining: retry.",
           504: "A dependency did not answer in time: retry."}
    headers = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}},
               "retry-after-ms": {"description": "The same, in milliseconds.", "schema": {"type": "integer"}}}
    return {str(status): {"description": why[status], "content": {"application/json": {"schema": ERROR}},
                          **({"headers": headers} if status in (429, 503) else {})} for status in statuses}


CACHE_CONTROL = {"name": "Cache-Control", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "`no-cache`: not answered from the response cache (the answer may still be stored); "
                                "`no-store`: the answer is not stored; both: the cache is left alone."}
CACHE_RESULT = {"x-lmesh-cache": {"schema": {"type": "string", "enum": ["hit", "miss", "bypass"]},
                                  "description": "hit: answered from the gateway's response cache, no model ran; "
                                                 "miss: looked up, not found; bypass: not looked up (opted out, or "
                                                 "not deterministic: sampled without a seed)."}}


def openapi_document() -> dict[str, Any]:
    post_errors = _errors(400, 401, 403, 404, 413, 429, 500, 503, 504)
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "lmesh OpenAI-compatible API", "version": "1",
                 "description": "The gateway's HTTP API: OpenAI's chat completions, completions and models. The same "
                                "request path as the gRPC lmesh.gateway.v1.Gateway (validation, policy, guardrails, "
                                "routing, cancellation)."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "An lmesh API key."}},
                       "schemas": {"Error": ERROR}},
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion", "security": secured, "parameters": [CACHE_CONTROL],
                "requestBody": {"required": True, "content": {"application/json": {"schema": CHAT_REQUEST}}},
                "responses": {"200": {"description": "The answer, or with `stream` its Server-Sent Events.",
                                      "headers": CACHE_RESULT,
                                      "content": {"application/json": {"schema": CHAT_COMPLETION}, **SSE}},
                              **post_errors}}},
            "/v1/completions": {"post": {
                "operationId": "createCompletion", "security": secured, "parameters": [CACHE_CONTROL],
                "requestBody": {"required": True, "content": {"application/json": {"schema": COMPLETION_REQUEST}}},
                "responses": {"200": {"description": "The answer, or with `stream` its Server-Sent Events.",
                                      "headers": CACHE_RESULT,
                                      "content": {"application/json": {"schema": COMPLETION}, **SSE}},
                              **post_errors}}},
            "/v1/embeddings": {"post": {
                "operationId": "createEmbedding", "security": secured,
                "requestBody": {"required": True, "content": {"application/json": {"schema": EMBEDDINGS_REQUEST}}},
                "responses": {"200": {"description": "One unit-length vector per input, in order.",
                                      "content": {"application/json": {"schema": EMBEDDING_LIST}}},
                              **_errors(400, 401, 404, 413, 429, 500, 503, 504)}}},
            "/v1/models": {"get": {
                "operationId": "listModels", "security": secured,
                "responses": {"200": {"description": "The model versions the key may use.",
                                      "content": {"application/json": {"schema": MODEL_LIST}}},
                              **_errors(401, 500, 503, 504)}}},
            "/v1/models/{model}": {"get": {
                "operationId": "retrieveModel", "security": secured,
                "parameters": [{"name": "model", "in": "path", "required": True,
                                "schema": {"type": "string", "maxLength": MAX_REFERENCE_CHARS,
                                           "pattern": REFERENCE_PATTERN},
                                "description": "A model reference: `name:version`, a name or an alias (400 when "
                                               "it is none of them, with or without a key)."}],
                "responses": {"200": {"description": "The version it resolves to.",
                                      "content": {"application/json": {"schema": MODEL_OBJECT}}},
                              **_errors(400, 401, 404, 500, 503, 504)}}},
            "/openapi.json": {"get": {
                "operationId": "openapi", "security": [],
                "responses": {"200": {"description": "This document.",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/health": {"get": {
                "operationId": "health", "security": [],
                "description": "For load balancers in front of this API: no key needed.",
                "responses": {status: {"description": description, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["status"], "properties": {"status": {"const": state}}}}}}
                    for status, description, state in (("200", "Serving.", "serving"),
                                                       ("503", "Draining: send new requests elsewhere.",
                                                        "draining"))}}},
        },
    }
