"""lmesh-inference wiring: the model references a replica follows, their versions loaded from the registry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from services.common.config import choice_type, float_type, int_type, lmesh_cache, setting
from services.common.errors import LmeshError
from services.common.server import ServiceParts, ServiceRuntime

log = logging.getLogger("lmesh.inference")

SWAP_MODES = ("auto", "beside", "drain")


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
    swap: str = setting(flag="--swap", env="LMESH_SWAP", default="auto", parse=choice_type(SWAP_MODES),
                        help="how a reference's new version replaces the old: beside (loaded while the old serves), "
                             "drain (the old drains and is freed first), auto (beside when memory holds both)")
    swap_grace_s: float = setting(flag="--swap-grace", env="LMESH_SWAP_GRACE_S", default=5.0, parse=float_type(0),
                                  help="seconds a replaced version still accepts requests (gateways' view of Consul "
                                       "lags), ≥ 0")
    swap_drain_s: float = setting(flag="--swap-drain", env="LMESH_SWAP_DRAIN_S", default=60.0, parse=float_type(0),
                                  help="seconds a replaced version's streams may take to finish before they end "
                                       "UNAVAILABLE, ≥ 0")


SETTINGS = InferenceSettings


def build(runtime: ServiceRuntime) -> ServiceParts:
    from lmesh.inference.v1 import inference_pb2, inference_pb2_grpc

    from services.common.peers import REGISTRY
    from services.inference.engine import EngineLimits
    from services.inference.follower import ModelFollower, RegistrySource
    from services.inference.loader import GrammarCache, load_version, memory_needed
    from services.inference.metrics import InferenceMetrics
    from services.inference.servicer import InferenceServicer

    settings = runtime.config.settings_as(InferenceSettings)
    limits = EngineLimits(max_active=settings.max_active, max_queue=settings.max_queue,
                          prefill_chunk=settings.prefill_chunk,
                          prefix_cache_bytes=settings.prefix_cache_mb * 1024 * 1024)
    registry = runtime.mesh.peer(REGISTRY)
    cache_dir = lmesh_cache() / "artifacts"
    grammars = GrammarCache()
    # A state change (loading, advertised, draining) is published at once; load changes at most once a second.
    state_changed, load_changed = asyncio.Event(), asyncio.Event()
    follower = ModelFollower(
        RegistrySource(registry), settings.models,
        lambda version: load_version(registry, version, cache_dir, limits, settings.threads or None, grammars),
        grace_s=settings.swap_grace_s, drain_timeout_s=settings.swap_drain_s, swap=settings.swap,
        memory_needed=lambda version: memory_needed(version, limits),
        on_state_change=state_changed.set, on_load_change=load_changed.set)
    models = follower.models  # the live dict: the servicer and the metrics see every swap
    # A copy taken at once (list() under the GIL): an exporter thread reads it while the follower swaps.
    metrics = InferenceMetrics(runtime.meter, lambda: {k: m.engine for k, m in list(models.items())})
    servicer = InferenceServicer(models, runtime.tracer, metrics)
    reporter: list[asyncio.Task[None]] = []

    def meta() -> dict[str, str]:
        load = {"active": 0, "queued": 0, "kv_bytes": 0}
        for model in models.values():
            for key, value in model.engine.load().items():
                if key in load:
                    load[key] += value
        return {**follower.meta(), "max_active": str(limits.max_active),
                **{f"load_{k}": str(v) for k, v in load.items()}}

    async def report() -> None:
        """Keeps the Consul meta current: a state change at once, load for balancing at most once a second."""
        while True:
            if not state_changed.is_set():
                waits = [asyncio.create_task(e.wait()) for e in (state_changed, load_changed)]
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for wait in waits:
                        wait.cancel()
            state_changed.clear()
            load_changed.clear()
            if runtime.registration is not None:
                try:
                    await runtime.registration.register(meta())
                except Exception as exc:
                    log.warning("could not report to Consul: %s", exc)
            with contextlib.suppress(TimeoutError):  # rate limit for load; a state change cuts it short
                await asyncio.wait_for(state_changed.wait(), 1.0)

    async def warm_up() -> None:
        reporter.append(asyncio.create_task(report()))  # the registry sees what loads (it refuses to delete it)
        await follower.start()

    async def on_drain() -> None:
        for task in reporter:
            task.cancel()
        await follower.stop()
        for model in models.values():
            model.engine.stop_accepting()

    def on_grace_expiring(error: LmeshError) -> None:
        for model in models.values():  # queued sequences too, which no token would reach
            model.engine.abort(error)

    async def on_stop() -> None:
        await follower.stop()  # a start-up cut short: a load may still be under way
        await asyncio.gather(*(m.engine.close() for m in models.values()))

    name = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    return ServiceParts(
        servicers=[(inference_pb2_grpc.add_InferenceServicer_to_server, servicer, name)],
        warm_up=warm_up, meta=meta, on_drain=on_drain, on_stop=on_stop, on_grace_expiring=on_grace_expiring,
        max_request_bytes=8 * 1024 * 1024,  # a prompt's ids: a million tokens at most, far beyond any context
    )
