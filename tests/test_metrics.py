"""Metrics: one set of instruments per service, read by OTLP and by the service's own Prometheus endpoint; the RPC,
gateway and inference instruments; deploy/'s Prometheus scrape configuration and Grafana dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import promql_parser
import pytest
import yaml
from lmesh.common.v1 import generation_pb2
from lmesh.gateway.v1 import gateway_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from services.common.config import ConfigError, ServiceConfig
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.server import RunningService, ServiceParts, start_service
from services.common.telemetry import prometheus_wanted, setup_metrics
from services.gateway.metrics import GatewayMetrics, meter_chats, note_model, note_tenant
from tests.harness import ROOT, intercepted
from tests.otlp import OtlpReceiver

OTEL_VARIABLES = ("OTEL_METRICS_EXPORTER", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_METRIC_EXPORT_INTERVAL",
                  "LMESH_METRICS_PORT")
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "lmesh-dashboard.json"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


Families = dict[str, list[Sample]]


def parse(text: str) -> Families:
    """Prometheus text as prometheus_client's own parser reads it: samples by family name."""
    return {family.name: list(family.samples) for family in text_string_to_metric_families(text)}


async def scrape(port: int, host: str = "127.0.0.1") -> Families:
    async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        return parse(await response.text())


def value(families: Families, sample_name: str, **labels: str) -> float:
    """The sum of the samples called `sample_name` whose labels include `labels`."""
    return sum(s.value for samples in families.values() for s in samples
               if s.name == sample_name and labels.items() <= s.labels.items())


async def start(service: str, **fields: Any) -> RunningService:
    config = ServiceConfig(mtls=False, service=service, grace_s=0, **fields)
    return await start_service(config, lambda runtime: ServiceParts(servicers=[]), register=False)


# ---- the endpoint ------------------------------------------------------------------------------------------------

async def test_each_service_serves_its_own_instruments_as_prometheus_text_and_over_otlp(
        monkeypatch: pytest.MonkeyPatch) -> None:
    otlp = OtlpReceiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", await otlp.start())
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    tokenizer, policy = await start("tokenizer"), await start("policy")  # two services in one process
    try:
        for running, things in ((tokenizer, 3), (policy, 5)):
            running.runtime.meter.create_counter("lmesh.test.things", unit="{thing}").add(things, {"kind": "a"})
        assert tokenizer.runtime.metrics_endpoint is not None and policy.runtime.metrics_endpoint is not None
        mine = await scrape(tokenizer.runtime.metrics_endpoint.port)
        theirs = await scrape(policy.runtime.metrics_endpoint.port)
        # Each registry is the service's own: neither shows the other's instruments (nor the process-wide one's).
        assert value(mine, "lmesh_test_things_total", kind="a") == 3
        assert value(theirs, "lmesh_test_things_total", kind="a") == 5
        assert {s.labels["otel_scope_name"] for s in mine["lmesh_test_things"]} == {"lmesh.tokenizer"}
        assert value(mine, "target_info", service_name="lmesh-tokenizer") == 1
        # The same instrument goes out over OTLP too.
        assert await otlp.wait_for_metric("lmesh-tokenizer", "lmesh.test.things", lambda v: v == 3) == 3
        # Counters move between scrapes.
        tokenizer.runtime.meter.create_counter("lmesh.test.things", unit="{thing}").add(2, {"kind": "a"})
        assert value(await scrape(tokenizer.runtime.metrics_endpoint.port), "lmesh_test_things_total") == 5
    finally:
        await tokenizer.stop()
        await policy.stop()
        await otlp.stop()
    # Stopped with its service: the port no longer answers.
    with pytest.raises(aiohttp.ClientConnectionError):
        await scrape(tokenizer.runtime.metrics_endpoint.port)


@pytest.mark.parametrize(("exporters", "endpoint"), [(None, True), ("otlp,prometheus", True), ("prometheus", True),
                                                     ("otlp", False), ("console", False), ("none", False),
                                                     ("prometheus,none", False)])
