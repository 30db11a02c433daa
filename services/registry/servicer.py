"""The Registry gRPC servicer: protos in, domain calls, protos out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence

import grpc
from lmesh.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.admin import AdminGuard
from services.common.connect import parse_spiffe_id, peer_spiffe_id
from services.common.discovery import meta_models
from services.common.errors import InvalidArgument, LmeshError, NotFound, Reason, Unavailable
from services.common.references import check_reference
from services.common.rpc import first_message
from services.registry.store import (
    UNKNOWN_ACTOR,
    Alias,
    AliasMove,
    AliasTarget,
    Architecture,
    Artifact,
    BlobStore,
    ModelStore,
    ModelVersion,
    Removal,
    ResolvedTarget,
    check_name,
    check_version,
    cut_actor,
    draw,
    model_in_use,
)

# Consul meta keys of an inference replica that list the versions it serves, loads and drains (`name:version`,
# comma-separated): a version any of them names must not be deleted.
REPLICA_MODEL_KEYS = ("models", "loading", "draining")
MAX_WATCHED_REFERENCES = 64
DEFAULT_GC_MIN_AGE_S = 3600

# The service ids of the passing inference replicas that serve, load or drain a version (`name:version`);
# Unavailable when Consul cannot be asked.
ReplicasUsing = Callable[[str], Awaitable[Sequence[str]]]


def replica_uses(meta: Mapping[str, str], model_id: str) -> bool:
    return any(model_id in meta_models(meta, key) for key in REPLICA_MODEL_KEYS)


async def no_replicas(model_id: str) -> Sequence[str]:
    """For a registry that knows no inference replicas (tests of the store alone)."""
    return ()


def artifact_to_proto(artifact: Artifact) -> registry_pb2.Artifact:
    return registry_pb2.Artifact(
        kind=artifact.kind,
        sha256=artifact.sha256,
        size_bytes=artifact.size_bytes,
        file_name=artifact.file_name,
    )


def model_to_proto(model: ModelVersion) -> registry_pb2.ModelVersion:
    arch = model.architecture
    return registry_pb2.ModelVersion(
        name=model.name,
        version=model.version,
        format=model.format,
        artifacts=[artifact_to_proto(a) for a in model.artifacts],
        chat_template=model.chat_template,
        context_length=model.context_length,
        eos_token_ids=list(model.eos_token_ids),
        bos_token_id=model.bos_token_id,
        architecture=registry_pb2.ModelArchitecture(
            num_layers=arch.num_layers,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            vocab_size=arch.vocab_size,
            dtype=arch.dtype,
        ),
        labels=dict(model.labels),
        aliases=list(model.aliases),
        create_time_unix_ms=model.create_time_unix_ms,
    )


def targets_to_proto(targets: Sequence[AliasTarget]) -> list[registry_pb2.AliasTarget]:
    return [registry_pb2.AliasTarget(name=t.name, version=t.version, weight=t.weight) for t in targets]


def alias_to_proto(alias: Alias) -> registry_pb2.Alias:
    return registry_pb2.Alias(alias=alias.alias, targets=targets_to_proto(alias.targets),
                              update_time_unix_ms=alias.update_time_unix_ms)


def move_to_proto(move: AliasMove) -> registry_pb2.AliasMove:
    return registry_pb2.AliasMove(alias=move.alias, to=targets_to_proto(move.to_targets), actor=move.actor,
                                  time_unix_ms=move.time_unix_ms, action=move.action,
                                  **{"from": targets_to_proto(move.from_targets)})


def resolved_to_proto(targets: Sequence[ResolvedTarget]) -> list[registry_pb2.ResolvedTarget]:
    return [registry_pb2.ResolvedTarget(model=model_to_proto(t.model), weight=t.weight) for t in targets]


def removed_to_proto(removal: Removal) -> list[registry_pb2.Artifact]:
    """DeleteModelResponse's and CollectGarbageResponse's `removed_blobs`."""
    return [registry_pb2.Artifact(kind=registry_pb2.ArtifactKind.Name(b.kind), sha256=b.sha256,
                                  size_bytes=b.size_bytes, file_name=b.file_name) for b in removal.blobs]


def caller_actor(requested: str, context: grpc.aio.ServicerContext) -> str:
    """Who moved an alias, for its history: the request's `actor` (cut), else the caller's verified mesh
    identity, else "unknown". Informational only: the admin token is what authorizes."""
    if requested:
        return cut_actor(requested)
    spiffe = peer_spiffe_id(context)
    identity = parse_spiffe_id(spiffe) if spiffe else None
    return cut_actor(identity.service) if identity else UNKNOWN_ACTOR


def model_from_proto(model: registry_pb2.ModelVersion) -> ModelVersion:
    """The version to register; output-only fields (aliases, create time) are dropped."""
    arch = model.architecture
    return ModelVersion(
        name=model.name,
        version=model.version,
        format=int(model.format),
        artifacts=tuple(
            Artifact(kind=int(a.kind), sha256=a.sha256, size_bytes=a.size_bytes, file_name=a.file_name)
            for a in model.artifacts
        ),
        chat_template=model.chat_template,
        context_length=model.context_length,
        eos_token_ids=tuple(model.eos_token_ids),
        bos_token_id=model.bos_token_id,
        architecture=Architecture(
            num_layers=arch.num_layers,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            vocab_size=arch.vocab_size,
            dtype=arch.dtype,
        ),
        labels=dict(model.labels),
    )


# An upload whose client stops sending holds a temporary file and its descriptor: it ends after this long idle.
UPLOAD_IDLE_S = 60.0


async def _chunks(requests: AsyncIterator[registry_pb2.UploadArtifactRequest],
                  idle_s: float = UPLOAD_IDLE_S) -> AsyncIterator[bytes]:
    while True:
        try:
            async with asyncio.timeout(idle_s):
                request = await anext(requests, None)
        except TimeoutError:
            raise InvalidArgument("chunk", f"no chunk and no end of the upload within {idle_s:g} s") from None
        if request is None:
            return
        if request.WhichOneof("kind") != "chunk":
            raise InvalidArgument("chunk", "every message after the first must carry a chunk")
        yield request.chunk


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, blobs: BlobStore, models: ModelStore, admin: AdminGuard | None = None,
                 replicas_using: ReplicasUsing = no_replicas) -> None:
        self._blobs = blobs
        self._models = models
        # Writes (uploads, registrations, aliases) need the admin token when one is set; reads stay open to the
        # mesh's services.
        self._admin = admin or AdminGuard(None)
        self._replicas_using = replicas_using
        # Set, and replaced by a fresh one, after every change: what WatchModels streams wait on.
        self._changed = asyncio.Event()
        self._draining = False
        models.on_change(self._announce)

    def _announce(self, revision: int = 0) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def drain(self) -> None:
        """Ends every WatchModels stream (UNAVAILABLE, reason DRAINING: the client reconnects to another
        instance), so that the never-ending streams do not hold up a graceful stop for the whole grace."""
        self._draining = True
        self._announce()

    async def UploadArtifact(
        self,
        request_iterator: AsyncIterable[registry_pb2.UploadArtifactRequest],
        context: grpc.aio.ServicerContext,
    ) -> registry_pb2.UploadArtifactResponse:
        self._admin.check_call(context)
        requests = aiter(request_iterator)
        header = await first_message(requests, "header")
        stored = await self._blobs.put(header.sha256, _chunks(requests), size_bytes=header.size_bytes)
        # An already stored blob is answered at once; the rest of the client's stream is not read.
        return registry_pb2.UploadArtifactResponse(
            artifact=registry_pb2.Artifact(
                sha256=stored.sha256, size_bytes=stored.size_bytes, file_name=header.file_name
            ),
            already_stored=stored.already_stored,
        )

    async def RegisterModel(
        self, request: registry_pb2.RegisterModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterModelResponse:
        self._admin.check_call(context)
        if not request.HasField("model"):
            raise InvalidArgument("model", "is required")
        model = self._models.register(model_from_proto(request.model), list(request.aliases),
                                      actor=caller_actor("", context))
        return registry_pb2.RegisterModelResponse(model=model_to_proto(model))

    async def GetModel(
        self, request: registry_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.GetModelResponse:
        return registry_pb2.GetModelResponse(
            model=model_to_proto(self._models.get(request.name, request.version))
        )

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListModelsResponse:
        return registry_pb2.ListModelsResponse(
            models=[model_to_proto(m) for m in self._models.list(request.name)],
            aliases=[alias_to_proto(a) for a in self._models.list_aliases()],
        )

    async def ResolveModel(
        self, request: registry_pb2.ResolveModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ResolveModelResponse:
        targets = self._models.resolve_targets(request.reference)
        return registry_pb2.ResolveModelResponse(model=model_to_proto(draw(targets)),
                                                 targets=resolved_to_proto(targets))

    async def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.SetAliasResponse:
        self._admin.check_call(context)
        actor = caller_actor(request.actor, context)
        single = bool(request.name or request.version)
        if single and request.targets:
            raise InvalidArgument("targets", "set either `name` and `version` or `targets`, not both")
        if single:
            check_name(request.name, "name")
            check_version(request.version, "version")
            model = self._models.set_alias(request.alias, request.name, request.version, actor=actor)
        elif request.targets:
            targets = [AliasTarget(t.name, t.version, t.weight) for t in request.targets]
            model = self._models.set_alias(request.alias, targets, actor=actor)
        else:
            raise InvalidArgument("name", "is required (or `targets`)")
        return registry_pb2.SetAliasResponse(model=model_to_proto(model),
                                             alias=alias_to_proto(self._models.get_alias(request.alias)))

    async def RollbackAlias(
        self, request: registry_pb2.RollbackAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.RollbackAliasResponse:
        self._admin.check_call(context)
        alias, move = self._models.rollback(request.alias, actor=caller_actor(request.actor, context))
        return registry_pb2.RollbackAliasResponse(alias=alias_to_proto(alias), move=move_to_proto(move))

    async def ListAliases(
        self, request: registry_pb2.ListAliasesRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ListAliasesResponse:
        return registry_pb2.ListAliasesResponse(aliases=[alias_to_proto(a) for a in self._models.list_aliases()])

    async def GetAliasHistory(
        self, request: registry_pb2.GetAliasHistoryRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.GetAliasHistoryResponse:
        moves = self._models.history(request.alias, request.limit)
        return registry_pb2.GetAliasHistoryResponse(moves=[move_to_proto(m) for m in moves])

    async def DeleteModel(
        self, request: registry_pb2.DeleteModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.DeleteModelResponse:
        self._admin.check_call(context)
        model = self._models.get(request.name, request.version)
        try:
            replicas = sorted(await self._replicas_using(model.ref))
        except LmeshError:
            raise
        except Exception as exc:
            raise Unavailable(f"cannot ask Consul which inference replicas serve {model.ref} ({exc}); nothing "
                              "was deleted") from exc
        if replicas:
            raise model_in_use(model.ref, sorted(model.aliases), replicas)
        # The store checks the aliases again, in the deletion's own transaction.
        removal = self._models.delete(request.name, request.version)
        return registry_pb2.DeleteModelResponse(removed_blobs=removed_to_proto(removal),
                                                freed_bytes=removal.freed_bytes)

    async def CollectGarbage(
        self, request: registry_pb2.CollectGarbageRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.CollectGarbageResponse:
        self._admin.check_call(context)
        if request.min_age_seconds < 0:
            raise InvalidArgument("min_age_seconds", f"must not be negative, got {request.min_age_seconds}")
        # On the event loop, not a thread: no registration may run between reading which blobs are referenced and
        # removing the others (a few stats and unlinks).
        removal = self._models.collect_garbage(request.min_age_seconds or DEFAULT_GC_MIN_AGE_S, request.dry_run)
        return registry_pb2.CollectGarbageResponse(removed_blobs=removed_to_proto(removal),
                                                   freed_bytes=removal.freed_bytes)

    def _resolution(self, reference: str) -> registry_pb2.Resolution:
        try:
            targets = self._models.resolve_targets(reference)
        except NotFound:
            targets = []
        return registry_pb2.Resolution(reference=reference, targets=resolved_to_proto(targets))

    async def WatchModels(
        self, request: registry_pb2.WatchModelsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[registry_pb2.WatchModelsResponse]:
        references = list(request.references)
        if len(references) > MAX_WATCHED_REFERENCES:
            raise InvalidArgument("references", f"at most {MAX_WATCHED_REFERENCES}, got {len(references)}")
        for i, reference in enumerate(references):
            check_reference(reference, f"references[{i}]")
        sent = -1
        while not self._draining:
            changed = self._changed  # taken before the revision is read, so no change can slip between
            revision = self._models.revision
            if revision != sent:
                sent = revision
                yield registry_pb2.WatchModelsResponse(revision=revision,
                                                       resolutions=[self._resolution(r) for r in references])
            else:
                await changed.wait()
        raise Unavailable("the registry is shutting down; reconnect to another instance", reason=Reason.DRAINING)

    async def FetchArtifact(
        self,
        request: registry_pb2.FetchArtifactRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[registry_pb2.FetchArtifactResponse]:
        size = self._blobs.stat(request.sha256)
        yield registry_pb2.FetchArtifactResponse(
            header=registry_pb2.FetchArtifactHeader(sha256=request.sha256, size_bytes=size)
        )
        async for chunk in self._blobs.read_chunks(request.sha256):
            yield registry_pb2.FetchArtifactResponse(chunk=chunk)
