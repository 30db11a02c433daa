"""Wiring of lmesh-registry: the stores live under --data-dir; health is NOT_SERVING until they are open."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from lmesh.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.admin import ADMIN_TOKEN_ENV, AdminGuard, AdminTokenSettings, require_beyond_localhost
from services.common.config import ServiceConfig
from services.common.server import ServiceParts, ServiceRuntime
from services.registry.servicer import RegistryServicer
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

    async def warm_up() -> None:
        blobs.open()
        models.open()
        if not admin.enabled:
            log.warning("%s is not set: model registration RPCs are open to every caller", ADMIN_TOKEN_ENV)

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
            (registry_pb2_grpc.add_RegistryServicer_to_server, RegistryServicer(blobs, models, admin), full_name)
        ],
        warm_up=warm_up,
        on_stop=on_stop,
        extra={"blobs": blobs, "models": models},
    )
