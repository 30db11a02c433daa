"""An in-test OTLP/gRPC trace receiver: the services (separate processes) export their spans to it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, object]
    status_code: str = "UNSET"  # UNSET, OK or ERROR
    status_message: str = ""
    events: tuple[str, ...] = ()
    instance: str = ""  # the resource's service.instance.id (OTEL_RESOURCE_ATTRIBUTES), when set


def _value(any_value: object) -> object:
    kind = any_value.WhichOneof("value")  # type: ignore[attr-defined]
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]  # type: ignore[attr-defined]
    return getattr(any_value, kind) if kind else None


class _MetricsReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """Keeps the latest value of every sum and gauge data point, by (service, metric name)."""

    def __init__(self, owner: OtlpReceiver) -> None:
        self._owner = owner

    async def Export(self, request: metrics_service_pb2.ExportMetricsServiceRequest,
                     context: grpc.aio.ServicerContext) -> metrics_service_pb2.ExportMetricsServiceResponse:
        for resource_metrics in request.resource_metrics:
            attrs = {a.key: _value(a.value) for a in resource_metrics.resource.attributes}
            service = str(attrs.get("service.name", ""))
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    if kind in ("sum", "gauge"):
                        points = getattr(metric, kind).data_points
                        total = sum(p.as_int or p.as_double for p in points)
                        self._owner.metrics[(service, metric.name)] = total
                    elif kind == "histogram":
                        count = sum(p.count for p in metric.histogram.data_points)
                        self._owner.metrics[(service, metric.name)] = count
        async with self._owner._arrived:
            self._owner._arrived.notify_all()
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.metrics: dict[tuple[str, str], float] = {}
        self._arrived = asyncio.Condition()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            attrs = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = str(attrs.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(ReceivedSpan(
                        service=service, name=span.name, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        status_code=trace_pb2.Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
                        status_message=span.status.message, events=tuple(e.name for e in span.events),
                        instance=str(attrs.get("service.instance.id", "")),
                    ))
        async with self._arrived:
            self._arrived.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> str:
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsReceiver(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    async def wait_for_metric(self, service: str, name: str, predicate: object, timeout: float = 15.0) -> float:
        """Waits until the metric's latest exported value satisfies `predicate`; returns it."""
        async def ready() -> float:
            async with self._arrived:
                while not predicate(self.metrics.get((service, name), 0)):  # type: ignore[operator]
                    await self._arrived.wait()
                return self.metrics[(service, name)]

        return await asyncio.wait_for(ready(), timeout)

    async def wait_for(self, predicate: object, timeout: float = 15.0) -> list[ReceivedSpan]:
        """Waits until `predicate(spans)` is true; returns the spans."""
        async def ready() -> list[ReceivedSpan]:
            async with self._arrived:
                while not predicate(self.spans):  # type: ignore[operator]
                    await self._arrived.wait()
                return list(self.spans)

        return await asyncio.wait_for(ready(), timeout)
