"""The gateway's HTTP door: the OpenAI-compatible API (openai_api.py) as an ASGI app, served by uvicorn inside the
gateway process, on its event loop, beside the gRPC server.

Each request runs in a task of its own, raced against the client's disconnect: a client that goes away cancels
that task, which closes the request path's events (request_path.chat_events) and with them the inference and
detokenizer streams, at once, as a gRPC client that drops its stream does. A streamed answer's HTTP status waits
for its first delta (or its end), so a refusal that comes late (every replica's queue full) is still a 429; an
error after that is an `event: error` in OpenAI's shape, and the stream ends.

Drain: when the gateway drains, uvicorn stops accepting connections and the requests in flight get the gateway's
`--grace`; a moment before it runs out, those still running end with the same UNAVAILABLE (DRAINING) a gRPC
stream ends with: a 503, or the error event of a stream under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import uvicorn
from lmesh.policy.v1 import policy_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Meter
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common.config import ServiceConfig, host_port
from services.common.errors import InvalidArgument, LmeshError, NotFound, Reason, Unauthenticated, Unavailable, capped
from services.common.references import check_reference
from services.common.rpc import current_trace_id, status_for
from services.common.telemetry import extract_context
from services.gateway.accounting import rate_limit_headers
from services.gateway.asgi import App, Receive, Scope, Send
from services.gateway.chat import ChatDelta, ChatEnd, ChatParams, ChatService, allowed
from services.gateway.cors import Cors
from services.gateway.credentials import Credential
from services.gateway.mesh_tools import ToolStepEvent, tool_step_json
from services.gateway.metrics import ChatRecord, GatewayMetrics
from services.gateway.openai_api import (
    DONE,
    FINISH_REASONS,
    MAX_BODY_BYTES,
    Answer,
    ApiRequest,
    HttpError,
    chat_request,
    completion_request,
    dumps,
    embeddings_json,
    embeddings_request,
    http_error,
    model_json,
    openapi_document,
    parse_body,
    plain_error,
)
from services.gateway.request_path import ChatEvent, ChatStarted, chat_events, closing, stalled_client
from services.gateway.response_cache import cache_control

if TYPE_CHECKING:
    from services.gateway.tls import PublicTls

log = logging.getLogger("lmesh.gateway.http")


CHAT, COMPLETIONS, MODELS, MODEL = "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}"
EMBEDDINGS, OPENAPI, HEALTH = "/v1/embeddings", "/openapi.json", "/health"
ROUTES = {CHAT: "POST", COMPLETIONS: "POST", EMBEDDINGS: "POST", MODELS: "GET", OPENAPI: "GET", HEALTH: "GET"}
MISSING_KEY = "missing API key: send the header 'Authorization: Bearer <key>'"
JSON = (b"content-type", b"application/json")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
TLS_CHECK_INTERVAL_S = 1.0
MAX_DRAINED_BYTES = 4 * MAX_BODY_BYTES  # a body over the limit is still read (and dropped) up to this size
LARGE_BODY_BYTES = 64 * 1024  # parsed and checked in a worker thread
REQUEST_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def bearer_credential(headers: dict[str, str]) -> Callable[[], Credential]:
    """The request's `Authorization: Bearer <key>`, asked for once its form is checked (UNAUTHENTICATED
    without one)."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    key = token.strip() if scheme.lower() == "bearer" else ""

    def credential() -> Credential:
        if not key:
            other = scheme and scheme.lower() != "bearer"
            raise Unauthenticated(f"the Authorization header's scheme must be Bearer, got {capped(scheme, 40)!r}: "
                                  f"send 'Authorization: Bearer <key>'" if other else MISSING_KEY)
        return Credential(api_key=key)

    return credential


