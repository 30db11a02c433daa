"""Prefix reuse: the KV cache of earlier prompts and answers, so a request that starts the same way skips that
prefill.

The cache is a tree of token blocks (BLOCK_TOKENS each; a shorter "tail" block may end a branch). A block holds
the KV of its tokens ([1, H, n, D] per tensor) and is reached by the tokens before it, so a prefix shared by many
requests — a system prompt, a conversation's earlier turns — is stored once, however many continuations it has.
A lookup walks the tree along a new prompt and returns the KV of the longest cached prefix (it may end inside a
block: the KV of a position depends only on the tokens up to it). Memory is bounded in bytes; the least recently
used leaf blocks go first, so a shared prefix outlives the continuations that used it less recently.

Blocks computed the way a seeded request computes its prompt (in pieces at fixed positions: see the engine) are
marked exact, and an exact lookup serves only those, whole pieces at a time: a seeded request then starts from KV
equal bit for bit to what it would compute itself.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import numpy as np

# Tokens per block: small enough that a branch wastes little, large enough that a lookup walks few blocks.
BLOCK_TOKENS = 32

Tokens = tuple[int, ...]


@dataclass(eq=False)  # identity: blocks hold arrays, and list/dict removal must not compare those
class _Block:
    tokens: Tokens  # BLOCK_TOKENS of them, or fewer for a tail block (which has no children)
    kv: list[np.ndarray]  # [1, H, len(tokens), D] per tensor, owned (copied out of the caller's arrays)
    parent: _Block | None
    last_used: int = 0
    exact: bool = False  # computed in a seeded request's pieces, as is every block above it
    children: dict[Tokens, _Block] = field(default_factory=dict)  # full blocks, by their tokens
    tails: list[_Block] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.kv)

    @property
    def is_leaf(self) -> bool:
        return not self.children and not self.tails

    def candidates(self) -> list[_Block]:
        return [*self.children.values(), *self.tails]


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    evictions: int = 0  # blocks


def _shared(a: Tokens, b: list[int]) -> int:
    """Length of the common prefix of a and b."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class PrefixCache:
    max_bytes: int
    # Below this many shared tokens a hit saves less than the lookup and copy cost.
    min_tokens: int = 16
    block_tokens: int = BLOCK_TOKENS
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    _root: _Block = field(default_factory=lambda: _Block(tokens=(), kv=[], parent=None))
    _clock: itertools.count[int] = field(default_factory=itertools.count)
    _bytes: int = 0
    _blocks: int = 0
    _tokens: int = 0

    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def tokens_stored(self) -> int:
        """Token positions held, each once however many prefixes share it."""
        return self._tokens

    def __len__(self) -> int:
        return self._blocks

    def usable(self, prompt: list[int], exact_piece: int = 0) -> int:
        """How many of `prompt`'s tokens a lookup would serve now (0 or at least min_tokens); copies nothing."""
        n = sum(used for _, used in self._walk(prompt, exact_piece))
        return n if n >= self.min_tokens else 0

    def lookup(self, prompt: list[int], exact_piece: int = 0) -> tuple[int, list[np.ndarray] | None]:
        """(n, kv) with n cached tokens usable for `prompt` (at most len(prompt) - 1: the last one must run).

        exact_piece: serve only exact blocks, a multiple of this many tokens (a seeded request's pieces)."""
        pieces = self._walk(prompt, exact_piece)
        n = sum(used for _, used in pieces)
        if n < self.min_tokens:
            self.stats.misses += 1
            return 0, None
        now = next(self._clock)
        for block, _ in pieces:
            block.last_used = now
        self.stats.hits += 1
        self.stats.hit_tokens += n
        layers = len(pieces[0][0].kv)
        return n, [np.concatenate([block.kv[i][:, :, :used] for block, used in pieces], axis=2)
                   for i in range(layers)]

    def _walk(self, prompt: list[int], exact_piece: int = 0) -> list[tuple[_Block, int]]:
        """The blocks along `prompt`'s longest cached prefix (at most len(prompt) - 1 tokens), and how many of each
        one's tokens it uses; with exact_piece, exact blocks only, cut to a multiple of exact_piece tokens."""
        limit = len(prompt) - 1
        pieces: list[tuple[_Block, int]] = []
        if self.max_bytes <= 0:
            return pieces
        node, n = self._root, 0
        while n + self.block_tokens <= limit:
            child = node.children.get(tuple(prompt[n:n + self.block_tokens]))
            if child is None or (exact_piece and not child.exact):
                break
            pieces.append((child, self.block_tokens))
            node, n = child, n + self.block_tokens
        if exact_piece:
            keep = n - n % exact_piece
            cut: list[tuple[_Block, int]] = []
            for block, used in pieces:
                if keep <= 0:
                    break
                cut.append((block, min(used, keep)))
                keep -= used
            return cut
        # The rest may share the beginning of a block or tail below (a branch point inside a block).
        rest = prompt[n:limit]
        best, best_len = None, 0
        for candidate in node.candidates():
            shared = _shared(candidate.tokens, rest)
            if shared > best_len:
                best, best_len = candidate, shared
        if best is not None:
            pieces.append((best, best_len))
        return pieces

    def insert(self, tokens: list[int], kv: list[np.ndarray], exact_tokens: int = 0) -> None:
        """Remembers the KV of `tokens` ([1, H, >= len(tokens), D] per tensor); stores only blocks not yet held.

        exact_tokens: the first this many were computed in a seeded request's pieces; the blocks wholly inside
        take this KV (a block held from another computation gets it too: its other users are not exact) and are
        marked exact."""
        if self.max_bytes <= 0 or len(tokens) < self.min_tokens:
            return
        per_token = sum(layer.nbytes // layer.shape[2] for layer in kv) if kv[0].shape[2] else 0
        if per_token * len(tokens) > self.max_bytes // 2:
            # A long document keeps its first whole blocks, up to half the cache: a resend or a question about it
            # then skips that part of its prefill, and one document cannot flush every conversation.
            fit = self.max_bytes // 2 // per_token
            tokens = tokens[:fit - fit % self.block_tokens]
            if len(tokens) < self.min_tokens:
                return
        now = next(self._clock)
        node, n = self._root, 0
        while n + self.block_tokens <= len(tokens):
            key = tuple(tokens[n:n + self.block_tokens])
            child = node.children.get(key)
            if child is None:
                child = self._add(node, key, kv, n)
                node.children[key] = child
                # A tail that this block extends says nothing more: drop it.
                for tail in [t for t in node.tails if key[:len(t.tokens)] == t.tokens]:
                    self._remove(tail)
            above_exact = node is self._root or node.exact
            if n + self.block_tokens <= exact_tokens and above_exact and not child.exact:
                child.kv = [layer[:, :, n:n + self.block_tokens].copy() for layer in kv]
                child.exact = True
            child.last_used = now
            node, n = child, n + self.block_tokens
        rest = tuple(tokens[n:])
        if rest:
            covering = next((c for c in node.candidates() if c.tokens[:len(rest)] == rest), None)
            if covering is not None:
                covering.last_used = now
            else:
                for tail in [t for t in node.tails if rest[:len(t.tokens)] == t.tokens]:
                    self._remove(tail)
                tail = self._add(node, rest, kv, n)
                tail.last_used = now
                node.tails.append(tail)
        self._evict()

    def _add(self, parent: _Block, tokens: Tokens, kv: list[np.ndarray], start: int) -> _Block:
        # Copies: a view would keep the caller's whole array alive.
        block = _Block(tokens=tokens, kv=[layer[:, :, start:start + len(tokens)].copy() for layer in kv],
                       parent=parent)
        self._bytes += block.nbytes
        self._blocks += 1
        self._tokens += len(tokens)
        return block

    def _remove(self, block: _Block) -> None:
        """Drops a leaf block."""
        parent = block.parent
        assert parent is not None and block.is_leaf
        if len(block.tokens) == self.block_tokens and parent.children.get(block.tokens) is block:
            del parent.children[block.tokens]
        else:
            parent.tails.remove(block)
        self._bytes -= block.nbytes
        self._blocks -= 1
        self._tokens -= len(block.tokens)

    def _evict(self) -> None:
        if self._bytes <= self.max_bytes:
            return
        order = itertools.count()  # tie-breaker: blocks do not compare
        heap = [(leaf.last_used, next(order), leaf) for leaf in self._leaves()]
        heapq.heapify(heap)
        while self._bytes > self.max_bytes and heap:
            _, _, oldest = heapq.heappop(heap)
            self._remove(oldest)
            self.stats.evictions += 1
            parent = oldest.parent
            if parent is not None and parent is not self._root and parent.is_leaf:
                heapq.heappush(heap, (parent.last_used, next(order), parent))

    def _leaves(self) -> list[_Block]:
        leaves, stack = [], [self._root]
        while stack:
            block = stack.pop()
            below = block.candidates()
            if not below and block is not self._root:
                leaves.append(block)
            stack.extend(below)
        return leaves
