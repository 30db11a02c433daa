"""Loading one model version: its artifacts fetched from the registry (digest-verified), its engine started."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lmesh.registry.v1 import registry_pb2
from lmesh.registry.v1.registry_pb2_grpc import RegistryStub

from services.common.errors import FailedPrecondition
from services.common.peers import Peer
from services.inference.constrained import Grammars
from services.inference.engine import Engine, EngineLimits
from services.inference.onnx_model import LENGTH_QUANTUM, OnnxDecoder
from services.inference.servicer import ServedModel
from services.registry.client import fetch_to_cache

log = logging.getLogger("lmesh.inference.loader")


class GrammarCache:
    """A replica's constraint compilers by tokenizer artifact and end-of-turn tokens, so that versions sharing a
    tokenizer (a quantized build, a fine-tune) share one. llguidance reads a tokenizer holding the GIL (half a second
    for SmolLM2's, more on a loaded machine): long enough, during a swap, for the replica to miss the health check
    it must pass while it serves the old version."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], Grammars | None] = OrderedDict()

    async def get(self, tokenizer_sha256: str, eos_token_ids: Sequence[int], path: Path,
                  name: str) -> Grammars | None:
        key = (tokenizer_sha256, tuple(sorted(eos_token_ids)))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        try:
            grammars: Grammars | None = await asyncio.to_thread(
                lambda: Grammars.from_tokenizer_json(path.read_text(encoding="utf-8"), key[1]))
        except Exception as exc:  # llguidance's errors have no common type; the replica serves unconstrained
            log.warning("%s: llguidance cannot read its tokenizer (%s): its output cannot be constrained", name,
                        str(exc).strip()[:300])
            grammars = None
        self._entries[key] = grammars
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return grammars


async def load_version(registry: Peer[RegistryStub], version: registry_pb2.ModelVersion, cache_dir: Path,
                       limits: EngineLimits, threads: int | None, grammars: GrammarCache | None = None,
                       ) -> ServedModel:
    """`version` fetched (digest-verified), warmed and its engine started: ready for requests.

    FailedPrecondition when its files cannot be served (not a decoder this engine runs, a KV cache that does not
    fit). The engine starts last, so a load cancelled half-way leaves nothing running."""
    name = f"{version.name}:{version.version}"
    weights = [a for a in version.artifacts if a.kind == registry_pb2.ARTIFACT_KIND_MODEL]
    if len(weights) != 1:
        raise FailedPrecondition(f"{name} has no model artifact")
    path = await fetch_to_cache(registry, weights[0].sha256, cache_dir)
    try:
        decoder = await asyncio.to_thread(OnnxDecoder, path, threads)
        await asyncio.to_thread(_warm, decoder)
    except Exception as exc:  # ONNX Runtime's errors carry no common type; its first line says what failed
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FailedPrecondition(
            f"{name} cannot be served: its model file is not a decoder this engine runs ({reason[:300]}); "
            f"register a folder built by `make model`") from exc
    engine = await asyncio.to_thread(_engine, decoder, version, limits)
    compiler = await _grammars(registry, version, cache_dir, grammars or GrammarCache(size=0))
    vocab = version.architecture.vocab_size or decoder.vocab_size
    engine.start()
    log.info("loaded %s from %s", name, path)
    return ServedModel(version.name, version.version, engine, vocab, version.context_length, compiler)


# A session being built holds its weights about once more than the file (ONNX Runtime's graph optimisation).
LOAD_MEMORY_FACTOR = 1.5


def memory_needed(version: registry_pb2.ModelVersion, limits: EngineLimits) -> int:
    """About what serving `version` takes: its weights (times LOAD_MEMORY_FACTOR, for the load), a full decode KV
    cache and the prefix cache. It errs high: on a CPU the KV cache grows only as far as the sequences do."""
    weights = sum(a.size_bytes for a in version.artifacts if a.kind == registry_pb2.ARTIFACT_KIND_MODEL)
    kv = limits.max_active * version.context_length * kv_bytes_per_token(version.architecture)
    return int(weights * LOAD_MEMORY_FACTOR) + kv + limits.prefix_cache_bytes


def kv_bytes_per_token(architecture: registry_pb2.ModelArchitecture) -> int:
    """What one position of KV cache takes, from the registered architecture (before any file is loaded). The KV
    cache is half precision only in a half-precision build; int8 quantizes weights only, its cache is float32."""
    itemsize = 2 if architecture.dtype in ("float16", "bfloat16") else 4
    return 2 * architecture.num_layers * architecture.num_kv_heads * architecture.head_dim * itemsize


async def _grammars(registry: Peer[RegistryStub], version: registry_pb2.ModelVersion, cache_dir: Path,
                    cache: GrammarCache) -> Grammars | None:
    """What compiles output constraints for the version: its tokenizer artifact (tokenizer.json, digest-verified like
    the weights) read by llguidance once per replica. Without one (or one llguidance cannot read) the version is
    served unconstrained: a constrained request is then FAILED_PRECONDITION."""
    name = f"{version.name}:{version.version}"
    tokenizers = [a for a in version.artifacts if a.kind == registry_pb2.ARTIFACT_KIND_TOKENIZER]
    if len(tokenizers) != 1:
        log.warning("%s has no tokenizer artifact: its output cannot be constrained", name)
        return None
    path = await fetch_to_cache(registry, tokenizers[0].sha256, cache_dir)
    return await cache.get(tokenizers[0].sha256, version.eos_token_ids, path, name)


def _engine(decoder: OnnxDecoder, version: registry_pb2.ModelVersion, limits: EngineLimits) -> Engine:
    """The version's engine, its decode KV cache allocated and warmed (on a GPU the whole context for every row)."""
    kv_bytes = limits.max_active * version.context_length * decoder.kv_bytes_per_token()
    try:
        engine = Engine(decoder, frozenset(version.eos_token_ids), version.context_length, limits,
                        model_id=f"{version.name}:{version.version}")
        engine.warm()
    except Exception as exc:  # ONNX Runtime reports a failed allocation as a bare RuntimeError
        if not decoder.kv_fixed_length:
            raise
        raise FailedPrecondition(
            f"{version.name}:{version.version} cannot be served: its decode KV cache ({limits.max_active} rows of "
            f"{version.context_length} positions, {kv_bytes / 2**30:.1f} GiB) could not be allocated on the GPU "
            f"({str(exc).strip()[:200]}); lower --max-active") from exc
    if decoder.kv_fixed_length:
        log.info("decode KV cache on %s: %d rows of %d positions, %.1f GiB", decoder.kv_device, limits.max_active,
                 version.context_length, kv_bytes / 2**30)
    return engine


def _warm(decoder: OnnxDecoder) -> None:
    """A tiny prompt and decode step so the first real request does not pay ONNX Runtime's lazy initialisation."""
    out = decoder.run(np.asarray([[1, 2]], dtype=np.int64), np.asarray([1]), np.asarray([1]), decoder.empty_past())
    slots = decoder.slot_cache(max_rows=1, max_length=LENGTH_QUANTUM)
    slots.reserve(1, 3)
    slots.put(0, out.presents, 2)
    decoder.decode(np.asarray([[3]], dtype=np.int64), np.asarray([2]), slots)
