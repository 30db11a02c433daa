"""The Registry gRPC servicer: protos in, domain calls, protos out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator

import grpc
from lmesh.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.admin import AdminGuard
from services.common.errors import InvalidArgument
from services.common.rpc import first_message
from services.registry.store import Architecture, Artifact, BlobStore, ModelStore, ModelVersion


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
    def __init__(self, blobs: BlobStore, models: ModelStore, admin: AdminGuard | None = None) -> None:
        self._blobs = blobs
        self._models = models
        # Writes (uploads, registrations, aliases) need the admin token when one is set; reads stay open to the
        # mesh's services.
        self._admin = admin or AdminGuard(None)

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
        model = self._models.register(model_from_proto(request.model), list(request.aliases))
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
            models=[model_to_proto(m) for m in self._models.list(request.name)]
        )

    async def ResolveModel(
        self, request: registry_pb2.ResolveModelRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.ResolveModelResponse:
        return registry_pb2.ResolveModelResponse(
            model=model_to_proto(self._models.resolve(request.reference))
        )

    async def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> registry_pb2.SetAliasResponse:
        self._admin.check_call(context)
        model = self._models.set_alias(request.alias, request.name, request.version)
        return registry_pb2.SetAliasResponse(model=model_to_proto(model))

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
