"""The embedding model on ONNX Runtime, and the micro-batcher that runs concurrent requests as one batch.

EmbeddingModel is synchronous (tokenize, run the graph); MicroBatcher is what the servicer calls: it answers
recently seen texts from an LRU cache and queues the rest; one worker takes every queued request at once (up to
`max_batch_texts`), runs them together in a thread, and resolves each request's future. While a batch runs, new
requests gather for the next one, so under load batches grow by themselves and an idle service adds no wait.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.common.errors import InvalidArgument, Limit, NotFound, Reason, ResourceExhausted, Unavailable
from services.embeddings.manifest import EmbeddingsManifest, load_manifest

log = logging.getLogger("lmesh.embeddings")

# Request limits (the proto documents them).
MAX_INPUTS = 256
MAX_INPUT_CHARS = 100_000
# Texts longer than this are not cached: tool descriptions and queries are short, and a cache of 100,000-character
# keys would hold gigabytes.
CACHE_MAX_TEXT_CHARS = 4096


@dataclass(frozen=True)
class TextEmbedding:
    """One text's vector (float32, unit length) and the wordpieces the model read for it."""

    vector: np.ndarray
    token_count: int
    truncated: bool


def check_model(model: str, served: Sequence[str]) -> None:
    """NotFound for a model name that is set and not among `served` (empty: the default model)."""
    if model and model not in served:
        raise NotFound(f"model '{model}' is not served here (this service serves {', '.join(map(repr, served))})",
                       reason=Reason.MODEL_NOT_FOUND, metadata={"model": model})


def check_request(inputs: Sequence[str], model: str, served: Sequence[str]) -> None:
    """InvalidArgument or NotFound for a request the service refuses, before any work is queued."""
    check_model(model, served)
    if not inputs:
        raise InvalidArgument("inputs", "at least one text is required")
    if len(inputs) > MAX_INPUTS:
        raise InvalidArgument("inputs", f"{len(inputs)} texts; at most {MAX_INPUTS} per call")
    for index, text in enumerate(inputs):
        if len(text) > MAX_INPUT_CHARS:
            raise InvalidArgument(f"inputs[{index}]", f"{len(text)} characters; at most {MAX_INPUT_CHARS} "
                                  "(only the first 256 wordpieces are embedded anyway)")


