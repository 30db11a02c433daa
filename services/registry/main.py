"""Wiring of lmesh-registry: the stores live under --data-dir; health is NOT_SERVING until they are open."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from lmesh.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.admin import ADMIN_TOKEN_ENV, AdminGuard, AdminTokenSettings, require_beyond_localhost
from services.common.config import ServiceConfig
from services.common.errors import Unavailable
from services.common.peers import INFERENCE
from services.common.server import ServiceParts, ServiceRuntime
from services.registry.servicer import RegistryServicer, replica_uses
from services.registry.store import BlobStore, ModelStore

log = logging.getLogger("lmesh.registry")


@dataclass(frozen=True)
class RegistrySettings(AdminTokenSettings):
    """lmesh-registry's own settings: the admin token (environment only); no flags of its own, the state
    directory is the common --data-dir."""


SETTINGS = RegistrySettings


def check_config(config: ServiceConfig) -> None:
    """Refuses to listen beyond localhost without the admin token (OSError, one line)."""
    require_beyond_localhost("registry", config.host, config.settings_as(RegistrySettings).admin_token)


def build(runtime: ServiceRuntime) -> ServiceParts:
    data_dir = runtime.config.data_dir
    blobs = BlobStore(data_dir)
    models = ModelStore(data_dir / "registry.sqlite3", blobs)
    admin = AdminGuard(runtime.config.settings_as(RegistrySettings).admin_token)
    check_config(runtime.config)
    inference = runtime.mesh.peer(INFERENCE)

    async def replicas_using(model_id: str) -> Sequence[str]:
        """The passing inference replicas whose Consul meta lists `model_id` as served, loading or draining."""
        try:
            endpoints = await inference.passing()
        except Unavailable:
            raise
        except Exception as exc:
            raise Unavailable(f"Consul cannot be asked which inference replicas serve {model_id}: {exc}") from exc
        return [e.service_id for e in endpoints if replica_uses(e.meta, model_id)]

    servicer = RegistryServicer(blobs, models, admin, replicas_using=replicas_using)

    async def warm_up() -> None:
        blobs.open()
        models.open()
        if not admin.enabled:
            log.warning("%s is not set: model registration RPCs are open to every caller", ADMIN_TOKEN_ENV)

    async def on_drain() -> None:
        # WatchModels streams never end by themselves: end them now rather than at the grace's end.
        await servicer.drain()

    async def on_stop() -> None:
        # Cancelled uploads remove their temporary files; let them finish before the process exits.
        try:
            async with asyncio.timeout(5.0):
                await blobs.wait_uploads(lambda writing: not writing)
        except TimeoutError:
            log.warning("uploads still in progress at shutdown: %s", blobs.uploads_in_progress())
        models.close()

    full_name = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name
    return ServiceParts(
        servicers=[
            (registry_pb2_grpc.add_RegistryServicer_to_server, servicer, full_name)
        ],
        warm_up=warm_up,
        on_drain=on_drain,
        on_stop=on_stop,
        extra={"blobs": blobs, "models": models, "servicer": servicer},
    )
