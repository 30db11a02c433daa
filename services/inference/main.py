"""lmesh-inference wiring: which models to serve, fetched from the registry at start-up."""

from __future__ import annotations

import argparse
import asyncio
import logging

from services.common.config import add_env_argument, int_type, lmesh_cache
from services.common.errors import LmeshError
from services.common.server import ServiceParts, ServiceRuntime

log = logging.getLogger("lmesh.inference")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=None,
                        help="model reference to serve (name, name:version or alias); repeatable; default 'default'")
    add_env_argument(parser, "--max-active", "LMESH_MAX_ACTIVE", "16", "sequences decoded together per step, ≥ 1",
                     type=int_type(1))
    add_env_argument(parser, "--max-queue", "LMESH_MAX_QUEUE", "64",
                     "sequences waiting beyond that before RESOURCE_EXHAUSTED, ≥ 0", type=int_type(0))
    # 0 leaves the choice to onnx_model.py (all cores); a set LMESH_ORT_THREADS is checked here, so a bad one
    # fails at start-up in one line rather than when the model loads.
    add_env_argument(parser, "--threads", "LMESH_ORT_THREADS", "0", "ONNX Runtime intra-op threads",
                     type=int_type(0), fallback_help="0: all cores")
    add_env_argument(parser, "--prefill-chunk", "LMESH_PREFILL_CHUNK", "256",
                     "prompt tokens prefilled per engine step, ≥ 1 (bounds the stall of running streams)",
                     type=int_type(1))
    add_env_argument(parser, "--prefix-cache-mb", "LMESH_PREFIX_CACHE_MB", "256",
                     "memory for reusing the KV cache of shared prompt prefixes (0: off)", type=int_type(0))


def extra_config(args: argparse.Namespace) -> dict[str, str]:
    return {
        "models": ",".join(args.model or ["default"]),
        "max_active": str(args.max_active),
        "max_queue": str(args.max_queue),
        "threads": str(args.threads),
        "prefill_chunk": str(args.prefill_chunk),
        "prefix_cache_mb": str(args.prefix_cache_mb),
    }


def build(runtime: ServiceRuntime) -> ServiceParts:
    from lmesh.inference.v1 import inference_pb2

    from services.common.peers import REGISTRY
    from services.inference.engine import EngineLimits
    from services.inference.loader import load_models
    from services.inference.metrics import InferenceMetrics
    from services.inference.servicer import InferenceServicer, ServedModel

    extra = runtime.config.extra
    refs = [r for r in extra.get("models", "default").split(",") if r]
    limits = EngineLimits(
        max_active=int(extra.get("max_active", "16")), max_queue=int(extra.get("max_queue", "64")),
        prefill_chunk=int(extra.get("prefill_chunk", "256")),
        prefix_cache_bytes=int(extra.get("prefix_cache_mb", "256")) * 1024 * 1024,
    )
    models: dict[str, ServedModel] = {}
    metrics = InferenceMetrics(runtime.meter, lambda: {k: m.engine for k, m in models.items()})
    servicer = InferenceServicer(models, runtime.tracer, metrics)
    registry = runtime.mesh.peer(REGISTRY)
    reporter: list[asyncio.Task[None]] = []

    def meta() -> dict[str, str]:
        load = {"active": 0, "queued": 0, "kv_bytes": 0}
        for model in models.values():
            for key, value in model.engine.load().items():
                if key in load:
                    load[key] += value
        return {"models": ",".join(models), "max_active": str(limits.max_active),
                **{f"load_{k}": str(v) for k, v in load.items()}}

    async def report_load() -> None:
        """Keeps the Consul meta's load current for balancing: at most one write a second, only on change."""
        changed = asyncio.Event()
        for model in models.values():
            model.engine.on_load_change = changed.set
        while True:
            await changed.wait()
            changed.clear()
            if runtime.registration is not None:
                try:
                    await runtime.registration.register(meta())
                except Exception as exc:
                    log.warning("could not report load to Consul: %s", exc)
            await asyncio.sleep(1.0)  # rate limit, not polling: the loop only runs after a change

    async def warm_up() -> None:
        loaded = await load_models(registry, refs, cache_dir=lmesh_cache() / "artifacts", limits=limits,
                                   threads=int(extra.get("threads", "0")) or None)
        models.update({m.id: m for m in loaded})
        reporter.append(asyncio.create_task(report_load()))

    async def on_drain() -> None:
        for task in reporter:
            task.cancel()
        for model in models.values():
            model.engine.stop_accepting()

    def on_grace_expiring(error: LmeshError) -> None:
        for model in models.values():  # queued sequences too, which no token would reach
            model.engine.abort(error)

    async def on_stop() -> None:
        await asyncio.gather(*(m.engine.close() for m in models.values()))

    name = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    from lmesh.inference.v1 import inference_pb2_grpc

    return ServiceParts(
        servicers=[(inference_pb2_grpc.add_InferenceServicer_to_server, servicer, name)],
        warm_up=warm_up, meta=meta, on_drain=on_drain, on_stop=on_stop, on_grace_expiring=on_grace_expiring,
        max_request_bytes=8 * 1024 * 1024,  # a prompt's ids: a million tokens at most, far beyond any context
    )
