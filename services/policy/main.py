"""Wiring of lmesh-policy: the admin token from the environment, the key store and the servicer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.admin import ADMIN_TOKEN_ENV, AdminGuard, AdminTokenSettings, require_beyond_localhost
from services.common.config import READABLE_FILE_TYPE, ConfigError, ServiceConfig, setting, setting_names
from services.common.server import ServiceParts, ServiceRuntime
from services.policy.audit import MemoryAudit
from services.policy.keys import KeyStore
from services.policy.rules import RulesError, RulesSource
from services.policy.servicer import PolicyServicer

log = logging.getLogger("lmesh.policy")


@dataclass(frozen=True)
class PolicySettings(AdminTokenSettings):
    """lmesh-policy's own settings: the admin token (environment only), the guardrail rules file; its keys live
    under --data-dir."""

    rules: Path | None = setting(
        flag="--rules", env="LMESH_POLICY_RULES", default=None, parse=READABLE_FILE_TYPE, metavar="FILE",
        default_help="the built-in default rules",
        help="guardrail rules (YAML; see `lmesh policy rules check`), re-read when the file changes")


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
    store = KeyStore(config.data_dir)
    admin = AdminGuard(config.settings_as(PolicySettings).admin_token)
    check_config(config)
    rules = rules_source(config.settings_as(PolicySettings))
    audit = MemoryAudit()  # the durable, hash-chained log replaces it

    async def warm_up() -> None:
        store.open()
        rules.start()
        if not admin.enabled:
            log.warning("%s is not set: key management RPCs are open to every caller", ADMIN_TOKEN_ENV)

    async def on_drain() -> None:
        await rules.close()  # ends the gateways' WatchRules streams: they reconnect elsewhere

    async def on_stop() -> None:
        await rules.close()
        store.close()

    full_name = policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name
    return ServiceParts(
        servicers=[(policy_pb2_grpc.add_PolicyServicer_to_server, PolicyServicer(store, admin, rules, audit),
                    full_name)],
        warm_up=warm_up,
        on_drain=on_drain,
        on_stop=on_stop,
        max_request_bytes=1024 * 1024,  # keys and model references: the largest (256 patterns) is about 66 KB
    )