async def test_otel_metrics_exporter_decides_whether_the_endpoint_is_served(
        monkeypatch: pytest.MonkeyPatch, exporters: str | None, endpoint: bool) -> None:
    if exporters is not None:
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", exporters)
    assert prometheus_wanted() is endpoint
    running = await start("tokenizer")
    try:
        assert (running.runtime.metrics_endpoint is not None) is endpoint
    finally:
        await running.stop()


def test_an_exporter_lmesh_cannot_honour_still_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus,statsd")
    with pytest.raises(ConfigError, match="OTEL_METRICS_EXPORTER") as caught:
        setup_metrics("lmesh-test")
    assert "statsd" in str(caught.value) and "prometheus" in str(caught.value) and "\n" not in str(caught.value)


@pytest.fixture
def taken_port() -> Iterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


async def test_the_metrics_port_is_the_one_asked_for_and_a_taken_one_fails_in_one_line(taken_port: int) -> None:
    with pytest.raises(OSError, match=r"--metrics-port") as caught:
        await start("tokenizer", metrics_port=taken_port)
    assert "in use" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(OSError, match=r"--metrics-port must be another port than --port"):
        await start("tokenizer", port=taken_port + 1, metrics_port=taken_port + 1)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    wanted = free.getsockname()[1]
    free.close()
    running = await start("tokenizer", metrics_port=wanted)
    try:
        assert running.runtime.metrics_endpoint is not None and running.runtime.metrics_endpoint.port == wanted
        await scrape(wanted)
    finally:
        await running.stop()


async def test_a_slow_scrape_does_not_hold_the_services_event_loop() -> None:
    running = await start("tokenizer")
    try:
        endpoint = running.runtime.metrics_endpoint
        assert endpoint is not None

        def slow(_: object) -> list[object]:
            import time

            time.sleep(0.5)  # a collection that takes long (a callback reading a big engine)
            return []

        running.runtime.meter.create_observable_gauge("lmesh.test.slow", [slow])
        loop = asyncio.get_running_loop()
        scraping = asyncio.create_task(scrape(endpoint.port))
        started = loop.time()
        ticks = 0
        while not scraping.done():
            await asyncio.sleep(0.01)
            ticks += 1
        await scraping
        assert loop.time() - started >= 0.5 and ticks >= 20  # the loop kept turning meanwhile
    finally:
        await running.stop()


# ---- RPC metrics from the shared interceptor ----------------------------------------------------------------------

def points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    return [point for resource in (data.resource_metrics if data else ()) for scope in resource.scope_metrics
            for metric in scope.metrics if metric.name == name for point in metric.data.data_points]


def by_attributes(reader: InMemoryMetricReader, name: str, field: str = "count") -> dict[frozenset[Any], float]:
    return {frozenset(p.attributes.items()): getattr(p, field) for p in points(reader, name)}


