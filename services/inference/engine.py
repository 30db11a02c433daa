"""The generation engine: continuous batching over one ONNX decoder.

One asyncio task drives the model. Every step it admits waiting sequences (prefill, one run each), then
runs ONE decode for all active sequences together. The batch's KV cache stays in batch layout between
steps while the membership is unchanged (no copying); when a sequence joins or leaves, rows are re-packed
left-padded to the longest past. A cancelled, finished or expired sequence leaves before the next step
and its cache is freed with it. The model runs in a worker thread so the event loop keeps streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from services.common.errors import DeadlineExceeded, LmeshError, ResourceExhausted, Unavailable
from services.inference.onnx_model import KV, OnnxDecoder
from services.inference.prefix_cache import PrefixCache
from services.inference.sampling import Sampled, Sampler, SamplingConfig, greedy_rows

log = logging.getLogger("lmesh.inference.engine")


class Finish(Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    stop_ids: frozenset[int] = frozenset()
    top_logprobs: int = 0
    request_id: str = ""
    # Absolute time.monotonic() deadline, or None.
    deadline: float | None = None


@dataclass
class TokenEvent:
    sampled: Sampled


@dataclass
class FinishEvent:
    reason: Finish
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass
class ErrorEvent:
    error: LmeshError


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclass(eq=False)
class Sequence:
    """One generation's state; lives in the engine until finished, cancelled or expired."""

    id: int
    request: GenerationRequest
    sampler: Sampler
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    kv: list[np.ndarray] | None = None  # own cache until it joins the batch
    past_len: int = 0
    prefilled: int = 0  # prompt tokens whose KV is computed (reused from the prefix cache or run)
    cached_tokens: int = 0  # of those, reused from the prefix cache
    last_token: int = -1
    generated: int = 0
    cancelled: bool = False
    done: bool = False
    tokens_at_cancel: int | None = None
    first_token_ns: int = 0
    # Timestamps (time.time_ns) for the prefill and decode spans the servicer records.
    enqueued_ns: int = field(default_factory=time.time_ns)
    prefill_start_ns: int = 0
    prefill_end_ns: int = 0
    finish_ns: int = 0

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.request.prompt_ids)

    @property
    def tokens_after_cancel(self) -> int:
        return 0 if self.tokens_at_cancel is None else self.generated - self.tokens_at_cancel

    def expired(self, now: float) -> bool:
        return self.request.deadline is not None and now > self.request.deadline


@dataclass(frozen=True)
class EngineLimits:
    max_active: int = 16
    max_queue: int = 64
    # Prompt tokens prefilled per step, so a long prompt cannot freeze the streams already decoding.
    prefill_chunk: int = 256
    # Bytes of prompt KV kept for prefix reuse (0 turns it off).
    prefix_cache_bytes: int = 256 * 1024 * 1024


@dataclass
class _Batch:
    """The active sequences in the order of the batch's rows, and their packed KV cache."""

    seqs: list[Sequence] = field(default_factory=list)
    kv: list[np.ndarray] = field(default_factory=list)
    width: int = 0  # past length of the packed cache (the longest row)


