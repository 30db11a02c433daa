"""The gateway's memory of credentials that authenticated: by hash, bounded, expiring, never of a failure."""

from __future__ import annotations

from lmesh.policy.v1 import policy_pb2

from services.gateway import credentials
from services.gateway.credentials import Credential, RecentPrincipals

ACME = policy_pb2.Principal(key_id="key_1", tenant="acme")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_principal_is_remembered_for_its_ttl_then_forgotten() -> None:
    clock = Clock()
    principals = RecentPrincipals(2.0, clock=clock)
    assert principals.get("lm-secret") is None
    principals.remember("lm-secret", ACME)
    assert principals.get("lm-secret") == ACME
    assert principals.get(Credential(api_key="lm-secret")) == ACME  # the same credential, however it came
    assert principals.get("lm-other") is None
    clock.now += 2.0
    assert principals.get("lm-secret") is None


def test_a_key_and_a_certificate_are_told_apart_and_the_key_is_not_kept_in_clear() -> None:
    principals = RecentPrincipals(2.0)
    certificate = Credential(client_certificate=policy_pb2.ClientCertificate(sha256_fingerprint="ab" * 32))
    principals.remember(certificate, ACME)
    assert principals.get("ab" * 32) is None
    principals.remember("lm-secret", ACME)
    assert not any(b"lm-secret" in key for key in principals._entries)


def test_ttl_zero_remembers_nothing() -> None:
    principals = RecentPrincipals(0.0)
    principals.remember("lm-secret", ACME)
    assert principals.get("lm-secret") is None


def test_it_holds_a_bounded_number_forgetting_the_oldest(monkeypatch: object) -> None:
    monkeypatch.setattr(credentials, "MAX_REMEMBERED_PRINCIPALS", 3)  # type: ignore[attr-defined]
    principals = RecentPrincipals(60.0)
    for i in range(5):
        principals.remember(f"lm-{i}", ACME)
    assert [principals.get(f"lm-{i}") for i in range(5)] == [None, None, ACME, ACME, ACME]
