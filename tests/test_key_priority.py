"""A key's max priority in policy: set at creation and by UpdateApiKey, shown by ListApiKeys, carried by the
principal of Authenticate and Reserve (what the gateway caps a chat's priority with), validated, kept across a
restart and added to an older store; on both ledgers (SQLite and a real Redis), through the servicer."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from lmesh.policy.v1 import policy_pb2

from services.common.admin import AdminGuard
from services.common.errors import FailedPrecondition, InvalidArgument
from services.policy.keys import DB_NAME, KeyStore
from services.policy.servicer import PolicyServicer
from tests.test_accounting import MODEL, Books, books, ledger_kind, new_id  # noqa: F401 (fixtures)


class _NoMetadata:
    """A call's context as the servicer reads it here: no metadata (the admin guard is open)."""

    def invocation_metadata(self) -> tuple[()]:
        return ()


CONTEXT = cast(grpc.aio.ServicerContext, _NoMetadata())


def servicer(books: Books) -> PolicyServicer:  # noqa: F811 (the fixture's type)
    return PolicyServicer(books.keys, AdminGuard(None), accounting=books.accounting)


async def test_a_keys_max_priority_is_created_updated_listed_and_carried_by_its_principal(
        books: Books) -> None:  # noqa: F811
    policy = servicer(books)
    created = await policy.CreateApiKey(policy_pb2.CreateApiKeyRequest(tenant="acme", max_priority=7), CONTEXT)
    plain = await policy.CreateApiKey(policy_pb2.CreateApiKeyRequest(tenant="acme"), CONTEXT)
    assert (created.key.max_priority, plain.key.max_priority) == (7, 0)  # 0, the lowest, unless granted

    async def principal(api_key: str) -> policy_pb2.Principal:
        authenticated = await policy.Authenticate(policy_pb2.AuthenticateRequest(api_key=api_key), CONTEXT)
        reserved = await policy.Reserve(policy_pb2.ReserveRequest(
            api_key=api_key, model=MODEL, prompt_tokens=3, max_tokens=4, reservation_id=new_id()), CONTEXT)
        assert reserved.principal == authenticated.principal
        return authenticated.principal

    assert (await principal(created.api_key)).max_priority == 7
    assert (await principal(plain.api_key)).max_priority == 0

    # Priority alone: the limits stay as they were; with limits: both change.
    lowered = await policy.UpdateApiKey(policy_pb2.UpdateApiKeyRequest(key_id=created.key.key_id, max_priority=2),
                                        CONTEXT)
    assert lowered.key.max_priority == 2 and lowered.key.limits == policy_pb2.Limits()
    both = await policy.UpdateApiKey(policy_pb2.UpdateApiKeyRequest(
        key_id=plain.key.key_id, max_priority=9, limits=policy_pb2.LimitsUpdate(requests_per_minute=5)), CONTEXT)
    assert both.key.max_priority == 9 and both.key.limits.requests_per_minute == 5
    # Limits alone leave the priority.
    limits_only = await policy.UpdateApiKey(policy_pb2.UpdateApiKeyRequest(
        key_id=plain.key.key_id, limits=policy_pb2.LimitsUpdate(requests_per_minute=6)), CONTEXT)
    assert limits_only.key.max_priority == 9
    assert (await principal(created.api_key)).max_priority == 2  # the next request is judged by it
    listed = await policy.ListApiKeys(policy_pb2.ListApiKeysRequest(tenant="acme"), CONTEXT)
    assert {k.key_id: k.max_priority for k in listed.keys} == {created.key.key_id: 2, plain.key.key_id: 9}


@pytest.mark.parametrize("value", [-1, 10, 2**31 - 1])
async def test_a_max_priority_outside_0_to_9_is_invalid_named_and_changes_nothing(books: Books,  # noqa: F811
                                                                                   value: int) -> None:
    policy = servicer(books)
    with pytest.raises(InvalidArgument) as refused:
        await policy.CreateApiKey(policy_pb2.CreateApiKeyRequest(tenant="acme", max_priority=value), CONTEXT)
    assert refused.value.field == "max_priority" and "[0, 9]" in refused.value.message
    assert books.keys.list("acme") == []
    created = await policy.CreateApiKey(policy_pb2.CreateApiKeyRequest(tenant="acme", max_priority=3), CONTEXT)
    with pytest.raises(InvalidArgument) as refused:
        await policy.UpdateApiKey(policy_pb2.UpdateApiKeyRequest(
            key_id=created.key.key_id, max_priority=value, limits=policy_pb2.LimitsUpdate(requests_per_minute=1)),
            CONTEXT)
    assert refused.value.field == "max_priority"
    record = books.keys.get(created.key.key_id)
    assert record.max_priority == 3
    assert (await books.accounting.key_limits([record.key_id]))[record.key_id].requests_per_minute == 0


async def test_a_revoked_keys_priority_cannot_change(books: Books) -> None:  # noqa: F811
    policy = servicer(books)
    created = await policy.CreateApiKey(policy_pb2.CreateApiKeyRequest(tenant="acme"), CONTEXT)
    await policy.RevokeApiKey(policy_pb2.RevokeApiKeyRequest(key_id=created.key.key_id), CONTEXT)
    with pytest.raises(FailedPrecondition):
        await policy.UpdateApiKey(policy_pb2.UpdateApiKeyRequest(key_id=created.key.key_id, max_priority=5),
                                  CONTEXT)


def test_max_priority_survives_a_restart_and_an_older_store_gains_it_at_0(tmp_path: Path) -> None:
    with KeyStore(tmp_path) as store:
        high, high_key = store.create("acme", max_priority=8)
        old, old_key = store.create("acme")
    with KeyStore(tmp_path) as store:
        assert store.authenticate(high_key).max_priority == 8
    db = sqlite3.connect(tmp_path / DB_NAME)  # back to what schema 2 had
    db.executescript("ALTER TABLE api_keys DROP COLUMN max_priority; PRAGMA user_version=2;")
    db.close()
    with KeyStore(tmp_path) as store:
        assert [store.authenticate(k).max_priority for k in (high_key, old_key)] == [0, 0]
        assert store.set_max_priority(old.key_id, 4).max_priority == 4
        assert store.authenticate(old_key).max_priority == 4 and store.get(high.key_id).max_priority == 0


def test_the_cli_takes_a_keys_max_priority_and_a_chats_priority() -> None:
    from services.cli import build_parser

    parsed: Any = build_parser().parse_args(["keys", "create", "--tenant", "acme", "--max-priority", "6"])
    assert parsed.max_priority == 6
    assert build_parser().parse_args(["keys", "create", "--tenant", "acme"]).max_priority == 0
    assert build_parser().parse_args(["keys", "update", "key_00000001"]).max_priority is None
    assert build_parser().parse_args(["chat", "--priority", "5", "hi"]).priority == 5
    assert build_parser().parse_args(["chat", "hi"]).priority is None
