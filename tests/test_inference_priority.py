"""Priority through the inference contract: GenerateStart.priority validated, and a stream shed from the full queue
for a higher priority ending with RESOURCE_EXHAUSTED (SHED) and its typed details, over gRPC behind the shared
interceptor, on the real model (an in-process server: no mesh)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import grpc
import pytest
from lmesh.common.v1 import generation_pb2
from lmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.discovery import SERVER_OPTIONS
from services.common.errors import InvalidArgument
from services.common.rpc import ServerInterceptor
from services.inference.engine import Engine, EngineLimits
from services.inference.metrics import InferenceMetrics
from services.inference.onnx_model import OnnxDecoder
from services.inference.servicer import InferenceServicer, ServedModel, _validate
from tests.test_e2e import typed_details
from tests.test_metrics import by_attributes

MODEL = "smollm2-135m-instruct:1"
PROMPT = list(range(1000, 1024))


def served(engine: Engine | None, vocab_size: int = 49152) -> ServedModel:
    return ServedModel("smollm2-135m-instruct", "1", cast(Engine, engine), vocab_size, 8192)


@pytest.mark.parametrize("priority", [-1, 10, 2**31 - 1])
def test_a_priority_out_of_range_is_invalid_and_named(priority: int) -> None:
    start = inference_pb2.GenerateStart(model=MODEL, prompt_token_ids=PROMPT, max_tokens=4, priority=priority)
    with pytest.raises(InvalidArgument) as caught:
        _validate(start, served(None), None)
    assert caught.value.field == "priority" and "[0, 9]" in caught.value.message


@pytest.mark.parametrize("priority", [0, 1, 9])
def test_a_priority_in_range_reaches_the_engine(priority: int) -> None:
    start = inference_pb2.GenerateStart(model=MODEL, prompt_token_ids=PROMPT, max_tokens=4, priority=priority)
    assert _validate(start, served(None), None).priority == priority


@contextlib.asynccontextmanager
async def serving(engine: Engine, metrics: InferenceMetrics, spans: InMemorySpanExporter,
                  ) -> AsyncIterator[inference_pb2_grpc.InferenceStub]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("test")
    server = grpc.aio.server(interceptors=[ServerInterceptor("inference", tracer)], options=SERVER_OPTIONS)
    model = served(engine, engine.model.vocab_size)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer({model.id: model}, tracer, metrics), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield inference_pb2_grpc.InferenceStub(channel)
    finally:
        await server.stop(None)


async def generate(stub: inference_pb2_grpc.InferenceStub, priority: int,
                   max_tokens: int = 3) -> grpc.aio.StreamStreamCall:
    call = stub.Generate(timeout=60)
    await call.write(inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
        model=MODEL, prompt_token_ids=PROMPT, max_tokens=max_tokens, priority=priority)))
    return call


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def read_rest(call: grpc.aio.StreamStreamCall) -> list[inference_pb2.GenerateResponse]:
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


async def test_a_shed_stream_ends_resource_exhausted_with_reason_shed_and_the_high_one_runs(built_model: Path) -> None:
    """--max-active 1 --max-queue 1: one decoding, a low one queued; a high one arrives and takes the low one's
    place. The low stream ends RESOURCE_EXHAUSTED (SHED, retry-after-ms, QuotaFailure), the decoding one goes on,
    and the high one runs once the place frees."""
    engine = Engine(OnnxDecoder(built_model / "model.onnx"), frozenset(), 8192,
                    EngineLimits(max_active=1, max_queue=1), model_id=MODEL)
    reader = InMemoryMetricReader()
    metrics = InferenceMetrics(MeterProvider(metric_readers=[reader]).get_meter("lmesh.inference"),
                               lambda: {MODEL: engine})
    spans = InMemorySpanExporter()
    engine.start()
    try:
        async with serving(engine, metrics, spans) as stub:
            running = await generate(stub, priority=0, max_tokens=2000)  # no end-of-turn id: runs until cancelled
            assert (await running.read()).WhichOneof("kind") == "tokens"
            low = await generate(stub, priority=0)
            await low.done_writing()
            await until(lambda: engine.load()["queued"] == 1)
            high = await generate(stub, priority=7)
            await high.done_writing()

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await low.read()
            error = caught.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            assert "higher priority (7 > 0)" in (error.details() or "")
            assert dict(error.trailing_metadata() or ())["retry-after-ms"] == "1000"
            details = typed_details(error)
            assert details["ErrorInfo"].reason == "SHED" and details["ErrorInfo"].metadata["limit"] == "inference.queue"
            assert details["RetryInfo"].retry_delay.ToMilliseconds() == 1000
            [violation] = details["QuotaFailure"].violations
            assert (violation.quota_id, violation.subject, violation.quota_value) == ("inference.queue",
                                                                                     f"model:{MODEL}", 1)
            # Equal priority to the lowest waiting (the high one): refused at once, QUEUE_FULL.
            same = await generate(stub, priority=7)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await same.read()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert typed_details(refused.value)["ErrorInfo"].reason == "QUEUE_FULL"
            # Out of range: INVALID_ARGUMENT naming the field.
            bad = await generate(stub, priority=10)
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await bad.read()
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert typed_details(invalid.value)["BadRequest"].field_violations[0].field == "priority"

            assert (await running.read()).WhichOneof("kind") == "tokens"  # never preempted
            await running.write(inference_pb2.GenerateRequest(cancel=inference_pb2.CancelGeneration()))
            await running.done_writing()
            assert (await read_rest(running))[-1].finish.reason == generation_pb2.FINISH_REASON_CANCELLED
            answer = await read_rest(high)
            assert answer[-1].finish.reason == generation_pb2.FINISH_REASON_LENGTH
            assert answer[-1].finish.usage.completion_tokens == 3
    finally:
        await engine.close()
    assert by_attributes(reader, "lmesh.inference.shed", "value") == {
        frozenset({"gen_ai.request.model": MODEL, "lmesh.inference.priority": 0}.items()): 1}
    generate_spans = [s for s in spans.get_finished_spans() if s.name == "lmesh.inference/Generate"]
    priorities = sorted(dict(s.attributes or {}).get("lmesh.inference.priority", -1) for s in generate_spans)
    assert priorities == [-1, 0, 0, 7, 7], priorities  # the invalid one never got as far as its priority
