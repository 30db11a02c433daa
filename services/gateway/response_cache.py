"""The gateway's response cache: an identical deterministic request from the same tenant is answered from a
bounded cache, replayed event by event as the model first produced it, without running the model.

Deterministic means greedy (`temperature == 0`) or sampled with a non-zero `seed`. The key is a SHA-256 over the
tenant, the concrete model version, the messages, the rendered prompt's token ids (the messages after input
guardrails, through the version's chat template) and every generation field; neither the prompt nor the tenant
appears in clear in a key, a log or a span. Only complete answers are stored (finish STOP or LENGTH after output
screening); the events are kept as `ChatService.generate` produced them, before output screening, so a hit is
screened with the rules in force when it is served.

Entries live in each gateway's memory (an LRU bounded by entries and bytes, each with a TTL) and, when configured,
in a Redis shared by several gateways (the same TTL; a Redis that fails or is slower than its timeout counts as a
miss, and is left alone for a few seconds, never failing a chat).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lmesh.common.v1 import generation_pb2
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from services.gateway.accounting import Meter as UsageMeter
from services.gateway.chat import ChatDelta, ChatEnd, ChatParams
from services.gateway.logprobs import Candidate, TokenLogprob

log = logging.getLogger("lmesh.gateway.response_cache")

Result = Literal["hit", "miss", "bypass"]
ENCODING_VERSION = 1
COMPLETE = frozenset({generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH})
REDIS_BACKOFF_S = 5.0  # after a Redis failure or timeout, how long lookups and stores skip it
DEFAULT_TTL_S = 600.0
DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_MB = 64
DEFAULT_REDIS_TIMEOUT_MS = 50


def deterministic(params: ChatParams) -> bool:
    """Whether the same request gives the same answer: greedy, or sampled with a seed."""
    return params.temperature == 0 or params.seed != 0


def response_key(tenant: str, model_id: str, prompt: Sequence[int], params: ChatParams) -> str:
    """The cache key of a request: a hex SHA-256 that changes with the tenant, the model version, the messages, the
    rendered prompt and every generation field (a hash: neither the prompt nor the tenant can be read back from
    it)."""
    fields = {"v": ENCODING_VERSION, "tenant": tenant, "model": model_id, "messages": params.messages,
              "max_tokens": params.max_tokens,
              "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed,
              "stop": list(params.stop), "repetition_penalty": params.repetition_penalty,
              "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
              "logit_bias": [list(pair) for pair in params.logit_bias],
              "logprobs": params.logprobs, "top_logprobs": params.top_logprobs,
              # What the output must match: the same prompt under another constraint is another answer.
              "constraint": (params.response_format.SerializeToString(deterministic=True).hex()
                             if params.response_format is not None else "")}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    digest.update(b"\0")
    digest.update(b"".join(token.to_bytes(4, "little", signed=True) for token in prompt))
    return digest.hexdigest()


# ---- what is stored -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...]
    tokens: int  # completion tokens the generation had produced when this delta came (what a cut replay charges)


@dataclass(frozen=True)
class StoredAnswer:
    """One complete answer, as `ChatService.generate` produced it."""

    deltas: tuple[StoredDelta, ...]
    finish_reason: generation_pb2.FinishReason.ValueType
    usage: generation_pb2.Usage
    end_logprobs: tuple[TokenLogprob, ...] = ()

    def encode(self) -> bytes:
        return json.dumps({
            "v": ENCODING_VERSION, "finish": int(self.finish_reason),
            "usage": [self.usage.prompt_tokens, self.usage.completion_tokens, self.usage.total_tokens,
                      self.usage.cached_prompt_tokens],
            "deltas": [[d.text, d.tokens, _entries_json(d.logprobs)] for d in self.deltas],
            "end": _entries_json(self.end_logprobs)}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> StoredAnswer:
        """ValueError for anything `encode` did not write (another version, a corrupt value)."""
        try:
            value = json.loads(data)
            if value["v"] != ENCODING_VERSION:
                raise ValueError(f"encoding version {value['v']}")
            if value["finish"] not in COMPLETE:
                raise ValueError(f"finish reason {value['finish']}")
            prompt, completion, total, cached = value["usage"]
            return cls(tuple(StoredDelta(str(text), _entries(entries), int(tokens))
                             for text, tokens, entries in value["deltas"]),
                       generation_pb2.FinishReason.ValueType(int(value["finish"])),
                       generation_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total,
                                            cached_prompt_tokens=cached),
                       _entries(value["end"]))
        except (KeyError, TypeError, IndexError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError too
            raise ValueError(f"not a stored answer: {exc}") from None


def _candidate_json(candidate: Candidate) -> list[Any]:
    return [candidate.token_id, base64.b64encode(candidate.data).decode(), candidate.logprob]


def _candidate(value: list[Any]) -> Candidate:
    token_id, data, logprob = value
    return Candidate(int(token_id), base64.b64decode(data), float(logprob))


def _entries_json(entries: Iterable[TokenLogprob]) -> list[Any]:
    return [[_candidate_json(e.chosen), [_candidate_json(c) for c in e.top]] for e in entries]


def _entries(value: list[Any]) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(_candidate(chosen), tuple(_candidate(c) for c in top)) for chosen, top in value)


class Recorder:
    """Watches a generation's events go by and keeps them; `answer` once it finished STOP or LENGTH."""

    def __init__(self, meter: UsageMeter) -> None:
        self._meter = meter
        self._deltas: list[StoredDelta] = []
        self.answer: StoredAnswer | None = None

    async def record(self, events: AsyncIterator[ChatDelta | ChatEnd]) -> AsyncIterator[ChatDelta | ChatEnd]:
        """`events`, passed through; closed when this is (the generation's streams are cut at once)."""
        try:
            async for event in events:
                if isinstance(event, ChatDelta):
                    self._deltas.append(StoredDelta(event.text, tuple(event.logprobs), self._meter.completion_tokens))
                elif event.finish_reason in COMPLETE:
                    self.answer = StoredAnswer(tuple(self._deltas), event.finish_reason, event.usage,
                                               tuple(event.logprobs))
                yield event
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()


