"""Prefix reuse: the KV cache of earlier prompts, so a request that starts the same way skips that prefill.

Entries hold a prompt's token ids and its KV arrays ([1, H, L, D] per layer, shared read-only with the
engine: nothing writes into a KV array in place, ONNX Runtime returns new ones). A lookup finds the entry
sharing the longest common prefix with a new prompt and returns views of its first tokens. Memory is
bounded in bytes, least recently used entries go first.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)  # identity: entries hold arrays, and list.remove must not compare those
class _Entry:
    tokens: np.ndarray
    kv: list[np.ndarray]
    nbytes: int
    last_used: int


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    evictions: int = 0


@dataclass
class PrefixCache:
    max_bytes: int
    # Below this many shared tokens a hit saves less than the lookup and copy cost.
    min_tokens: int = 16
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    _entries: list[_Entry] = field(default_factory=list)
    _clock: itertools.count[int] = field(default_factory=itertools.count)
    _bytes: int = 0

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> tuple[int, list[np.ndarray] | None]:
        """(n, kv) with n cached tokens usable for `prompt` (at most len(prompt) - 1: the last one must run)."""
        if self.max_bytes <= 0 or not self._entries:
            self.stats.misses += 1
            return 0, None
        query = np.asarray(prompt, dtype=np.int64)
        best, best_len = None, 0
        for entry in self._entries:
            n = min(entry.tokens.size, query.size - 1)
            if n <= best_len:
                continue
            same = entry.tokens[:n] == query[:n]
            shared = n if same.all() else int(np.argmin(same))
            if shared > best_len:
                best, best_len = entry, shared
        if best is None or best_len < self.min_tokens:
            self.stats.misses += 1
            return 0, None
        best.last_used = next(self._clock)
        self.stats.hits += 1
        self.stats.hit_tokens += best_len
        return best_len, [np.ascontiguousarray(layer[:, :, :best_len, :]) for layer in best.kv]

    def insert(self, prompt: list[int], kv: list[np.ndarray]) -> None:
        """Remembers a prompt's KV; an entry that is a prefix of it is replaced, a longer one keeps it."""
        if self.max_bytes <= 0 or len(prompt) < self.min_tokens:
            return
        tokens = np.asarray(prompt, dtype=np.int64)
        nbytes = sum(layer.nbytes for layer in kv)
        if nbytes > self.max_bytes:
            return
        for entry in list(self._entries):
            n = min(entry.tokens.size, tokens.size)
            if not np.array_equal(entry.tokens[:n], tokens[:n]):
                continue
            if entry.tokens.size >= tokens.size:
                entry.last_used = next(self._clock)
                return  # already covered
            self._drop(entry)
        self._entries.append(_Entry(tokens, kv, nbytes, next(self._clock)))
        self._bytes += nbytes
        while self._bytes > self.max_bytes:
            oldest = min(self._entries, key=lambda e: e.last_used)
            self._drop(oldest)
            self.stats.evictions += 1

    def _drop(self, entry: _Entry) -> None:
        self._entries.remove(entry)
        self._bytes -= entry.nbytes
