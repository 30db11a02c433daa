"""lmesh-inference wiring: which models to serve, fetched from the registry at start-up."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from services.common.config import int_type, lmesh_cache, setting
from services.common.errors import LmeshError
from services.common.server import ServiceParts, ServiceRuntime

log = logging.getLogger("lmesh.inference")


@dataclass(frozen=True)
class InferenceSettings:
    """What `lmesh serve inference` takes beyond the common settings."""

    models: tuple[str, ...] = setting(flag="--model", repeatable=True, default=("default",), metavar="REF",
                                      help="model reference to serve (name, name:version or alias); repeatable")
    max_active: int = setting(flag="--max-active", env="LMESH_MAX_ACTIVE", default=16, parse=int_type(1),
                              help="sequences decoded together per step, ≥ 1")
    max_queue: int = setting(flag="--max-queue", env="LMESH_MAX_QUEUE", default=64, parse=int_type(0),
                             help="sequences waiting beyond that before RESOURCE_EXHAUSTED, ≥ 0")
    # 0 leaves the choice to onnx_model.py (all cores); a set LMESH_ORT_THREADS is checked here, so a bad one
    # fails at start-up in one line rather than when the model loads.
    threads: int = setting(flag="--threads", env="LMESH_ORT_THREADS", default=0, parse=int_type(0),
                           default_help="0: all cores", help="ONNX Runtime intra-op threads")
    prefill_chunk: int = setting(flag="--prefill-chunk", env="LMESH_PREFILL_CHUNK", default=256, parse=int_type(1),
                                 help="prompt tokens prefilled per engine step, ≥ 1 (bounds the stall of running "
                                      "streams)")
    prefix_cache_mb: int = setting(flag="--prefix-cache-mb", env="LMESH_PREFIX_CACHE_MB", default=256,
                                   parse=int_type(0),
                                   help="memory for reusing the KV cache of shared prompt prefixes (0: off)")


SETTINGS = InferenceSettings


def build(runtime: ServiceRuntime) -> ServiceParts:
    from lmesh.inference.v1 import inference_pb2

    from services.common.peers import REGISTRY
    from services.inference.engine import EngineLimits
    from services.inference.loader import load_models
    from services.inference.metrics import InferenceMetrics
    from services.inference.servicer import InferenceServicer, ServedModel

    settings = runtime.config.settings_as(InferenceSettings)
    refs = list(settings.models)
    limits = EngineLimits(max_active=settings.max_active, max_queue=settings.max_queue,
                          prefill_chunk=settings.prefill_chunk,
                          prefix_cache_bytes=settings.prefix_cache_mb * 1024 * 1024)
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
                                   threads=settings.threads or None)
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
