"""The Embeddings gRPC servicer: protos in, domain calls, protos out."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from lmesh.embeddings.v1 import embeddings_pb2, embeddings_pb2_grpc

from services.common.errors import Unavailable
from services.embeddings.embedder import MAX_INPUTS, EmbeddingModel, MicroBatcher, check_model, check_request


class EmbeddingsServicer(embeddings_pb2_grpc.EmbeddingsServicer):
    """`batchers` by model name, filled while the service loads (`models` of them in all); the first is the
    default: what a request naming no model gets."""

    def __init__(self, batchers: Mapping[str, MicroBatcher], models: int) -> None:
        self._batchers = batchers
        self._models = models

    def _batcher(self, name: str) -> tuple[MicroBatcher, EmbeddingModel]:
        if len(self._batchers) < self._models:
            raise Unavailable("lmesh-embeddings is still loading its models", retry_after_s=1.0)
        check_model(name, list(self._batchers))
        batcher = self._batchers[name] if name else next(iter(self._batchers.values()))
        if batcher.model is None:
            raise Unavailable("lmesh-embeddings is still loading its models", retry_after_s=1.0)
        return batcher, batcher.model

    async def Embed(self, request: embeddings_pb2.EmbedRequest, context: grpc.aio.ServicerContext
                    ) -> embeddings_pb2.EmbedResponse:
        batcher, model = self._batcher(request.model)
        inputs = list(request.inputs)
        check_request(inputs, request.model, list(self._batchers))
        embedded = await batcher.embed(inputs)
        tokens = sum(e.token_count for e in embedded)
        return embeddings_pb2.EmbedResponse(
            embeddings=[embeddings_pb2.Embedding(index=i, values=e.vector.tolist(), token_count=e.token_count,
                                                 truncated=e.truncated) for i, e in enumerate(embedded)],
            model=model.name,
            dimensions=model.dimensions,
            usage=embeddings_pb2.EmbedUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def GetModel(self, request: embeddings_pb2.GetModelRequest, context: grpc.aio.ServicerContext
                       ) -> embeddings_pb2.GetModelResponse:
        _, model = self._batcher(request.model)
        return embeddings_pb2.GetModelResponse(model=model.name, dimensions=model.dimensions,
                                               max_input_tokens=model.max_seq_length, max_inputs=MAX_INPUTS)
