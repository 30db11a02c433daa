"""A chat's events, read as fast as they come, for a client that reads at its own pace.

Without it, a client that reads slowly would push back through the gateway's writes into the detokenizer and
inference streams of its chat. `coalesced` decouples the two: a task reads the events into a buffer of its own
while the protocol's writer takes them out. Up to MAX_WAITING_MESSAGES deltas wait as they came (a writer that
keeps up, or an answer replayed at once from the response cache, gets them unchanged); while the writer lags
further, each new delta merges into the last one waiting (text concatenated, logprob entries concatenated), so the
client still receives every byte of the answer, in order, in fewer, larger deltas, and the chat upstream ends at
the engine's pace.

Bounds: a merged delta grows to about MAX_MESSAGE_BYTES (then the next one starts), and the buffer holds about
MAX_BUFFERED_BYTES at most (admission.py): past that, reading pauses until the writer takes something (only then
does a slow client hold back its own chat upstream, never the engine or another stream). A writer that takes
nothing for `stall_s` (its last write still blocked: the client stopped reading) is reported once through
`on_stall`, which ends the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from services.gateway.admission import MAX_BUFFERED_BYTES
from services.gateway.chat import ChatDelta
from services.gateway.logprobs import TokenLogprob

MAX_MESSAGE_BYTES = 64 * 1024  # well inside gRPC's 4 MiB receive limit, with logprobs too
MAX_WAITING_MESSAGES = 64  # deltas kept apart while they wait (past it, they merge)
CANDIDATE_BYTES = 16  # a logprob candidate's id, logprob and framing, beyond its token text and bytes

E = TypeVar("E")


def delta_size(delta: ChatDelta) -> int:
    """About how many bytes `delta` takes on the wire (its text, and each logprob entry's text and bytes)."""
    return len(delta.text) + (sum(_entry_size(entry) for entry in delta.logprobs) if delta.logprobs else 0)


def _entry_size(entry: TokenLogprob) -> int:
    return 2 * len(entry.chosen.data) + CANDIDATE_BYTES + sum(2 * len(c.data) + CANDIDATE_BYTES for c in entry.top)


class _Merged:
    """Consecutive deltas not taken yet: their parts, joined once when the writer takes them (a delta that waited
    alone is given as it came)."""

    __slots__ = ("entries", "first", "size", "texts")

    def __init__(self, delta: ChatDelta, size: int) -> None:
        self.first = delta
        self.texts: list[str] = []
        self.entries: list[TokenLogprob] = []
        self.size = size

    def add(self, delta: ChatDelta, size: int) -> None:
        if not self.texts:
            self.texts.append(self.first.text)
            self.entries += self.first.logprobs
        self.texts.append(delta.text)
        self.entries += delta.logprobs
        self.size += size

    def delta(self) -> ChatDelta:
        return ChatDelta("".join(self.texts), self.entries) if self.texts else self.first


class Coalescer(Generic[E]):
    """The events of `source` (ChatDelta merged while they wait; anything else passed as it is), in order, then
    the error that ended `source`, if any. Use it through `coalesced`."""

    def __init__(self, source: AsyncIterator[E], stall_s: float | None = None,
                 on_stall: Callable[[], None] | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 max_buffered_bytes: int = MAX_BUFFERED_BYTES, max_messages: int = MAX_WAITING_MESSAGES) -> None:
        self._source = source
        self._max_messages = max_messages
        self._stall_s = stall_s
        self._on_stall = on_stall
        self._max_message = max_message_bytes
        self._max_buffered = max_buffered_bytes
        self._items: deque[E | _Merged] = deque()
        self._buffered = 0  # bytes of the deltas waiting
        self._ended = False
        self._error: BaseException | None = None
        self._waiting: asyncio.Future[None] | None = None  # the writer's, while the buffer is empty
        self._room = asyncio.Event()  # set while the buffer has room
        self._room.set()
        self._taken_at: float | None = None  # when the writer took its last event (None: it waits for the next)
        self._timer: asyncio.TimerHandle | None = None
        self.stalled = False
        self._reader: asyncio.Task[None] | None = None

    @property
    def buffered_bytes(self) -> int:
        """About how many bytes of deltas wait for the writer."""
        return self._buffered

    @property
    def waiting(self) -> int:
        """How many messages wait for the writer."""
        return len(self._items)

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name="coalesce")

    async def close(self) -> None:
        """Stops reading (the source stays open: its owner closes it) and the stall timer."""
        if self._timer is not None:
            self._timer.cancel()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        try:
            async for event in self._source:
                self._push(event)
                if self._buffered > self._max_buffered:
                    self._room.clear()
                    await self._room.wait()
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # close(): the writer is gone
                raise
            self._error = exc  # a cancellation from upstream itself: the writer gets it, as it would unbuffered
        except Exception as exc:
            self._error = exc
        finally:
            self._ended = True
            self._wake()

    def _push(self, event: E) -> None:
        if isinstance(event, ChatDelta):
            size = delta_size(event)
            self._buffered += size
            tail = self._items[-1] if len(self._items) >= self._max_messages else None
            if isinstance(tail, _Merged) and tail.size < self._max_message:
                tail.add(event, size)
                return
            self._items.append(_Merged(event, size))
        else:
            self._items.append(event)
        self._wake()

    def _wake(self) -> None:
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)

    def __aiter__(self) -> Coalescer[E]:
        return self

    async def __anext__(self) -> E:
        self._taken_at = None
        while not self._items:
            if self._ended:
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                raise StopAsyncIteration
            self._waiting = asyncio.get_running_loop().create_future()
            await self._waiting
        item = self._items.popleft()
        if isinstance(item, _Merged):
            self._buffered -= item.size
            if self._buffered <= self._max_buffered:
                self._room.set()
            event: E = item.delta()  # type: ignore[assignment]
        else:
            event = item
        if self._stall_s is not None:
            self._taken_at = asyncio.get_running_loop().time()
            if self._timer is None and not self.stalled:
                self._arm(self._taken_at + self._stall_s)
        return event

    def _arm(self, when: float) -> None:
        self._timer = asyncio.get_running_loop().call_at(when, self._check_stall)

    def _check_stall(self) -> None:
        """The timer: the writer has not come back for the next event since it took one `stall_s` ago: stalled.
        Re-armed for the writer's latest event otherwise (or left off while the writer waits for one)."""
        self._timer = None
        taken_at, stall_s = self._taken_at, self._stall_s
        if taken_at is None or stall_s is None:
            return
        if asyncio.get_running_loop().time() - taken_at >= stall_s:
            self.stalled = True
            if self._on_stall is not None:
                self._on_stall()
            return
        self._arm(taken_at + stall_s)


@contextlib.asynccontextmanager
async def coalesced(source: AsyncIterator[E], stall_s: float | None = None,
                    on_stall: Callable[[], None] | None = None, max_buffered_bytes: int = MAX_BUFFERED_BYTES,
                    ) -> AsyncIterator[Coalescer[E]]:
    """`source`'s events through a Coalescer, read in a task of their own until the block ends (then the reading
    stops at once: closing the source, which its owner does, cancels the chat upstream)."""
    coalescer = Coalescer(source, stall_s, on_stall, max_buffered_bytes=max_buffered_bytes)
    coalescer.start()
    try:
        yield coalescer
    finally:
        await coalescer.close()
