"""Model resolution for the gateway: what a reference means, learnt from the registry's watch, and which version
serves each request.

Resolutions are cached for as long as the WatchModels stream lives: the registry announces every registration,
alias move and deletion on it, and the gateway drops its cache on the announcement, so the next request after a
move uses the new target. While the stream is down (a registry restarting, or one that predates the watch) an
answer is trusted for RESOLVE_TTL_S only, and a registry that cannot be asked is covered by the last answer.

A split alias (`default` = version 1 at 90, version 2 at 10) is drawn per request by weight, or per conversation
when the request names a session (the same conversation stays on one version). A version no passing replica
serves yet (one still loading after a move) is not chosen while another target, or what the reference meant
before the move, is served: requests keep flowing during a rollout.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass

import grpc
from lmesh.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.discovery import StaleAnswers
from services.common.errors import InvalidArgument, Unavailable
from services.common.follow import StreamFollower
from services.common.peers import Lease, Peer

log = logging.getLogger("lmesh.gateway.models")
RESOLVE_TTL_S = 5.0  # how long an answer is trusted while the registry's watch is down
LIST_KEY = "the model list"  # stale answers are logged per reference; the list is one more


def model_id(version: registry_pb2.ModelVersion) -> str:
    return f"{version.name}:{version.version}"


@dataclass(frozen=True)
class Resolution:
    """What a reference means: its versions, heaviest first, each with its weight."""

    targets: tuple[tuple[registry_pb2.ModelVersion, int], ...]

    @classmethod
    def from_proto(cls, response: registry_pb2.ResolveModelResponse) -> Resolution:
        if not response.targets:  # a registry that predates splits: one version
            return cls(((response.model, 100),))
        return cls(tuple((t.model, max(t.weight, 1)) for t in response.targets))

    @property
    def first(self) -> registry_pb2.ModelVersion:
        return self.targets[0][0]

    def draw(self, session: str = "") -> registry_pb2.ModelVersion:
        """A target by weight: at random, or by the session's hash so one conversation stays on one version."""
        if len(self.targets) == 1:
            return self.first
        total = sum(weight for _, weight in self.targets)
        if session:
            point = int.from_bytes(hashlib.sha256(session.encode()).digest()[:8], "big") % total
        else:
            point = random.randrange(total)
        for version, weight in self.targets:
            if point < weight:
                return version
            point -= weight
        return self.first


def choose(drawn: registry_pb2.ModelVersion, current: Resolution, previous: Resolution | None,
           served: Collection[str]) -> registry_pb2.ModelVersion:
    """The version to route to: the one drawn when a replica serves it; else another served target of the
    reference; else a served target of what the reference meant before its last move (its new version is still
    loading); else the one drawn (the request then waits for it, or is refused naming it)."""
    if model_id(drawn) in served:
        return drawn
    for candidates in (current, previous):
        for version, _ in candidates.targets if candidates is not None else ():
            if model_id(version) in served:
                return version
    return drawn


class ModelDirectory:
    def __init__(self, registry: Peer[registry_pb2_grpc.RegistryStub], ttl_s: float = RESOLVE_TTL_S) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        # reference -> (trusted until, monotonic; its resolution); "until" is infinite while the watch lives.
        self._cache: dict[str, tuple[float, Resolution]] = {}
        self._previous: dict[str, Resolution] = {}  # what each reference meant before the registry's last change
        self._inflight: dict[str, asyncio.Future[Resolution]] = {}
        self._last_list: list[registry_pb2.ModelVersion] | None = None
        self._stale = StaleAnswers(log, "registry", "serving the last answer for %r")
        self._revision: int | None = None  # the registry revision the cache reflects, while the watch lives
        self._generation = 0  # bumped on every change: a resolution asked for before one is not cached
        self._watch = StreamFollower(registry, self._open_watch, self._on_change, what="model watch", log=log,
                                     on_lost=self._on_watch_lost)

    @staticmethod
    def _open_watch(lease: Lease[registry_pb2_grpc.RegistryStub]) -> AsyncIterator[registry_pb2.WatchModelsResponse]:
        call: AsyncIterator[registry_pb2.WatchModelsResponse] = lease.stub.WatchModels(
            registry_pb2.WatchModelsRequest(), **lease.options(timeout=None))
        return call

    def _on_change(self, message: registry_pb2.WatchModelsResponse) -> None:
        if message.revision == self._revision:
            return  # a re-opened stream at the revision the cache already reflects
        known = self._revision is not None
        self._revision = message.revision
        self._generation += 1
        for reference, (_, resolution) in self._cache.items():
            self._previous[reference] = resolution
        self._cache.clear()
        if known:
            log.info("the registry changed (revision %d): model references are resolved again", message.revision)

    def _on_watch_lost(self) -> None:
        """Changes may now go unannounced: what is cached is trusted for the TTL only."""
        if self._revision is None:
            return
        self._revision = None
        until = time.monotonic() + self._ttl_s
        self._cache = {ref: (min(expiry, until), resolution) for ref, (expiry, resolution) in self._cache.items()}

    async def close(self) -> None:
        await self._watch.close()

    def previous(self, reference: str) -> Resolution | None:
        """What `reference` meant before the registry's last change (None: unchanged since this gateway asked)."""
        return self._previous.get(reference)

    async def resolve(self, reference: str) -> registry_pb2.ModelVersion:
        """The version `reference` means (a split alias: its heaviest target)."""
        return (await self.resolution(reference)).first

    async def resolution(self, reference: str) -> Resolution:
        self._watch.start()
        cached = self._cache.get(reference)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        pending = self._inflight.get(reference)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Resolution] = asyncio.get_running_loop().create_future()
        self._inflight[reference] = future
        generation = self._generation
        try:
            try:
                response = await self._registry.call(lambda r: r.ResolveModel,
                                                     registry_pb2.ResolveModelRequest(reference=reference),
                                                     timeout=10)
            except Unavailable:
                if cached is None:
                    raise
                # The registry is down: the last answer keeps chats going (an alias move waits for its return).
                self._stale.served_stale(reference)
                future.set_result(cached[1])
                return cached[1]
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                # The registry names its own field; the caller sent it as `model`.
                problem = (exc.details() or "").removeprefix("reference: ")
                raise InvalidArgument("model", problem) from None
            resolution = Resolution.from_proto(response)
            if generation == self._generation:  # no change announced meanwhile: the answer is current
                until = float("inf") if self._revision is not None else time.monotonic() + self._ttl_s
                self._cache[reference] = (until, resolution)
            self._stale.answered(reference)
            future.set_result(resolution)
            return resolution
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[reference]

    async def route(self, reference: str, served: Collection[str], session: str = "") -> registry_pb2.ModelVersion:
        """The version this request goes to (see `choose`)."""
        resolution = await self.resolution(reference)
        return choose(resolution.draw(session), resolution, self.previous(reference), served)

    async def list(self) -> list[registry_pb2.ModelVersion]:
        try:
            response = await self._registry.call(lambda r: r.ListModels, registry_pb2.ListModelsRequest(),
                                                 timeout=10)
        except Unavailable:
            if self._last_list is None:
                raise
            self._stale.served_stale(LIST_KEY)
            return list(self._last_list)
        self._stale.answered(LIST_KEY)
        self._last_list = list(response.models)
        return list(self._last_list)
