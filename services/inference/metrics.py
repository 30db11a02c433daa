"""Inference metrics (OpenTelemetry): latency per request, and engine state read when exported."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from services.inference.engine import Engine, Sequence


class InferenceMetrics:
    def __init__(self, meter: Meter, engines: Callable[[], dict[str, Engine]]) -> None:
        self._engines = engines
        self.time_to_first_token = meter.create_histogram(
            "lmesh.inference.time_to_first_token", unit="s", description="queue + prefill until the first token")
        self.inter_token_latency = meter.create_histogram(
            "lmesh.inference.inter_token_latency", unit="s", description="mean gap between tokens of a request")
        self.cached_prompt_tokens = meter.create_counter(
            "lmesh.inference.prefix_cache.hit_tokens", unit="{token}", description="prompt tokens reused")
        meter.create_observable_counter("lmesh.inference.prefix_cache.hits", [self._stat("hits")], unit="{lookup}",
                                        description="prompts that found part of their prefix cached")
        meter.create_observable_counter("lmesh.inference.prefix_cache.misses", [self._stat("misses")],
                                        unit="{lookup}", description="prompts that found nothing cached")
        meter.create_observable_counter("lmesh.inference.prefix_cache.evictions", [self._stat("evictions")],
                                        unit="{block}", description="cached blocks dropped to stay in budget")
        for key, unit, description in (("active", "{sequence}", "sequences decoding"),
                                       ("queued", "{sequence}", "sequences waiting for a slot"),
                                       ("kv_bytes", "By", "KV cache memory of the active sequences"),
                                       ("prefix_cache_bytes", "By", "memory held by the prefix cache")):
            meter.create_observable_gauge(f"lmesh.inference.{key}", [self._load(key)], unit=unit,
                                          description=description)

    def _stat(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            for model, engine in self._engines().items():
                yield Observation(getattr(engine.prefix_cache.stats, name), {"gen_ai.request.model": model})
        return observe

    def _load(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            for model, engine in self._engines().items():
                yield Observation(engine.load()[key], {"gen_ai.request.model": model})
        return observe

    def record(self, model: str, seq: Sequence) -> None:
        attributes = {"gen_ai.request.model": model}
        if seq.first_token_ns:
            self.time_to_first_token.record((seq.first_token_ns - seq.enqueued_ns) / 1e9, attributes)
            if seq.generated > 1 and seq.finish_ns > seq.first_token_ns:
                gap = (seq.finish_ns - seq.first_token_ns) / 1e9 / (seq.generated - 1)
                self.inter_token_latency.record(gap, attributes)
        if seq.cached_tokens:
            self.cached_prompt_tokens.add(seq.cached_tokens, attributes)
