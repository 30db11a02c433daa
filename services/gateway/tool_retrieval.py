"""Which tools a request needs: embedding similarity between the request and each tool's description (two towers:
descriptions are embedded once, when a tool first appears, and kept by their text; a request costs one embedding).
The embeddings come from `lmesh-embeddings`, found through Consul like every peer."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
from lmesh.embeddings.v1 import embeddings_pb2
from lmesh.embeddings.v1.embeddings_pb2_grpc import EmbeddingsStub

from services.common.peers import Peer
from services.gateway.tool_catalog import Tool

# texts -> one unit-norm row each
Embed = Callable[[list[str]], Awaitable[np.ndarray]]
MAX_KEPT_DESCRIPTIONS = 4096
EMBED_BATCH = 256  # lmesh-embeddings' most inputs per call


def embeddings_of(peer: Peer[EmbeddingsStub], timeout_s: float = 10.0) -> Embed:
    """`Embed` through lmesh-embeddings (unit-length vectors)."""

    async def embed(texts: list[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for start in range(0, len(texts), EMBED_BATCH):
            request = embeddings_pb2.EmbedRequest(inputs=texts[start:start + EMBED_BATCH])
            response = await peer.call(lambda stub: stub.Embed, request, timeout=timeout_s)
            rows.extend(list(embedding.values) for embedding in response.embeddings)
        return np.asarray(rows, dtype=np.float32)

    return embed


@dataclass(frozen=True)
class Candidate:
    tool: Tool
    score: float  # cosine similarity of the request and the tool's description


def description_text(tool: Tool) -> str:
    """What a tool is matched by: its name's words and its description."""
    return f"{tool.name.replace('_', ' ')}: {tool.description}"


class ToolIndex:
    """Tool descriptions' embeddings, kept by text (a tool that comes back costs nothing)."""

    def __init__(self, embed: Embed) -> None:
        self._embed = embed
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    async def _description_vectors(self, tools: Sequence[Tool]) -> np.ndarray:
        texts = [description_text(tool) for tool in tools]
        missing = sorted({text for text in texts if text not in self._vectors})
        if missing:
            for text, vector in zip(missing, await self._embed(missing), strict=True):
                self._vectors[text] = np.asarray(vector, dtype=np.float32)
        for text in texts:
            self._vectors.move_to_end(text)
        while len(self._vectors) > MAX_KEPT_DESCRIPTIONS:
            self._vectors.popitem(last=False)
        return np.stack([self._vectors[text] for text in texts])

    async def rank(self, request: str, tools: Sequence[Tool], k: int) -> list[Candidate]:
        """The `k` tools whose descriptions are most similar to `request`, most similar first (ties by name)."""
        if not tools or k <= 0:
            return []
        ordered = sorted(tools, key=lambda tool: tool.name)
        vectors = await self._description_vectors(ordered)
        query = np.asarray((await self._embed([request]))[0], dtype=np.float32)
        scores = vectors @ query
        best = sorted(range(len(ordered)), key=lambda i: (-float(scores[i]), ordered[i].name))[:k]
        return [Candidate(ordered[i], float(scores[i])) for i in best]
