"""Model resolution for the gateway, cached briefly so no registry call sits on every request."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from lmesh.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.discovery import StaleAnswers
from services.common.errors import InvalidArgument, Unavailable
from services.common.peers import Peer

log = logging.getLogger("lmesh.gateway.models")
RESOLVE_TTL_S = 5.0  # short enough that an alias move is seen within seconds
LIST_KEY = "the model list"  # stale answers are logged per reference; the list is one more


class ModelDirectory:
    def __init__(self, registry: Peer[registry_pb2_grpc.RegistryStub], ttl_s: float = RESOLVE_TTL_S) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._cache: dict[str, tuple[float, registry_pb2.ModelVersion]] = {}
        self._inflight: dict[str, asyncio.Future[registry_pb2.ModelVersion]] = {}
        self._last_list: list[registry_pb2.ModelVersion] | None = None
        self._stale = StaleAnswers(log, "registry", "serving the last answer for %r")

    async def resolve(self, reference: str) -> registry_pb2.ModelVersion:
        cached = self._cache.get(reference)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        pending = self._inflight.get(reference)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[registry_pb2.ModelVersion] = asyncio.get_running_loop().create_future()
        self._inflight[reference] = future
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
            self._cache[reference] = (time.monotonic() + self._ttl_s, response.model)
            self._stale.answered(reference)
            future.set_result(response.model)
            return response.model
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[reference]

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