class Responder:
    """Writes one response: whole (JSON), or as a stream of Server-Sent Events."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.trace_id = ""  # sent as `x-lmesh-trace-id` (and `x-request-id`) once the request has a span
        self.answer_headers: list[tuple[bytes, bytes]] = []  # sent with an answer (not with an error)
        self.started = False
        self.status = 0

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started, self.status = True, status
        if self.trace_id:  # `x-request-id` too: OpenAI's SDKs show it as the request's id, on answers and errors
            trace_id = self.trace_id.encode()
            headers = [*headers, (b"x-lmesh-trace-id", trace_id), (b"x-request-id", trace_id)]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def json(self, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        await self._start(status, [JSON, (b"content-length", str(len(body)).encode()), *headers])
        await self._send({"type": "http.response.body", "body": body})

    async def error(self, error: HttpError) -> None:
        if not self.started:
            await self.json(error.status, error.body, error.headers)
        else:  # a stream under way: its status went out with the first delta
            await self.end(error.event())

    async def event(self, data: bytes) -> None:
        if not self.started:
            await self._start(200, [*SSE_HEADERS, *self.answer_headers])
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        if not self.started:
            await self._start(200, [*SSE_HEADERS, *self.answer_headers])
        await self._send({"type": "http.response.body", "body": data})


@dataclass(eq=False)
class Flight:
    """A request being answered: its task, and the error it ends with when the drain's grace runs out, or when its
    client stopped reading (`stalled`: nothing is written then; the connection is closed)."""

    task: asyncio.Task[int] | None = None
    expired: LmeshError | None = None
    stalled: LmeshError | None = None

    def cut(self, error: LmeshError) -> None:
        self.stalled = error
        if self.task is not None:
            self.task.cancel()


async def read_body(receive: Receive, declared: str | None) -> bytes | HttpError | None:
    """The request's body (None: the client left while sending it; a 413 over MAX_BODY_BYTES). A body a little
    over the limit is read to its end and dropped before the 413, so that clients that send all of it before
    reading (most) see the answer; one announced far larger is answered at once, and the connection closed."""
    too_large = plain_error(413, f"the request body is over {MAX_BODY_BYTES // (1024 * 1024)} MiB",
                            "request_too_large", headers=((b"connection", b"close"),))
    if declared is not None and declared.isdigit() and int(declared) > MAX_DRAINED_BYTES:
        return too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_DRAINED_BYTES:
            return too_large
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks) if size <= MAX_BODY_BYTES else too_large


async def client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (its body is already read: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class OpenAIApp:
    """The ASGI application: routes, spans, metrics, and the request path for chats."""

    def __init__(self, chat: ChatService, tracer: trace.Tracer, metrics: GatewayMetrics | None = None,
                 meter: Meter | None = None) -> None:
        self._chat = chat
        self._tracer = tracer
        self._metrics = metrics
        self._duration = None if meter is None else meter.create_histogram(
            "http.server.request.duration", unit="s", description="Duration of HTTP requests (a stream: until it ends)",
            explicit_bucket_boundaries_advisory=REQUEST_DURATION_BUCKETS)
        self._flights: set[Flight] = set()
        self.draining = False  # /health answers 503 from the drain on (load balancers stop sending new requests)
        self.openapi = dumps(openapi_document())

    def expire(self, error: LmeshError) -> None:
        """Ends every request still in flight with `error` (the drain's grace is running out)."""
        for flight in list(self._flights):
            flight.expired = error
            if flight.task is not None:
                flight.task.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # uvicorn runs it with lifespan off; ASGI test clients may not
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        respond = Responder(send)
        try:
            await self._serve(scope, receive, respond)
        except Exception as exc:  # a bug: never a traceback to the client, nor uvicorn's plain-text 500
            error = http_error(exc)
            log.error("%s %s failed (trace_id=%s)", scope.get("method"), scope.get("path"),
                      current_trace_id(None), exc_info=exc)
            if not respond.started:
                await respond.json(error.status, error.body)

    def _route(self, method: str, path: str) -> tuple[str, str] | HttpError:
        """(route, model id) for a known route and method; a 404 or 405 otherwise."""
        route, model = path, ""
        if path.startswith("/v1/models/"):
            route, model = MODEL, path.removeprefix("/v1/models/")
        expected = ROUTES.get(route, "GET" if route == MODEL else None)
        if expected is None:
            return plain_error(404, f"no such route: {method} {path[:200]}", "not_found")
        if method != expected:
            return plain_error(405, f"{route} takes {expected}, not {method[:20]}", "method_not_allowed",
                               headers=((b"allow", expected.encode()),))
        return route, model

    async def _serve(self, scope: Scope, receive: Receive, respond: Responder) -> None:
        method = scope["method"]
        routed = self._route(method, scope["path"])
        if isinstance(routed, HttpError):
            await respond.error(routed)
            return
        route, model = routed
        if route == OPENAPI:
            await respond.json(200, self.openapi)
            return
        if route == HEALTH:  # for load balancers in front of the HTTP API: no key
            status, state = (503, b"draining") if self.draining else (200, b"serving")
            await respond.json(status, b'{"status":"' + state + b'"}')
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        body = b""
        if method == "POST":
            read = await read_body(receive, headers.get("content-length"))
            if read is None:
                return  # gone before it finished sending
            if isinstance(read, HttpError):
                await respond.error(read)
                return
            body = read
        started = time.monotonic()
        attributes = {"http.request.method": method, "http.route": route, "url.scheme": scope.get("scheme", "http")}
        span = self._tracer.start_span(f"lmesh.gateway/{method} {route}", context=extract_context(headers),
                                       kind=SpanKind.SERVER, attributes=attributes)
        respond.trace_id = current_trace_id(span)
        flight = Flight()
        token = otel_context.attach(trace.set_span_in_context(span))
        try:  # the task copies the context: the span is current in it, and in the request path's tasks
            work = flight.task = asyncio.create_task(self._operation(route, model, body, headers, respond, flight))
        finally:
            otel_context.detach(token)
        self._flights.add(flight)
        watcher = asyncio.create_task(client_gone(receive))
        status = 0
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client left: the request path stops at once
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                span.add_event("cancelled by the client")
            else:
                status = work.result()
        except asyncio.CancelledError:  # the server is going away without a drain
            work.cancel()
            raise
        finally:
            watcher.cancel()
            self._flights.discard(flight)
            if status:
                span.set_attribute("http.response.status_code", status)
            span.end()
            if self._duration is not None:
                self._duration.record(time.monotonic() - started, {
                    **attributes, **({"http.response.status_code": status} if status else {})})

    async def _operation(self, route: str, model: str, body: bytes, headers: dict[str, str],
                         respond: Responder, flight: Flight) -> int:
        """Answers the request; returns its HTTP status. Any error becomes OpenAI's error JSON (or event)."""
        credential = bearer_credential(headers)
        request: ApiRequest | None = None
        record = self._metrics.begin() if self._metrics is not None and route in (CHAT, COMPLETIONS) else None
        code = grpc.StatusCode.OK
        try:
            try:
                if route == MODELS:
                    await respond.json(200, await self._list_models(credential()))
                elif route == MODEL:
                    await respond.json(200, await self._retrieve_model(credential(), model))
                elif route == EMBEDDINGS:
                    asked, base64_vectors = embeddings_request(parse_body(body))
                    await respond.json(200, embeddings_json(await self._chat.embed(credential(), asked),
                                                            base64_vectors))
                else:
                    def checked() -> ApiRequest:
                        parsed = parse_body(body)
                        asked = chat_request(parsed) if route == CHAT else completion_request(parsed)
                        read, store = cache_control(headers.get("cache-control", ""))
                        return replace(asked, params=replace(asked.params, cache_read=read, cache_store=store))

                    # A large body takes a worker thread (up to half a second for 4 MiB of messages): the event
                    # loop keeps relaying the other streams' tokens meanwhile.
                    request = await asyncio.to_thread(checked) if len(body) > LARGE_BODY_BYTES else checked()
                    await self._answer(request, credential, respond, record, flight)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if flight.stalled is not None and task is not None:
                    task.uncancel()  # the client stopped reading: nothing more reaches it, uvicorn closes it
                    code = flight.stalled.code
                    _mark_failed(trace.get_current_span(), flight.stalled)
                    return respond.status
                if flight.expired is None or task is None:  # the client left
                    code = grpc.StatusCode.CANCELLED
                    raise
                task.uncancel()  # the drain's grace ran out: the client is still there to be told
                raise flight.expired from None
        except Exception as exc:
            span = trace.get_current_span()
            error = http_error(exc, span, request)
            code = error.code
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s failed (trace_id=%s)", route, current_trace_id(span), exc_info=exc)
            _mark_failed(span, exc)
            await respond.error(error)
        finally:
            if record is not None and self._metrics is not None:
                self._metrics.end(record, code)
        return respond.status

    # -- chats

    async def _answer(self, request: ApiRequest, credential: Callable[[], Credential], respond: Responder,
                      record: ChatRecord | None, flight: Flight) -> None:
        metrics = self._metrics if record is not None else None
        created = int(time.time())
        answer: Answer | None = None
        rate: list[tuple[bytes, bytes]] = []
        latest = 0  # the key's requests in its window at the latest admission seen (each choice is one)

        def admitted(reservation: policy_pb2.ReserveResponse | None) -> None:
            nonlocal latest, rate
            # Later admissions count the earlier ones; a tool chat's answer counts no request of its own but
            # says more of the tokens.
            if reservation is not None and reservation.key_window.requests >= latest:
                latest = reservation.key_window.requests
                rate = [(name.encode(), value.encode()) for name, value in rate_limit_headers(reservation)]

        async with closing(self._choices(request, credential, flight)) as events:
            async for index, event in events:
                if isinstance(event, ChatStarted):
                    answer = answer or Answer(request, event.id, event.model, created)
                    answer.cache_results[index] = event.response_cache
                    admitted(event.admitted)
                    respond.answer_headers = [answer.cache_header(), *rate]
                    continue
                if isinstance(event, ToolStepEvent):
                    answer = answer or Answer(request, event.id, event.model, created)
                    if index not in answer.cache_results:  # its first step: the plan admitted the chat
                        answer.cache_results[index] = "bypass"  # a tool chat's answer is never cached
                        admitted(event.admitted)
                        respond.answer_headers = [answer.cache_header(), *rate]
                    step = tool_step_json(event)
                    if request.stream:
                        await respond.event(answer.tool_step_chunk(index, step))
                    else:
                        answer.choices[index].tool_steps.append(step)
                    continue
                assert answer is not None
                choice = answer.choices[index]
                if isinstance(event, ChatDelta):
                    if request.stream:
                        await respond.event(answer.chunk(index, event.text, event.logprobs))
                    else:
                        choice.text.append(event.text)
                        choice.entries += event.logprobs
                    if metrics is not None and record is not None and event.text:
                        metrics.text_sent(record)  # after the write: the first text's wait includes no metrics
                elif isinstance(event, ChatEnd):
                    choice.finish_reason = FINISH_REASONS.get(event.finish_reason, "stop")
                    choice.usage = event.usage
                    if metrics is not None and record is not None:
                        metrics.usage(record, event.usage)
                    if request.stream:
                        if event.function_calls:
                            await respond.event(answer.tool_calls_chunk(index, event.function_calls))
                        await respond.event(answer.chunk(index, "", event.logprobs, choice.finish_reason))
                    else:
                        choice.entries += event.logprobs
                        choice.tool_calls = event.function_calls
        assert answer is not None
        if request.stream:
            await respond.end((answer.usage_chunk() if request.include_usage else b"") + DONE)
        else:
            await respond.json(200, answer.whole(), (answer.cache_header(), *rate))

    async def _choices(self, request: ApiRequest, credential: Callable[[], Credential], flight: Flight,
                       ) -> AsyncGenerator[tuple[int, ChatEvent], None]:
        """Every choice's events, tagged with its index: one request path per choice, run in parallel."""
        choices = request.choices()
        if len(choices) == 1:
            async with closing(chat_events(self._chat, choices[0], credential, asyncio.Event(),
                                           stalled=lambda: flight.cut(stalled_client(self._chat)))) as events:
                async for event in events:
                    yield 0, event
            return
        # Bounded: while the client lags, each choice waits here and its own stream buffer (chat_events) merges
        # its deltas, as one choice's does.
        queue: asyncio.Queue[tuple[int, ChatEvent | BaseException | None]] = asyncio.Queue(maxsize=len(choices))

        async def run(index: int, params: ChatParams) -> None:
            try:  # its own cancel: a guardrail that blocks one choice stops that one
                async with closing(chat_events(self._chat, params, credential, asyncio.Event(),
                                               stalled=lambda: flight.cut(stalled_client(self._chat)))) as events:
                    async for event in events:
                        await queue.put((index, event))
                await queue.put((index, None))
            except Exception as exc:
                await queue.put((index, exc))

        tasks = [asyncio.create_task(run(i, params)) for i, params in enumerate(choices)]
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- models

    async def _list_models(self, credential: Credential) -> bytes:
        versions = await self._chat.list_models(credential)
        served = await self._chat.served_models()
        return dumps({"object": "list", "data": [model_json(v, served) for v in versions]})

    async def _retrieve_model(self, credential: Credential, reference: str) -> bytes:
        check_reference(reference, "model")  # its form first, with or without a key, as every request's
        principal = await self._chat.authenticate(credential)  # then the key: no probing for models without one
        missing = NotFound(f"model {reference[:200]!r} not found (or not allowed for this key)",
                           reason=Reason.MODEL_NOT_FOUND, metadata={"model": reference})
        try:
            version = await self._chat.models.resolve(reference)
        except InvalidArgument:
            raise missing from None
        if not allowed(principal, version):
            raise missing
        return dumps(model_json(version, await self._chat.served_models()))


def _mark_failed(span: trace.Span, exc: BaseException) -> None:
    code, message, _ = status_for(exc, span)
    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message[:1024]}"))


