"""The gateway's bound on its own in-flight work: at most `max_chats` chats at once, gRPC streams and HTTP requests
together (an HTTP request with `n` choices counts `n`), each counted from the moment its form is checked until
its last event was taken by the protocol that writes it (request_path.chat_events holds the place).

Beyond the bound a chat is refused at once with RESOURCE_EXHAUSTED (reason GATEWAY_BUSY; HTTP 429), and the
refusal says when to come back. That delay is an estimate from the recent past, not a constant: a place frees,
on average, every `mean duration / max_chats` seconds (the mean duration of recent chats, an exponentially
weighted mean, or the mean age of those in flight when that is longer: chats stuck far past the usual length make
the wait longer). Refused callers queue virtually: each refusal is told the time of the next place not yet
promised to an earlier one, so a burst of refusals is spread out instead of all coming back at once. The delay
is kept within [MIN_RETRY_S, MAX_RETRY_S].
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from services.common.errors import Limit, Reason, ResourceExhausted

# Enough for several inference replicas' whole capacity (16 decoding and 64 queued each by default) behind one
# gateway, so normal use never meets it; small enough that a flood of chats, each holding at most its request
# (up to 4 MiB) and its bounded stream buffer (coalesce.py), cannot exhaust the gateway's memory.
DEFAULT_MAX_CHATS = 512
# A streaming client that has taken nothing of its stream this long (its last message still unsent: it stopped
# reading) has the stream ended (request_path.chat_events), so it cannot hold a place for ever.
DEFAULT_STALLED_CLIENT_S = 60.0
# What one stream's buffer holds for a client that lags (coalesce.py): every text answer many times over (a whole
# 8192-token context is about 40 KB of text), and answers with logprobs up to about 2,000 tokens with 20
# alternatives each. Past it, that stream's own chat upstream waits for its client.
MAX_BUFFERED_BYTES = 1024 * 1024
DURATION_WEIGHT = 0.1  # each finished chat's weight in the mean duration (about the last 10 to 20 chats count)
MIN_RETRY_S = 0.05
MAX_RETRY_S = 30.0
LIMIT_ID = "gateway.chats"


class ChatAdmission:
    """Counts the chats in flight and refuses those beyond `max_chats` with a retry delay (see the module)."""

    def __init__(self, max_chats: int = DEFAULT_MAX_CHATS, clock: Callable[[], float] = time.monotonic) -> None:
        if max_chats < 1:
            raise ValueError(f"max_chats must be >= 1, got {max_chats}")
        self.max_chats = max_chats
        self.in_flight = 0
        self.refused = 0  # since start
        self._clock = clock
        self._mean_duration_s: float | None = None  # of finished chats; None until one finished
        self._started_sum = 0.0  # the start times of the chats in flight, summed (their mean age, in O(1))
        self._promised_until = 0.0  # the time of the last place promised to a refused caller

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Holds a place for the block; ResourceExhausted (GATEWAY_BUSY) at once when none is free."""
        started = self._clock()
        if self.in_flight >= self.max_chats:
            self.refused += 1
            delay = self.retry_after_s(started)
            raise ResourceExhausted(
                f"this gateway is at its limit of {self.max_chats} concurrent chats (--max-chats); retry in "
                f"{delay:.2f} s, or on another gateway", delay, reason=Reason.GATEWAY_BUSY,
                limit=Limit(LIMIT_ID, "gateway", self.max_chats))
        self.in_flight += 1
        self._started_sum += started
        try:
            yield
        finally:
            ended = self._clock()
            self.in_flight -= 1
            self._started_sum -= started
            duration = ended - started
            mean = self._mean_duration_s
            self._mean_duration_s = duration if mean is None else mean + DURATION_WEIGHT * (duration - mean)

    def mean_duration_s(self, now: float) -> float:
        """How long a chat lasts, from what was seen: the weighted mean of finished chats, or the mean age of those
        in flight where that is longer (or where none finished yet)."""
        age = now - self._started_sum / self.in_flight if self.in_flight else 0.0
        return max(self._mean_duration_s or 0.0, age)

    def retry_after_s(self, now: float) -> float:
        """The delay for the caller refused now: the time until the next place no earlier refusal was promised
        frees, at the rate places have been freeing (see the module)."""
        interval = self.mean_duration_s(now) / self.max_chats
        self._promised_until = min(max(self._promised_until, now) + interval, now + MAX_RETRY_S)
        return min(max(self._promised_until - now, MIN_RETRY_S), MAX_RETRY_S)