async def replay(answer: StoredAnswer, meter: UsageMeter, cancel: asyncio.Event) -> AsyncIterator[ChatDelta | ChatEnd]:
    """The stored answer's events, in its chunks, its usage marked `cached_response`; `meter` fed as a generation
    feeds it (the reservation is settled with the usage the answer reports). `cancel` cuts it short as it would
    cut the model: FINISH_REASON_CANCELLED, charged the tokens replayed so far."""
    usage = generation_pb2.Usage()
    usage.CopyFrom(answer.usage)
    usage.cached_response = True
    meter.started(usage.prompt_tokens)
    for delta in answer.deltas:
        if cancel.is_set():
            cut = generation_pb2.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=meter.completion_tokens,
                                       total_tokens=usage.prompt_tokens + meter.completion_tokens,
                                       cached_prompt_tokens=usage.cached_prompt_tokens, cached_response=True)
            meter.finished(cut, cancelled=True)
            yield ChatEnd(generation_pb2.FINISH_REASON_CANCELLED, cut)
            return
        meter.received(max(0, min(delta.tokens, usage.completion_tokens) - meter.completion_tokens))
        yield ChatDelta(delta.text, list(delta.logprobs))
    meter.finished(usage, cancelled=False)
    yield ChatEnd(answer.finish_reason, usage, list(answer.end_logprobs))


# ---- stores -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheLimits:
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_bytes: int = DEFAULT_MAX_MB << 20
    ttl_s: float = DEFAULT_TTL_S

    @property
    def max_entry_bytes(self) -> int:
        """An answer larger than this is not kept: one entry never takes more than an eighth of the memory."""
        return self.max_bytes // 8


class MemoryStore:
    """Key -> encoded answer, least recently used dropped first to stay within the entries and bytes, each entry
    forgotten `ttl_s` after it was stored."""

    def __init__(self, limits: CacheLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> bool:
        """Keeps `value` (False: it is larger than an entry may be)."""
        if len(value) > self.limits.max_entry_bytes or self.limits.max_entries <= 0:
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + self.limits.ttl_s, value)
        self.bytes += len(value)
        while len(self._entries) > self.limits.max_entries or self.bytes > self.limits.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.bytes -= len(value)