class Engine:
    """Continuous-batching generation over one model version."""

    def __init__(self, model: OnnxDecoder, eos_ids: frozenset[int], context_length: int,
                 limits: EngineLimits = EngineLimits()) -> None:
        self.model = model
        self.eos_ids = eos_ids
        self.context_length = context_length
        self.limits = limits
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._batch = _Batch()
        self.prefix_cache = PrefixCache(limits.prefix_cache_bytes)
        self._wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._accepting = True
        self.steps = 0
        # Called when the number of active or queued sequences changes (load reporting).
        self.on_load_change: Callable[[], None] = lambda: None

    # ---- public API -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="engine")

    async def close(self) -> None:
        self._accepting = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def stop_accepting(self) -> None:
        self._accepting = False

    def submit(self, request: GenerationRequest) -> Sequence:
        """Queues a generation; RESOURCE_EXHAUSTED at once when the queue is full."""
        if not self._accepting:
            raise Unavailable("this inference replica is draining; retry on another")
        if len(self._waiting) >= self.limits.max_queue:
            raise ResourceExhausted(
                f"inference queue is full ({self.limits.max_queue} waiting, {len(self._active)} active)",
                retry_after_s=1.0,
            )
        seq = Sequence(id=next(self._ids), request=request,
                       sampler=Sampler(request.sampling, request.prompt_ids, request.top_logprobs))
        self._waiting.append(seq)
        self._wake.set()
        self.on_load_change()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Marks a sequence cancelled; it leaves before the next step."""
        if not seq.cancelled and not seq.done:
            seq.cancelled = True
            seq.tokens_at_cancel = seq.generated
            self._wake.set()

    def load(self) -> dict[str, int]:
        kv_tokens = sum(s.past_len for s in self._active)
        return {
            "active": len(self._active),
            "queued": len(self._waiting),
            "kv_bytes": kv_tokens * self.model.kv_bytes_per_token(),
            "prefix_cache_bytes": self.prefix_cache.bytes_used,
        }

    # ---- the loop ---------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._retire(time.monotonic())
            if not self._active and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._admit()
            prefilling = [s for s in self._active if s.prefilling]
            decoding = [s for s in self._active if not s.prefilling]
            try:
                results = await asyncio.to_thread(self._step, prefilling, decoding)
            except Exception:
                log.exception("engine step failed")
                for seq in list(self._active):
                    self._finish_error(seq, Unavailable("the inference step failed; retry"))
                self._batch = _Batch()
                continue
            self.steps += 1
            for seq, sampled in results:
                self._emit(seq, sampled)

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.limits.max_active:
            self._active.append(self._waiting.popleft())

    def _retire(self, now: float) -> None:
        """Ends cancelled and expired sequences, waiting or active, before the next step."""
        for seq in list(self._waiting):
            if seq.cancelled:
                self._waiting.remove(seq)
                self._finish(seq, Finish.CANCELLED)
            elif seq.expired(now):
                self._waiting.remove(seq)
                self._finish_error(seq, DeadlineExceeded("deadline exceeded while queued"))
        for seq in list(self._active):
            if seq.cancelled:
                self._finish(seq, Finish.CANCELLED)
            elif seq.expired(now):
                self._finish_error(seq, DeadlineExceeded("deadline exceeded while generating"))

    def _emit(self, seq: Sequence, sampled: Sampled) -> None:
        if seq.done:
            return
        seq.generated += 1
        if seq.cancelled:
            return  # produced by the step in flight when the cancel came; counted, not sent
        request = seq.request
        if sampled.token_id in self.eos_ids or sampled.token_id in request.stop_ids:
            self._finish(seq, Finish.STOP)
            return
        if seq.generated == 1:
            seq.first_token_ns = time.time_ns()
        seq.events.put_nowait(TokenEvent(sampled))
        seq.last_token = sampled.token_id
        if seq.generated >= request.max_tokens or seq.past_len + 1 > self.context_length:
            self._finish(seq, Finish.LENGTH)

    def _remove(self, seq: Sequence) -> None:
        seq.done = True
        seq.finish_ns = time.time_ns()
        seq.kv = None
        if seq in self._active:
            self._active.remove(seq)
        self.on_load_change()

    def _finish(self, seq: Sequence, reason: Finish) -> None:
        if seq.done:
            return
        self._remove(seq)
        completion = seq.generated if reason != Finish.STOP else seq.generated - 1
        if reason == Finish.CANCELLED:
            completion = min(seq.generated, seq.tokens_at_cancel or 0)
        seq.events.put_nowait(FinishEvent(reason, len(seq.request.prompt_ids), completion, seq.cached_tokens))

    def _finish_error(self, seq: Sequence, error: LmeshError) -> None:
        if seq.done:
            return
        self._remove(seq)
        seq.events.put_nowait(ErrorEvent(error))

    # ---- model work (worker thread) ---------------------------------------------------------------------

    def _step(self, prefilling: list[Sequence], decoding: list[Sequence]) -> list[tuple[Sequence, Sampled]]:
        """One engine step: prompt chunks within the step's token budget (one run), then one decode run."""
        results: list[tuple[Sequence, Sampled]] = []
        work: list[tuple[Sequence, int, int]] = []
        budget = self.limits.prefill_chunk
        for seq in prefilling:
            if budget <= 0:
                break
            if seq.cancelled:
                continue
            if seq.prefilled == 0:
                self._reuse_prefix(seq)
            start = seq.prefilled
            end = min(len(seq.request.prompt_ids), start + budget)
            work.append((seq, start, end))
            budget -= end - start
        if work:
            for (seq, _, end), (logits, kv) in zip(work, self._prefill(work), strict=True):
                seq.kv = kv
                seq.prefilled = seq.past_len = end
                if not seq.prefilling:
                    seq.prefill_end_ns = time.time_ns()
                    if self.prefix_cache.max_bytes > 0:
                        self.prefix_cache.insert(seq.request.prompt_ids, [self.model.to_numpy(t) for t in kv])
                    results.append((seq, seq.sampler.sample(logits)))
        decoding = [s for s in decoding if not s.cancelled]
        if decoding:
            results.extend(zip(decoding, self._decode(decoding), strict=True))
        return results

    def _reuse_prefix(self, seq: Sequence) -> None:
        seq.prefill_start_ns = time.time_ns()
        cached, kv = self.prefix_cache.lookup(seq.request.prompt_ids)
        if kv is not None:
            seq.kv, seq.prefilled, seq.cached_tokens = kv, cached, cached

    def _prefill(self, work: list[tuple[Sequence, int, int]]) -> list[tuple[np.ndarray, list[KV]]]:
        """Runs prompt chunks [start, end) of several sequences in one run; returns last logits and KV per row.

        Each row is laid out [past padding | past | chunk padding | chunk]: padding is masked out, positions
        are per row, and the chunk's last token sits in the last column for every row.
        """
        if len(work) == 1:
            seq, start, end = work[0]
            ids = np.asarray([seq.request.prompt_ids[start:end]], dtype=np.int64)
            out = self.model.run(ids, np.ones((1, end), dtype=np.int64),
                                 np.arange(start, end, dtype=np.int64)[None, :],
                                 seq.kv if seq.kv is not None else self.model.empty_past())
            return [(out.logits[0], out.presents)]
        rows = len(work)
        past = max(start for _, start, _ in work)
        width = max(end - start for _, start, end in work)
        ids = np.zeros((rows, width), dtype=np.int64)
        positions = np.zeros((rows, width), dtype=np.int64)
        mask = np.zeros((rows, past + width), dtype=np.int64)
        shape = (rows, self.model.num_kv_heads, past, self.model.head_dim)
        packed = [np.zeros(shape, dtype=self.model.kv_dtype) for _ in range(2 * self.model.num_layers)]
        for row, (seq, start, end) in enumerate(work):
            length = end - start
            ids[row, width - length:] = seq.request.prompt_ids[start:end]
            positions[row, width - length:] = np.arange(start, end)
            mask[row, past - start:past] = 1
            mask[row, past + width - length:] = 1
            if start:
                assert seq.kv is not None
                for layer, tensor in enumerate(seq.kv):
                    packed[layer][row, :, past - start:, :] = self.model.to_numpy(tensor)[0]
        out = self.model.run(ids, mask, positions, packed)
        presents = [self.model.to_numpy(t) for t in out.presents]
        results: list[tuple[np.ndarray, list[KV]]] = []
        for row in range(rows):
            keep = np.flatnonzero(mask[row])
            results.append((out.logits[row], [np.ascontiguousarray(p[row:row + 1, :, keep, :]) for p in presents]))
        return results

    def _decode(self, seqs: list[Sequence]) -> list[Sampled]:
        batch = self._batch
        if batch.seqs != seqs:
            batch = self._batch = self._repack(seqs)
        rows = len(seqs)
        width = batch.width
        mask = np.zeros((rows, width + 1), dtype=np.int64)
        for row, seq in enumerate(seqs):
            mask[row, width - seq.past_len:] = 1
        input_ids = np.asarray([[s.last_token] for s in seqs], dtype=np.int64)
        positions = np.asarray([[s.past_len] for s in seqs], dtype=np.int64)
        out = self.model.run(input_ids, mask, positions, batch.kv)
        batch.kv = out.presents
        batch.width = width + 1
        for seq in seqs:
            seq.past_len += 1
        fast = [row for row, seq in enumerate(seqs) if seq.sampler.plain_greedy]
        sampled: list[Sampled | None] = [None] * rows
        if fast:
            for row, result in zip(fast, greedy_rows(out.logits[fast]), strict=True):
                sampled[row] = result
        for row, seq in enumerate(seqs):
            if sampled[row] is None:
                sampled[row] = seq.sampler.sample(out.logits[row])
        return [s for s in sampled if s is not None]

    def _repack(self, seqs: list[Sequence]) -> _Batch:
        """Packs the rows' caches left-padded into one batch cache (only when membership changed)."""
        old = self._batch
        old_rows = {id(s): row for row, s in enumerate(old.seqs)}
        old_kv = [self.model.to_numpy(t) for t in old.kv] if any(id(s) in old_rows for s in seqs) else []
        caches: list[list[np.ndarray]] = []
        for seq in seqs:
            row = old_rows.get(id(seq))
            if row is not None:
                start = old.width - seq.past_len
                caches.append([layer[row:row + 1, :, start:, :] for layer in old_kv])
            else:
                assert seq.kv is not None, "a sequence joins the batch right after its prefill"
                caches.append(seq.kv)
                seq.kv = None
        width = max(s.past_len for s in seqs)
        if len(seqs) == 1:
            only = caches[0]
            kv = [t if not isinstance(t, np.ndarray) else np.ascontiguousarray(t) for t in only]
            return _Batch(seqs=list(seqs), kv=kv, width=width)
        packed: list[np.ndarray] = []
        shape = (len(seqs), self.model.num_kv_heads, width, self.model.head_dim)
        for layer in range(len(caches[0])):
            buffer = np.zeros(shape, dtype=self.model.kv_dtype)
            for row, (seq, cache) in enumerate(zip(seqs, caches, strict=True)):
                buffer[row, :, width - seq.past_len:, :] = self.model.to_numpy(cache[layer])[0]
            packed.append(buffer)
        return _Batch(seqs=list(seqs), kv=packed, width=width)
