"""Telemetry set-up from the OTEL_* variables, and what the shared interceptor records on a call's span."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from services.common.config import ConfigError
from services.common.telemetry import resource, setup_metrics, setup_tracing, shutdown_telemetry
from tests.harness import intercepted

OTEL_VARIABLES = ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER",
                  "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                  "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
                  "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
                  "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT")


@pytest.fixture(autouse=True)
def clean_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# ---- configuration ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("variable", "value", "named"), [
    ("OTEL_TRACES_EXPORTER", "zipkin", "zipkin"),
    ("OTEL_TRACES_EXPORTER", "otlp,jaegr", "jaegr"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "grpc or http/protobuf"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift", "grpc or http/protobuf"),
])
def test_a_tracing_setting_lmesh_cannot_honour_fails_naming_it(monkeypatch: pytest.MonkeyPatch, variable: str,
                                                              value: str, named: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable) as caught:
        setup_tracing("lmesh-test")
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("variable", "value"), [("OTEL_METRICS_EXPORTER", "statsd"),
                                                 ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/json")])
def test_a_metrics_setting_lmesh_cannot_honour_fails_naming_it(monkeypatch: pytest.MonkeyPatch, variable: str,
                                                              value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        setup_metrics("lmesh-test")


def test_exporter_names_are_read_like_the_sdk_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", " Console ")
    console = setup_tracing("lmesh-test")
    processors = console._active_span_processor._span_processors
    assert [type(p.span_exporter).__name__ for p in processors] == ["ConsoleSpanExporter"]  # type: ignore[attr-defined]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert setup_tracing("lmesh-test")._active_span_processor._span_processors == ()


def test_each_service_keeps_its_name_and_a_mesh_wide_service_name_becomes_the_namespace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "lmesh-prod")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod")
    gateway, policy = resource("lmesh-gateway").attributes, resource("lmesh-policy").attributes
    assert (gateway["service.name"], policy["service.name"]) == ("lmesh-gateway", "lmesh-policy")
    assert gateway["service.namespace"] == policy["service.namespace"] == "lmesh-prod"
    assert gateway["deployment.environment"] == "prod"
    # A namespace given explicitly wins.
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.namespace=payments")
    assert resource("lmesh-gateway").attributes["service.namespace"] == "payments"


async def test_traces_reach_a_collector_over_otlp_http(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        received.append(trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        provider = setup_tracing("lmesh-test")
        provider.get_tracer("test").start_span("over-http").end()
        # The exporter posts from its own thread (blocking I/O); this loop keeps serving meanwhile.
        assert await asyncio.to_thread(provider.force_flush, 10_000)
        await shutdown_telemetry(provider, setup_metrics("lmesh-test"))
    finally:
        await runner.cleanup()
    spans = [(r.resource, s.name) for request in received for r in request.resource_spans
             for scope in r.scope_spans for s in scope.spans]
    assert [name for _, name in spans] == ["over-http"]
    assert {a.key: a.value.string_value for a in spans[0][0].attributes}["service.name"] == "lmesh-test"


@pytest.fixture
def hung_collector() -> Iterator[int]:
    """A port that accepts connections and never answers, like a collector that hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


async def test_a_hung_collector_cannot_hold_a_stopping_service(monkeypatch: pytest.MonkeyPatch, hung_collector: int,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{hung_collector}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "10000")  # each export would wait 10 s
    tracer_provider, meter_provider = setup_tracing("lmesh-test"), setup_metrics("lmesh-test")
    tracer_provider.get_tracer("test").start_span("unsent").end()
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lmesh.telemetry"):
        await shutdown_telemetry(tracer_provider, meter_provider, timeout_s=1.0)
    assert time.monotonic() - began < 3.0
    assert "did not finish within 1 s" in caplog.text


# ---- what the interceptor records ---------------------------------------------------------------------------------

def _slow_methods() -> dict[str, grpc.RpcMethodHandler]:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(30)
        return b""

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.sleep(30)
        yield b"never"

    async def quick(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"ok"

    return {"Slow": grpc.unary_unary_rpc_method_handler(unary),
            "SlowStream": grpc.unary_stream_rpc_method_handler(stream),
            "Quick": grpc.unary_unary_rpc_method_handler(quick)}


class NotifyingExporter(InMemorySpanExporter):
    """Keeps spans like InMemorySpanExporter and wakes a waiter at each (export runs as a span ends, in the loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.exported = asyncio.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        self.exported.set()
        return result


async def _finished(exporter: NotifyingExporter, count: int) -> list[ReadableSpan]:
    async with asyncio.timeout(10):
        while len(exporter.get_finished_spans()) < count:
            exporter.exported.clear()
            await exporter.exported.wait()
    return list(exporter.get_finished_spans())


@pytest.mark.parametrize("method", ["Slow", "SlowStream"])
async def test_a_call_whose_deadline_passed_is_an_error_on_its_span(method: str) -> None:
    exporter = NotifyingExporter()
    async with intercepted(_slow_methods(), [exporter]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if method == "Slow":
                await channel.unary_unary(f"/lmesh.test.v1.Test/{method}")(b"x", timeout=0.3)
            else:
                _ = [m async for m in channel.unary_stream(f"/lmesh.test.v1.Test/{method}")(b"x", timeout=0.3)]
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        [span] = await _finished(exporter, 1)
    assert span.name == f"lmesh.test/{method}"
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "DEADLINE_EXCEEDED: the call's deadline passed"
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 4


@pytest.mark.parametrize("method", ["Slow", "SlowStream"])
async def test_a_call_the_client_cancelled_is_recorded_as_cancelled_not_failed(method: str) -> None:
    exporter = NotifyingExporter()
    async with intercepted(_slow_methods(), [exporter]) as channel:
        if method == "Slow":
            call = channel.unary_unary(f"/lmesh.test.v1.Test/{method}")(b"x", timeout=30)
            await asyncio.sleep(0.3)
        else:
            call = channel.unary_stream(f"/lmesh.test.v1.Test/{method}")(b"x", timeout=30)
            assert await call.read() == b"first"
        call.cancel()
        [span] = await _finished(exporter, 1)
        ok = await channel.unary_unary("/lmesh.test.v1.Test/Quick")(b"x")
        assert ok == b"ok"
        spans = await _finished(exporter, 2)
    assert span.status.status_code == StatusCode.UNSET
    assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 1
    assert [e.name for e in span.events] == ["cancelled by the client"]
    quick = spans[1]
    assert quick.attributes is not None and quick.attributes["rpc.grpc.status_code"] == 0


@pytest.mark.parametrize(("variable", "limit"), [(None, 1024), ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", 100),
                                                 ("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", 50)])
def test_span_attribute_values_are_bounded_unless_a_variable_sets_the_bound(
        monkeypatch: pytest.MonkeyPatch, variable: str | None, limit: int) -> None:
    """A 200,000-character value a caller sent must not travel whole in every span batch."""
    if variable is not None:
        monkeypatch.setenv(variable, str(limit))
    exporter = InMemorySpanExporter()
    provider = setup_tracing("lmesh-test", extra_exporters=[exporter])
    with provider.get_tracer("test").start_as_current_span("work") as span:
        span.set_attribute("gen_ai.request.model", "m" * 200_000)
        span.add_event("seen", {"what": "e" * 200_000})
    finished = exporter.get_finished_spans()[0]
    assert finished.attributes is not None and len(str(finished.attributes["gen_ai.request.model"])) == limit
    if variable != "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT":  # that one leaves events to the general limit
        assert finished.events[0].attributes is not None
        assert len(str(finished.events[0].attributes["what"])) == limit