async def test_every_rpc_is_counted_by_method_and_the_code_its_caller_got() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    async def ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"ok"

    async def refused(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise InvalidArgument("field", "is wrong")

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"a"
        raise ResourceExhausted("full", retry_after_s=1.0)

    methods = {"Ok": grpc.unary_unary_rpc_method_handler(ok), "Refused": grpc.unary_unary_rpc_method_handler(refused),
               "Stream": grpc.unary_stream_rpc_method_handler(stream)}
    async with intercepted(methods, meter=provider.get_meter("lmesh.test")) as channel:
        for _ in range(2):
            await channel.unary_unary("/lmesh.test.v1.Test/Ok")(b"x")
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary("/lmesh.test.v1.Test/Refused")(b"x")
        with pytest.raises(grpc.aio.AioRpcError):
            _ = [m async for m in channel.unary_stream("/lmesh.test.v1.Test/Stream")(b"x")]
    counts = by_attributes(reader, "rpc.server.call.duration")

    def key(method: str, code: str) -> frozenset[Any]:
        return frozenset({"rpc.system.name": "grpc", "rpc.method": f"lmesh.test.v1.Test/{method}",
                          "rpc.response.status_code": code}.items())

    assert counts == {key("Ok", "OK"): 2, key("Refused", "INVALID_ARGUMENT"): 1,
                      key("Stream", "RESOURCE_EXHAUSTED"): 1}


# ---- the gateway's chats ------------------------------------------------------------------------------------------

class FakeGateway:
    """A Chat that goes as far as `fail_at` says, noting what the real chat path notes."""

    def __init__(self, fail_at: str = "") -> None:
        self.fail_at = fail_at

    async def Chat(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext,
                   ) -> AsyncIterator[gateway_pb2.ChatResponse]:
        if self.fail_at == "resolve":
            raise InvalidArgument("model", "no such model")
        note_model("default", "tiny:1")
        if self.fail_at == "authorize":
            raise ResourceExhausted("over budget", retry_after_s=1.0)
        note_tenant("acme")
        yield gateway_pb2.ChatResponse(delta="Par", model="tiny:1")
        await asyncio.sleep(0.01)
        yield gateway_pb2.ChatResponse(delta="is")
        yield gateway_pb2.ChatResponse(finish_reason=generation_pb2.FINISH_REASON_STOP, usage=generation_pb2.Usage(
            prompt_tokens=30, completion_tokens=2, total_tokens=32))


async def test_gateway_chats_are_counted_by_model_tenant_and_outcome() -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("lmesh.gateway")
    metrics = GatewayMetrics(meter)
    servicers = {name: FakeGateway(fail_at) for name, fail_at in (("Ok", ""), ("Bad", "resolve"),
                                                                    ("Poor", "authorize"))}
    for servicer in servicers.values():
        meter_chats(servicer, metrics)
    methods = {name: grpc.unary_stream_rpc_method_handler(
        servicer.Chat, response_serializer=gateway_pb2.ChatResponse.SerializeToString)
        for name, servicer in servicers.items()}
    async with intercepted(methods) as channel:
        for name in ("Ok", "Ok", "Bad", "Poor"):
            call = channel.unary_stream(f"/lmesh.test.v1.Test/{name}")(b"x")
            with pytest.raises(grpc.aio.AioRpcError) if name != "Ok" else contextlib.nullcontext():
                _ = [m async for m in call]
    chat = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "lmesh"}
    model = {**chat, "gen_ai.request.model": "default", "gen_ai.response.model": "tiny:1"}
    assert by_attributes(reader, "lmesh.gateway.requests", "value") == {
        frozenset({**model, "lmesh.tenant": "acme", "rpc.response.status_code": "OK"}.items()): 2,
        frozenset({**chat, "rpc.response.status_code": "INVALID_ARGUMENT"}.items()): 1,  # no made-up model label
        frozenset({**model, "rpc.response.status_code": "RESOURCE_EXHAUSTED"}.items()): 1,  # no tenant yet
    }
    assert by_attributes(reader, "lmesh.gateway.active_streams", "value") == {frozenset(): 0}
    assert by_attributes(reader, "gen_ai.server.time_to_first_token") == {frozenset(model.items()): 2}
    # Per version, so a canary's speed can be judged beside its stable version's.
    assert by_attributes(reader, "gen_ai.server.time_per_output_token") == {frozenset(model.items()): 2}
    durations = by_attributes(reader, "gen_ai.server.request.duration")
    assert durations[frozenset(model.items())] == 2
    assert durations[frozenset({**model, "error.type": "RESOURCE_EXHAUSTED"}.items())] == 1
    usage = by_attributes(reader, "gen_ai.client.token.usage", "sum")
    assert usage == {frozenset({**model, "gen_ai.token.type": "input"}.items()): 60,
                     frozenset({**model, "gen_ai.token.type": "output"}.items()): 4}


