"""Policy's audit trail: every decision, appended as it is made (see AuditEvent for what a record holds).

This module holds the interface the deciding code writes to; the durable, hash-chained log behind it lives here
too once built. A record never holds an API key, an admin token or the text a guardrail matched: rule ids and
positions only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class AuditEvent:
    """One decision. `action`: what was decided (authenticate, authorize, reserve, settle, expire, block, redact,
    flag, key.create, key.update, key.revoke, tenant.set, ...); `outcome`: allowed, denied, ok, ...; `principal`:
    the key id (never the key); `tokens`: counts that matter to the decision (prompt, completion, reserved,
    charged); `detail`: a short human-readable note, never a secret or matched text."""

    action: str
    outcome: str
    principal: str = ""
    tenant: str = ""
    model: str = ""
    rule_id: str = ""
    tokens: Mapping[str, int] = field(default_factory=dict)
    trace_id: str = ""
    detail: str = ""
    time_unix_ms: int = field(default_factory=lambda: int(time.time() * 1000))


class AuditSink(Protocol):
    """Where decisions go: `append` must be durable (or raise) before the decision takes effect."""

    def append(self, event: AuditEvent) -> None: ...


class MemoryAudit:
    """An AuditSink that keeps events in memory (unit tests)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def append(self, event: AuditEvent) -> None:
        self.events.append(event)
