"""Which tools a request needs: embedding similarity between the request and each tool's description (two towers:
descriptions are embedded once, when a tool first appears, and kept by their text; a request costs one embedding),
combined with a lexical (BM25) match over the descriptions (bench/tool_retrieval.py measures the choice).

The embeddings come from `lmesh-embeddings`, found through Consul like every peer, with its tool-retrieval model
(`all-minilm-l6-v2-tools`, fine-tuned to match requests to tool descriptions) or, where an instance does not serve
that one, its default model."""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from lmesh.embeddings.v1 import embeddings_pb2
from lmesh.embeddings.v1.embeddings_pb2_grpc import EmbeddingsStub

from services.common.errors import Unavailable
from services.common.peers import Peer
from services.embeddings.manifest import TOOLS_MODEL_NAME as TOOLS_MODEL  # services/embeddings/finetune.py builds it
from services.gateway.tool_catalog import Tool
from services.tools.catalog import matched_text

log = logging.getLogger("lmesh.gateway.tools")

# texts -> (the model that embedded them, one unit-norm row each); vectors of two models are not comparable
Embed = Callable[[list[str]], Awaitable[tuple[str, np.ndarray]]]
MAX_KEPT_DESCRIPTIONS = 4096
EMBED_BATCH = 256  # lmesh-embeddings' most inputs per call
# After an instance answered that it lacks TOOLS_MODEL, the default model is used this long before asking again.
TOOLS_MODEL_RETRY_S = 60.0


def embeddings_of(peer: Peer[EmbeddingsStub], timeout_s: float = 10.0, model: str = TOOLS_MODEL,
                  clock: Callable[[], float] = time.monotonic) -> Embed:
    """`Embed` through lmesh-embeddings (unit-length vectors) with `model`, or the service's default model while
    the instance asked does not serve `model` (an older build, or one without the tool-retrieval model)."""
    fallback_until = -math.inf

    async def call(texts: list[str], name: str) -> tuple[str, np.ndarray]:
        rows: list[list[float]] = []
        served = name
        for start in range(0, len(texts), EMBED_BATCH):
            request = embeddings_pb2.EmbedRequest(inputs=texts[start:start + EMBED_BATCH], model=name)
            response = await peer.call(lambda stub: stub.Embed, request, timeout=timeout_s)
            if start and response.model != served:  # another instance, another default: start again with one
                return await call(texts, response.model)
            served = response.model
            rows.extend(list(embedding.values) for embedding in response.embeddings)
        return served, np.asarray(rows, dtype=np.float32)

    async def embed(texts: list[str]) -> tuple[str, np.ndarray]:
        nonlocal fallback_until
        if model and clock() >= fallback_until:
            try:
                return await call(texts, model)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                log.warning("lmesh-embeddings does not serve %s: ranking tools with its default model", model)
                fallback_until = clock() + TOOLS_MODEL_RETRY_S
        return await call(texts, "")

    return embed


@dataclass(frozen=True)
class Candidate:
    tool: Tool
    score: float  # the hybrid score (`ToolIndex.rank`): comparable within one ranking only


def description_text(tool: Tool) -> str:
    """What a tool is matched by: its name's words and its description."""
    return matched_text(tool.name, tool.description)


_SENTENCE_END = re.compile(r"(?<=[.;:!?])\s+")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.")


def sentences_of(text: str) -> list[str]:
    """`text` cut after each . ; : ! or ? that ends a clause (not after e.g. or i.e.)."""
    sentences: list[str] = []
    for part in _SENTENCE_END.split(text.strip()):
        if sentences and sentences[-1].lower().endswith(_ABBREVIATIONS):
            sentences[-1] += " " + part
        elif part:
            sentences.append(part)
    return sentences


def description_views(tool: Tool) -> list[str]:
    """The texts a tool is embedded as: the whole description, and each of its sentences on its own (both with
    the name's words). A description says what the tool does, then when to use it or examples; a short request
    resembles one of those sentences more than their average, which is what one vector of the whole becomes."""
    name = tool.name.replace("_", " ")
    sentences = sentences_of(tool.description)
    views = [description_text(tool)]
    if len(sentences) > 1:
        views += [f"{name}: {sentence}" for sentence in sentences]
    return views


# Words that carry no topic in a request or a description (BM25's idf would weigh them little, not nothing).
_STOP_WORDS = frozenset(
    "a an and are as at be by can do does e.g for from how i in is it me my of on or the this that to was what "
    "when where which who with you your".split())
_WORD = re.compile(r"[a-z0-9]+")


def lexical_terms(text: str) -> list[str]:
    """Lower-case words without stop words, their common English suffixes cut (`emails` and `emailed` are
    `email`; `days` is `day`): a light stemmer, enough for requests and descriptions to share words."""
    terms = []
    for word in _WORD.findall(text.lower()):
        if word in _STOP_WORDS:
            continue
        for suffix in ("ing", "ed", "es", "s"):
            if len(word) > len(suffix) + 2 and word.endswith(suffix):
                word = word[: -len(suffix)]
                break
        terms.append(word)
    return terms


