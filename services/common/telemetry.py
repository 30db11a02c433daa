"""OpenTelemetry set-up from the standard OTEL_* variables, the Prometheus `/metrics` endpoint, and W3C
trace-context helpers.

Each service owns its TracerProvider and MeterProvider (no global provider), and its Prometheus registry (not
prometheus_client's process-wide default), so several services can live in one test process without sharing
exporters or each other's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

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

from services.common.config import ConfigError, host_port

if TYPE_CHECKING:  # imported where used: a command-line call that serves no metrics does not pay for them
    from aiohttp import web
    from prometheus_client import CollectorRegistry

PROPAGATOR = TraceContextTextMapPropagator()
log = logging.getLogger("lmesh.telemetry")

EXPORTERS = ("otlp", "console", "none")
# Metrics have one more: the service's own Prometheus endpoint (`/metrics` on --metrics-port).
METRICS_EXPORTERS = (*EXPORTERS[:2], "prometheus", "none")
# OTEL_METRICS_EXPORTER unset: OTLP (when an endpoint is set) and the Prometheus endpoint. The SDK's default is
# otlp alone; lmesh serves /metrics unless the variable leaves prometheus out.
DEFAULT_METRICS_EXPORTERS = "otlp,prometheus"
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
# Bucket boundaries (s, tokens) that OpenTelemetry's GenAI conventions advise for their histograms; time per output
# token adds four below their first (10 ms): a small model's decode step on a GPU takes a few milliseconds, which
# would all fall into one bucket.
GENAI_TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                                     7.5, 10.0)
GENAI_TIME_PER_OUTPUT_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                                       0.4, 0.5, 0.75, 1.0, 2.5)
GENAI_REQUEST_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96,
                                  81.92)
GENAI_TOKEN_USAGE_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
                             67108864)
# gen_ai.provider.name of lmesh's own measurements: it serves its own models.
GENAI_PROVIDER = "lmesh"
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
    supported = METRICS_EXPORTERS if signal == "metrics" else EXPORTERS
    default = DEFAULT_METRICS_EXPORTERS if signal == "metrics" else "otlp"
    wanted = {name.strip().lower() for name in (os.environ.get(variable, "").strip() or default).split(",")
              if name.strip()}
    unknown = sorted(wanted - set(supported))
    if unknown:
        raise ConfigError(f"{variable}={os.environ[variable]!r}: lmesh exports {signal} with "
                          f"{', '.join(supported)} (not {', '.join(unknown)})")
    return set() if "none" in wanted else wanted


def prometheus_wanted() -> bool:
    """Whether OTEL_METRICS_EXPORTER asks for the Prometheus endpoint: unset (lmesh's default, with OTLP) or
    naming `prometheus` (ConfigError for a value lmesh does not support)."""
    return "prometheus" in _exporters("metrics")


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


def setup_metrics(service_name: str, extra_readers: Sequence[MetricReader] = (),
                  prometheus: CollectorRegistry | None = None) -> MeterProvider:
    """One set of instruments, read by every exporter OTEL_METRICS_EXPORTER names: OTLP (gRPC or HTTP, as for
    traces) when an endpoint is set, or the console, every OTEL_METRIC_EXPORT_INTERVAL; and, when `prometheus` is
    given (the service's own registry, which its MetricsEndpoint serves), a reader collected at each scrape.
    `extra_readers` (tests) read the same instruments."""
    wanted = _exporters("metrics")
    otlp = _otlp_exporter("metrics", wanted, service_name)
    readers: list[MetricReader] = list(extra_readers)
    if otlp is not None:
        readers.append(PeriodicExportingMetricReader(otlp))
    if "console" in wanted:
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    if prometheus is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader(registry=prometheus))
    return MeterProvider(metric_readers=readers, resource=resource(service_name), shutdown_on_exit=False)


class MetricsEndpoint:
    """A service's Prometheus endpoint: `GET /metrics` over plain HTTP on its own port, serving the service's own
    registry (`registry`, which setup_metrics' Prometheus reader fills).

    Served by aiohttp on the service's event loop; a scrape collects in a worker thread (the SDK's collection and
    the text encoding are synchronous), one scrape at a time, so the loop never waits on it.
    """

    def __init__(self, service_name: str) -> None:
        self.service_name = service_name
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._scraping = asyncio.Lock()

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port (0: a free one) and returns the bound port; OSError when it cannot listen."""
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        # No access log (a line per scrape), no signal handlers (the service owns SIGTERM), and a short wait for a
        # scrape in flight when it stops.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host.strip("[]") or None, port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("%s serves Prometheus metrics on http://%s/metrics", self.service_name, host_port(host, self.port))
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        from aiohttp import web
        from prometheus_client.exposition import choose_encoder

        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        async with self._scraping:  # the SDK reader's hand-over to its collector is not made for two at once
            body = await asyncio.to_thread(encode, self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _index(self, _: web.Request) -> web.Response:
        from aiohttp import web

        return web.Response(text=f"{self.service_name}: Prometheus metrics at /metrics\n")


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
