"""`lmesh models stats`: the gateway's own metrics, as its Prometheus endpoint exposes them, read per version."""

from __future__ import annotations

import math

import grpc
import pytest
from lmesh.common.v1 import generation_pb2
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from services.gateway import metrics as gateway_metrics
from services.model_stats import collect, histogram_quantile, table


def exposition(chats: list[tuple[str, bool, int]]) -> str:
    """The Prometheus text of a gateway that served `chats`: (version, failed, completion tokens)."""
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    metrics = gateway_metrics.GatewayMetrics(provider.get_meter("lmesh.gateway"))
    for version, failed, tokens in chats:
        record = metrics.begin()
        gateway_metrics.note_model("default", version)
        metrics.text_sent(record)
        metrics.usage(record, generation_pb2.Usage(prompt_tokens=10, completion_tokens=tokens))
        metrics.end(record, grpc.StatusCode.UNAVAILABLE if failed else grpc.StatusCode.OK)
    return generate_latest(registry).decode()


def test_stats_are_per_version_and_summed_over_gateways() -> None:
    first = exposition([("m:1", False, 8)] * 9 + [("m:2", True, 0)])
    second = exposition([("m:1", False, 8), ("m:2", False, 8)])
    rows = {row.version: row for row in collect([first, second])}
    assert set(rows) == {"m:1", "m:2"}
    assert (rows["m:1"].chats, rows["m:1"].errors) == (10, 0)
    assert (rows["m:2"].chats, rows["m:2"].errors) == (2, 1)
    assert rows["m:1"].tpot_count == 10 and rows["m:2"].tpot_count == 1  # no speed from a chat of no tokens
    assert rows["m:1"].tokens_per_second is not None and rows["m:1"].tokens_per_second > 0
    assert rows["m:1"].ttft_quantile(0.5) is not None
    printed = table(list(rows.values())).splitlines()
    assert printed[0].split() == ["VERSION", "CHATS", "ERRORS", "TTFT", "P50", "TTFT", "P95", "TOKENS/S"]
    assert printed[1].split()[:3] == ["m:1", "10", "0"]


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 50.0, 0.2: 90.0, 0.4: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    assert histogram_quantile(0.99, {0.1: 1.0, math.inf: 10.0}) == 0.1  # beyond the last finite bound


def test_unlabelled_and_unknown_samples_are_ignored() -> None:
    assert collect(["# HELP x y\n# TYPE x counter\nx_total 3\n"]) == []