# ---- the server ---------------------------------------------------------------------------------------------

class HttpDoor:
    """uvicorn serving `app` on the gateway's host at `port` (0: a free one), TLS when the gateway has it, on the
    running event loop. `check` before start (at build time), `start` in warm-up, `drain` with the gRPC server's,
    `stop` last."""

    def __init__(self, app: OpenAIApp, config: ServiceConfig, port: int, flag: str, tls: PublicTls | None = None,
                 cors_origins: Sequence[str] = ()) -> None:
        self.app = app
        self._cors_origins = tuple(cors_origins)
        self._host = config.host
        self._requested = port
        self._flag = flag
        self._grace_s = config.grace_s
        self._tls = tls
        self._service = config.service
        self._other_ports = {"--port": config.port, "--health-port": config.health_port,
                             "--metrics-port": config.metrics_port}
        self.port = 0
        self._socket: socket.socket | None = None
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._tls_task: asyncio.Task[None] | None = None
        self._expiring: asyncio.TimerHandle | None = None
        self._drained_at: float | None = None
        self._tls_generation = 0

    def check(self) -> None:
        """Refuses a port another of the service's ports has, or one in use now (OSError, one line)."""
        from services.common.server import port_is_free

        port = self._requested
        if not port:
            return
        for flag, other in self._other_ports.items():
            if port == other:
                raise OSError(f"{self._flag} must be another port than {flag} ({port})")
        if not port_is_free(port, self._host.strip("[]") or "0.0.0.0"):
            raise OSError(f"could not listen on {host_port(self._host, port)} ({self._flag}): the port is in use; "
                          f"stop what listens there or pick another with {self._flag}")

    def meta(self) -> dict[str, str]:
        """Consul meta: where the HTTP API is (once it listens)."""
        return {"http_port": str(self.port)} if self.port else {}

    async def start(self) -> None:
        self._socket = self._bind()
        self.port = self._socket.getsockname()[1]
        try:
            import httptools  # noqa: F401 - uvicorn's faster parser, when installed
            http = "httptools"
        except ImportError:
            http = "h11"
        served: App = Cors(self.app, self._cors_origins) if self._cors_origins else self.app
        config = uvicorn.Config(served, lifespan="off", http=http, ws="none", log_config=None, access_log=False,
                                server_header=False, proxy_headers=False,
                                timeout_graceful_shutdown=math.ceil(self._grace_s) + 5)
        config.load()
        if self._tls is not None:
            config.ssl = self._ssl_context()
            self._tls_task = asyncio.create_task(self._follow_tls(config.ssl))
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start and stop lines: ours say it
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http-door")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"the HTTP API did not start on {host_port(self._host, self.port)}")
            await asyncio.sleep(0.01)
        log.info("lmesh-%s serves the OpenAI-compatible HTTP API on %s%s", self._service,
                 host_port(self._host, self.port), " (TLS)" if self._tls is not None else "")

    def _bind(self) -> socket.socket:
        host = self._host.strip("[]") or None
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, self._requested, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise OSError(f"could not listen on {host_port(self._host, self._requested)} ({self._flag}): "
                          f"{exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(f"could not listen on {host_port(self._host, self._requested)} ({self._flag}): "
                          f"{exc.strerror or exc}") from None
        return sock

    async def drain(self) -> None:
        """Stops accepting; a moment before the grace runs out, requests still in flight end UNAVAILABLE."""
        if self._server is None:
            return
        self._server.should_exit = True
        self.app.draining = True
        self._drained_at = time.monotonic()
        grace = self._grace_s
        error = Unavailable(f"lmesh-{self._service} shut down before this stream finished (its --grace of "
                            f"{grace:g} s was running out); retry", reason=Reason.DRAINING)
        self._expiring = asyncio.get_running_loop().call_later(grace - min(0.5, grace / 4), self.app.expire, error)

    async def stop(self) -> None:
        """Waits for the drain (at most the grace), then closes everything."""
        if self._server is not None and self._drained_at is None:
            await self.drain()
        if self._task is not None:
            left = self._grace_s + 1.0 - (time.monotonic() - (self._drained_at or time.monotonic()))
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=max(left, 0.5))
            except TimeoutError:
                self._server.force_exit = True
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            except Exception:
                log.exception("the HTTP server failed while stopping")
        if self._expiring is not None:
            self._expiring.cancel()
        if self._tls_task is not None:
            self._tls_task.cancel()
        if self._socket is not None:
            self._socket.close()

    # -- TLS

    def _ssl_context(self) -> ssl.SSLContext:
        assert self._tls is not None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        material = self._tls.material
        _load_chain(context, material.cert_pem, material.key_pem)
        self._tls_generation = material.generation
        return context

    async def _follow_tls(self, context: ssl.SSLContext) -> None:
        """New connections get the files PublicTls loaded last (checked once a second), as the gRPC port does."""
        assert self._tls is not None
        while True:
            await asyncio.sleep(TLS_CHECK_INTERVAL_S)
            material = self._tls.material
            if material.generation == self._tls_generation:
                continue
            try:
                _load_chain(context, material.cert_pem, material.key_pem)
            except (OSError, ssl.SSLError) as exc:
                log.warning("keeping the HTTP port's TLS certificate in use: %s", exc)
            self._tls_generation = material.generation


def _load_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Loads a certificate chain and key held in memory (ssl takes paths only: an anonymous memory file where the
    system has them, else a file in a private temporary directory, removed at once)."""
    with _private_files(cert_pem, key_pem) as (cert, key):
        context.load_cert_chain(cert, key)


@contextlib.contextmanager
def _private_files(*contents: bytes) -> Iterator[list[str]]:
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("lmesh-tls") for _ in contents]
        try:
            for fd, data in zip(fds, contents, strict=True):
                os.write(fd, data)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="lmesh-tls-") as folder:
        paths = []
        for index, data in enumerate(contents):
            path = Path(folder) / str(index)
            path.touch(mode=0o600)
            path.write_bytes(data)
            paths.append(str(path))
        yield paths


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the gateway's own (services.common.server) drain it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