class RedisStore:
    """Entries in a Redis shared by several gateways, under `prefix`, each with the TTL. Every operation is bounded
    by `timeout_s`; one that fails or times out is a miss (or a store not made), and Redis is then skipped for
    REDIS_BACKOFF_S, so a Redis that is down or slow costs one timeout per few seconds, never a failed chat."""

    def __init__(self, url: str, *, prefix: str = "lmesh:", timeout_s: float = DEFAULT_REDIS_TIMEOUT_MS / 1000,
                 ttl_s: float = DEFAULT_TTL_S) -> None:
        import redis.asyncio as aioredis

        self.prefix = f"{prefix}response-cache:"
        self._timeout_s = timeout_s
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._skip_until = 0.0
        pool = aioredis.BlockingConnectionPool.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, max_connections=32, timeout=timeout_s)
        self._redis: Any = aioredis.Redis(connection_pool=pool)

    async def get(self, key: str) -> bytes | None:
        value = await self._run("get", lambda: self._redis.get(self.prefix + key))
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes) -> None:
        await self._run("set", lambda: self._redis.set(self.prefix + key, value, px=self._ttl_ms))

    async def _run(self, what: str, work: Callable[[], Any]) -> Any:
        from redis.exceptions import RedisError

        if time.monotonic() < self._skip_until:
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                return await work()
        except (RedisError, OSError, TimeoutError) as exc:
            self._skip_until = time.monotonic() + REDIS_BACKOFF_S
            log.warning("response cache: Redis %s failed (%s); Redis is skipped for %gs", what,
                        type(exc).__name__ if isinstance(exc, TimeoutError) else exc, REDIS_BACKOFF_S)
            return None

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)


# ---- the cache ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What one request does with the cache: `key` None when it neither reads nor writes it."""

    key: str | None
    read: bool
    write: bool

    @property
    def result_if_missed(self) -> Result:
        return "miss" if self.read else "bypass"


BYPASS = Plan(None, False, False)


@dataclass
class ResponseCache:
    """The gateway's response cache: memory, plus a shared Redis when given; `enabled` False makes every request a
    bypass."""

    limits: CacheLimits = field(default_factory=CacheLimits)
    shared: RedisStore | None = None
    enabled: bool = True
    meter: Meter | None = None

    def __post_init__(self) -> None:
        self.memory = MemoryStore(self.limits)
        self._storing: set[asyncio.Task[None]] = set()
        self._lookups = None
        if self.meter is not None:
            self._lookups = self.meter.create_counter(
                "lmesh.gateway.response_cache.lookups", unit="{request}",
                description="Chats by what the response cache did (lmesh.response_cache: hit, miss, or bypass: "
                            "opted out or not deterministic)")
            self.meter.create_observable_gauge("lmesh.gateway.response_cache.entries", [self._observe(len)],
                                               unit="{entry}", description="answers in this gateway's memory")
            self.meter.create_observable_gauge("lmesh.gateway.response_cache.bytes",
                                               [self._observe(lambda m: m.bytes)], unit="By",
                                               description="memory held by this gateway's cached answers")

    @classmethod
    def off(cls) -> ResponseCache:
        return cls(enabled=False)

    def _observe(self, read: Callable[[MemoryStore], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(read(self.memory))

        return observe

    def plan(self, params: ChatParams, tenant: str, model_id: str, prompt: Sequence[int]) -> Plan:
        read, write = params.cache_read, params.cache_store
        if not self.enabled or not (read or write) or not deterministic(params):
            return BYPASS
        return Plan(response_key(tenant, model_id, prompt, params), read, write)

    async def lookup(self, plan: Plan) -> StoredAnswer | None:
        """The stored answer for the plan's key, from memory, else from Redis (then kept in memory too)."""
        if plan.key is None or not plan.read:
            return None
        data = self.memory.get(plan.key)
        if data is None and self.shared is not None:
            data = await self.shared.get(plan.key)
            if data is not None:
                self.memory.put(plan.key, data)
        if data is None:
            return None
        try:
            return StoredAnswer.decode(data)
        except ValueError as exc:
            log.warning("response cache: dropped an entry that does not decode (%s)", exc)
            return None

    def count(self, result: Result, model_id: str) -> None:
        if self._lookups is not None:
            self._lookups.add(1, {"lmesh.response_cache": result, "gen_ai.response.model": model_id})

    def store(self, plan: Plan, answer: StoredAnswer) -> None:
        """Keeps a complete answer: in memory now, in Redis in a task of its own (the chat does not wait for it)."""
        if plan.key is None or not plan.write or answer.finish_reason not in COMPLETE:
            return
        data = answer.encode()
        if not self.memory.put(plan.key, data) or self.shared is None:
            return
        task = asyncio.get_running_loop().create_task(self.shared.put(plan.key, data))
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)

    async def close(self) -> None:
        """At the gateway's stop: the stores still going out to Redis, then its connections."""
        if self._storing:
            await asyncio.wait(set(self._storing), timeout=1.0)
        if self.shared is not None:
            with contextlib.suppress(Exception):
                await self.shared.close()


def cache_control(header: str) -> tuple[bool, bool]:
    """(read, store) from an HTTP `Cache-Control` request header: `no-cache` does not read the cache (the answer
    may still be stored), `no-store` does not store it."""
    directives = {part.strip().split("=", 1)[0].lower() for part in header.split(",")}
    return "no-cache" not in directives, "no-store" not in directives
