"""The Embeddings gRPC servicer: protos in, domain calls, protos out."""

from __future__ import annotations

import grpc
from lmesh.embeddings.v1 import embeddings_pb2, embeddings_pb2_grpc

from services.common.errors import Unavailable
from services.embeddings.embedder import MAX_INPUTS, EmbeddingModel, MicroBatcher, check_request


class EmbeddingsServicer(embeddings_pb2_grpc.EmbeddingsServicer):
    def __init__(self, batcher: MicroBatcher) -> None:
        self._batcher = batcher

    def _model(self) -> EmbeddingModel:
        if self._batcher.model is None:
            raise Unavailable("lmesh-embeddings is still loading its model", retry_after_s=1.0)
        return self._batcher.model

    async def Embed(self, request: embeddings_pb2.EmbedRequest, context: grpc.aio.ServicerContext
                    ) -> embeddings_pb2.EmbedResponse:
        model = self._model()
        inputs = list(request.inputs)
        check_request(inputs, request.model, model.name)
        embedded = await self._batcher.embed(inputs)
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
        model = self._model()
        return embeddings_pb2.GetModelResponse(model=model.name, dimensions=model.dimensions,
                                               max_input_tokens=model.max_seq_length, max_inputs=MAX_INPUTS)