class Bm25:
    """Okapi BM25 (k1 = 1.2, b = 0.75) of a query against a fixed set of documents."""

    def __init__(self, documents: Sequence[str], k1: float = 1.2, b: float = 0.75) -> None:
        self._counts = [Counter(lexical_terms(document)) for document in documents]
        lengths = np.array([sum(counts.values()) for counts in self._counts], dtype=np.float64)
        self._norm = k1 * (1 - b + b * lengths / max(float(lengths.mean()) if len(lengths) else 0.0, 1.0))
        self._k1 = k1
        n = len(documents)
        frequency = Counter(term for counts in self._counts for term in counts)
        self._idf = {term: math.log(1 + (n - df + 0.5) / (df + 0.5)) for term, df in frequency.items()}

    def scores(self, query: str) -> np.ndarray:
        scores = np.zeros(len(self._counts), dtype=np.float64)
        for term in set(lexical_terms(query)):
            idf = self._idf.get(term)
            if idf is None:
                continue
            tf = np.array([counts.get(term, 0) for counts in self._counts], dtype=np.float64)
            scores += idf * tf * (self._k1 + 1) / (tf + self._norm)
        return scores


# How much the lexical match counts beside the two cosines (each in [-1, 1]); BM25 is scaled so that the best
# description of a request scores 1. Chosen on bench/tool_retrieval.py; 0.1 to 0.2 give the same recall@3.
LEXICAL_WEIGHT = 0.15


def hybrid_scores(whole: np.ndarray, best_sentence: np.ndarray, lexical: np.ndarray) -> np.ndarray:
    """Per tool: the mean of the cosine to its whole description and to its closest sentence, plus
    LEXICAL_WEIGHT times its BM25 score relative to the request's best (0 when no word is shared)."""
    top = float(lexical.max()) if lexical.size else 0.0
    relative = lexical / top if top > 0 else np.zeros_like(lexical)
    return (whole + best_sentence) / 2 + LEXICAL_WEIGHT * relative


class ToolIndex:
    """Tool descriptions' embeddings, kept by text (a tool that comes back costs nothing), and a lexical index of
    the tools last ranked over.

    A request's score for a tool combines three signals (`hybrid_scores`): the cosine to the whole description,
    the cosine to its closest sentence, and BM25 over the name and description. The lexical part recovers what a
    small embedding model blurs: rare words a request shares with one description (`email`, `invoice`, `pager`).
    """

    def __init__(self, embed: Embed) -> None:
        self._embed = embed
        self._vectors: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()  # by (model, text)
        self._lexical: tuple[tuple[str, ...], Bm25] | None = None

    async def _vectors_of(self, model: str, texts: list[str]) -> np.ndarray | None:
        """`texts`' vectors by `model`: None when lmesh-embeddings answered with another model meanwhile."""
        missing = sorted({text for text in texts if (model, text) not in self._vectors})
        if missing:
            embedded_by, vectors = await self._embed(missing)
            for text, vector in zip(missing, vectors, strict=True):
                self._vectors[(embedded_by, text)] = np.asarray(vector, dtype=np.float32)
            if embedded_by != model:
                return None
        for text in texts:
            self._vectors.move_to_end((model, text))
        while len(self._vectors) > MAX_KEPT_DESCRIPTIONS:
            self._vectors.popitem(last=False)
        return np.stack([self._vectors[(model, text)] for text in texts])

    def _bm25(self, tools: Sequence[Tool]) -> Bm25:
        key = tuple(description_text(tool) for tool in tools)
        if self._lexical is None or self._lexical[0] != key:
            self._lexical = (key, Bm25(key))
        return self._lexical[1]

    async def rank(self, request: str, tools: Sequence[Tool], k: int) -> list[Candidate]:
        """The `k` tools that best match `request`, best first (ties by name)."""
        if not tools or k <= 0:
            return []
        ordered = sorted(tools, key=lambda tool: tool.name)
        views = [description_views(tool) for tool in ordered]
        owner = np.repeat(np.arange(len(ordered)), [len(v) for v in views])
        texts = [text for tool_views in views for text in tool_views]
        for _ in range(3):  # the request and the descriptions by one model (instances may differ in theirs)
            model, embedded = await self._embed([request])
            vectors = await self._vectors_of(model, texts)
            if vectors is not None:
                break
        else:
            raise Unavailable("lmesh-embeddings' instances keep answering with different models; retry",
                              retry_after_s=1.0)
        query = np.asarray(embedded[0], dtype=np.float32)
        cosines = (vectors @ query).astype(np.float64)
        starts = np.concatenate(([0], np.cumsum([len(v) for v in views])[:-1]))
        whole = cosines[starts]  # each tool's first view is its whole description
        best_sentence = np.full(len(ordered), -np.inf)
        np.maximum.at(best_sentence, owner, cosines)
        scores = hybrid_scores(whole, best_sentence, self._bm25(ordered).scores(request))
        best = sorted(range(len(ordered)), key=lambda i: (-float(scores[i]), ordered[i].name))[:k]
        return [Candidate(ordered[i], float(scores[i])) for i in best]
