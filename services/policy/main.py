"""Wiring of lmesh-policy: the admin token from the environment, the key store and the servicer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.admin import ADMIN_TOKEN_ENV, AdminGuard, AdminTokenSettings, require_beyond_localhost
from services.common.config import ServiceConfig
from services.common.server import ServiceParts, ServiceRuntime
from services.policy.keys import KeyStore
from services.policy.servicer import PolicyServicer

log = logging.getLogger("lmesh.policy")


@dataclass(frozen=True)
class PolicySettings(AdminTokenSettings):
    """lmesh-policy's own settings: the admin token (environment only); its keys live under --data-dir."""


SETTINGS = PolicySettings


def check_config(config: ServiceConfig) -> None:
    """Refuses to listen beyond localhost without the admin token (OSError, one line)."""
    require_beyond_localhost("policy", config.host, config.settings_as(PolicySettings).admin_token)


def build(runtime: ServiceRuntime) -> ServiceParts:
    config = runtime.config
    store = KeyStore(config.data_dir)
    admin = AdminGuard(config.settings_as(PolicySettings).admin_token)
    check_config(config)

    async def warm_up() -> None:
        store.open()
        if not admin.enabled:
            log.warning("%s is not set: key management RPCs are open to every caller", ADMIN_TOKEN_ENV)

    async def on_stop() -> None:
        store.close()

    full_name = policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name
    return ServiceParts(
        servicers=[(policy_pb2_grpc.add_PolicyServicer_to_server, PolicyServicer(store, admin), full_name)],
        warm_up=warm_up,
        on_stop=on_stop,
        max_request_bytes=1024 * 1024,  # keys and model references: the largest (256 patterns) is about 66 KB
    )
