"""OpenTelemetry set-up from the standard OTEL_* variables, and W3C trace-context helpers.

Each service owns its TracerProvider (no global provider), so several services can live in one test
process without sharing exporters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()


def setup_tracing(service_name: str, extra_exporters: Sequence[SpanExporter] = ()) -> TracerProvider:
    """A provider named `service_name` (OTEL_SERVICE_NAME wins) exporting as OTEL_* variables say.

    OTLP over gRPC when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (unless
    OTEL_TRACES_EXPORTER excludes "otlp"); the console when OTEL_TRACES_EXPORTER contains "console".
    `extra_exporters` (tests) get every span synchronously.
    """
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    wanted = {e.strip() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    has_endpoint = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if "otlp" in wanted and has_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # The exporter reads endpoint, headers, insecure and timeout from the OTEL_* variables itself.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=500))
    if "console" in wanted:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    for exporter in extra_exporters:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def setup_metrics(service_name: str, extra_readers: Sequence[MetricReader] = ()) -> MeterProvider:
    """Metrics exported over OTLP/gRPC when an OTLP endpoint is configured (OTEL_METRICS_EXPORTER allowing)."""
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    readers: list[MetricReader] = list(extra_readers)
    wanted = {e.strip() for e in os.environ.get("OTEL_METRICS_EXPORTER", "otlp").split(",")}
    has_endpoint = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if "otlp" in wanted and has_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    return MeterProvider(metric_readers=readers, resource=Resource.create({"service.name": name}))


def extract_context(metadata: Mapping[str, str]) -> otel_context.Context:
    """The caller's trace context from incoming gRPC metadata (traceparent/tracestate)."""
    return PROPAGATOR.extract(carrier=dict(metadata))


def inject_metadata() -> list[tuple[str, str]]:
    """The current trace context as outgoing gRPC metadata."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return list(carrier.items())


def current_trace_id(span: trace.Span | None = None) -> str:
    """The trace id of `span` (default: the current span) as 32 hex digits, or "none"."""
    span_context = (span or trace.get_current_span()).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else "none"
