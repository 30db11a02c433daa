"""Loading tokenizers from the registry, once per model version, and keeping them.

A request names a model reference; the registry resolves it to a concrete version (cached for a few seconds
so alias moves are seen), the version's tokenizer.json is fetched once into the content-addressed artifact
cache and loaded once, however many requests ask for it at the same time.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol, TypeVar

import grpc
from lmesh.registry.v1 import registry_pb2
from lmesh.registry.v1.registry_pb2_grpc import RegistryStub

from services.common.discovery import StaleAnswers
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Reason, Unavailable
from services.common.peers import Peer
from services.registry.client import fetch_to_cache
from services.tokenizer.text import ModelTokenizer

log = logging.getLogger("lmesh.tokenizer.loader")

T = TypeVar("T")

RESOLVE_TIMEOUT_S = 10.0
# Distinct references remembered at most; expired ones are dropped first when the map is full.
MAX_RESOLVED_REFERENCES = 1024


class ModelSource(Protocol):
    """Where model versions and their artifact bytes come from (the registry; a fake in tests)."""

    async def resolve(self, reference: str) -> registry_pb2.ModelVersion: ...

    async def fetch(self, sha256: str, cache_dir: Path) -> Path: ...


class RegistrySource:
    """ModelSource over the `lmesh-registry` service found through Consul."""

    def __init__(self, registry: Peer[RegistryStub]) -> None:
        self._registry = registry

    async def resolve(self, reference: str) -> registry_pb2.ModelVersion:
        try:
            response = await self._registry.call(lambda r: r.ResolveModel,
                                                 registry_pb2.ResolveModelRequest(reference=reference),
                                                 timeout=RESOLVE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(details or f"model {reference!r} not found", reason=Reason.MODEL_NOT_FOUND,
                               metadata={"model": reference}) from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # The registry names its own field (`reference`); ours is `model`.
                problem = details.removeprefix("reference: ") or "is not a valid model reference"
                raise InvalidArgument("model", problem) from None
            raise
        model: registry_pb2.ModelVersion = response.model
        return model

    async def fetch(self, sha256: str, cache_dir: Path) -> Path:
        """The verified artifact at `<cache_dir>/<sha256>`, fetched from the registry unless already there."""
        try:
            return await fetch_to_cache(self._registry, sha256, cache_dir)
        except NotFound:
            # The registry resolved a version whose blob it lacks: its state is inconsistent, not our input.
            raise FailedPrecondition(f"artifact {sha256} is missing from the registry") from None


class TokenizerCache:
    """Model reference -> loaded ModelTokenizer, with one registry resolution per reference per TTL."""

    def __init__(self, source: ModelSource, artifacts_dir: Path, *, resolve_ttl_s: float = 5.0,
                 max_models: int = 8) -> None:
        self._source = source
        self._artifacts_dir = artifacts_dir
        self._resolve_ttl_s = resolve_ttl_s
        self._max_models = max_models
        self._resolved: dict[str, tuple[float, registry_pb2.ModelVersion]] = {}
        self._resolving: dict[str, asyncio.Task[registry_pb2.ModelVersion]] = {}
        self._stale = StaleAnswers(log, "registry", "using the expired resolution of %r")
        # name:version -> its loading (or loaded) tokenizer, least recently used first.
        self._models: OrderedDict[str, asyncio.Task[ModelTokenizer]] = OrderedDict()
        self._parsed = LoadedTokenizers()

    async def get(self, reference: str) -> ModelTokenizer:
        if not reference:
            raise InvalidArgument("model", "must not be empty")
        version = await self._resolve(reference)
        key = f"{version.name}:{version.version}"
        task = self._models.get(key)
        if task is None:
            task = self._single_flight(self._models, key, lambda: self._load(key, version))
            self._models[key] = task
            self._evict()
        else:
            self._models.move_to_end(key)
        # Shielded: a caller that gives up must not cancel the load the other callers wait for.
        return await asyncio.shield(task)

    async def _resolve(self, reference: str) -> registry_pb2.ModelVersion:
        cached = self._resolved.get(reference)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        task = self._resolving.get(reference)
        if task is None:
            task = self._resolving[reference] = self._single_flight(
                self._resolving, reference, lambda: self._source.resolve(reference))
            task.add_done_callback(lambda t: self._remember(reference, t))
        try:
            return await asyncio.shield(task)
        except Unavailable:
            if cached is None:
                raise
            # The registry is down: keep serving the last known version rather than fail every request.
            self._stale.served_stale(reference)
            return cached[1]

    def _remember(self, reference: str, task: asyncio.Task[registry_pb2.ModelVersion]) -> None:
        self._resolving.pop(reference, None)
        if task.cancelled() or task.exception() is not None:
            return
        self._stale.answered(reference)
        now = time.monotonic()
        if reference not in self._resolved and len(self._resolved) >= MAX_RESOLVED_REFERENCES:
            self._resolved = {ref: entry for ref, entry in self._resolved.items() if entry[0] > now}
            if len(self._resolved) >= MAX_RESOLVED_REFERENCES:
                self._resolved.clear()
        self._resolved[reference] = (now + self._resolve_ttl_s, task.result())

    @staticmethod
    def _single_flight(tasks: dict[str, asyncio.Task[T]], key: str,
                       start: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        """A task every concurrent caller for `key` awaits; forgotten on failure so the next call retries."""
        async def run() -> T:
            return await start()

        task = asyncio.create_task(run(), name=f"tokenizer-load-{key}")

        def forget_failure(done: asyncio.Task[T]) -> None:
            if (done.cancelled() or done.exception() is not None) and tasks.get(key) is done:
                del tasks[key]

        task.add_done_callback(forget_failure)
        return task

    def _evict(self) -> None:
        for key in list(self._models):
            if len(self._models) <= self._max_models:
                return
            if self._models[key].done():
                del self._models[key]

    async def _load(self, key: str, version: registry_pb2.ModelVersion) -> ModelTokenizer:
        tokenizer = await load_tokenizer(version, lambda sha256: self._source.fetch(sha256, self._artifacts_dir),
                                         self._parsed)
        log.info("loaded the tokenizer of %s (vocabulary %d)", key, tokenizer.vocab_size)
        return tokenizer


# Each tokenizer artifact's most recently loaded tokenizer, by digest, while a version still uses it: versions that
# share a tokenizer.json (a quantized build, a fine-tune) share its parse (ModelTokenizer.for_version).
LoadedTokenizers = weakref.WeakValueDictionary[str, ModelTokenizer]


async def load_tokenizer(version: registry_pb2.ModelVersion, fetch: Callable[[str], Awaitable[Path]],
                         loaded_before: LoadedTokenizers | None = None) -> ModelTokenizer:
    """`version`'s tokenizer: its one tokenizer artifact (`fetch(sha256)` gives its verified file) with the chat
    template and special tokens the registry holds for it, sharing the parse of one `loaded_before` from the same
    artifact. FailedPrecondition when the artifact is missing or does not load."""
    key = f"{version.name}:{version.version}"
    tokenizers = [a for a in version.artifacts if a.kind == registry_pb2.ARTIFACT_KIND_TOKENIZER]
    if len(tokenizers) != 1:
        raise FailedPrecondition(f"{key} has {len(tokenizers)} tokenizer artifacts, expected one")
    sha256 = tokenizers[0].sha256
    bos, eos = version.bos_token_id, list(version.eos_token_ids)
    loaded = loaded_before.get(sha256) if loaded_before is not None else None
    if loaded is not None:
        tokenizer = await asyncio.to_thread(lambda: loaded.for_version(
            version.chat_template, name=key, bos_token_id=bos, eos_token_ids=eos).prepared())
    else:
        path = await fetch(sha256)
        try:
            tokenizer = await asyncio.to_thread(lambda: ModelTokenizer.from_file(
                path, version.chat_template, name=key, bos_token_id=bos, eos_token_ids=eos).prepared())
        except Exception as exc:  # tokenizers raises bare Exceptions for malformed files
            raise FailedPrecondition(f"the tokenizer artifact of {key} does not load: {exc}") from None
    if loaded_before is not None:
        loaded_before[sha256] = tokenizer
    return tokenizer
