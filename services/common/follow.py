"""Following a peer's server stream for as long as the process runs: policy's rules, the registry's model changes.

A `StreamFollower` keeps one stream open in a background task (in a context of its own: no request's deadline or
trace applies), hands every message to `on_message`, and when the stream ends or fails opens it again after a
back-off (0.2 s doubling to 5 s; reset by a message). `on_lost` runs each time a stream ends, so a caller that
trusts its cache only while the stream lives can stop trusting it. The first message of a new stream is the whole
state by the contracts of the streams followed this way (WatchRules, WatchModels).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import grpc

from services.common.errors import LmeshError, end_if_cancelled
from services.common.peers import Lease, Peer

S = TypeVar("S")
M = TypeVar("M")
RETRY_MIN_S, RETRY_MAX_S = 0.2, 5.0


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancels `task` and waits for it to end."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class StreamFollower(Generic[S, M]):
    """One server stream of `peer`, re-opened whenever it ends (see the module's docstring)."""

    def __init__(self, peer: Peer[S], open_stream: Callable[[Lease[S]], AsyncIterator[M]],
                 on_message: Callable[[M], object], *, what: str, log: logging.Logger,
                 on_lost: Callable[[], None] | None = None) -> None:
        self._peer = peer
        self._open = open_stream
        self._on_message = on_message
        self._on_lost = on_lost
        self._what = what
        self._log = log
        self._task: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name=self._what, context=contextvars.Context())

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_task(task)

    async def _follow(self) -> None:
        delay = RETRY_MIN_S
        while True:
            try:
                async with self._peer.lease() as lease:
                    async for message in self._open(lease):
                        handled = self._on_message(message)
                        if inspect.isawaitable(handled):
                            await handled
                        delay = RETRY_MIN_S
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, LmeshError, OSError) as exc:
                end_if_cancelled(exc)
                reason = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                self._log.debug("%s: the stream from %s ended (%s); again in %.1f s", self._what, self._peer.name,
                                reason, delay)
            except Exception as exc:
                end_if_cancelled(exc)
                self._log.exception("%s: following %s failed; again in %.1f s", self._what, self._peer.name, delay)
            if self._on_lost is not None:
                self._on_lost()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
