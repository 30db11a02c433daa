"""Inference metrics (OpenTelemetry, read by every exporter the service has: OTLP and Prometheus).

Names follow OpenTelemetry's GenAI model-server conventions where they exist (`gen_ai.server.*`), with their
advised bucket boundaries; the engine's own state keeps `lmesh.inference.*` names. Per-token timing costs the engine
a timestamp and a list append per token (Sequence.token_gaps_ns); the histogram takes the gaps in batches, from the
servicer, off the engine's step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from services.common.telemetry import (
    GENAI_PROVIDER,
    GENAI_REQUEST_DURATION_BUCKETS,
    GENAI_TIME_PER_OUTPUT_TOKEN_BUCKETS,
    GENAI_TIME_TO_FIRST_TOKEN_BUCKETS,
)
from services.inference.engine import Engine, Sequence

# gen_ai.operation.name: the engine continues a prompt of token ids (the gateway renders the chat into one).
OPERATION = "text_completion"
# Token gaps a running sequence holds before the servicer hands them to the histogram.
GAP_BATCH = 64


class InferenceMetrics:
    def __init__(self, meter: Meter, engines: Callable[[], dict[str, Engine]]) -> None:
        self._engines = engines
        self._attributes: dict[str, dict[str, str]] = {}
        self.time_to_first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time to generate the first token (queue and prefill) for successful responses",
            explicit_bucket_boundaries_advisory=GENAI_TIME_TO_FIRST_TOKEN_BUCKETS)
        self.time_per_output_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Time between consecutive output tokens after the first: one observation per token",
            explicit_bucket_boundaries_advisory=GENAI_TIME_PER_OUTPUT_TOKEN_BUCKETS)
        self.request_duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="Time from queueing to the last token (or the error) of a generation",
            explicit_bucket_boundaries_advisory=GENAI_REQUEST_DURATION_BUCKETS)
        self.tokens = meter.create_counter(
            "lmesh.inference.tokens", unit="{token}",
            description="Tokens of finished generations by gen_ai.token.type: input (the prompt, cached or not) and "
                        "output (what usage bills)")
        self.cached_prompt_tokens = meter.create_counter(
            "lmesh.inference.prefix_cache.hit_tokens", unit="{token}", description="prompt tokens reused")
        meter.create_observable_counter("lmesh.inference.prefix_cache.hits", [self._stat("hits")], unit="{lookup}",
                                        description="prompts that found part of their prefix cached")
        meter.create_observable_counter("lmesh.inference.prefix_cache.misses", [self._stat("misses")],
                                        unit="{lookup}", description="prompts that found nothing cached")
        meter.create_observable_counter("lmesh.inference.prefix_cache.evictions", [self._stat("evictions")],
                                        unit="{block}", description="cached blocks dropped to stay in budget")
        meter.create_observable_counter("lmesh.inference.shed", [self._shed], unit="{request}",
                                        description="queued requests shed for one of a higher priority (the queue "
                                                    "was full), by the shed one's lmesh.inference.priority")
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

    def _shed(self, _: CallbackOptions) -> Iterable[Observation]:
        for model, engine in self._engines().items():
            for priority, count in sorted(dict(engine.shed).items()):  # a copy: the loop may add a priority
                yield Observation(count, {"gen_ai.request.model": model, "lmesh.inference.priority": priority})

    def _load(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            for model, engine in self._engines().items():
                yield Observation(engine.load()[key], {"gen_ai.request.model": model})
        return observe

    def _genai(self, model: str) -> dict[str, str]:
        """The GenAI attributes of `model`'s measurements (one dict per model, reused)."""
        attributes = self._attributes.get(model)
        if attributes is None:
            attributes = self._attributes[model] = {"gen_ai.operation.name": OPERATION,
                                                    "gen_ai.provider.name": GENAI_PROVIDER,
                                                    "gen_ai.request.model": model}
        return attributes

    def record_gaps(self, model: str, seq: Sequence) -> None:
        """Hands the token gaps `seq` holds to the time-per-output-token histogram (one observation each)."""
        gaps, seq.token_gaps_ns = seq.token_gaps_ns, []
        record, attributes = self.time_per_output_token.record, self._genai(model)
        for gap in gaps:
            record(gap / 1e9, attributes)

    def record(self, model: str, seq: Sequence) -> None:
        """A finished generation: its first token's time, its remaining token gaps, duration and tokens."""
        attributes = self._genai(model)
        self.record_gaps(model, seq)
        if seq.first_token_ns and seq.error is None:
            self.time_to_first_token.record((seq.first_token_ns - seq.enqueued_ns) / 1e9, attributes)
        if seq.finish_ns:
            ended = attributes if seq.error is None else {**attributes, "error.type": seq.error.code.name}
            self.request_duration.record((seq.finish_ns - seq.enqueued_ns) / 1e9, ended)
        self.tokens.add(len(seq.request.prompt_ids), {**attributes, "gen_ai.token.type": "input"})
        self.tokens.add(seq.completion_tokens, {**attributes, "gen_ai.token.type": "output"})
        # Also 0: the series exists from the first request on, so a hit ratio reads 0 rather than nothing.
        self.cached_prompt_tokens.add(seq.cached_tokens, {"gen_ai.request.model": model})
