"""Wiring of lmesh-policy: the admin token from the environment, the key store and the servicer."""

from __future__ import annotations

import argparse
import logging

from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.admin import ADMIN_TOKEN_ENV, ADMIN_TOKEN_EXTRA, AdminGuard, admin_extra_config
from services.common.server import ServiceParts, ServiceRuntime
from services.policy.keys import KeyStore
from services.policy.servicer import PolicyServicer

log = logging.getLogger("lmesh.policy")

def extra_config(args: argparse.Namespace) -> dict[str, str]:
    return admin_extra_config()


def build(runtime: ServiceRuntime) -> ServiceParts:
    config = runtime.config
    store = KeyStore(config.data_dir)
    admin = AdminGuard(config.extra.get(ADMIN_TOKEN_EXTRA) or None)

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
