"""Wiring of lmesh-policy: the admin token from the environment, the key store, the accounting ledger (SQLite,
or Redis shared by several replicas), the audit sink and the servicer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.admin import ADMIN_TOKEN_ENV, AdminGuard, AdminTokenSettings, require_beyond_localhost
from services.common.config import ServiceConfig, choice_type, float_type, setting
from services.common.server import ServiceParts, ServiceRuntime
from services.policy.accounting import Accounting
from services.policy.audit import MemoryAudit
from services.policy.keys import KeyStore
from services.policy.ledger import Ledger, SqliteLedger
from services.policy.servicer import PolicyServicer

log = logging.getLogger("lmesh.policy")


REDIS_URL_ENV = "LMESH_POLICY_REDIS_URL"


@dataclass(frozen=True)
class PolicySettings(AdminTokenSettings):
    """lmesh-policy's own settings: the admin token (environment only); its keys live under --data-dir, and so do
    limits, reservations and usage unless a Redis keeps them for several replicas."""

    redis_url: str | None = setting(
        env=REDIS_URL_ENV, secret=True, default=None,
        help="keep limits, reservations and usage in this Redis (redis://[:password@]host:port[/db], rediss:// for "
             "TLS), shared by every policy replica that names it; unset: SQLite under --data-dir (one replica)")
    redis_prefix: str = setting(flag="--redis-prefix", env="LMESH_POLICY_REDIS_PREFIX", default="lmesh:",
                                help="prefix of the ledger's Redis keys (one Redis may serve several meshes)")
    ledger_failure: str = setting(
        flag="--ledger-failure", env="LMESH_LEDGER_FAILURE", default="closed", parse=choice_type(("closed", "open")),
        help="admissions while the ledger's store is unreachable: closed (refused, UNAVAILABLE) or open (admitted "
             "unmetered, audited as such)")
    reservation_lease_s: float = setting(
        flag="--reservation-lease", env="LMESH_RESERVATION_LEASE_S", default=30.0, parse=float_type(0.5),
        help="seconds a reservation lives unless renewed (the gateway renews every third of it while a chat "
             "streams); one that lapses is charged in full")
    rate_window_s: float = setting(
        flag="--rate-window", env="LMESH_RATE_WINDOW_S", default=60.0, parse=float_type(1),
        help="seconds of the sliding window behind the per-minute limits (shorter only for tests and demos)")


SETTINGS = PolicySettings


def check_config(config: ServiceConfig) -> None:
    """Refuses to listen beyond localhost without the admin token, or to start with a Redis URL it cannot use
    (OSError, one line)."""
    settings = config.settings_as(PolicySettings)
    require_beyond_localhost("policy", config.host, settings.admin_token)
    if settings.redis_url:
        check_redis_url(settings.redis_url)


def check_redis_url(url: str) -> None:
    """OSError (one line, without the URL: it may hold a password) unless `url` is a Redis URL."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok, parts = False, None
    if parts is None or not port_ok or parts.scheme not in ("redis", "rediss", "unix") or not (
            parts.hostname or parts.path):
        raise OSError(f"{REDIS_URL_ENV} must be a Redis URL: redis://[:password@]host:port[/db], rediss://... or "
                      "unix:///path/to/socket")


def ledger_for(config: ServiceConfig) -> Ledger:
    settings = config.settings_as(PolicySettings)
    if settings.redis_url:
        from services.policy.redis_ledger import RedisLedger

        return RedisLedger(settings.redis_url, prefix=settings.redis_prefix)
    return SqliteLedger(config.data_dir)


def build(runtime: ServiceRuntime) -> ServiceParts:
    config = runtime.config
    settings = config.settings_as(PolicySettings)
    # In memory for now: the durable, hash-chained audit log (services/policy/audit.py) replaces it.
    audit = MemoryAudit()
    store = KeyStore(config.data_dir, audit)
    admin = AdminGuard(settings.admin_token)
    check_config(config)
    accounting = Accounting(store, ledger_for(config), audit, lease_s=settings.reservation_lease_s,
                            window_ms=int(settings.rate_window_s * 1000), fail_open=settings.ledger_failure == "open")

    async def warm_up() -> None:
        store.open()
        await accounting.open()
        accounting.start_sweeper()
        if not admin.enabled:
            log.warning("%s is not set: key management RPCs are open to every caller", ADMIN_TOKEN_ENV)

    async def on_stop() -> None:
        await accounting.close()
        store.close()

    full_name = policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name
    return ServiceParts(
        servicers=[(policy_pb2_grpc.add_PolicyServicer_to_server, PolicyServicer(store, admin, accounting=accounting),
                     full_name)],
        warm_up=warm_up,
        on_stop=on_stop,
        max_request_bytes=1024 * 1024,  # keys and model references: the largest (256 patterns) is about 66 KB
    )
