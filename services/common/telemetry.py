"""OpenTelemetry set-up from the standard OTEL_* variables, and W3C trace-context helpers.

Each service owns its TracerProvider (no global provider), so several services can live in one test
process without sharing exporters.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.config import ConfigError

PROPAGATOR = TraceContextTextMapPropagator()
log = logging.getLogger("lmesh.telemetry")

EXPORTERS = ("otlp", "console", "none")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
# The longest attribute value a span, event or link keeps unless OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT (or the span-only
# OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT) says otherwise: a value a caller sent (megabytes, in the worst case)
# must not make a batch too large for the collector, which would drop the whole batch.
MAX_ATTRIBUTE_CHARS = 1024
# Exporting what is left at shutdown waits at most this long: a collector that is down or hung must not turn a
# drain into a kill (each OTLP export would otherwise wait out its 10 s timeout).
FLUSH_ON_STOP_S = 2.0


def _exporters(signal: str) -> set[str]:
    """OTEL_<SIGNAL>_EXPORTER as a set of names, each one lmesh supports (ConfigError otherwise)."""
    variable = f"OTEL_{signal.upper()}_EXPORTER"
    wanted = {name.strip().lower() for name in os.environ.get(variable, "otlp").split(",") if name.strip()}
    unknown = sorted(wanted - set(EXPORTERS))
    if unknown:
        raise ConfigError(f"{variable}={os.environ[variable]!r}: lmesh exports {signal} with "
                          f"{', '.join(EXPORTERS)} (not {', '.join(unknown)})")
    return set() if "none" in wanted else wanted


def _otlp_endpoint(signal: str) -> str:
    return (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "")


def _otlp_protocol(signal: str) -> str:
    """The OTLP transport for `signal`: the per-signal variable, else OTEL_EXPORTER_OTLP_PROTOCOL, else grpc."""
    for variable in (f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = os.environ.get(variable, "").strip().lower()
        if value:
            if value not in OTLP_PROTOCOLS:
                raise ConfigError(f"{variable}={os.environ[variable]!r}: lmesh speaks OTLP as "
                                  f"{' or '.join(OTLP_PROTOCOLS)}")
            return value
    return "grpc"


def resource(service_name: str) -> Resource:
    """service.name is always the service's own (`lmesh-gateway`, ...), which is also its Consul name.

    OTEL_SERVICE_NAME would give all five services one name when it is set for the whole mesh (one environment
    file serves every systemd unit and Kubernetes container), so lmesh reads it as the mesh's name: it becomes
    service.namespace, unless OTEL_RESOURCE_ATTRIBUTES sets that. OTEL_RESOURCE_ATTRIBUTES applies as usual.
    """
    own = Resource.create({"service.name": service_name})
    mesh_name = os.environ.get("OTEL_SERVICE_NAME", "").strip()
    if mesh_name and "service.namespace" not in own.attributes:
        return own.merge(Resource({"service.namespace": mesh_name}))
    return own


# Per signal: the OTLP exporter's module (under opentelemetry.exporter.otlp.proto.<grpc|http>) and class.
_OTLP_EXPORTERS = {"traces": ("trace_exporter", "OTLPSpanExporter"),
                   "metrics": ("metric_exporter", "OTLPMetricExporter")}


def _otlp_exporter(signal: str, wanted: set[str], service_name: str) -> Any:
    """The OTLP exporter for `signal` ("traces" or "metrics") over the configured protocol, or None when
    OTEL_<SIGNAL>_EXPORTER leaves out otlp or no endpoint is set. The exporter itself reads endpoint, headers,
    certificates and timeout from the OTEL_* variables."""
    protocol = _otlp_protocol(signal)  # checked even when unused: a typo should not wait for the endpoint
    endpoint = _otlp_endpoint(signal)
    if "otlp" not in wanted or not endpoint:
        return None
    module_name, class_name = _OTLP_EXPORTERS[signal]
    transport = "grpc" if protocol == "grpc" else "http"
    module = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{transport}.{module_name}")
    log.info("%s exports %s over OTLP/%s to %s", service_name, signal, protocol, endpoint)
    return getattr(module, class_name)()


def span_limits() -> SpanLimits:
    """The SDK's limits, from the OTEL_* variables, with attribute values cut to MAX_ATTRIBUTE_CHARS unless a
    variable sets a length."""
    if any(os.environ.get(v, "").strip() for v in ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
                                                    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT")):
        return SpanLimits()
    return SpanLimits(max_attribute_length=MAX_ATTRIBUTE_CHARS)


def setup_tracing(service_name: str, extra_exporters: Sequence[SpanExporter] = ()) -> TracerProvider:
    """A provider for `service_name` exporting as the OTEL_* variables say (ConfigError on a value lmesh does not
    support, rather than silently exporting nothing).

    OTLP (gRPC, or HTTP with OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf) when OTEL_EXPORTER_OTLP_ENDPOINT or
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set and OTEL_TRACES_EXPORTER includes "otlp" (the default); the console
    when it includes "console". The sampler follows OTEL_TRACES_SAMPLER. `extra_exporters` (tests) get every span
    synchronously.
    """
    wanted = _exporters("traces")
    otlp = _otlp_exporter("traces", wanted, service_name)
    provider = TracerProvider(resource=resource(service_name), span_limits=span_limits(), shutdown_on_exit=False)
    if otlp is not None:
        provider.add_span_processor(BatchSpanProcessor(otlp, schedule_delay_millis=500))
    if "console" in wanted:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    for extra in extra_exporters:
        provider.add_span_processor(SimpleSpanProcessor(extra))
    return provider


def setup_metrics(service_name: str, extra_readers: Sequence[MetricReader] = ()) -> MeterProvider:
    """Metrics exported as OTEL_METRICS_EXPORTER says: OTLP (gRPC or HTTP, as for traces) when an endpoint is set,
    or the console; every OTEL_METRIC_EXPORT_INTERVAL."""
    wanted = _exporters("metrics")
    otlp = _otlp_exporter("metrics", wanted, service_name)
    readers: list[MetricReader] = list(extra_readers)
    if otlp is not None:
        readers.append(PeriodicExportingMetricReader(otlp))
    if "console" in wanted:
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    return MeterProvider(metric_readers=readers, resource=resource(service_name), shutdown_on_exit=False)


async def shutdown_telemetry(tracer_provider: TracerProvider, meter_provider: MeterProvider,
                             timeout_s: float = FLUSH_ON_STOP_S) -> None:
    """Flushes and shuts both providers down, waiting at most `timeout_s`.

    The SDK's shutdown blocks until its exporters give up (10 s per signal against a hung collector), so it runs
    in a daemon thread that the process does not wait for: what a dead collector never took is dropped.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def shut_down() -> None:
        try:
            tracer_provider.shutdown()
            meter_provider.shutdown()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                loop.call_soon_threadsafe(finished)

    threading.Thread(target=shut_down, name="lmesh-telemetry-shutdown", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.shield(done), timeout_s)
    except TimeoutError:
        log.warning("telemetry exporters did not finish within %.0f s (collector down?); unsent spans and "
                    "metrics are dropped", timeout_s)


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
