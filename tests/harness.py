"""A real mesh for integration tests: each service a separate `lmesh serve` process on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from opentelemetry.sdk.trace.export import SpanExporter

from services.common.discovery import SERVER_OPTIONS, Mesh

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServiceProcess:
    service: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class MeshProcesses:
    consul_addr: str
    home: Path
    otlp_endpoint: str
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

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
        }

    def start(self, service: str, *extra: str, name: str = "") -> ServiceProcess:
        """Starts `lmesh serve SERVICE`; `name` keys a second process of the same service."""
        name = name or service
        log_path = self.home / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")  # owned by the child for its whole life
        args = [sys.executable, "-m", "services.cli", "serve", service, "--data-dir", str(self.home / name),
                "--grace", "5", *extra]
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env(), cwd=ROOT)
        self.processes[name] = ServiceProcess(service, process, log_path)
        return self.processes[name]

    def kill(self, service: str) -> None:
        proc = self.processes[service].process
        proc.kill()
        proc.wait(10)

    def terminate(self, service: str) -> None:
        self.processes[service].process.send_signal(signal.SIGTERM)

    async def wait_exit(self, service: str, timeout: float = 20.0) -> int:
        """Waits for a child to exit without blocking the event loop (the OTLP receiver runs on it)."""
        return await asyncio.to_thread(self.processes[service].process.wait, timeout)

    async def stop_all(self) -> None:
        for entry in self.processes.values():
            if entry.process.poll() is None:
                entry.process.send_signal(signal.SIGTERM)
        for service, entry in self.processes.items():
            try:
                await self.wait_exit(service, 15)
            except subprocess.TimeoutExpired:
                entry.process.kill()
                entry.process.wait()

    def log(self, service: str) -> str:
        return self.processes[service].log_path.read_text(errors="replace")

    async def wait_passing(self, mesh: Mesh, service: str, timeout: float = 120.0,
                           exclude: frozenset[str] = frozenset(), name: str = "", model: str = "") -> None:
        """Waits for a passing instance whose process is still alive (fails fast with its log otherwise)."""
        entry = self.processes[name or service]
        waiter = asyncio.ensure_future(mesh.resolver(f"lmesh-{service}").wait_for(
            lambda e: e.service_id not in exclude and (not model or model in e.models),
            timeout=timeout))
        while not waiter.done():
            if entry.process.poll() is not None:
                waiter.cancel()
                raise RuntimeError(f"lmesh-{service} exited with {entry.process.returncode}:\n"
                                   f"{self.log(name or service)[-4000:]}")
            await asyncio.wait({waiter}, timeout=0.5)
        waiter.result()


@contextlib.asynccontextmanager
async def intercepted(methods: dict[str, grpc.RpcMethodHandler], exporters: Sequence[SpanExporter] = (),
                      ) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a server whose `lmesh.test.v1.Test` methods run behind the shared interceptor; `exporters`
    get its spans."""
    from services.common.rpc import ServerInterceptor
    from services.common.telemetry import setup_tracing

    provider = setup_tracing("lmesh-test", extra_exporters=exporters)
    server = grpc.aio.server(interceptors=[ServerInterceptor("test", provider.get_tracer("test"))],
                             options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("lmesh.test.v1.Test", methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)