async def test_a_chat_whose_caller_leaves_is_cancelled_and_closes_its_stream() -> None:
    reader = InMemoryMetricReader()
    metrics = GatewayMetrics(MeterProvider(metric_readers=[reader]).get_meter("lmesh.gateway"))
    closed = asyncio.Event()

    class Endless:
        async def Chat(self, requests: object, context: object) -> AsyncIterator[gateway_pb2.ChatResponse]:
            try:
                while True:
                    yield gateway_pb2.ChatResponse(delta="x")
                    await asyncio.sleep(0.01)
            finally:
                closed.set()

    servicer = Endless()
    meter_chats(servicer, metrics)
    methods = {"Chat": grpc.unary_stream_rpc_method_handler(
        servicer.Chat, response_serializer=gateway_pb2.ChatResponse.SerializeToString)}
    async with intercepted(methods) as channel:
        call = channel.unary_stream("/lmesh.test.v1.Test/Chat")(b"x")
        await call.read()
        assert by_attributes(reader, "lmesh.gateway.active_streams", "value") == {frozenset(): 1}
        call.cancel()
        await asyncio.wait_for(closed.wait(), 5)
        for _ in range(100):
            if by_attributes(reader, "lmesh.gateway.active_streams", "value") == {frozenset(): 0}:
                break
            await asyncio.sleep(0.02)
    codes = {dict(k)["rpc.response.status_code"]: v for k, v in by_attributes(reader, "lmesh.gateway.requests",
                                                                             "value").items()}
    assert codes == {"CANCELLED": 1}
    durations = by_attributes(reader, "gen_ai.server.request.duration")
    assert all("error.type" not in dict(k) for k in durations)  # a caller that left is not the gateway's error


# ---- the inference engine's per-token timing ---------------------------------------------------------------------

async def test_the_engine_times_every_token_gap_and_the_histogram_gets_one_observation_each(
        built_model: Path) -> None:
    from tokenizers import Tokenizer

    from services.inference.engine import Engine, GenerationRequest, TokenEvent
    from services.inference.metrics import InferenceMetrics
    from services.inference.onnx_model import OnnxDecoder
    from services.inference.sampling import SamplingConfig

    tokenizer = Tokenizer.from_file(str(built_model / "tokenizer.json"))
    prompt = tokenizer.encode("<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
                              add_special_tokens=False).ids
    engine = Engine(OnnxDecoder(built_model / "model.onnx"), frozenset({2}), context_length=8192)
    reader = InMemoryMetricReader()
    metrics = InferenceMetrics(MeterProvider(metric_readers=[reader]).get_meter("lmesh.inference"),
                               lambda: {"tiny:1": engine})
    engine.start()
    try:
        seq = engine.submit(GenerationRequest(prompt_ids=prompt, max_tokens=10, sampling=SamplingConfig()))
        tokens = 0
        while not seq.done or not seq.events.empty():
            if isinstance(await seq.events.get(), TokenEvent):
                tokens += 1
        assert tokens == 10 and len(seq.token_gaps_ns) == 9 and all(gap > 0 for gap in seq.token_gaps_ns)
        metrics.record("tiny:1", seq)
    finally:
        await engine.close()
    genai = {"gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "lmesh",
             "gen_ai.request.model": "tiny:1"}
    assert by_attributes(reader, "gen_ai.server.time_per_output_token") == {frozenset(genai.items()): 9}
    assert by_attributes(reader, "gen_ai.server.time_to_first_token") == {frozenset(genai.items()): 1}
    assert by_attributes(reader, "gen_ai.server.request.duration") == {frozenset(genai.items()): 1}
    assert by_attributes(reader, "lmesh.inference.tokens", "value") == {
        frozenset({**genai, "gen_ai.token.type": "input"}.items()): len(prompt),
        frozenset({**genai, "gen_ai.token.type": "output"}.items()): 10}
    assert seq.token_gaps_ns == []  # handed over, not kept
    assert by_attributes(reader, "lmesh.inference.active", "value") == {
        frozenset({"gen_ai.request.model": "tiny:1"}.items()): 0}


# ---- deploy/: the Prometheus scrape configuration and the Grafana dashboard --------------------------------------

