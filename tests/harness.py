"""A real mesh for integration tests: each service a separate `lmesh serve` process on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from opentelemetry.metrics import Meter
from opentelemetry.sdk.trace.export import SpanExporter

from services.common.discovery import SERVER_OPTIONS, Mesh
from services.common.supervisor import ProcessExited, Supervised, Supervisor

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class MeshProcesses:
    consul_addr: str
    home: Path
    otlp_endpoint: str

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.home / "logs", data_root=self.home, env=self.env(), cwd=ROOT, grace_s=15,
                                     own_sessions=False)

    @property
    def processes(self) -> dict[str, Supervised]:
        return self.supervisor.processes

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONSUL_HTTP_ADDR": self.consul_addr,
            "LMESH_HOME": str(self.home),
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            "PYTHONUNBUFFERED": "1",
            # The tests' meshes exercise the model path: an identical request must run the model again. The response
            # cache's tests turn it on for their own gateways (test_response_cache_mesh.py).
            "LMESH_RESPONSE_CACHE": "off",
        }

    def start(self, service: str, *extra: str, name: str = "") -> Supervised:
        """Starts `lmesh serve SERVICE`; `name` keys a second process of the same service."""
        # os.environ as it is at this start, not at construction (a test may have changed it since).
        return self.supervisor.start(service, "--grace", "5", *extra, name=name, env=self.env())

    def kill(self, name: str) -> None:
        self.supervisor.kill(name)

    def terminate(self, name: str) -> None:
        self.supervisor.terminate(name)

    async def wait_exit(self, name: str, timeout: float = 20.0) -> int:
        """Waits for a child to exit without blocking the event loop (the OTLP receiver runs on it)."""
        return await self.supervisor.wait_exit(name, timeout)

    async def stop_all(self) -> None:
        await asyncio.to_thread(self.supervisor.stop_all)

    def log(self, name: str) -> str:
        return self.supervisor.log(name)

    async def wait_passing(self, mesh: Mesh, service: str, timeout: float = 120.0,
                           exclude: frozenset[str] = frozenset(), name: str = "", model: str = "",
                           port: int = 0) -> None:
        """Waits for a passing instance (serving `model`, on `port`, when given) whose process is still alive (fails
        fast with its log otherwise)."""
        name = name or service
        waiter = mesh.resolver(f"lmesh-{service}").wait_for(
            lambda e: e.service_id not in exclude and (not model or model in e.models) and (not port or e.port == port),
            timeout=timeout)
        try:
            await self.supervisor.while_running(waiter, [name])
        except ProcessExited as exc:
            raise RuntimeError(f"{exc}:\n{self.log(name)[-4000:]}") from None


@contextlib.asynccontextmanager
async def intercepted(methods: dict[str, grpc.RpcMethodHandler], exporters: Sequence[SpanExporter] = (),
                      meter: Meter | None = None, service: str = "lmesh.test.v1.Test",
                      ) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a server whose `service` methods run behind the shared interceptor; `exporters` get its spans,
    `meter` its RPC metrics."""
    from services.common.rpc import ServerInterceptor
    from services.common.telemetry import setup_tracing

    provider = setup_tracing("lmesh-test", extra_exporters=exporters)
    server = grpc.aio.server(interceptors=[ServerInterceptor("test", provider.get_tracer("test"), meter=meter)],
                             options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)
