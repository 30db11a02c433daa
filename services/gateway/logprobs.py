"""Per-token logprobs for the public Chat: each token's bytes, and which entries ride on which message.

The vocabulary (every token id's exact bytes) comes from the tokenizer service once per model version.
The token path stays pipelined: inference's TokenChunk i is answered by the detokenizer's response i, so the
entries of chunk i are matched with that response's text, with no extra call per token.
"""

from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from lmesh.common.v1 import generation_pb2
from lmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from services.common.peers import Peer
from services.gateway.stops import StopMatcher

MAX_TOP_LOGPROBS = 20  # what inference reports at most
VOCABULARY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Vocabulary:
    """One model version's token id -> exact bytes, and its special tokens (left out of the answer's text)."""

    token_bytes: Sequence[bytes]
    special_token_ids: frozenset[int]

    def bytes_of(self, token_id: int) -> bytes:
        return self.token_bytes[token_id] if 0 <= token_id < len(self.token_bytes) else b""

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        return max((len(token) for token in self.token_bytes), default=1) or 1


@dataclass(frozen=True)
class Candidate:
    token_id: int
    data: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, and the most likely alternatives at its position (most likely first)."""

    chosen: Candidate
    top: tuple[Candidate, ...]


class VocabularyCache:
    """`name:version` -> its Vocabulary, fetched from the tokenizer service once (versions are immutable).

    Concurrent first requests share one fetch; a failed fetch is forgotten so the next request retries; only
    the `max_models` most recently used versions are kept.
    """

    def __init__(self, tokenizer: Peer[tokenizer_pb2_grpc.TokenizerStub], max_models: int = 4) -> None:
        self._tokenizer = tokenizer
        self._max_models = max_models
        self._entries: OrderedDict[str, asyncio.Task[Vocabulary]] = OrderedDict()

    async def get(self, model_id: str) -> Vocabulary:
        task = self._entries.get(model_id)
        if task is None:
            task = self._entries[model_id] = asyncio.create_task(self._fetch(model_id),
                                                                 name=f"vocabulary-{model_id}")
            task.add_done_callback(lambda done: self._forget_failure(model_id, done))
            excess = len(self._entries) - self._max_models
            for key in [key for key, entry in self._entries.items() if entry.done()][: max(0, excess)]:
                del self._entries[key]  # least recently used first; fetches in flight stay
        else:
            self._entries.move_to_end(model_id)
        # Shielded: a caller that gives up must not cancel the fetch the other callers wait for.
        return await asyncio.shield(task)

    def _forget_failure(self, model_id: str, done: asyncio.Task[Vocabulary]) -> None:
        if (done.cancelled() or done.exception() is not None) and self._entries.get(model_id) is done:
            del self._entries[model_id]

    async def _fetch(self, model_id: str) -> Vocabulary:
        response = await self._tokenizer.call(lambda t: t.GetVocabulary,
                                              tokenizer_pb2.GetVocabularyRequest(model=model_id),
                                              timeout=VOCABULARY_TIMEOUT_S)
        return Vocabulary(list(response.token_bytes), frozenset(response.special_token_ids))


class LogprobAligner:
    """Decides which token entries may ride on each message, so that an entry never precedes its text.

    `add_chunk` takes inference's chunk i (before it goes to the detokenizer); `take` gets the detokenizer's
    response i and returns the entries to send now. Positions are counted in UTF-8 bytes of the answer:
    an entry is released once the text given out (all text so far, less what the stop matcher still holds)
    reaches the end of its token's bytes. Special tokens count zero bytes, as the detokenizer skips them.
    If the counts ever disagree (invalid UTF-8 decoded as U+FFFD), an entry is still released no earlier than
    the response of its own chunk, and at the latest with the last message (`rest`). When a stop string
    completes, entries end with the token whose bytes completed it.
    """

    def __init__(self, vocabulary: Vocabulary) -> None:
        self._vocabulary = vocabulary
        self._chunks: deque[list[TokenLogprob]] = deque()
        self._pending: list[tuple[int, TokenLogprob]] = []  # (end of the token's bytes, entry), in order
        self._token_end = 0
        self._text_end = 0
        self._stopped = False

    def add_chunk(self, tokens: Sequence[generation_pb2.TokenLogprob]) -> None:
        candidate = self._candidate
        self._chunks.append([TokenLogprob(candidate(t.token_id, t.logprob),
                                          tuple(candidate(a.token_id, a.logprob) for a in t.top_logprobs))
                             for t in tokens])

    def _candidate(self, token_id: int, logprob: float) -> Candidate:
        return Candidate(token_id, self._vocabulary.bytes_of(token_id), logprob)

    def take(self, delta: str, held: str = "", stop_end: int | None = None) -> list[TokenLogprob]:
        """Entries released by the detokenizer response `delta` (the next one; the final one has no chunk).

        `held`: text the stop matcher still holds back after this response; `stop_end`: where in `delta` a
        stop string ended, if one did.
        """
        chunk = self._chunks.popleft() if self._chunks else []
        if self._stopped:
            return []
        text_start = self._text_end
        self._text_end += len(delta.encode())
        for entry in chunk:
            if entry.chosen.token_id not in self._vocabulary.special_token_ids:
                self._token_end += len(entry.chosen.data)
            self._pending.append((self._token_end, entry))
        if stop_end is not None:
            # Up to the token whose bytes completed the stop string. It may belong to an earlier chunk: the
            # detokenizer holds a complete character back while the same token ends in part of the next one.
            self._stopped = True
            cut = text_start + len(delta[:stop_end].encode())
            keep = next((i + 1 for i, (end, _) in enumerate(self._pending) if end >= cut), len(self._pending))
            return self._release(keep)
        given_out = self._text_end - len(held.encode())
        count = 0
        while count < len(self._pending) and self._pending[count][0] <= given_out:
            count += 1
        return self._release(count)

    def rest(self) -> list[TokenLogprob]:
        """Every entry not given out yet, for the last message (none after a stop string)."""
        return [] if self._stopped else self._release(len(self._pending))

    def _release(self, count: int) -> list[TokenLogprob]:
        released = [entry for _, entry in self._pending[:count]]
        del self._pending[:count]
        return released


class AnswerAssembler:
    """The detokenizer's responses in; the text of each message and the entries riding on it out.

    Applies the stop strings, and with a vocabulary (logprobs requested) aligns the tokens' entries.
    """

    def __init__(self, stops: list[str], vocabulary: Vocabulary | None = None) -> None:
        self._stops = StopMatcher(stops)
        self._aligner = LogprobAligner(vocabulary) if vocabulary is not None else None
        self._unsent: list[TokenLogprob] = []  # released, waiting for a message with text

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def add_chunk(self, tokens: Sequence[generation_pb2.TokenLogprob]) -> None:
        """Inference's next chunk, before its ids go to the detokenizer."""
        if self._aligner is not None:
            self._aligner.add_chunk(tokens)

    def piece(self, delta: str, final: bool = False) -> tuple[str, list[TokenLogprob]]:
        """The text to send for the detokenizer's next response (may be empty) and the entries to send with it."""
        stops = self._stops
        text = stops.feed(delta) + (stops.flush() if final else "")
        if self._aligner is not None:
            self._unsent += self._aligner.take(delta, stops.held, stops.stop_end)
        if not text:
            return "", []
        entries, self._unsent = self._unsent, []
        return text, entries

    def rest(self) -> list[TokenLogprob]:
        """The entries not sent yet, for the last message."""
        entries, self._unsent = self._unsent, []
        return entries + (self._aligner.rest() if self._aligner is not None else [])
