"""Fetching a model version's artifacts from the registry (digest-verified) and starting its engine."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import numpy as np
from lmesh.registry.v1 import registry_pb2
from lmesh.registry.v1.registry_pb2_grpc import RegistryStub

from services.common.errors import FailedPrecondition, LmeshError
from services.common.peers import Peer
from services.inference.constrained import Grammars
from services.inference.engine import Engine, EngineLimits
from services.inference.onnx_model import LENGTH_QUANTUM, OnnxDecoder
from services.inference.servicer import ServedModel
from services.registry.client import fetch_to_cache

log = logging.getLogger("lmesh.inference.loader")


async def resolve_when_registered(registry: Peer[RegistryStub], reference: str) -> registry_pb2.ModelVersion:
    """Resolves `reference`, waiting while the registry is down or the model not yet registered.

    The replica stays NOT_SERVING meanwhile, so nothing routes to it; `make run` registers the model after
    starting the registry, and a replica may well come up first.
    """
    delay = 0.25
    while True:
        try:
            response = await registry.call(lambda r: r.ResolveModel,
                                           registry_pb2.ResolveModelRequest(reference=reference), timeout=10)
            return response.model
        except (grpc.aio.AioRpcError, LmeshError) as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else exc.code
            if code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise
            log.info("waiting for model '%s' in the registry (%s)", reference, code.name)
        await asyncio.sleep(delay)  # back-off while a dependency is missing, not a polling loop on the hot path
        delay = min(delay * 2, 5.0)


async def load_models(registry: Peer[RegistryStub], references: list[str], cache_dir: Path, limits: EngineLimits,
                      threads: int | None) -> list[ServedModel]:
    served: list[ServedModel] = []
    for reference in references:
        version = await resolve_when_registered(registry, reference)
        if any((m.name, m.version) == (version.name, version.version) for m in served):
            log.info("%s is %s:%s, already loaded", reference, version.name, version.version)
            continue  # `--model default --model NAME:1` names one version twice: one copy serves both
        weights = [a for a in version.artifacts if a.kind == registry_pb2.ARTIFACT_KIND_MODEL]
        if len(weights) != 1:
            raise FailedPrecondition(f"{version.name}:{version.version} has no model artifact")
        path = await fetch_to_cache(registry, weights[0].sha256, cache_dir)
        try:
            decoder = await asyncio.to_thread(OnnxDecoder, path, threads)
            await asyncio.to_thread(_warm, decoder)
        except Exception as exc:  # ONNX Runtime's errors carry no common type; its first line says what failed
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FailedPrecondition(
                f"{version.name}:{version.version} cannot be served: its model file is not a decoder this engine "
                f"runs ({reason[:300]}); register a folder built by `make model`") from exc
        engine = await asyncio.to_thread(_engine, decoder, version, limits)
        grammars = await _grammars(registry, version, cache_dir)
        engine.start()
        vocab = version.architecture.vocab_size or decoder.vocab_size
        served.append(ServedModel(version.name, version.version, engine, vocab, version.context_length, grammars))
        log.info("serving %s:%s from %s", version.name, version.version, path)
    return served


async def _grammars(registry: Peer[RegistryStub], version: registry_pb2.ModelVersion,
                    cache_dir: Path) -> Grammars | None:
    """What compiles output constraints for the version: its tokenizer artifact (tokenizer.json, digest-verified like
    the weights) read by llguidance once. Without one (or one llguidance cannot read) the version is served
    unconstrained: a constrained request is then FAILED_PRECONDITION."""
    name = f"{version.name}:{version.version}"
    tokenizers = [a for a in version.artifacts if a.kind == registry_pb2.ARTIFACT_KIND_TOKENIZER]
    if len(tokenizers) != 1:
        log.warning("%s has no tokenizer artifact: its output cannot be constrained", name)
        return None
    path = await fetch_to_cache(registry, tokenizers[0].sha256, cache_dir)
    try:
        return await asyncio.to_thread(Grammars.from_tokenizer_json, path.read_text(encoding="utf-8"),
                                       version.eos_token_ids)
    except Exception as exc:  # llguidance's errors have no common type; the replica serves unconstrained
        log.warning("%s: llguidance cannot read its tokenizer (%s): its output cannot be constrained", name,
                    str(exc).strip()[:300])
        return None


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
