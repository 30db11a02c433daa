"""The lmesh side of the benchmark: a real Consul agent, lmesh-registry and lmesh-inference as child processes,
and Generate streams timed from the client's side.

The inference process is started on a port chosen here, so a restarted replica is told apart from the one
before it in Consul. Streams go to that replica through the mesh's client runtime, leased by its port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from lmesh.common.v1 import generation_pb2
from lmesh.inference.v1 import inference_pb2

from bench.stats import StreamResult, peak_rss_mb, spread_gaps
from services.common.consul_agent import ConsulAgent, free_port
from services.common.discovery import Mesh
from services.common.peers import INFERENCE, REGISTRY, PeerService
from services.common.supervisor import ProcessExited, Supervised, Supervisor

GRACE_S = 2.0


def service_env(**extra: str) -> dict[str, str]:
    """The environment of a bench's services: this process's, without OTLP export settings (a bench measures the
    mesh, not a collector), and with the gateway's response cache off: benches repeat the same greedy requests,
    which the cache would answer without running the model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, "LMESH_RESPONSE_CACHE": "off", **extra}
START_TIMEOUT_S = 300.0
STREAM_TIMEOUT_S = 900.0


@dataclass
class Child:
    process: Supervised
    port: int

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def pid(self) -> int:
        return self.process.pid

    def peak_rss_mb(self) -> float | None:
        return peak_rss_mb(self.pid)


