"""Wiring of lmesh-embeddings: the model directory and batching settings; health is NOT_SERVING until the model is
loaded (and has run once)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from services.common.config import int_type, setting
from services.common.server import ServiceParts, ServiceRuntime

log = logging.getLogger("lmesh.embeddings")


def _model_dir(text: str) -> Path | None:
    """The --model-dir value, absolute; empty means the default (read when the service starts)."""
    return Path(text).expanduser().resolve() if text else None


@dataclass(frozen=True)
class EmbeddingsSettings:
    """What `lmesh serve embeddings` takes beyond the common settings."""

    model_dir: Path | None = setting(flag="--model-dir", env="LMESH_EMBEDDINGS_MODEL_DIR", default=None,
                                     parse=_model_dir, default_help="$LMESH_CACHE/models/all-minilm-l6-v2",
                                     help="the model built by `make embeddings-model`")
    tools_model_dir: Path | None = setting(
        flag="--tools-model-dir", env="LMESH_EMBEDDINGS_TOOLS_MODEL_DIR", default=None, parse=_model_dir,
        default_help="$LMESH_CACHE/models/all-minilm-l6-v2-tools, served when built",
        help="the tool-retrieval model built by `make embeddings-model`, served beside the default one as "
             "`all-minilm-l6-v2-tools`; a directory given here must hold a build")
    threads: int = setting(flag="--threads", env="LMESH_EMBEDDINGS_THREADS", default=0, parse=int_type(0),
                           default_help="0: all cores", help="ONNX Runtime intra-op threads")
    max_batch_texts: int = setting(flag="--max-batch-texts", env="LMESH_EMBEDDINGS_MAX_BATCH_TEXTS", default=256,
                                   parse=int_type(1), help="texts of concurrent requests run together, ≥ 1")
    max_batch_tokens: int = setting(flag="--max-batch-tokens", env="LMESH_EMBEDDINGS_MAX_BATCH_TOKENS",
                                    default=8192, parse=int_type(256),
                                    help="padded wordpieces per model run (rows x longest), ≥ 256; a larger batch "
                                         "runs in several, texts of like length together")
    max_queue_texts: int = setting(flag="--max-queue-texts", env="LMESH_EMBEDDINGS_MAX_QUEUE_TEXTS", default=4096,
                                   parse=int_type(256),
                                   help="texts waiting to be embedded before RESOURCE_EXHAUSTED, ≥ 256")
    cache_entries: int = setting(flag="--cache-entries", env="LMESH_EMBEDDINGS_CACHE_ENTRIES", default=4096,
                                 parse=int_type(0), help="recent texts whose embeddings are kept (0: no cache)")


SETTINGS = EmbeddingsSettings
MAX_REQUEST_BYTES = 8 * 1024 * 1024


def build(runtime: ServiceRuntime) -> ServiceParts:
    # Imported here: the CLI imports every main.py to build its parser; onnxruntime and tokenizers are heavy.
    from lmesh.embeddings.v1 import embeddings_pb2, embeddings_pb2_grpc

    from services.embeddings.embedder import EmbeddingModel, MicroBatcher
    from services.embeddings.manifest import (
        MANIFEST_FILE,
        ManifestError,
        default_model_dir,
        default_tools_model_dir,
    )
    from services.embeddings.servicer import EmbeddingsServicer

    settings = runtime.config.settings_as(EmbeddingsSettings)
    model_dirs = [settings.model_dir or default_model_dir()]
    if settings.tools_model_dir is not None:
        model_dirs.append(settings.tools_model_dir)
    elif (default_tools_model_dir() / MANIFEST_FILE).exists():
        model_dirs.append(default_tools_model_dir())
    else:
        log.warning("no tool-retrieval model at %s: mesh tools are ranked with the default model (run "
                    "`make embeddings-model`)", default_tools_model_dir())
    batchers = [MicroBatcher(max_batch_texts=settings.max_batch_texts, max_queue_texts=settings.max_queue_texts,
                             cache_entries=settings.cache_entries) for _ in model_dirs]
    by_name: dict[str, MicroBatcher] = {}

    async def warm_up() -> None:
        for model_dir, batcher in zip(model_dirs, batchers, strict=True):
            try:
                model = await asyncio.to_thread(EmbeddingModel.load, model_dir, threads=settings.threads,
                                                max_batch_tokens=settings.max_batch_tokens)
            except ManifestError as exc:  # no build, or a stale one: the CLI prints an OSError as one line
                raise OSError(f"lmesh-embeddings cannot serve: {exc}") from None
            if model.name in by_name:
                raise OSError(f"lmesh-embeddings cannot serve: {model_dir} holds {model.name} again")
            await asyncio.to_thread(model.embed, ["warm up"])  # the first run allocates; not a client's wait
            batcher.load(model)
            by_name[model.name] = batcher
            log.info("serving %s (%d dimensions) from %s", model.name, model.dimensions, model_dir)

    def meta() -> dict[str, str]:
        if len(by_name) < len(model_dirs):
            return {}
        dimensions = {str(batcher.model.dimensions) for batcher in by_name.values() if batcher.model is not None}
        return {"models": ",".join(by_name), "dimensions": ",".join(sorted(dimensions))}

    async def close() -> None:
        for batcher in batchers:
            await batcher.close()

    name = embeddings_pb2.DESCRIPTOR.services_by_name["Embeddings"].full_name
    # Room for 256 inputs of some 30,000 ASCII characters; a larger message is refused by gRPC itself
    # (RESOURCE_EXHAUSTED) before it is read into memory.
    return ServiceParts(
        servicers=[(embeddings_pb2_grpc.add_EmbeddingsServicer_to_server, EmbeddingsServicer(by_name, len(model_dirs)),
                     name)],
        warm_up=warm_up, meta=meta, on_stop=close, max_request_bytes=MAX_REQUEST_BYTES,
        extra={"batcher": batchers[0], "batchers": by_name})
