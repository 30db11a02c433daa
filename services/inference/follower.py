"""An inference replica that follows its model references: `--model default` serves whatever `default` means, now
and after every move of the alias, without failing a request.

The registry streams what the references mean (WatchModels: the whole state first, then once per change). On a
change the new version loads beside the old one, which keeps serving (`loading`); once warm, one step advertises
the new set in Consul meta `models` and marks the replaced versions `draining`: no longer advertised, but still
accepting requests for a grace period (a gateway's view of Consul lags), then no longer accepting, their streams
left to finish (bounded), their engines closed. When memory cannot hold both versions, the old one drains first
and the new one loads after it (a short gap rather than an out-of-memory kill).

A load that fails leaves the old version serving; the next change retries it. A reference that resolves to nothing
(its alias or version deleted) keeps what it is served by. A `name:version` reference is pinned: it never moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Protocol

import grpc
from lmesh.registry.v1 import registry_pb2
from lmesh.registry.v1.registry_pb2_grpc import RegistryStub

from services.common.errors import LmeshError, Reason, Unavailable
from services.common.peers import Peer
from services.inference.engine import Engine
from services.inference.main import SWAP_MODES
from services.inference.servicer import ServedModel

log = logging.getLogger("lmesh.inference.follower")

LOADING, SERVING, DRAINING = "loading", "serving", "draining"
GiB = 2**30


class ModelSource(Protocol):
    """Where a replica learns what its references mean: one WatchModels stream per call. The stream ends or raises
    when it is lost; the follower opens another, whose first message is the whole state."""

    def watch(self, references: Sequence[str]) -> AsyncGenerator[registry_pb2.WatchModelsResponse, None]: ...


class RegistrySource:
    """ModelSource over lmesh-registry: one instance for the stream's life; one that is down is marked so, and the
    next stream goes to another."""

    def __init__(self, registry: Peer[RegistryStub]) -> None:
        self._registry = registry

    async def watch(self, references: Sequence[str]) -> AsyncGenerator[registry_pb2.WatchModelsResponse, None]:
        async with self._registry.lease() as lease:
            call = lease.stub.WatchModels(registry_pb2.WatchModelsRequest(references=list(references)),
                                          **lease.options(timeout=None))
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self._registry.mark_down(lease.endpoint)
                raise
            finally:
                call.cancel()


def available_memory() -> int | None:
    """Linux's estimate of the memory a new allocation can take without swapping (MemAvailable); None where
    /proc/meminfo does not say (the follower then loads beside)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def is_pinned(reference: str) -> bool:
    """`name:version` names one immutable version; a name or an alias may mean another one later."""
    return ":" in reference


def _model_id(version: registry_pb2.ModelVersion) -> str:
    return f"{version.name}:{version.version}"


