"""Wiring of lmesh-policy: the admin token from the environment, the key store, the accounting ledger (SQLite, or
Redis shared by several replicas), the guardrail rules, the audit log and the servicer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.admin import ADMIN_TOKEN_ENV, AdminGuard, AdminTokenSettings, require_beyond_localhost
from services.common.config import (
    READABLE_FILE_TYPE,
    ConfigError,
    ServiceConfig,
    choice_type,
    float_type,
    int_type,
    setting,
    setting_names,
)
from services.common.server import ServiceParts, ServiceRuntime
from services.policy.accounting import Accounting
from services.policy.audit import DEFAULT_SEGMENT_MB, AuditLog
from services.policy.auditing import AuditedPolicyServicer
from services.policy.keys import KeyStore
from services.policy.ledger import Ledger, SqliteLedger
from services.policy.rules import RulesError, RulesSource

log = logging.getLogger("lmesh.policy")
REDIS_URL_ENV = "LMESH_POLICY_REDIS_URL"


@dataclass(frozen=True)
class PolicySettings(AdminTokenSettings):
    """lmesh-policy's own settings: the admin token (environment only), the guardrail rules file, the ledger; its
    keys and audit log live under --data-dir, and so do limits, reservations and usage unless a Redis keeps them
    for several replicas."""

    rules: Path | None = setting(
        flag="--rules", env="LMESH_POLICY_RULES", default=None, parse=READABLE_FILE_TYPE, metavar="FILE",
        default_help="the built-in default rules",
        help="guardrail rules (YAML; see `lmesh policy rules check`), re-read when the file changes")
    audit_segment_mb: int = setting(
        flag="--audit-segment-mb", env="LMESH_AUDIT_SEGMENT_MB", default=DEFAULT_SEGMENT_MB, parse=int_type(0),
        help="the audit log's current file is closed as a segment (which an operator may archive) once it passes "
             "this many MiB, and a new one continues the chain; 0: never")
    audit_dir: Path | None = setting(
        flag="--audit-dir", env="LMESH_AUDIT_DIR", default=None, parse=Path, metavar="DIR",
        default_help="--data-dir",
        help="where this replica keeps its audit log (under DIR/audit): its own, one writer each, when several "
             "replicas share a --data-dir")
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
    """Refuses to listen beyond localhost without the admin token, or to start with rules or a Redis URL it cannot
    use (OSError, one line)."""
    settings = config.settings_as(PolicySettings)
    require_beyond_localhost("policy", config.host, settings.admin_token)
    try:
        rules_source(settings)
    except ConfigError as exc:
        raise OSError(str(exc)) from None
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


def rules_source(settings: PolicySettings) -> RulesSource:
    """The guardrail rules in force (ConfigError naming the setting and the bad line)."""
    try:
        return RulesSource(settings.rules)
    except RulesError as exc:
        raise ConfigError(f"{setting_names(PolicySettings, 'rules')}: {exc.located(str(settings.rules))}") from None
    except OSError as exc:
        raise ConfigError(f"{setting_names(PolicySettings, 'rules')}: cannot read {settings.rules} "
                          f"({exc.strerror or type(exc).__name__})") from None


def build(runtime: ServiceRuntime) -> ServiceParts:
    config = runtime.config
    settings = config.settings_as(PolicySettings)
    check_config(config)
    store = KeyStore(config.data_dir)
    admin = AdminGuard(settings.admin_token)
    rules = rules_source(settings)
    # Every decision goes here, durably, before it takes effect; the admin token is redacted should it reach it.
    audit = AuditLog(settings.audit_dir or config.data_dir, segment_bytes=settings.audit_segment_mb * 1024 * 1024,
                     redact=[settings.admin_token])
    # The servicer audits authentication, authorization and key management; accounting its own decisions.
    accounting = Accounting(store, ledger_for(config), audit, lease_s=settings.reservation_lease_s,
                            window_ms=int(settings.rate_window_s * 1000), fail_open=settings.ledger_failure == "open")

    async def warm_up() -> None:
        store.open()
        audit.open()
        await accounting.open()
        accounting.start_sweeper()
        rules.start()
        if not admin.enabled:
            log.warning("%s is not set: key management RPCs are open to every caller", ADMIN_TOKEN_ENV)

    async def on_drain() -> None:
        audit.end_follows()  # a follow would hold the drain for its whole grace
        await rules.close()  # ends the gateways' WatchRules streams: they reconnect elsewhere

    async def on_stop() -> None:
        await rules.close()
        await accounting.close()
        store.close()
        audit.close()

    full_name = policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name
    return ServiceParts(
        servicers=[(policy_pb2_grpc.add_PolicyServicer_to_server, AuditedPolicyServicer(store, admin, audit, rules,
                                                                                 accounting=accounting),
                    full_name)],
        warm_up=warm_up,
        on_drain=on_drain,
        on_stop=on_stop,
        max_request_bytes=1024 * 1024,  # keys and model references: the largest (256 patterns) is about 66 KB
    )