def _tail(path: Path | None, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path else ""
    except OSError:
        return ""


class BenchMesh:
    """Consul + registry (model registered) + one inference replica at a time."""

    def __init__(self, model_dir: Path, work_dir: Path, logs: Path) -> None:
        self.model_dir = model_dir
        self.work_dir = work_dir
        self.logs = logs
        self.agent: ConsulAgent | None = None
        self.supervisor: Supervisor | None = None
        self.mesh: Mesh | None = None
        self.registry: Child | None = None
        self.inference: Child | None = None
        self.model_id = ""

    async def start(self) -> None:
        from services.registry.client import register_model_dir

        self.agent = await asyncio.to_thread(ConsulAgent.start, None, self.logs / "consul.log")
        # Telemetry export is off in the children: the benchmark measures serving, not an OTLP collector.
        env = service_env()
        env.update(CONSUL_HTTP_ADDR=self.agent.http_addr, LMESH_HOME=str(self.work_dir / "home"))
        # A service's drain grace plus a margin before SIGKILL.
        self.supervisor = Supervisor(self.logs, data_root=self.work_dir, env=env, grace_s=GRACE_S + 10)
        self.supervisor.watch_consul_agent(self.agent)
        self.mesh = Mesh(self.agent.http_addr)
        self.registry = self._start_child("registry", "registry")
        await self._wait_passing(self.registry, REGISTRY)
        version = await register_model_dir(self.mesh.peer(REGISTRY), self.model_dir, aliases=("default",))
        self.model_id = f"{version.name}:{version.version}"

    async def start_inference(self, label: str) -> Child:
        """A fresh inference replica (new process, so its peak memory is this run's), passing in Consul."""
        await self.stop_inference()
        child = self._start_child("inference", f"inference-{label}")
        self.inference = child
        await self._wait_passing(child, INFERENCE)
        return child

    @contextlib.asynccontextmanager
    async def _generate_call(self) -> AsyncIterator[grpc.aio.StreamStreamCall]:
        """A Generate call to the current replica (by its port: not a replica it replaced)."""
        assert self.mesh is not None and self.inference is not None
        port = self.inference.port
        async with self.mesh.peer(INFERENCE).lease(lambda e: e.port == port) as lease:
            yield lease.stub.Generate(**lease.options(timeout=STREAM_TIMEOUT_S))

    async def stop_inference(self) -> None:
        if self.inference is not None:
            assert self.supervisor is not None
            await asyncio.to_thread(self.supervisor.stop, self.inference.name)
            self.inference = None

    async def close(self) -> None:
        await self.stop_inference()
        if self.mesh is not None:
            await self.mesh.close()
        if self.supervisor is not None:
            await asyncio.to_thread(self.supervisor.stop_all)
        if self.agent is not None:
            await asyncio.to_thread(self.agent.stop)  # already stopped by the supervisor; removes its scratch dir

    def _start_child(self, service: str, name: str) -> Child:
        """`lmesh serve SERVICE` on a port chosen here; replicas share SERVICE's data dir (and artifact cache)."""
        assert self.supervisor is not None
        port = free_port()
        process = self.supervisor.start(service, "--port", str(port), "--grace", str(GRACE_S), name=name,
                                        data_dir=self.work_dir / service)
        return Child(process, port)

    async def _wait_passing(self, child: Child, service: PeerService[Any]) -> Any:
        """Waits until `child` is passing in Consul; fails at once (with its log) if it exits first."""
        assert self.mesh is not None and self.supervisor is not None
        ready = self.mesh.peer(service).wait_for(lambda e: e.port == child.port, timeout=START_TIMEOUT_S)
        try:
            return await self.supervisor.while_running(ready, [child.name])
        except ProcessExited as exc:
            raise RuntimeError(f"{exc}:\n{_tail(child.process.log_path)}") from None

    # ---- streams --------------------------------------------------------------------------------------------

    def _start_message(self, prompt: list[int], max_tokens: int,
                       sampling: inference_pb2.SamplingParams | None = None) -> inference_pb2.GenerateRequest:
        return inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
            model=self.model_id, prompt_token_ids=prompt, max_tokens=max_tokens,
            sampling=sampling or inference_pb2.SamplingParams(temperature=0.0), request_id="bench"))

    async def generate(self, prompt_index: int, prompt: list[int], max_tokens: int,
                       sampling: inference_pb2.SamplingParams | None = None) -> StreamResult:
        """One Generate stream (greedy unless `sampling`), timed per message arrival."""
        tokens: list[int] = []
        arrivals: list[tuple[float, int]] = []
        finish: inference_pb2.GenerateFinish | None = None
        async with self._generate_call() as call:
            start = time.perf_counter()
            await call.write(self._start_message(prompt, max_tokens, sampling))
            await call.done_writing()  # half-close: not a cancel
            while (message := await call.read()) is not grpc.aio.EOF:
                now = time.perf_counter()
                if message.WhichOneof("kind") == "tokens":
                    chunk = [t.token_id for t in message.tokens.tokens]
                    tokens.extend(chunk)
                    arrivals.append((now, len(chunk)))
                else:
                    finish = message.finish
        if finish is None:
            raise RuntimeError("the Generate stream ended without a finish message")
        ttft, gaps = spread_gaps(arrivals, start)
        return StreamResult(prompt_index, tokens, ttft, gaps, cached_prompt_tokens=finish.usage.cached_prompt_tokens,
                            prompt_tokens=finish.usage.prompt_tokens)

    async def generate_many(self, prompts: list[tuple[int, list[int]]], max_tokens: int,
                            sampling: inference_pb2.SamplingParams | None = None,
                            ) -> tuple[list[StreamResult], float]:
        """All streams at once; (results, wall time from the first start to the last finish)."""
        start = time.perf_counter()
        results = await asyncio.gather(*(self.generate(i, p, max_tokens, sampling) for i, p in prompts))
        return list(results), time.perf_counter() - start

    async def cancel_after(self, prompt: list[int], after: int, max_tokens: int = 512) -> dict[str, Any]:
        """Starts a stream, sends `cancel` once `after` tokens arrived, and reads the finish's usage."""
        received = 0
        at_cancel: int | None = None
        after_cancel = 0
        finish: inference_pb2.GenerateFinish | None = None
        async with self._generate_call() as call:
            await call.write(self._start_message(prompt, max_tokens))
            while (message := await call.read()) is not grpc.aio.EOF:
                if message.WhichOneof("kind") != "tokens":
                    finish = message.finish
                    continue
                count = len(message.tokens.tokens)
                if at_cancel is not None:
                    after_cancel += count
                    continue
                received += count
                if received >= after:
                    at_cancel = received
                    await call.write(inference_pb2.GenerateRequest(cancel=inference_pb2.CancelGeneration()))
                    await call.done_writing()
        if finish is None or at_cancel is None:
            raise RuntimeError("the cancel test's stream ended before the cancel or without a finish")
        return {
            "received_at_cancel": at_cancel,
            "received_after_cancel": after_cancel,
            "completion_tokens": finish.usage.completion_tokens,
            "reason": generation_pb2.FinishReason.Name(finish.reason),
            "tokens_after_cancel": finish.usage.completion_tokens - at_cancel,
        }
