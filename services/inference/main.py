"""lmesh-inference wiring: which models to serve, fetched from the registry at start-up."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from services.common.config import lmesh_cache
from services.common.server import ServiceParts, ServiceRuntime

log = logging.getLogger("lmesh.inference")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=None,
                        help="model reference to serve (name, name:version or alias); repeatable; default 'default'")
    parser.add_argument("--max-active", type=int, default=int(os.environ.get("LMESH_MAX_ACTIVE", "16")),
                        help="sequences decoded together per step")
    parser.add_argument("--max-queue", type=int, default=int(os.environ.get("LMESH_MAX_QUEUE", "64")),
                        help="sequences waiting beyond that before RESOURCE_EXHAUSTED")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")


def extra_config(args: argparse.Namespace) -> dict[str, str]:
    return {
        "models": ",".join(args.model or ["default"]),
        "max_active": str(args.max_active),
        "max_queue": str(args.max_queue),
        "threads": str(args.threads),
    }


def build(runtime: ServiceRuntime) -> ServiceParts:
    from lmesh.inference.v1 import inference_pb2

    from services.inference.loader import load_models
    from services.inference.servicer import InferenceServicer, ServedModel

    extra = runtime.config.extra
    refs = [r for r in extra.get("models", "default").split(",") if r]
    models: dict[str, ServedModel] = {}
    servicer = InferenceServicer(models, runtime.tracer)
    registry = runtime.mesh.resolver("lmesh-registry")

    async def warm_up() -> None:
        loaded = await load_models(
            registry, refs, cache_dir=lmesh_cache() / "artifacts",
            max_active=int(extra.get("max_active", "16")), max_queue=int(extra.get("max_queue", "64")),
            threads=int(extra.get("threads", "0")) or None,
        )
        models.update({m.id: m for m in loaded})

    def meta() -> dict[str, str]:
        return {"models": ",".join(models)}

    async def on_drain() -> None:
        for model in models.values():
            model.engine.stop_accepting()

    async def on_stop() -> None:
        await asyncio.gather(*(m.engine.close() for m in models.values()))

    name = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    from lmesh.inference.v1 import inference_pb2_grpc

    return ServiceParts(
        servicers=[(inference_pb2_grpc.add_InferenceServicer_to_server, servicer, name)],
        warm_up=warm_up, meta=meta, on_drain=on_drain, on_stop=on_stop,
    )
