"""The lmesh side of the benchmark: a real Consul agent, lmesh-registry and lmesh-inference as child processes,
and Generate streams timed from the client's side.

The inference process is started on a port chosen here, so a restarted replica is told apart from the one
before it in Consul. Streams go over the benchmark's own channel to that replica (found through Consul), not
the resolver's, which may be closed under it when the replica's Consul entry changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from lmesh.common.v1 import generation_pb2
from lmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from bench.stats import StreamResult, peak_rss_mb, spread_gaps
from services.common.consul_agent import ConsulAgent, free_port
from services.common.discovery import CHANNEL_OPTIONS, Mesh
from services.common.rpc import call_options

GRACE_S = 2.0
START_TIMEOUT_S = 300.0
STREAM_TIMEOUT_S = 900.0


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def peak_rss_mb(self) -> float | None:
        return peak_rss_mb(self.pid)


async def stop_child(child: Child, grace_s: float = GRACE_S) -> None:
    """SIGTERM, the service's drain grace plus a margin, then SIGKILL."""
    if child.process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(child.process.wait(), grace_s + 10)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.process.kill()
        await child.process.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class BenchMesh:
    """Consul + registry (model registered) + one inference replica at a time."""

    def __init__(self, model_dir: Path, work_dir: Path, logs: Path) -> None:
        self.model_dir = model_dir
        self.work_dir = work_dir
        self.logs = logs
        self.agent: ConsulAgent | None = None
        self.mesh: Mesh | None = None
        self.registry: Child | None = None
        self.inference: Child | None = None
        self.model_id = ""
        self._channel: grpc.aio.Channel | None = None
        self.stub: inference_pb2_grpc.InferenceStub | None = None
        self._env: dict[str, str] = {}

    async def start(self) -> None:
        from services.registry.client import register_model_dir

        self.agent = await asyncio.to_thread(ConsulAgent.start, None, self.logs / "consul.log")
        # Telemetry export is off in the children: the benchmark measures serving, not an OTLP collector.
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        self._env.update(CONSUL_HTTP_ADDR=self.agent.http_addr, LMESH_HOME=str(self.work_dir / "home"))
        self.mesh = Mesh(self.agent.http_addr)
        self.registry = await self._start_child("registry", "registry", [])
        await self._wait_passing(self.registry, "lmesh-registry")
        version = await register_model_dir(self.mesh.resolver("lmesh-registry"), self.model_dir, aliases=("default",))
        self.model_id = f"{version.name}:{version.version}"

    async def start_inference(self, label: str) -> Child:
        """A fresh inference replica (new process, so its peak memory is this run's), passing in Consul."""
        await self.stop_inference()
        child = await self._start_child("inference", f"inference-{label}", [])
        self.inference = child
        endpoint = await self._wait_passing(child, "lmesh-inference")
        self._channel = grpc.aio.insecure_channel(endpoint.target, options=CHANNEL_OPTIONS)
        self.stub = inference_pb2_grpc.InferenceStub(self._channel)
        return child

    async def stop_inference(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self.stub = None
        if self.inference is not None:
            await stop_child(self.inference)
            self.inference = None

    async def close(self) -> None:
        await self.stop_inference()
        if self.registry is not None:
            await stop_child(self.registry)
        if self.mesh is not None:
            await self.mesh.close()
        if self.agent is not None:
            await asyncio.to_thread(self.agent.stop)

    async def _start_child(self, service: str, label: str, extra: list[str]) -> Child:
        port = free_port()
        log_path = self.logs / f"{label}.log"
        args = [sys.executable, "-m", "services.cli", "serve", service, "--port", str(port),
                "--data-dir", str(self.work_dir / service), "--grace", str(GRACE_S), *extra]
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(*args, stdout=log, stderr=asyncio.subprocess.STDOUT,
                                                           env=self._env, start_new_session=True)
        return Child(service, process, log_path, port)

    async def _wait_passing(self, child: Child, name: str) -> Any:
        """Waits until `child` is passing in Consul; fails at once (with its log) if it exits first."""
        assert self.mesh is not None
        ready = asyncio.ensure_future(
            self.mesh.resolver(name).wait_for(lambda e: e.port == child.port, timeout=START_TIMEOUT_S))
        died = asyncio.ensure_future(child.process.wait())
        try:
            await asyncio.wait({ready, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if not ready.done():
            ready.cancel()
            raise RuntimeError(f"{name} exited with {child.process.returncode}; {child.log_path}:\n"
                               f"{_tail(child.log_path)}")
        return ready.result()

    # ---- streams --------------------------------------------------------------------------------------------

    def _start_message(self, prompt: list[int], max_tokens: int,
                       sampling: inference_pb2.SamplingParams | None = None) -> inference_pb2.GenerateRequest:
        return inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
            model=self.model_id, prompt_token_ids=prompt, max_tokens=max_tokens,
            sampling=sampling or inference_pb2.SamplingParams(temperature=0.0), request_id="bench"))

    async def generate(self, prompt_index: int, prompt: list[int], max_tokens: int,
                       sampling: inference_pb2.SamplingParams | None = None) -> StreamResult:
        """One Generate stream (greedy unless `sampling`), timed per message arrival."""
        assert self.stub is not None
        call = self.stub.Generate(**call_options(timeout=STREAM_TIMEOUT_S))
        start = time.perf_counter()
        await call.write(self._start_message(prompt, max_tokens, sampling))
        await call.done_writing()  # half-close: not a cancel
        tokens: list[int] = []
        arrivals: list[tuple[float, int]] = []
        finish: inference_pb2.GenerateFinish | None = None
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
        assert self.stub is not None
        call = self.stub.Generate(**call_options(timeout=STREAM_TIMEOUT_S))
        await call.write(self._start_message(prompt, max_tokens))
        received = 0
        at_cancel: int | None = None
        after_cancel = 0
        finish: inference_pb2.GenerateFinish | None = None
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
