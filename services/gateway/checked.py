"""Per model version, something the gateway may do itself once a check in the background says so: detokenize
(detokenize.py), render prompts (render.py)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class CheckedOnce(Generic[T]):
    """`model_id` -> what its check gave (None: do it the service's way). The first ask starts the check and gets
    None, as does every ask while it runs; a check that failed (an error, not a None) is forgotten, so an ask at
    least `retry_after_s` later starts another, and `on_failure` is told. The `max_kept` most recently asked
    versions are kept."""

    def __init__(self, what: str, max_kept: int, on_failure: Callable[[str, BaseException], None], *,
                 retry_after_s: float = 0.0) -> None:
        self._what = what
        self._max_kept = max_kept
        self._on_failure = on_failure
        self._retry_after_s = retry_after_s
        self._checks: OrderedDict[str, asyncio.Task[T | None]] = OrderedDict()
        self._retry_at: dict[str, float] = {}

    def get(self, model_id: str, check: Callable[[], Awaitable[T | None]]) -> T | None:
        task = self._checks.get(model_id)
        if task is None:
            if self._retry_at.get(model_id, 0.0) > time.monotonic():
                return None

            async def run() -> T | None:
                return await check()

            task = self._checks[model_id] = asyncio.create_task(run(), name=f"{self._what}-{model_id}")
            task.add_done_callback(lambda done: self._forget_failure(model_id, done))
            while len(self._checks) > self._max_kept:
                self._checks.popitem(last=False)
            return None
        self._checks.move_to_end(model_id)
        return task.result() if task.done() and not task.cancelled() and task.exception() is None else None

    def _forget_failure(self, model_id: str, done: asyncio.Task[T | None]) -> None:
        if done.cancelled() or (error := done.exception()) is None:
            return
        self._on_failure(model_id, error)
        if self._retry_after_s:
            self._retry_at[model_id] = time.monotonic() + self._retry_after_s
        if self._checks.get(model_id) is done:
            del self._checks[model_id]
