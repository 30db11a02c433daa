"""The generation engine: continuous batching over one ONNX decoder.

One asyncio task drives the model. Every step it admits waiting sequences and prefills their prompts within a token
budget (new prompts together in one run, continued chunks one run each), then runs ONE decode for all decoding
sequences together. Each decoding sequence owns a row of the decode KV buffers and every step appends to them in
place (services.inference.onnx_model: SlotCache, DeviceSlotCache on CUDA); a sequence joining copies its prompt
cache into a row once, one leaving hands its row to the last row. A cancelled, finished or expired sequence leaves
before the next step. The model runs in one dedicated thread so the event loop keeps streaming; while the batch
stays the same that thread chains decode runs and hands each run's tokens to the loop as they come, so the loop's
round trip stays off the path between runs.

A seeded request's prompt is computed the same way every time, so that the same seed and input give the same
tokens bit for bit whatever else runs and whatever the prefix cache holds: in pieces at fixed positions, and from
the prefix cache only whole pieces that a seeded request computed that way (exact blocks). ONNX Runtime's kernels
round differently for a chunk whose bounds depend on the step's budget, for a prefix computed by other runs and for
a last prompt token run in a decode step (by about 5e-5 on SmolLM2's logits), and a seeded draw can follow a
difference in the last bit. Sharing a right-padded run with other new prompts, and decoding among other rows, change
nothing (measured bit for bit, on the CPU and on an H100).

A constrained sequence (an output constraint: JSON Schema, Lark grammar, regex; services.inference.constrained)
decodes in the same batch as the others. Its matcher consumes each token as soon as it is sampled; the next step's
mask of every constrained row is computed in a thread of its own while the model runs that step, then the row is
sampled from its masked logits (the free rows keep their vectorized greedy path). The token that completes a
constraint is sent and the sequence ends with STOP right after it; the run-ahead stops there like at an end-of-turn.

Priority (0-9, higher first) orders only the wait for a decode place: the waiting queue admits the highest priority
first, first come first served within a priority, and a full queue sheds its lowest priority (the newest of those)
for a request of a higher one. Once admitted, a sequence is scheduled like every other: the prefill scheduler's
"oldest prompt in progress" is the earliest admitted, and nothing admitted is ever preempted, so a prompt in
progress always finishes its prefill in bounded steps whatever arrives later.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from services.common.errors import DeadlineExceeded, Limit, LmeshError, Reason, ResourceExhausted, Unavailable
from services.inference.constrained import CompiledConstraint, ConstraintState, RowMasks
from services.inference.onnx_model import OnnxDecoder
from services.inference.prefix_cache import PrefixCache
from services.inference.sampling import Sampled, Sampler, SamplingConfig, greedy_rows

log = logging.getLogger("lmesh.inference.engine")


# A request's priority: higher is admitted first; 0, the default, is the lowest.
MIN_PRIORITY = 0
MAX_PRIORITY = 9


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
    # MIN_PRIORITY..MAX_PRIORITY (validated by the servicer): the order of admission, and of shedding, from the queue.
    priority: int = MIN_PRIORITY
    # What the output must match (compiled by the servicer), or None for free text.
    constraint: CompiledConstraint | None = None


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
    kv: list[np.ndarray] | None = None  # its prompt cache until it joins the decode rows
    # A seeded request: its prompt in pieces at fixed positions, from the prefix cache only exact blocks (see the
    # module's docstring).
    reproducible: bool = False
    # A constrained sequence's matcher (model thread), and the count of sampled tokens after which its constraint
    # was complete (0: not yet): the token that completed it is sent, then the sequence ends with STOP.
    constraint: ConstraintState | None = None
    constraint_end: int = 0
    past_len: int = 0
    prefilled: int = 0  # prompt tokens whose KV is computed (reused from the prefix cache or run)
    cached_tokens: int = 0  # of those, reused from the prefix cache
    last_token: int = -1  # the newest sampled token (set by the model thread: the next decode's input)
    sampled: int = 0  # tokens sampled by the model thread; `generated` counts those the loop has emitted
    generated: int = 0
    # The tokens the caller is billed for, set when the sequence ends: `generated` less the end-of-turn token
    # and anything emitted after a cancel (what its usage reports, and so its spans).
    completion_tokens: int = 0
    cancelled: bool = False
    done: bool = False
    # Every sampled token, in order (model thread). A sequence that ended without an error keeps its whole KV
    # (prompt and answer) for prefix reuse when it leaves the decode rows: a conversation's next turn starts with
    # it. Cancelled ones too: the gateway ends an answer at a stop string by cancelling it.
    output_ids: list[int] = field(default_factory=list)
    reusable: bool = False
    tokens_at_cancel: int | None = None  # tokens emitted when the cancel came (what the caller got)
    sampled_at_cancel: int = 0  # tokens the model thread had sampled by then
    first_token_ns: int = 0
    # When the newest token was emitted, and the gaps (ns) between emitted tokens after the first, not yet taken
    # by the metrics (a list append per token; the histogram is fed in batches).
    last_token_ns: int = 0
    token_gaps_ns: list[int] = field(default_factory=list)
    # The error the sequence ended with, if it did.
    error: LmeshError | None = None
    # Timestamps (time.time_ns) for the prefill and decode spans the servicer records.
    enqueued_ns: int = field(default_factory=time.time_ns)
    prefill_start_ns: int = 0
    prefill_end_ns: int = 0
    finish_ns: int = 0

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.request.prompt_ids)

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def tokens_after_cancel(self) -> int:
        """Tokens the model produced after the cancel came (at most the one whose step was in flight)."""
        return 0 if self.tokens_at_cancel is None else self.sampled - self.sampled_at_cancel

    def expired(self, now: float) -> bool:
        return self.request.deadline is not None and now > self.request.deadline


class WaitingQueue:
    """Sequences waiting for a decode place: highest priority first, first come first served within a priority (a
    heap on (-priority, arrival); a sequence's id counts arrivals). Its size is bounded by the engine's limits
    (max_queue + max_active), so the rarer operations (finding the lowest, taking some out) scan it."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Sequence]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Sequence]:
        """In the order of admission."""
        return (entry[2] for entry in sorted(self._heap, key=lambda e: e[:2]))

    def push(self, seq: Sequence) -> None:
        heapq.heappush(self._heap, (-seq.priority, seq.id, seq))

    def pop(self) -> Sequence:
        """The next to admit: the highest priority, the oldest of those."""
        return heapq.heappop(self._heap)[2]

    def lowest(self) -> Sequence | None:
        """The one to shed first: the lowest priority, the newest of those (the last to be admitted)."""
        return max(self._heap, key=lambda e: e[:2])[2] if self._heap else None

    def take(self, predicate: Callable[[Sequence], bool]) -> list[Sequence]:
        """Removes and returns (in the order of admission) the sequences `predicate` picks."""
        kept: list[tuple[int, int, Sequence]] = []
        taken: list[tuple[int, int, Sequence]] = []
        for entry in self._heap:
            (taken if predicate(entry[2]) else kept).append(entry)
        if taken:
            heapq.heapify(kept)
            self._heap = kept
        return [entry[2] for entry in sorted(taken, key=lambda e: e[:2])]


# A sampled token: its sequence, the token, and the sequence's cache length when it was sampled.
Produced = tuple["Sequence", Sampled, int]
# Decode runs the model thread may chain while the batch stays the same, before the loop takes a turn.
RUN_AHEAD_STEPS = 16
# The QuotaFailure `quota_id` of a full queue (stable: clients may match it).
QUEUE_LIMIT = "inference.queue"
# The retry delay of a request the full queue refuses or sheds: about when a place frees up on a busy replica.
QUEUE_RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class EngineLimits:
    max_active: int = 16
    max_queue: int = 64
    # Prompt tokens prefilled per step, so a long prompt cannot freeze the streams already decoding.
    prefill_chunk: int = 256
    # Bytes of prompt KV kept for prefix reuse (0 turns it off).
    prefix_cache_bytes: int = 256 * 1024 * 1024


def _padding_groups(fresh: list[tuple[Sequence, int, int]]) -> list[list[tuple[Sequence, int, int]]]:
    """Prompt chunks [0, end), sorted by end, cut into runs whose padded size stays within 1.5x their tokens."""
    groups: list[list[tuple[Sequence, int, int]]] = []
    for chunk in fresh:
        if groups:
            candidate = [*groups[-1], chunk]
            if chunk[2] * len(candidate) <= 1.5 * sum(end for _, _, end in candidate):
                groups[-1] = candidate
                continue
        groups.append([chunk])
    return groups


class Engine:
    """Continuous-batching generation over one model version."""

    def __init__(self, model: OnnxDecoder, eos_ids: frozenset[int], context_length: int,
                 limits: EngineLimits = EngineLimits(), model_id: str = "") -> None:
        self.model = model
        self.model_id = model_id  # `name:version`, for the errors a caller sees
        self.eos_ids = eos_ids
        self.context_length = context_length
        self.limits = limits
        self._waiting = WaitingQueue()
        self._active: list[Sequence] = []
        # Decoding sequences in the order of their rows in the decode KV buffers.
        self._rows: list[Sequence] = []
        self._slots = model.slot_cache(limits.max_active, context_length)
        self.prefix_cache = PrefixCache(limits.prefix_cache_bytes)
        self._wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        # One dedicated thread runs every model step: ONNX Runtime's calling thread stays the same (and is named
        # in thread dumps) instead of hopping between the loop's default executor threads.
        self._model_thread: ThreadPoolExecutor | None = None
        # Constrained rows' masks: computed by llguidance in this thread while the model thread runs the model.
        self._mask_thread: ThreadPoolExecutor | None = None
        self._masks = RowMasks(model.vocab_size, eos_ids)
        # False computes them in the model thread before the run instead (bench.constrained compares the two).
        self.overlap_masks = True
        self._accepting = True
        self.steps = 0
        # Called when the number of active or queued sequences changes (load reporting).
        self.on_load_change: Callable[[], None] = lambda: None
        self._aborted: LmeshError | None = None
        # Sequences shed from the full queue for a request of a higher priority, by their own priority (metrics).
        self.shed: dict[int, int] = {}
        # A seeded request's prompt runs in pieces of this many tokens, at multiples of it (at most half a step's
        # budget: the oldest prompt in progress always gets a whole piece).
        self._piece = max(1, limits.prefill_chunk // 2)

    # ---- public API -------------------------------------------------------------------------------------

    def warm(self) -> None:
        """One decode run through the engine's own KV cache (before `start`), so that the first request does not pay
        ONNX Runtime's first run at that cache's shapes (70-90 ms on CUDA, whose cache has one shape)."""
        model, slots = self.model, self._slots
        kv = [np.zeros((1, model.num_kv_heads, 1, model.head_dim), dtype=model.kv_dtype) for _ in model.past_names]
        slots.reserve(1, 2)
        slots.put(0, kv, 1)
        model.decode(np.zeros((1, 1), dtype=np.int64), np.ones(1, dtype=np.int64), slots)
        slots.clear()

    def start(self) -> None:
        if self._task is None:
            self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmesh-engine")
            self._mask_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmesh-masks")
            self._task = asyncio.create_task(self._run(self._model_thread), name="engine")

    async def close(self) -> None:
        self._accepting = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._model_thread is not None:
            self._model_thread.shutdown(wait=False)  # a step in flight finishes on its own; nothing waits for it
            self._model_thread = None
        if self._mask_thread is not None:
            self._mask_thread.shutdown(wait=False)
            self._mask_thread = None

    def stop_accepting(self) -> None:
        self._accepting = False

    def abort(self, error: LmeshError) -> None:
        """Ends every sequence, waiting or active, with `error` at the next step boundary (a drain's grace is
        running out: the callers learn why, rather than see their calls cut)."""
        self._accepting = False
        self._aborted = error
        self._wake.set()

    def submit(self, request: GenerationRequest) -> Sequence:
        """Queues a generation by its priority; RESOURCE_EXHAUSTED (QUEUE_FULL) at once when the queue is full of
        sequences of at least its priority.

        Free decode slots count as room too: a burst arriving during a step waits for the next step boundary to
        be admitted, so up to max_active + max_queue sequences are held, as the limits promise.

        When the queue is full, a cancelled or expired waiting sequence gives its place up first; then a request of
        a higher priority than the lowest waiting one takes that one's place: the lowest priority's newest waiting
        sequence ends with RESOURCE_EXHAUSTED (SHED, with the same retry delay as a refusal). Sequences already
        admitted (prefilling or decoding) are never preempted.
        """
        if not self._accepting:
            raise Unavailable("this inference replica is draining; retry on another", reason=Reason.DRAINING)
        if self._queue_full():
            self._retire_waiting(time.monotonic())
        if self._queue_full():
            victim = self._waiting.lowest()
            if victim is None or victim.priority >= request.priority:
                below = f", none below priority {request.priority}" if request.priority > MIN_PRIORITY else ""
                raise self._queue_error(f"inference queue is full ({len(self._waiting)} waiting, "
                                        f"{len(self._active)} active{below})", Reason.QUEUE_FULL)
            self._waiting.take(lambda s: s is victim)
            self.shed[victim.priority] = self.shed.get(victim.priority, 0) + 1
            self._finish_error(victim, self._queue_error(
                f"shed from the full inference queue for a request of a higher priority ({request.priority} > "
                f"{victim.priority}); retry later", Reason.SHED))
        seq = Sequence(id=next(self._ids), request=request,
                       sampler=Sampler(request.sampling, request.prompt_ids, request.top_logprobs),
                       reproducible=request.sampling.seed != 0,
                       constraint=request.constraint.start() if request.constraint is not None else None)
        self._waiting.push(seq)
        self._wake.set()
        self.on_load_change()
        return seq

    def _queue_full(self) -> bool:
        free_slots = max(0, self.limits.max_active - len(self._active))
        return len(self._waiting) >= self.limits.max_queue + free_slots

    def _queue_error(self, message: str, reason: Reason) -> ResourceExhausted:
        return ResourceExhausted(message, retry_after_s=QUEUE_RETRY_AFTER_S, reason=reason,
                                 limit=Limit(QUEUE_LIMIT, subject=f"model:{self.model_id}" if self.model_id else "",
                                             value=self.limits.max_queue))

    def cancel(self, seq: Sequence) -> None:
        """Marks a sequence cancelled; it leaves before the next step."""
        if not seq.cancelled and not seq.done:
            seq.cancelled = True
            seq.tokens_at_cancel = seq.generated
            seq.sampled_at_cancel = seq.sampled
            self._wake.set()

    def load(self) -> dict[str, int]:
        # What the active sequences' KV holds (the decode buffers' memory is committed only where written).
        held = sum(s.past_len for s in self._active) * self.model.kv_bytes_per_token()
        return {
            "active": len(self._active),
            "queued": len(self._waiting),
            "kv_bytes": held,
            "prefix_cache_bytes": self.prefix_cache.bytes_used,
        }

    # ---- the loop ---------------------------------------------------------------------------------------

    async def _run(self, model_thread: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()

        def deliver(batch: list[Produced]) -> None:  # called from the model thread
            loop.call_soon_threadsafe(self._deliver, batch)

        while True:
            self._retire(time.monotonic())
            if not self._active and not self._waiting:
                self._release_rows()
                self._wake.clear()
                await self._wake.wait()
                continue
            self._admit()
            prefilling = [s for s in self._active if s.prefilling]
            decoding = [s for s in self._active if not s.prefilling]
            try:
                results = await loop.run_in_executor(model_thread, self._step, prefilling, decoding, deliver)
            except Exception:
                log.exception("engine step failed")
                for seq in list(self._active):
                    self._finish_error(seq, Unavailable("the inference step failed; retry"))
                self._release_rows(keep=False)  # the rows' KV may be half-written
                continue
            self._deliver(results)
            self.on_load_change()  # the active sequences' KV grew by this step's tokens

    def _deliver(self, results: list[Produced]) -> None:
        for seq, sampled, past_len in results:
            self._emit(seq, sampled, past_len)

    def _release_rows(self, keep: bool = True) -> None:
        """Empties the decode rows (nothing runs: the batch is idle or its step failed)."""
        for row, seq in enumerate(self._rows if keep else ()):
            self._keep_for_reuse(seq, row)
        self._rows = []
        self._slots.clear()

    def _keep_for_reuse(self, seq: Sequence, row: int) -> None:
        """Puts a leaving sequence's KV (its prompt and the answer tokens fed so far) into the prefix cache, when
        it ended without an error: a conversation's next turn repeats both. Called before its row is overwritten."""
        if not seq.reusable or self.prefix_cache.max_bytes <= 0:
            return
        prompt = seq.request.prompt_ids
        tokens = [*prompt, *seq.output_ids[: seq.past_len - len(prompt)]]
        self.prefix_cache.insert(tokens, self._slots.row(row, seq.past_len))

    def _admit(self) -> None:
        """Fills the free decode places from the queue, highest priority first. `_active` keeps the order of
        admission: the prefill scheduler's oldest prompt in progress is the earliest admitted one."""
        while self._waiting and len(self._active) < self.limits.max_active:
            self._active.append(self._waiting.pop())

    def _retire(self, now: float) -> None:
        """Ends cancelled and expired sequences, waiting or active, before the next step (all of them once
        aborted)."""
        if self._aborted is not None:
            while self._waiting:
                self._finish_error(self._waiting.pop(), self._aborted)
            for seq in list(self._active):
                self._finish_error(seq, self._aborted)
            return
        self._retire_waiting(now)
        for seq in list(self._active):
            if seq.cancelled:
                self._finish(seq, Finish.CANCELLED)
            elif seq.expired(now):
                self._finish_error(seq, DeadlineExceeded("deadline exceeded while generating"))

    def _retire_waiting(self, now: float) -> None:
        for seq in self._waiting.take(lambda s: s.cancelled or s.expired(now)):
            if seq.cancelled:
                self._finish(seq, Finish.CANCELLED)
            else:
                self._finish_error(seq, DeadlineExceeded("deadline exceeded while queued"))

    def _emit(self, seq: Sequence, sampled: Sampled, past_len: int) -> None:
        """Sends one sampled token (past_len: the sequence's cache length when it was sampled) or finishes."""
        if seq.done:
            return
        seq.generated += 1
        if seq.cancelled:
            return  # produced by the step in flight when the cancel came; counted, not sent
        request = seq.request
        if sampled.token_id in self.eos_ids or sampled.token_id in request.stop_ids:
            self._finish(seq, Finish.STOP)
            return
        now = time.time_ns()
        if seq.generated == 1:
            seq.first_token_ns = now
        else:
            seq.token_gaps_ns.append(now - seq.last_token_ns)
        seq.last_token_ns = now
        seq.events.put_nowait(TokenEvent(sampled))
        if seq.constraint_end and seq.generated >= seq.constraint_end:
            self._finish(seq, Finish.STOP, last_token_sent=True)  # complete, even if max_tokens ends here too
        elif seq.generated >= request.max_tokens or past_len + 1 >= self.context_length:
            self._finish(seq, Finish.LENGTH)

    def _remove(self, seq: Sequence) -> None:
        seq.done = True
        seq.finish_ns = time.time_ns()
        seq.kv = None
        if seq in self._active:
            self._active.remove(seq)
        self.on_load_change()

    def _finish(self, seq: Sequence, reason: Finish, last_token_sent: bool = False) -> None:
        """Ends a sequence; a STOP's last token (end-of-turn or stop id) is not sent, nor billed, unless
        `last_token_sent` (the token that completed a constraint)."""
        if seq.done:
            return
        self._remove(seq)
        seq.reusable = True
        completion = seq.generated if reason != Finish.STOP or last_token_sent else seq.generated - 1
        if reason == Finish.CANCELLED:
            completion = min(seq.generated, seq.tokens_at_cancel or 0)
        seq.completion_tokens = completion
        seq.events.put_nowait(FinishEvent(reason, len(seq.request.prompt_ids), completion, seq.cached_tokens))

    def _finish_error(self, seq: Sequence, error: LmeshError) -> None:
        if seq.done:
            return
        self._remove(seq)
        seq.error = error
        seq.completion_tokens = seq.generated  # what the caller received before the error
        seq.events.put_nowait(ErrorEvent(error))

    # ---- model work (worker thread) ---------------------------------------------------------------------

    def _step(self, prefilling: list[Sequence], decoding: list[Sequence],
              deliver: Callable[[list[Produced]], None]) -> list[Produced]:
        """One engine step: prompt chunks within the step's token budget, then one decode run.

        While nothing would change the batch (no prompt in progress, nobody waiting, no sequence finishing,
        cancelled or expired, no abort), further decode runs follow at once, up to RUN_AHEAD_STEPS, each one's tokens
        handed to the event loop through `deliver`: the loop's round trip stays off the path between runs.
        """
        self.steps += 1
        results: list[Produced] = []
        work = [(seq, seq.prefilled, seq.prefilled + n) for seq, n in self._plan_prefill(prefilling).items()]
        # A prompt whose last token alone is left over its cache (a prefix-cache hit on a prompt sent again, or
        # a long prompt's last chunk of one token) joins this step's decode run with that token as its input,
        # instead of a run of its own: on a CPU every run streams all the weights, so that run cost about as much
        # as a whole decode step.
        joining = [seq for seq, start, end in work if start > 0 and end - start == 1
                   and end == len(seq.request.prompt_ids) and not seq.cancelled]
        for seq in joining:
            seq.past_len = len(seq.request.prompt_ids) - 1  # what its KV (seq.kv) holds
            if seq.reproducible and self.prefix_cache.max_bytes > 0 and seq.kv is not None:
                # Its whole pieces, for the next seeded request with this prefix (the last token runs in decode).
                self.prefix_cache.insert(seq.request.prompt_ids[:seq.past_len], seq.kv,
                                         self._exact_tokens(seq, seq.past_len))
            seq.prefilled = len(seq.request.prompt_ids)
            seq.last_token = seq.request.prompt_ids[-1]
            seq.prefill_end_ns = time.time_ns()
        work = [w for w in work if w[0] not in joining]
        for seq, end, logits, kv in self._prefill(work):
            seq.kv = kv
            seq.prefilled = seq.past_len = end
            if not seq.prefilling:
                seq.prefill_end_ns = time.time_ns()
                if self.prefix_cache.max_bytes > 0:
                    self.prefix_cache.insert(seq.request.prompt_ids, kv, self._exact_tokens(seq, end))
                mask = self._masks.compute([seq.constraint])[0] if seq.constraint is not None else None
                results.append(self._sampled(seq, seq.sampler.sample(logits, mask)))
        decoding = [s for s in decoding if not s.cancelled] + joining
        if not decoding:
            return results
        results.extend(self._decode(decoding))
        for _ in range(RUN_AHEAD_STEPS):
            if prefilling or not self._unchanged(results):
                break
            deliver(results)
            self.steps += 1
            results = self._decode(decoding)
        return results

    def _plan_prefill(self, prefilling: list[Sequence]) -> dict[Sequence, int]:
        """Prompt tokens to prefill this step, per sequence, within the step's budget (model thread).

        The oldest prompt in progress (the earliest admitted: priority decides only admission) always gets at least
        half the budget, so it finishes in bounded time. The rest goes to whole prompts, shortest first, so a short
        one is not queued behind long prefills (its time to first token is a step, not theirs); what is left
        continues the oldest.
        """
        live = [s for s in prefilling if not s.cancelled]
        # What the prefix cache would serve a prompt not started yet needs no prefill (counted here, copied
        # only once the prompt is scheduled: a waiting prompt holds no KV).
        cached = {seq: self.prefix_cache.usable(seq.request.prompt_ids, self._exact_piece(seq)) for seq in live
                  if not seq.prefill_start_ns}

        def remaining(seq: Sequence) -> int:
            return len(seq.request.prompt_ids) - max(seq.prefilled, cached.get(seq, 0))

        def allowed(seq: Sequence) -> int:
            """What one step may prefill: all that remains, or for a reproducible sequence its next piece."""
            if seq.reproducible:
                return min(remaining(seq), self._piece - seq.prefilled % self._piece)
            return remaining(seq)

        if not live:
            return {}
        budget = self.limits.prefill_chunk
        head = live[0]
        plan = {head: min(allowed(head), max(1, budget // 2))}
        budget -= plan[head]
        for seq in sorted(live[1:], key=remaining):
            if allowed(seq) > budget:
                break
            plan[seq] = allowed(seq)
            budget -= plan[seq]
        plan[head] += min(budget, allowed(head) - plan[head])
        for seq in plan:
            if not seq.prefill_start_ns:
                self._reuse_prefix(seq)  # serves exactly what `usable` counted: nothing changed the cache since
        return plan

    def _unchanged(self, results: list[Produced]) -> bool:
        """Whether the next decode would run the same sequences (judged in the model thread, ahead of _emit)."""
        if self._waiting or self._aborted is not None:
            return False
        now = time.monotonic()
        for seq, sampled, past_len in results:
            request = seq.request
            if (seq.cancelled or seq.expired(now) or sampled.token_id in self.eos_ids
                    or sampled.token_id in request.stop_ids or seq.sampled >= request.max_tokens
                    or past_len + 1 >= self.context_length or seq.constraint_end):
                return False
        return True

    @staticmethod
    def _sampled(seq: Sequence, sampled: Sampled) -> Produced:
        seq.last_token = sampled.token_id
        seq.output_ids.append(sampled.token_id)
        seq.sampled += 1
        if seq.constraint is not None:
            # Right away: the next step's mask depends on it, and is computed while that step's model runs.
            seq.constraint.consume(sampled.token_id)
            if seq.constraint.stopped and not seq.constraint_end:
                seq.constraint_end = seq.sampled
        return seq, sampled, seq.past_len

    def _exact_piece(self, seq: Sequence) -> int:
        """For a reproducible sequence, the piece size the prefix cache serves it in (exact blocks only), else 0."""
        return self._piece if seq.reproducible else 0

    def _exact_tokens(self, seq: Sequence, computed: int) -> int:
        """Of a prompt's first `computed` tokens, those a reproducible sequence computed in whole pieces."""
        return computed - computed % self._piece if seq.reproducible else 0

    def _reuse_prefix(self, seq: Sequence) -> None:
        seq.prefill_start_ns = time.time_ns()
        cached, kv = self.prefix_cache.lookup(seq.request.prompt_ids, self._exact_piece(seq))
        if kv is not None:
            seq.kv, seq.prefilled, seq.cached_tokens = kv, cached, cached

    def _prefill(self, work: list[tuple[Sequence, int, int]],
                 ) -> list[tuple[Sequence, int, np.ndarray, list[np.ndarray]]]:
        """Runs prompt chunks [start, end); returns (seq, end, last logits, KV [1, H, end, D] per tensor).

        Prompts starting from an empty cache share runs, right-padded to the longest of each run (padding sits
        after each row's tokens, so no real token attends to it); prompts of very different lengths go to
        separate runs, so padding never costs more than half again the real tokens. A chunk over an existing
        cache (a long prompt's next chunk, or the rest after a prefix-cache hit) runs alone: the attention
        kernel takes several new tokens over a past only for one row at a time.
        """
        results: list[tuple[Sequence, int, np.ndarray, list[np.ndarray]]] = []
        for group in _padding_groups(sorted((w for w in work if w[1] == 0), key=lambda w: w[2])):
            width = group[-1][2]
            ids = np.zeros((len(group), width), dtype=np.int64)
            for row, (seq, _, end) in enumerate(group):
                ids[row, :end] = seq.request.prompt_ids[:end]
            lengths = np.asarray([end for _, _, end in group])
            out = self.model.run(ids, lengths - 1, np.arange(len(group)) * width + lengths - 1,
                                 self.model.empty_past(len(group)))
            for row, (seq, _, end) in enumerate(group):
                kv = [np.ascontiguousarray(p[row:row + 1, :, :end]) for p in out.presents]
                results.append((seq, end, out.logits[row], kv))
        for seq, start, end in work:
            if start == 0:
                continue
            assert seq.kv is not None
            ids = np.asarray([seq.request.prompt_ids[start:end]], dtype=np.int64)
            out = self.model.run(ids, np.asarray([end - 1]), np.asarray([end - start - 1]), seq.kv)
            results.append((seq, end, out.logits[0], out.presents))
        return results

    def _decode(self, seqs: list[Sequence]) -> list[Produced]:
        self._sync_rows(seqs)
        rows = self._rows
        lengths = np.asarray([s.past_len for s in rows])
        self._slots.reserve(len(rows), int(lengths.max()) + 1)
        input_ids = np.asarray([[s.last_token] for s in rows], dtype=np.int64)
        # The constrained rows' masks depend only on the tokens already consumed: llguidance computes them on its
        # own threads, without the GIL, while the model runs.
        constrained = [row for row, seq in enumerate(rows) if seq.constraint is not None]
        masks: Future[np.ndarray] | None = None
        if constrained:
            states = [c for c in (rows[row].constraint for row in constrained) if c is not None]
            masks = Future()
            if self.overlap_masks and self._mask_thread is not None:
                masks = self._mask_thread.submit(self._masks.compute, states)
            else:
                masks.set_result(self._masks.compute(states))
        try:
            logits = self.model.decode(input_ids, lengths, self._slots)
        finally:
            biases = masks.result() if masks is not None else None  # never left running into the next step
        for seq in rows:
            seq.past_len += 1
        fast = [row for row, seq in enumerate(rows) if seq.sampler.plain_greedy and seq.constraint is None]
        sampled: list[Sampled | None] = [None] * len(rows)
        if fast:
            for row, result in zip(fast, greedy_rows(logits[fast]), strict=True):
                sampled[row] = result
        if biases is not None:
            # Plain-greedy constrained rows: one vectorized argmax over their masked logits, like the free ones.
            greedy = [i for i, row in enumerate(constrained) if rows[row].sampler.plain_greedy]
            if greedy:
                picked = [constrained[i] for i in greedy]
                for row, result in zip(picked, greedy_rows(logits[picked] + biases[greedy]), strict=True):
                    sampled[row] = result
            for row, bias in zip(constrained, biases, strict=True):
                if sampled[row] is None:
                    sampled[row] = rows[row].sampler.sample(logits[row], bias)
        for row, seq in enumerate(rows):
            if sampled[row] is None:
                sampled[row] = seq.sampler.sample(logits[row])
        return [self._sampled(seq, s) for seq, s in zip(rows, sampled, strict=True) if s is not None]

    def _sync_rows(self, seqs: list[Sequence]) -> None:
        """Makes the decode rows hold exactly `seqs`: leavers' rows are refilled from the end, joiners appended."""
        wanted = {id(s) for s in seqs}
        rows, slots = self._rows, self._slots
        for row, seq in enumerate(rows):  # every leaver's KV first: the moves below overwrite rows
            if id(seq) not in wanted:
                self._keep_for_reuse(seq, row)
        row = 0
        while row < len(rows):
            if id(rows[row]) in wanted:
                row += 1
                continue
            last = rows.pop()
            slots.pop()
            if row < len(rows) and id(last) in wanted:
                slots.move(len(rows), row, last.past_len)
                rows[row] = last
        present = {id(s) for s in rows}
        joining = [s for s in seqs if id(s) not in present]
        slots.shrink(max(s.past_len for s in seqs) + 1)
        if joining:
            slots.reserve(len(rows) + len(joining), max(s.past_len for s in joining) + 1)
            for seq in joining:
                assert seq.kv is not None, "a sequence joins the decode rows right after its prefill"
                slots.put(len(rows), seq.kv, seq.past_len)
                rows.append(seq)
                seq.kv = None
