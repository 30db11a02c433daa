"""Wiring of lmesh-policy: the admin token from the environment, the key store, the guardrail rules, the audit log
and the servicer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.admin import ADMIN_TOKEN_ENV, AdminGuard, AdminTokenSettings, require_beyond_localhost
from services.common.config import READABLE_FILE_TYPE, ConfigError, ServiceConfig, int_type, setting, setting_names
from services.common.server import ServiceParts, ServiceRuntime
from services.policy.audit import DEFAULT_SEGMENT_MB, AuditLog
from services.policy.auditing import AuditedPolicyServicer
from services.policy.keys import KeyStore
from services.policy.rules import RulesError, RulesSource

log = logging.getLogger("lmesh.policy")


@dataclass(frozen=True)
class PolicySettings(AdminTokenSettings):
    """lmesh-policy's own settings: the admin token (environment only), the guardrail rules file; its keys and
    audit log live under --data-dir."""

    rules: Path | None = setting(
        flag="--rules", env="LMESH_POLICY_RULES", default=None, parse=READABLE_FILE_TYPE, metavar="FILE",
        default_help="the built-in default rules",
        help="guardrail rules (YAML; see `lmesh policy rules check`), re-read when the file changes")
    audit_segment_mb: int = setting(
        flag="--audit-segment-mb", env="LMESH_AUDIT_SEGMENT_MB", default=DEFAULT_SEGMENT_MB, parse=int_type(0),
        help="the audit log's current file is closed as a segment (which an operator may archive) once it passes "
             "this many MiB, and a new one continues the chain; 0: never")


SETTINGS = PolicySettings


def check_config(config: ServiceConfig) -> None:
    """Refuses to listen beyond localhost without the admin token, or to start with rules it cannot use (OSError,
    one line)."""
    settings = config.settings_as(PolicySettings)
    require_beyond_localhost("policy", config.host, settings.admin_token)
    try:
        rules_source(settings)
    except ConfigError as exc:
        raise OSError(str(exc)) from None


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
    audit = AuditLog(config.data_dir, segment_bytes=settings.audit_segment_mb * 1024 * 1024,
                     redact=[settings.admin_token])

    async def warm_up() -> None:
        store.open()
        audit.open()
        rules.start()
        if not admin.enabled:
            log.warning("%s is not set: key management RPCs are open to every caller", ADMIN_TOKEN_ENV)

    async def on_drain() -> None:
        audit.end_follows()  # a follow would hold the drain for its whole grace
        await rules.close()  # ends the gateways' WatchRules streams: they reconnect elsewhere

    async def on_stop() -> None:
        await rules.close()
        store.close()
        audit.close()

    full_name = policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name
    return ServiceParts(
        servicers=[(policy_pb2_grpc.add_PolicyServicer_to_server, AuditedPolicyServicer(store, admin, audit, rules),
                    full_name)],
        warm_up=warm_up,
        on_drain=on_drain,
        on_stop=on_stop,
        max_request_bytes=1024 * 1024,  # keys and model references: the largest (256 patterns) is about 66 KB
    )