def test_the_prometheus_config_discovers_every_lmesh_service_in_consul_and_scrapes_its_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["lmesh"]
    assert job["metrics_path"] == "/metrics"
    assert job["consul_sd_configs"] and all("server" in sd for sd in job["consul_sd_configs"])
    relabel = job["relabel_configs"]
    # Only lmesh-* services with a metrics_port are kept...
    keep = [r for r in relabel if r.get("action") == "keep"]
    assert any(r["source_labels"] == ["__meta_consul_service"] and re.fullmatch(r["regex"], "lmesh-gateway")
               and not re.fullmatch(r["regex"], "consul") for r in keep)
    assert any(r["source_labels"] == ["__meta_consul_service_metadata_metrics_port"] for r in keep)
    # ... and scraped at address:metrics_port, as relabelling would compute it.
    target = _relabel(relabel, {"__meta_consul_service": "lmesh-inference", "__meta_consul_service_address": "10.0.0.5",
                                "__meta_consul_service_port": "7000",
                                "__meta_consul_service_metadata_metrics_port": "9464",
                                "__address__": "10.0.0.5:7000"})
    assert target is not None and target["__address__"] == "10.0.0.5:9464" and target["service"] == "lmesh-inference"
    assert _relabel(relabel, {"__meta_consul_service": "lmesh-gateway", "__meta_consul_service_address": "::1",
                              "__meta_consul_service_metadata_metrics_port": "9464",
                              "__address__": "[::1]:7000"})["__address__"] == "[::1]:9464"  # type: ignore[index]
    consul = {"__meta_consul_service": "consul", "__meta_consul_service_address": "10.0.0.5",
              "__meta_consul_service_metadata_metrics_port": "", "__address__": "10.0.0.5:8300"}
    assert _relabel(relabel, consul) is None


def _relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus's relabelling (keep, drop, replace, labelmap) over `labels`; None when the target is dropped."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        regex = re.compile(rule.get("regex", "(.*)"))
        source = rule.get("separator", ";").join(labels.get(name, "") for name in rule.get("source_labels", []))
        match = regex.fullmatch(source)
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            labels[rule["target_label"]] = match.expand(rule.get("replacement", "$1").replace("$", "\\"))
        if action == "labelmap":
            for name, label_value in list(labels.items()):
                if m := regex.fullmatch(name):
                    labels[m.expand(rule.get("replacement", "$1").replace("$", "\\"))] = label_value
    return labels


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30 and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert all(queries)
    return queries


def selectors(node: Any) -> Iterator[Any]:
    """The vector selectors of a parsed PromQL expression (promql_parser's tree)."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node
        return
    for attribute in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attribute, None)
        if child is not None and not isinstance(child, (str, int, float)):
            yield from selectors(child)
    for child in getattr(node, "args", None) or ():
        yield from selectors(child)


def dashboard_selectors() -> list[tuple[str, dict[str, str]]]:
    """(metric name, equality matchers) of every selector of every panel query, each query parsed as PromQL (a
    syntax error fails here). Grafana's $__rate_interval is a duration."""
    found = []
    for query in dashboard_queries():
        tree = promql_parser.parse(query.replace("$__rate_interval", "1m"))
        for selector in selectors(tree):
            assert selector.name, query
            found.append((selector.name, {m.name: m.value for m in selector.matchers.matchers}))
    return found


def test_the_dashboard_is_grafana_json_whose_queries_parse_and_cover_the_issues_metrics() -> None:
    names = {name for name, _ in dashboard_selectors()}
    for wanted in ("gen_ai_server_time_to_first_token_seconds_bucket",
                   "gen_ai_server_time_per_output_token_seconds_bucket", "lmesh_inference_tokens_total",
                   "lmesh_gateway_requests_total", "lmesh_gateway_active_streams", "lmesh_inference_queued",
                   "lmesh_inference_kv_bytes", "lmesh_inference_prefix_cache_hits_total",
                   "lmesh_inference_prefix_cache_misses_total"):
        assert wanted in names, wanted
    # A query that could match series of another service names the one it means.
    for name, matchers in dashboard_selectors():
        if name.startswith("gen_ai_server_"):
            assert matchers.get("otel_scope_name") in ("lmesh.gateway", "lmesh.inference"), name