def padded(batch: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64, right-padded with 0 ([PAD]) to the longest sequence."""
    width = max(len(ids) for ids in batch)
    input_ids = np.zeros((len(batch), width), dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return input_ids, mask


def length_chunks(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices of `lengths` sorted shortest first and cut into runs whose padded size (rows x longest) stays
    within `max_batch_tokens` (a single longer row runs alone): texts of like length run together, so little
    of each run is padding, and one long text does not pad a hundred short ones."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and lengths[index] * (len(current) + 1) > max_batch_tokens:
            chunks.append(current)
            current = []
        current.append(index)
    if current:
        chunks.append(current)
    return chunks


class EmbeddingModel:
    """all-MiniLM-L6-v2 as built by services.embeddings.convert: the graph pools and normalises itself."""

    def __init__(self, manifest: EmbeddingsManifest, session: object, tokenizer: object,
                 max_batch_tokens: int = 8192) -> None:
        self.manifest = manifest
        self._session = session
        self._tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens

    @classmethod
    def load(cls, model_dir: Path, *, threads: int = 0, max_batch_tokens: int = 8192) -> EmbeddingModel:
        """Checks the build (ManifestError says what is wrong) and opens it."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest = load_manifest(model_dir)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(model_dir / manifest.model_file), options,
                                       providers=["CPUExecutionProvider"])
        tokenizer = Tokenizer.from_file(str(model_dir / manifest.tokenizer_file))
        # The build writes these; set again so a hand-edited tokenizer.json cannot make the model read 512.
        tokenizer.no_padding()
        tokenizer.enable_truncation(manifest.max_seq_length)
        return cls(manifest, session, tokenizer, max_batch_tokens=max_batch_tokens)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def dimensions(self) -> int:
        return self.manifest.dimensions

    @property
    def max_seq_length(self) -> int:
        return self.manifest.max_seq_length

    def tokenize(self, texts: Sequence[str]) -> list[tuple[list[int], bool]]:
        """Each text's wordpiece ids ([CLS] ... [SEP], at most max_seq_length) and whether it was truncated."""
        encodings = self._tokenizer.encode_batch(list(texts))  # type: ignore[attr-defined]
        return [(e.ids, bool(e.overflowing)) for e in encodings]

    def run(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """The unit vectors of tokenized texts, float32 [len(batch), dimensions], in the order given."""
        out = np.empty((len(batch), self.dimensions), dtype=np.float32)
        for chunk in length_chunks([len(ids) for ids in batch], self.max_batch_tokens):
            input_ids, mask = padded([batch[i] for i in chunk])
            vectors = self._session.run(  # type: ignore[attr-defined]
                [self.manifest.output], {"input_ids": input_ids, "attention_mask": mask})[0]
            out[chunk] = vectors
        return out

    def embed(self, texts: Sequence[str]) -> list[TextEmbedding]:
        tokenized = self.tokenize(texts)
        vectors = self.run([ids for ids, _ in tokenized])
        return [TextEmbedding(vector=vector, token_count=len(ids), truncated=truncated)
                for vector, (ids, truncated) in zip(vectors, tokenized, strict=True)]


class EmbeddingCache:
    """The most recently used texts' embeddings (texts up to CACHE_MAX_TEXT_CHARS)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[str, TextEmbedding] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, text: str) -> TextEmbedding | None:
        found = self._entries.get(text)
        if found is None:
            self.misses += 1
            return None
        self._entries.move_to_end(text)
        self.hits += 1
        return found

    def put(self, text: str, embedding: TextEmbedding) -> None:
        if self.max_entries <= 0 or len(text) > CACHE_MAX_TEXT_CHARS:
            return
        self._entries[text] = embedding
        self._entries.move_to_end(text)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future[list[TextEmbedding]]


@dataclass
class BatchStats:
    """What the batcher has done: the tests and the bench read it (batches run, texts in them)."""

    batches: int = 0
    texts: int = 0
    largest: int = 0
    # Texts embedded per second of model time, smoothed: the queue-full retry delay is estimated from it.
    texts_per_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)

    def record(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.texts += size
        self.largest = max(self.largest, size)
        if len(self.batch_sizes) < 10_000:
            self.batch_sizes.append(size)
        rate = size / max(seconds, 1e-6)
        self.texts_per_s = rate if self.texts_per_s == 0 else 0.8 * self.texts_per_s + 0.2 * rate


class MicroBatcher:
    """Gathers concurrent requests into one model run; `load` gives it the model (before that, UNAVAILABLE)."""

    def __init__(self, *, max_batch_texts: int = 256, max_queue_texts: int = 4096, cache_entries: int = 4096
                 ) -> None:
        self.max_batch_texts = max_batch_texts
        self.max_queue_texts = max_queue_texts
        self.cache = EmbeddingCache(cache_entries)
        self.stats = BatchStats()
        self.model: EmbeddingModel | None = None
        self._pending: collections.deque[_Job] = collections.deque()
        self._queued_texts = 0
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    def load(self, model: EmbeddingModel) -> None:
        self.model = model
        self._worker = asyncio.get_running_loop().create_task(self._work(model), name="embeddings-batcher")

    async def close(self) -> None:
        """Stops the worker; requests still queued end UNAVAILABLE."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(Unavailable("lmesh-embeddings shut down before this request ran; retry",
                                                     reason=Reason.DRAINING))
        self._queued_texts = 0

    async def embed(self, texts: Sequence[str]) -> list[TextEmbedding]:
        """Each text's embedding, in order: from the cache, or from the next batch the worker runs."""
        if self.model is None or self._closed:
            raise Unavailable("lmesh-embeddings is not serving (its model is loading or it is shutting down)",
                              retry_after_s=1.0)
        found: dict[str, TextEmbedding] = {}
        missing: list[str] = []
        for text in texts:
            if text in found:
                continue
            cached = self.cache.get(text)
            if cached is not None:
                found[text] = cached
            elif text not in missing:
                missing.append(text)
        if missing:
            for text, embedding in zip(missing, await self._queue(missing), strict=True):
                found[text] = embedding
        return [found[text] for text in texts]

    async def _queue(self, texts: list[str]) -> list[TextEmbedding]:
        if self._queued_texts + len(texts) > self.max_queue_texts:
            rate = self.stats.texts_per_s or 100.0
            retry_after = min(5.0, max(0.05, self._queued_texts / rate))
            raise ResourceExhausted(f"{self._queued_texts} texts are waiting to be embedded (at most "
                                    f"{self.max_queue_texts}); retry in {retry_after:.2f} s", retry_after,
                                    reason=Reason.QUEUE_FULL,
                                    limit=Limit("embeddings.queue", "texts", self.max_queue_texts))
        job = _Job(texts, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._queued_texts += len(texts)
        self._wake.set()
        # A caller that goes away cancels the future; the worker skips a cancelled job it has not started.
        return await job.future

    def _take_batch(self) -> list[_Job]:
        """Every queued job, oldest first, while their texts fit `max_batch_texts` (always at least one)."""
        batch: list[_Job] = []
        size = 0
        while self._pending and (not batch or size + len(self._pending[0].texts) <= self.max_batch_texts):
            job = self._pending.popleft()
            self._queued_texts -= len(job.texts)
            if job.future.done():  # cancelled by its caller
                continue
            batch.append(job)
            size += len(job.texts)
        if not self._pending:
            self._wake.clear()
        return batch

    async def _work(self, model: EmbeddingModel) -> None:
        while True:
            await self._wake.wait()
            batch = self._take_batch()
            if not batch:
                continue
            # A text several callers asked for at once is embedded once.
            texts = list(dict.fromkeys(text for job in batch for text in job.texts))
            started = time.perf_counter()
            try:
                embeddings = await asyncio.to_thread(model.embed, texts)
            except Exception as exc:
                log.exception("embedding a batch of %d texts failed", len(texts))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.stats.record(len(texts), time.perf_counter() - started)
            by_text = dict(zip(texts, embeddings, strict=True))
            for text, embedding in by_text.items():
                self.cache.put(text, embedding)
            for job in batch:
                if not job.future.done():
                    job.future.set_result([by_text[text] for text in job.texts])