def _error_code(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    return exc.code if isinstance(exc, LmeshError) else None


def _gib(size: int) -> str:
    return f"{size / GiB:.1f}"


class ModelFollower:
    """Owns the versions a replica serves: `models` (the dict the servicer reads, `name:version` -> ServedModel:
    advertised ones and draining ones until their engines close) and each one's state."""

    def __init__(self, source: ModelSource, references: Sequence[str],
                 load: Callable[[registry_pb2.ModelVersion], Awaitable[ServedModel]], *,
                 grace_s: float = 5.0, drain_timeout_s: float = 60.0, swap: str = "auto",
                 memory_needed: Callable[[registry_pb2.ModelVersion], int] = lambda _: 0,
                 memory_available: Callable[[], int | None] = available_memory,
                 on_state_change: Callable[[], None] = lambda: None,
                 on_load_change: Callable[[], None] = lambda: None,
                 retry_s: tuple[float, float] = (0.25, 5.0)) -> None:
        if swap not in SWAP_MODES:
            raise ValueError(f"swap must be one of {', '.join(SWAP_MODES)}, got {swap!r}")
        self.references = list(dict.fromkeys(references))  # `--model a --model a` follows `a` once
        self.models: dict[str, ServedModel] = {}
        self.states: dict[str, str] = {}
        self._source = source
        self._load = load
        self._grace_s = grace_s
        self._drain_timeout_s = drain_timeout_s
        self._swap = swap
        self._memory_needed = memory_needed
        self._memory_available = memory_available
        self._on_state_change = on_state_change
        self._on_load_change = on_load_change
        self._retry_s = retry_s
        # The versions each reference is served by now: changed only once all of its new targets are warm.
        self._serving_for: dict[str, frozenset[str]] = {ref: frozenset() for ref in self.references}
        self._versions: dict[str, registry_pb2.ModelVersion] = {}
        self._retiring: dict[str, asyncio.Task[None]] = {}
        self._in_grace: set[str] = set()  # retiring versions that still accept requests
        self._unresolved: set[str] = set()  # references whose empty resolution was logged
        self._latest: registry_pb2.WatchModelsResponse | None = None
        self._fresh = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Returns once every reference is served by warm versions (the replica may turn SERVING), and keeps
        following in the background. Raises what makes serving impossible: a malformed reference, a first load
        that fails (nothing older would serve in its place)."""
        self._task = asyncio.create_task(self._follow(), name="model-follower")
        ready = asyncio.create_task(self._ready.wait())
        try:
            await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._task.done():
            self._task.result()  # its error; a follower does not end otherwise
        self._task.add_done_callback(self._ended)

    @staticmethod
    def _ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("no longer following the model references: %s", task.exception(), exc_info=task.exception())

    async def stop(self) -> None:
        """Stops following (the replica drains): no more loads or swaps. Engines stay in `models` for the
        service's own drain to stop, abort and close."""
        tasks = [t for t in (self._task, *self._retiring.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._retiring.clear()
        self._in_grace.clear()

    def meta(self) -> dict[str, str]:
        """The Consul meta of the replica's versions: `models` advertised (warm and accepting), `loading`,
        `draining` (comma-separated ids), and `follows` (its references, as given)."""
        def listed(state: str) -> str:
            return ",".join(sorted(i for i, s in self.states.items() if s == state))

        return {"models": listed(SERVING), "loading": listed(LOADING), "draining": listed(DRAINING),
                "follows": ",".join(self.references)}

    # ------------------------------------------------------------------------------------------------ the stream

    async def _follow(self) -> None:
        """Applies the newest state the stream brought, one change at a time: states that arrive during a load
        are coalesced into the last one (each message is the whole state)."""
        reader = asyncio.create_task(self._read(), name="model-watch")
        try:
            while True:
                fresh = asyncio.create_task(self._fresh.wait())
                try:
                    await asyncio.wait({reader, fresh}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    fresh.cancel()
                if reader.done():
                    reader.result()
                self._fresh.clear()
                response, self._latest = self._latest, None
                if response is not None:
                    await self._apply(response)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self) -> None:
        """The watch stream, opened again (with back-off) whenever it is lost or refused."""
        delay = self._retry_s[0]
        while True:
            try:
                async with contextlib.aclosing(self._source.watch(self.references)) as stream:
                    async for response in stream:
                        delay = self._retry_s[0]
                        self._latest = response
                        self._fresh.set()
                log.info("the registry ended the model watch; opening it again")
            except (grpc.aio.AioRpcError, LmeshError) as exc:
                if _error_code(exc) == grpc.StatusCode.INVALID_ARGUMENT:
                    raise  # a malformed reference: no retry mends it
                details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.info("watching the model references failed (%s); retrying in %.2f s", details, delay)
            await asyncio.sleep(delay)  # back-off while the registry is out of reach, not a polling loop
            delay = min(delay * 2, self._retry_s[1])

    # ------------------------------------------------------------------------------------------------ changes

    def _changes(self, response: registry_pb2.WatchModelsResponse) -> dict[str, dict[str, registry_pb2.ModelVersion]]:
        """The references whose versions differ from what serves them, with their new versions."""
        changed: dict[str, dict[str, registry_pb2.ModelVersion]] = {}
        for resolution in response.resolutions:
            ref = resolution.reference
            if ref not in self._serving_for:
                continue
            versions = {_model_id(t.model): t.model for t in resolution.targets}
            current = self._serving_for[ref]
            if not versions:
                if ref not in self._unresolved:
                    self._unresolved.add(ref)
                    if current:
                        log.warning("'%s' resolves to nothing in the registry now (deleted?); still serving %s",
                                    ref, ", ".join(sorted(current)))
                    else:
                        log.info("waiting for model '%s' in the registry", ref)
                continue
            self._unresolved.discard(ref)
            if (is_pinned(ref) and current) or frozenset(versions) == current:
                continue
            changed[ref] = versions
        return changed

    async def _apply(self, response: registry_pb2.WatchModelsResponse) -> None:
        changed = self._changes(response)
        wanted = {i: v for versions in changed.values() for i, v in versions.items()}
        for model_id in wanted:
            self._revive(model_id)
        to_load = {i: v for i, v in wanted.items() if self.states.get(i) != SERVING}
        if to_load:
            self._versions.update(to_load)
            prospective = {**self._serving_for, **{ref: frozenset(v) for ref, v in changed.items()}}
            replaced = self._unused(prospective)
            if replaced and not self._fits_beside(to_load, replaced):
                await asyncio.gather(*(self._retire_now(i) for i in replaced))
            loaded = await self._load_all(to_load)
        else:
            loaded = {}
        # One step: the references whose targets are all warm move; the rest keep what serves them.
        for ref, versions in changed.items():
            if all(i in loaded or self.states.get(i) == SERVING for i in versions):
                self._serving_for[ref] = frozenset(versions)
        kept = frozenset[str]().union(*self._serving_for.values())
        for model_id, model in loaded.items():
            if model_id in kept:
                self._advertise(model)
            else:  # a split whose other target failed: retried with it at the next change
                del self.states[model_id]
                await model.engine.close()
        for model_id in self._unused(self._serving_for):
            self._retire(model_id)
        if all(self._serving_for.values()):
            self._ready.set()
        self._on_state_change()
        await self._restore(kept)
        self._versions = {i: v for i, v in self._versions.items() if i in kept or i in self.states}

    def _unused(self, serving_for: dict[str, frozenset[str]]) -> list[str]:
        """The advertised versions no reference would be served by."""
        kept = frozenset[str]().union(*serving_for.values())
        return sorted(i for i, s in self.states.items() if s == SERVING and i not in kept)

    async def _restore(self, kept: frozenset[str]) -> None:
        """After a drain swap whose new version failed: the old one loads again rather than nothing serving."""
        missing = {i: self._versions[i] for i in sorted(kept) if i not in self.states and i in self._versions}
        if not missing:
            return
        log.warning("loading %s again: the version meant to replace it could not be loaded", ", ".join(missing))
        for model in (await self._load_all(missing)).values():
            self._advertise(model)
        self._on_state_change()

    def _fits_beside(self, to_load: dict[str, registry_pb2.ModelVersion], replaced: list[str]) -> bool:
        if self._swap != "auto":
            return self._swap == "beside"
        available = self._memory_available()
        needed = sum(self._memory_needed(v) for v in to_load.values())
        if available is None or needed <= available:
            return True
        log.warning("cannot hold %s beside %s (needs ~%s GiB, %s GiB available): swapping with a short drain",
                    ", ".join(to_load), ", ".join(replaced), _gib(needed), _gib(available))
        return False

    async def _load_all(self, versions: dict[str, registry_pb2.ModelVersion]) -> dict[str, ServedModel]:
        """Loads `versions` one at a time (memory peaks once); one that fails is logged and left out, unless nothing
        serves yet: a replica that could not load its first versions does not turn SERVING."""
        loaded: dict[str, ServedModel] = {}
        for model_id in versions:
            if model_id not in self._retiring:  # one still draining shows so until it is gone
                self.states[model_id] = LOADING
        self._on_state_change()
        try:
            for model_id, version in versions.items():
                if model_id in self._retiring:  # the same version still draining (moved away and back): let it go
                    await self._retiring[model_id]
                    self.states[model_id] = LOADING
                try:
                    loaded[model_id] = await self._load(version)
                except Exception as exc:
                    if not self._ready.is_set():
                        raise
                    reason = str(exc).strip()[:300] or type(exc).__name__
                    log.warning("could not load %s, still serving %s: %s", model_id,
                                ", ".join(sorted(self.models)) or "nothing", reason)
                    del self.states[model_id]
        except BaseException:
            for model in loaded.values():
                await model.engine.close()
            for model_id in versions:
                if self.states.get(model_id) == LOADING:
                    del self.states[model_id]
            raise
        return loaded

    def _advertise(self, model: ServedModel) -> None:
        model.engine.on_load_change = self._on_load_change
        self.models[model.id] = model
        self.states[model.id] = SERVING
        log.info("serving %s", model.id)

    # ------------------------------------------------------------------------------------------------ retirement

    def _retire(self, model_id: str) -> None:
        """Unadvertises `model_id` now and lets it go in the background (see `_drain`)."""
        self.states[model_id] = DRAINING
        self._in_grace.add(model_id)
        self._retiring[model_id] = asyncio.create_task(self._drain(model_id), name=f"drain-{model_id}")

    def _revive(self, model_id: str) -> None:
        """A version moved back to while it still accepts requests (an alias rolled back within the grace) serves
        again at once, rather than being closed and loaded again."""
        if model_id in self._in_grace:
            self._in_grace.discard(model_id)
            self._retiring.pop(model_id).cancel()
            self.states[model_id] = SERVING
            log.info("serving %s again", model_id)

    async def _retire_now(self, model_id: str) -> None:
        self._retire(model_id)
        self._on_state_change()
        await self._retiring[model_id]

    async def _drain(self, model_id: str) -> None:
        """Accepts for the grace (gateways still routing by an older Consul view), then stops accepting, waits for
        the streams (bounded, then ends them saying why), closes the engine and forgets the version."""
        engine = self.models[model_id].engine
        await asyncio.sleep(self._grace_s)
        self._in_grace.discard(model_id)
        engine.stop_accepting()
        if not await self._until_idle(engine, self._drain_timeout_s):
            log.warning("%s still had streams %.0f s after it was replaced; ending them", model_id,
                        self._drain_timeout_s)
            engine.abort(Unavailable(f"model '{model_id}' was replaced on this replica before this stream finished; "
                                     "retry", reason=Reason.DRAINING))
            await self._until_idle(engine, 5.0)
        await engine.close()
        del self.models[model_id], self.states[model_id], self._retiring[model_id]
        log.info("stopped serving %s", model_id)
        self._on_state_change()

    async def _until_idle(self, engine: Engine, timeout_s: float) -> bool:
        """Whether the engine's sequences, active and queued, all ended within `timeout_s`."""
        changed = asyncio.Event()

        def on_load_change() -> None:
            changed.set()
            self._on_load_change()

        engine.on_load_change = on_load_change
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while (load := engine.load())["active"] or load["queued"]:
                    await changed.wait()
                    changed.clear()
        return not ((load := engine.load())["active"] or load["queued"])

