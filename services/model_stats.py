"""`lmesh models stats`: the gateways' measurements per model version, side by side, to judge a canary.

Read from each passing gateway's Prometheus endpoint (Consul meta `metrics_port`): chats and errors
(`lmesh.gateway.requests` by status code), time to first token (quantiles from its histogram's buckets, as
Prometheus' histogram_quantile interpolates them) and tokens per second (1 / the mean time per output token).
Counts are since each gateway started; several gateways are summed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from services.common.config import host_port
from services.common.discovery import Endpoint

MODEL_LABEL = "gen_ai_response_model"
OK_CODES = frozenset({"OK", "CANCELLED"})  # a caller that left is not the version's error


@dataclass
class VersionStats:
    version: str
    chats: int = 0
    errors: int = 0
    ttft_buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count
    tpot_sum: float = 0.0
    tpot_count: float = 0.0

    def ttft_quantile(self, q: float) -> float | None:
        return histogram_quantile(q, self.ttft_buckets)

    @property
    def tokens_per_second(self) -> float | None:
        return self.tpot_count / self.tpot_sum if self.tpot_sum > 0 else None


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile of cumulative buckets, linear within a bucket (Prometheus' histogram_quantile); None: empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is the best known
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def collect(texts: Iterable[str]) -> list[VersionStats]:
    """Per version, from the Prometheus texts of the gateways; versions in name order."""
    stats: dict[str, VersionStats] = {}

    def of(labels: dict[str, str]) -> VersionStats | None:
        version = labels.get(MODEL_LABEL)
        if not version:
            return None
        return stats.setdefault(version, VersionStats(version))

    for text in texts:
        buckets: dict[str, dict[float, float]] = defaultdict(dict)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                entry = of(sample.labels)
                if entry is None:
                    continue
                if sample.name == "lmesh_gateway_requests_total":
                    entry.chats += int(sample.value)
                    if sample.labels.get("rpc_response_status_code") not in OK_CODES:
                        entry.errors += int(sample.value)
                elif sample.name == "gen_ai_server_time_to_first_token_seconds_bucket":
                    bound = float(sample.labels["le"])
                    own = buckets[entry.version]
                    own[bound] = own.get(bound, 0.0) + sample.value  # summed over request models' series
                elif sample.name == "gen_ai_server_time_per_output_token_seconds_sum":
                    entry.tpot_sum += sample.value
                elif sample.name == "gen_ai_server_time_per_output_token_seconds_count":
                    entry.tpot_count += sample.value
        for version, own in buckets.items():
            merged = stats[version].ttft_buckets
            for bound, count in own.items():
                merged[bound] = merged.get(bound, 0.0) + count
    return [stats[name] for name in sorted(stats)]


def table(rows: list[VersionStats]) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    lines = [f"{'VERSION':40} {'CHATS':>7} {'ERRORS':>7} {'TTFT P50':>9} {'TTFT P95':>9} {'TOKENS/S':>9}"]
    for row in rows:
        speed = row.tokens_per_second
        lines.append(f"{row.version:40} {row.chats:>7} {row.errors:>7} {seconds(row.ttft_quantile(0.5)):>9} "
                     f"{seconds(row.ttft_quantile(0.95)):>9} {'-' if speed is None else f'{speed:.1f}':>9}")
    return "\n".join(lines)


async def gateway_expositions(endpoints: Iterable[Endpoint], timeout_s: float = 5.0) -> tuple[list[str], list[str]]:
    """The Prometheus text of each gateway that publishes a `metrics_port`, and one line per gateway that could not
    be read (it is left out of the sums)."""
    import aiohttp

    texts: list[str] = []
    problems: list[str] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        for endpoint in endpoints:
            port = endpoint.meta.get("metrics_port", "")
            if not port.isdigit():
                problems.append(f"{endpoint.service_id}: no Prometheus endpoint (OTEL_METRICS_EXPORTER without "
                                "prometheus)")
                continue
            url = f"http://{host_port(endpoint.address, int(port))}/metrics"
            try:
                async with session.get(url) as response:
                    response.raise_for_status()
                    texts.append(await response.text())
            except (aiohttp.ClientError, TimeoutError) as exc:
                problems.append(f"{endpoint.service_id}: {url} could not be read ({exc or type(exc).__name__})")
    return texts, problems
