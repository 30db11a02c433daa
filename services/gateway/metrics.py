"""Gateway metrics: chats by model, tenant and outcome, streams open, and the GenAI timings as the caller sees them.

The servicer's Chat is wrapped (`meter_chats`) rather than edited: the wrapper sees each response go out (the
first delta, the usage at the end) and learns the call's final status code from the shared interceptor
(services.common.rpc.on_call_end), so the outcome is the one the caller got. What only the chat path knows, the
model a request resolved to and the tenant policy authorized, it notes on the chat being served (`note_model`,
`note_tenant`): a context variable, no argument threaded through, a no-op outside a metered chat.

Labels stay bounded: a model is labelled only once it resolved (a caller cannot mint series with made-up names), a
tenant only once policy authorized the request (refusals have none), and the status code is one of gRPC's.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from lmesh.common.v1 import generation_pb2
from lmesh.gateway.v1 import gateway_pb2
from opentelemetry.metrics import Meter, Observation

from services.common.rpc import on_call_end, status_for
from services.common.telemetry import (
    GENAI_PROVIDER,
    GENAI_REQUEST_DURATION_BUCKETS,
    GENAI_TIME_PER_OUTPUT_TOKEN_BUCKETS,
    GENAI_TIME_TO_FIRST_TOKEN_BUCKETS,
    GENAI_TOKEN_USAGE_BUCKETS,
)
from services.gateway.admission import ChatAdmission

OPERATION = "chat"


@dataclass
class ChatRecord:
    """What the metrics know of one chat while it runs."""

    started: float  # time.monotonic()
    request_model: str = ""  # the reference asked for, once it resolved
    response_model: str = ""  # name:version it resolved to
    tenant: str = ""  # once policy authorized it
    first_token: bool = False
    first_token_at: float = 0.0  # time.monotonic() of the first text delta
    ended: bool = False
    reported: bool = False  # the shared interceptor reports its end (with the code the caller got)

    def model_attributes(self) -> dict[str, str]:
        attributes = {"gen_ai.operation.name": OPERATION, "gen_ai.provider.name": GENAI_PROVIDER}
        if self.request_model:
            attributes["gen_ai.request.model"] = self.request_model
        if self.response_model:
            attributes["gen_ai.response.model"] = self.response_model
        return attributes


_current: contextvars.ContextVar[ChatRecord | None] = contextvars.ContextVar("lmesh_gateway_chat", default=None)


def note_model(requested: str, resolved: str) -> None:
    """The chat being served asked for `requested`, which resolved to `resolved` (name:version)."""
    record = _current.get()
    if record is not None:
        record.request_model, record.response_model = requested, resolved


def note_tenant(tenant: str) -> None:
    """Policy authorized the chat being served for `tenant`."""
    record = _current.get()
    if record is not None:
        record.tenant = tenant


class GatewayMetrics:
    def __init__(self, meter: Meter) -> None:
        self._meter = meter
        self.requests = meter.create_counter(
            "lmesh.gateway.requests", unit="{request}",
            description="Chats by model, tenant and outcome (rpc.response.status_code: the gRPC code the caller got)")
        self.active_streams = meter.create_up_down_counter(
            "lmesh.gateway.active_streams", unit="{stream}", description="Chat streams open now")
        self.time_to_first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="From the chat's arrival to its first text delta leaving the gateway",
            explicit_bucket_boundaries_advisory=GENAI_TIME_TO_FIRST_TOKEN_BUCKETS)
        self.time_per_output_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Per chat, from its first text delta to its end, divided by its completion tokens after the "
                        "first (1 / tokens per second, as the caller sees it)",
            explicit_bucket_boundaries_advisory=GENAI_TIME_PER_OUTPUT_TOKEN_BUCKETS)
        self.request_duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s", description="From the chat's arrival to its end, any outcome",
            explicit_bucket_boundaries_advisory=GENAI_REQUEST_DURATION_BUCKETS)
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens per chat by gen_ai.token.type, as its usage reports them (the gateway is the model "
                        "server's client)",
            explicit_bucket_boundaries_advisory=GENAI_TOKEN_USAGE_BUCKETS)

    def observe_admission(self, admission: ChatAdmission) -> None:
        """The gateway's bound on chats in flight: how many are in flight, the bound, and the refusals beyond it."""
        self._meter.create_observable_up_down_counter(
            "lmesh.gateway.chats_in_flight", [lambda _: [Observation(admission.in_flight)]], unit="{chat}",
            description="Chats holding a place under the gateway's bound (--max-chats), gRPC and HTTP together")
        self._meter.create_observable_gauge(
            "lmesh.gateway.max_chats", [lambda _: [Observation(admission.max_chats)]], unit="{chat}",
            description="The gateway's bound on chats in flight (--max-chats)")
        self._meter.create_observable_counter(
            "lmesh.gateway.chats_refused", [lambda _: [Observation(admission.refused)]], unit="{chat}",
            description="Chats refused because the gateway was at its bound (RESOURCE_EXHAUSTED, GATEWAY_BUSY)")

    def begin(self) -> ChatRecord:
        """A chat arrived: it counts as open until the interceptor reports its end (or `end` is called)."""
        record = ChatRecord(time.monotonic())
        _current.set(record)  # this call's own context: the servicer runs in the same task
        self.active_streams.add(1)
        record.reported = on_call_end(lambda code: self.end(record, code))
        return record

    def response(self, record: ChatRecord, response: gateway_pb2.ChatResponse) -> None:
        """A response leaves: the first delta stops the time to first token; the last one carries the usage."""
        if response.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED:
            if response.HasField("usage"):
                self.usage(record, response.usage)
        elif response.delta:
            self.text_sent(record)

    def text_sent(self, record: ChatRecord) -> None:
        """Text of the answer left the gateway (any protocol): the first stops the time to first token."""
        if not record.first_token:
            record.first_token = True
            record.first_token_at = time.monotonic()
            self.time_to_first_token.record(record.first_token_at - record.started, record.model_attributes())

    def usage(self, record: ChatRecord, usage: generation_pb2.Usage) -> None:
        """The chat's usage, as its end reported it."""
        attributes = record.model_attributes()
        self.token_usage.record(usage.prompt_tokens, {**attributes, "gen_ai.token.type": "input"})
        self.token_usage.record(usage.completion_tokens, {**attributes, "gen_ai.token.type": "output"})
        if record.first_token and usage.completion_tokens > 1:
            decoding = time.monotonic() - record.first_token_at
            self.time_per_output_token.record(decoding / (usage.completion_tokens - 1), attributes)

    def end(self, record: ChatRecord, code: grpc.StatusCode) -> None:
        if record.ended:
            return
        record.ended = True
        self.active_streams.add(-1)
        attributes = record.model_attributes()
        counted = {**attributes, "rpc.response.status_code": code.name}
        if record.tenant:
            counted["lmesh.tenant"] = record.tenant
        self.requests.add(1, counted)
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):  # a caller that left is not our error
            attributes["error.type"] = code.name
        self.request_duration.record(time.monotonic() - record.started, attributes)


Chat = Callable[[AsyncIterator[gateway_pb2.ChatRequest], grpc.aio.ServicerContext],
               AsyncGenerator[gateway_pb2.ChatResponse, None]]


def meter_chats(servicer: Any, metrics: GatewayMetrics) -> None:
    """Measures the Chat calls of `servicer` (a GatewayServicer; its other methods stay as they are): its Chat is
    replaced, before the server registers it, by one that reports to `metrics`."""
    chat: Chat = servicer.Chat

    async def metered(request_iterator: AsyncIterator[gateway_pb2.ChatRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.ChatResponse]:
        record = metrics.begin()
        responses = chat(request_iterator, context)
        code = grpc.StatusCode.OK
        try:
            async for response in responses:
                yield response
                metrics.response(record, response)  # once it is written: the client waits for no metrics
        except Exception as exc:
            code = status_for(exc)[0]
            raise
        except BaseException:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            await responses.aclose()  # at once: it cancels the upstream calls of a chat whose caller left
            # Served by the shared interceptor, the call's end comes from it, with the code the caller got; here
            # only where none runs (a servicer called directly).
            if not record.reported:
                metrics.end(record, code)

    servicer.Chat = metered
