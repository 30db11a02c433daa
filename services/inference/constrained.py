"""Structured generation: output constraints (JSON Schema, Lark grammar, regex) compiled with llguidance against the
served model's tokenizer, a matcher per constrained sequence, and the masks of a decode step's constrained rows.

A constraint compiles once per text (an LRU: the same tool schema comes again and again); each sequence copies the
compiled matcher (microseconds) and feeds it every token it samples. Before a step samples a constrained row, the
row's mask (one bit per token: does it keep the text a prefix of something the constraint accepts?) is computed
from the matcher's state, which the previous token fixed: the engine computes it while the model runs that step.
A mask costs tens of microseconds for a JSON schema over SmolLM2's 49152 tokens; llguidance computes a batch's
masks on its own threads without holding the GIL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par

from services.common.errors import InvalidArgument

log = logging.getLogger("lmesh.inference.constrained")

# The longest constraint text accepted: a large tool schema is a few KiB; beyond this compile time and memory grow
# with no use to a caller.
MAX_CONSTRAINT_BYTES = 64 * 1024
# Compiled constraints kept per served model (each a few hundred KiB at most: its lexer and grammar).
GRAMMAR_CACHE_SIZE = 256
# The field names of lmesh.common.v1.OutputConstraint's oneof, i.e. the kinds of constraint.
CONSTRAINT_KINDS = ("json_schema", "lark_grammar", "regex")
# An error message from the compiler is cut to this many characters (it may quote the whole grammar).
MAX_ERROR_CHARS = 600


def _parser_limits() -> llguidance.LLParserLimits:
    """llguidance's resource limits, spelled out: they bound a constraint's compile time (lexer fuel at ~50k/ms:
    about 20 ms; grammar size) and each mask's time (step fuel at ~14k/ms, items at ~20k/ms: about 10 ms), so a
    hostile grammar costs its own request an error, never the batch a stall."""
    return llguidance.LLParserLimits(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                                     step_max_items=50_000, max_lexer_states=250_000, max_grammar_size=500_000,
                                     verbose_errors=False)


@dataclass(frozen=True)
class ConstraintSpec:
    """A constraint as the caller sent it: its kind (the proto field's name) and its text."""

    kind: str
    text: str

    @property
    def field(self) -> str:
        return f"constraint.{self.kind}"


class CompiledConstraint:
    """A compiled constraint: a matcher in its initial state, which every sequence constrained by it copies."""

    def __init__(self, spec: ConstraintSpec, matcher: llguidance.LLMatcher, token_count: int) -> None:
        self.spec = spec
        self._matcher = matcher
        self.token_count = token_count  # tokens the tokenizer knows: the masks' bits

    def start(self) -> ConstraintState:
        return ConstraintState(self._matcher.deep_copy(), self.token_count)


class ConstraintState:
    """One sequence's matcher: the tokens it sampled so far, and whether the constraint is complete (accepts
    nothing more). Used only by the engine's model thread once the sequence is queued."""

    def __init__(self, matcher: llguidance.LLMatcher, token_count: int) -> None:
        self.matcher = matcher
        self.token_count = token_count
        self.stopped = False

    def consume(self, token: int) -> None:
        """Advances past a sampled token (always one its mask allowed)."""
        if not self.matcher.consume_token(token):  # a masked draw cannot cause it: a bug, ended as complete
            log.warning("constraint matcher failed on token %d: %s", token, self.matcher.get_error()[:300])
        # Stopped: nothing but the end-of-turn token may follow (also true once failed): the engine ends the
        # sequence after this token.
        self.stopped = self.matcher.is_stopped()


class Grammars:
    """Compiles constraints for one served model's tokenizer, caching them by their text (thread-safe: the servicer
    compiles in worker threads)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, cache_size: int = GRAMMAR_CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self._cache: OrderedDict[ConstraintSpec, CompiledConstraint] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def from_tokenizer_json(cls, tokenizer_json: str, eos_ids: Iterable[int]) -> Grammars:
        """From a HF `tokenizers` tokenizer.json's text (about 0.3 s for SmolLM2's: build it once per model)."""
        eos = sorted(eos_ids)  # none given: the tokenizer's own
        return cls(llguidance.LLTokenizer(tokenizer_json, eos_token=eos or None))

    def cached(self, spec: ConstraintSpec) -> CompiledConstraint | None:
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
            return compiled

    def compile(self, spec: ConstraintSpec) -> CompiledConstraint:
        """The compiled constraint; InvalidArgument naming `constraint.<kind>` with the compiler's message when it
        cannot be compiled. Up to tens of milliseconds for a large grammar, without the GIL: call it off the loop."""
        compiled = self.cached(spec)
        if compiled is not None:
            return compiled
        if spec.kind not in CONSTRAINT_KINDS:
            raise InvalidArgument("constraint", f"unknown kind {spec.kind!r}")
        if len(spec.text.encode()) > MAX_CONSTRAINT_BYTES:
            raise InvalidArgument(spec.field, f"must be at most {MAX_CONSTRAINT_BYTES // 1024} KiB, got "
                                              f"{len(spec.text.encode())} bytes")
        if not spec.text.strip():
            raise InvalidArgument(spec.field, "must not be empty")
        if spec.kind == "json_schema":
            _check_json_object(spec)
        try:
            if spec.kind == "json_schema":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.text)
            elif spec.kind == "lark_grammar":
                grammar = llguidance.LLMatcher.grammar_from_lark(spec.text)
            else:
                grammar = llguidance.LLMatcher.grammar_from_regex(spec.text)
        except ValueError as exc:  # a JSON Schema that is not JSON (or not an object)
            raise InvalidArgument(spec.field, _message(str(exc))) from exc
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=_parser_limits())
        if matcher.is_error():
            raise InvalidArgument(spec.field, _message(matcher.get_error()))
        compiled = CompiledConstraint(spec, matcher, self.tokenizer.vocab_size)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    async def compile_async(self, spec: ConstraintSpec) -> CompiledConstraint:
        """`compile`, in a worker thread unless cached (a cache hit stays on the loop: a dict lookup)."""
        compiled = self.cached(spec)
        return compiled if compiled is not None else await asyncio.to_thread(self.compile, spec)


def _check_json_object(spec: ConstraintSpec) -> None:
    """A schema must be JSON text of an object (or a boolean): said in the caller's terms, with positions in the
    caller's text (llguidance's own message counts from a wrapper it puts around it)."""
    try:
        schema = json.loads(spec.text)
    except ValueError as exc:
        raise InvalidArgument(spec.field, f"not valid JSON: {exc}") from exc
    if not isinstance(schema, dict | bool):
        raise InvalidArgument(spec.field, f"a schema must be a JSON object (or true/false), got "
                                          f"{type(schema).__name__}")


def _message(text: str) -> str:
    text = text.strip() or "cannot be compiled"
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


# What a masked token's logit becomes: far below any real logit, so its probability is exactly 0 (exp underflows to
# 0 at once), yet finite: adding it costs one vectorized pass, where -inf through a boolean index costs a branch
# per token (3 to 7 times slower over 49152 tokens).
MASKED = np.float32(-1e30)


class RowMasks:
    """Computes a decode step's constrained rows' masks as additive biases over the model's logits: float32
    [rows, vocab], 0 where a token is allowed and MASKED where not (a model vocabulary larger than the tokenizer's
    has its extra ids masked). Built in the mask thread, so the model thread only adds them."""

    def __init__(self, vocab_size: int, fallback_ids: Iterable[int], threads: int | None = None) -> None:
        self.vocab_size = vocab_size
        # What a row whose mask allows nothing (a matcher in an error state: a masked draw cannot cause one) may
        # still sample: the end-of-turn ids, so the sequence ends rather than draws from nothing.
        self._fallback = np.asarray(sorted(i for i in fallback_ids if 0 <= i < vocab_size), dtype=np.int64)
        self._threads = threads
        self._executor: llguidance.LLExecutor | None = None  # its threads start with the first constrained row

    def compute(self, states: list[ConstraintState]) -> np.ndarray:
        """Every state's bias row, in order (llguidance computes the bits without the GIL)."""
        if self._executor is None:
            self._executor = llguidance.LLExecutor(self._threads)
        token_count = max(s.token_count for s in states)
        bitmask = np.zeros((len(states), (token_count + 31) // 32), dtype=np.int32)
        fill_next_token_bitmask_par(self._executor, [(s.matcher, i) for i, s in enumerate(states)], bitmask)
        # One bit per token, lowest bit first within each little-endian int32 word.
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        width = min(self.vocab_size, token_count)
        allowed = np.zeros((len(states), self.vocab_size), dtype=np.uint8)
        allowed[:, :width] = bits[:, :width]
        empty = allowed.max(axis=1) == 0
        if empty.any() and self._fallback.size:
            allowed[np.ix_(np.flatnonzero(empty), self._fallback)] = 1
        return MASKED * (1 - allowed)  # uint8 arithmetic: 1 - {0, 1} is {1, 0}
