"""Tool grants on API keys (issue 18): which mesh tools a key's chats may call. Deny by default: a key may call no
tool unless an operator granted it. The shared matching rule, the grant's validation, the key store (kept across
a restart, added to a schema 3 store as "no tool"), the service over real gRPC (create, update: replace, clear,
leave; Authenticate and Reserve carry it; ListApiKeys shows it) and `lmesh keys create|update|list --tools`."""

from __future__ import annotations

import asyncio
import hmac
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from hashlib import sha256
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st
from lmesh.policy.v1 import policy_pb2

from services.common.access import TOOL_NAME_PATTERN, tool_allowed
from services.common.consul_agent import ConsulAgent
from services.common.errors import FailedPrecondition, InvalidArgument
from services.policy.keys import DB_NAME, MAX_ALLOWED_TOOLS, SCHEMA_VERSION, KeyStore, validate_allowed_tools
from tests.cli_runner import run_cli
from tests.test_policy import PolicyInstance, _call, _status, start_policy

tool_names = st.from_regex(TOOL_NAME_PATTERN, fullmatch=True)


# ---- the rule the policy service and the gateway share --------------------------------------------------------

@pytest.mark.parametrize(("patterns", "tool", "allowed"), [
    ((), "calculator", False),  # deny by default
    (("calculator",), "calculator", True),
    (("calculator",), "calculator2", False),  # a name is the whole name, not a prefix
    (("calculator",), "calc", False),
    (("calc*",), "calculator", True),
    (("calc*",), "calc", True),
    (("calc*",), "convert_units", False),
    (("*_units",), "convert_units", True),
    (("convert_unit?",), "convert_units", True),
    (("convert_unit?",), "convert_unit", False),
    (("search_people", "calc*"), "search_people", True),
    (("search_people", "calc*"), "search_places", False),
    (("*",), "x", True),
    (("*",), "Calculator", False),  # not a tool name: never allowed, whatever the grant
    (("*",), "", False),
    (("*",), "a-b", False),
    (("*",), "calc/../admin", False),
    (("*",), "a" * 49, False),
    (("*",), "a" * 48, True),
    (("calculator",), "CALCULATOR", False),  # case-sensitive
])
def test_tool_allowed(patterns: tuple[str, ...], tool: str, allowed: bool) -> None:
    assert tool_allowed(patterns, tool) is allowed


@given(tool=tool_names, other=tool_names)
def test_a_name_grants_exactly_that_tool_and_star_grants_every_tool(tool: str, other: str) -> None:
    assert not tool_allowed([], tool)
    assert tool_allowed(["*"], tool)
    assert tool_allowed([tool], tool)
    assert tool_allowed([tool], other) is (tool == other)
    assert tool_allowed([other, tool[:1] + "*"], tool)


# ---- validation ------------------------------------------------------------------------------------------------

def test_a_grant_keeps_its_order_and_drops_duplicates() -> None:
    assert validate_allowed_tools([]) == ()
    assert validate_allowed_tools(["convert_units", "calc*", "convert_units", "*", "a?c"]) == (
        "convert_units", "calc*", "*", "a?c")
    assert validate_allowed_tools(["x" * 48]) == ("x" * 48,)
    assert len(validate_allowed_tools([f"tool_{i}" for i in range(MAX_ALLOWED_TOOLS)])) == MAX_ALLOWED_TOOLS


@pytest.mark.parametrize("bad", ["", "Calculator", "calc-u", "calc u", " calc", "calc\n", "x" * 49, "9lives", "_x",
                                 "[ab]c", "ca[!l]c", "kalkülator", "calc.v2", "*" * 49])
def test_a_malformed_entry_is_invalid_and_named_by_its_index(bad: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_allowed_tools(["calculator", "calc*", bad])
    assert refused.value.field == "allowed_tools[2]"
    with pytest.raises(InvalidArgument) as refused:
        validate_allowed_tools([bad], "tools.allowed_tools")
    assert refused.value.field == "tools.allowed_tools[0]"


def test_more_than_64_entries_are_invalid_even_when_duplicates() -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_allowed_tools(["calculator"] * (MAX_ALLOWED_TOOLS + 1))
    assert refused.value.field == "allowed_tools" and f"at most {MAX_ALLOWED_TOOLS}" in refused.value.message


@given(patterns=st.lists(st.text(max_size=60), max_size=8))
def test_what_validation_accepts_is_a_list_of_names_and_wildcard_globs(patterns: list[str]) -> None:
    try:
        accepted = validate_allowed_tools(patterns)
    except InvalidArgument as refused:
        assert refused.field.startswith("allowed_tools[")
        return
    assert set(accepted) == set(patterns)
    for pattern in accepted:
        assert 1 <= len(pattern) <= 48 and set(pattern) <= set("abcdefghijklmnopqrstuvwxyz0123456789_*?")
        assert TOOL_NAME_PATTERN.fullmatch(pattern) or "*" in pattern or "?" in pattern


@given(names=st.lists(tool_names, max_size=MAX_ALLOWED_TOOLS))
def test_every_list_of_tool_names_is_a_valid_grant(names: list[str]) -> None:
    assert validate_allowed_tools(names) == tuple(dict.fromkeys(names))


# ---- the key store -------------------------------------------------------------------------------------------

def test_a_key_has_no_tool_unless_granted_and_its_grant_can_be_replaced_and_cleared(tmp_path: Path) -> None:
    with KeyStore(tmp_path) as store:
        plain, plain_key = store.create("acme")
        granted, granted_key = store.create("acme", allowed_tools=["calculator", "search_*"])
        assert plain.allowed_tools == () and granted.allowed_tools == ("calculator", "search_*")
        principal = store.authenticate(granted_key)
        assert principal.allowed_tools == ("calculator", "search_*")
        assert principal.may_call_tool("search_people") and not principal.may_call_tool("convert_units")
        assert not store.authenticate(plain_key).may_call_tool("calculator")
        assert store.set_allowed_tools(plain.key_id, ["*"]).allowed_tools == ("*",)
        assert store.authenticate(plain_key).may_call_tool("convert_units")  # the next request is judged by it
        assert store.set_allowed_tools(granted.key_id, []).allowed_tools == ()
        assert not store.authenticate(granted_key).may_call_tool("calculator")
        with pytest.raises(InvalidArgument) as refused:
            store.set_allowed_tools(plain.key_id, ["calculator", "Nope"])
        assert refused.value.field == "tools.allowed_tools[1]"
        assert store.get(plain.key_id).allowed_tools == ("*",)  # unchanged
        with pytest.raises(InvalidArgument) as refused:
            store.create("acme", allowed_tools=["ok", "not ok"])
        assert refused.value.field == "allowed_tools[1]"
        assert len(store.list("acme")) == 2  # no key was created
        store.revoke(plain.key_id)
        with pytest.raises(FailedPrecondition):
            store.set_allowed_tools(plain.key_id, [])
    with KeyStore(tmp_path) as store:  # kept across a restart
        assert store.get(plain.key_id).allowed_tools == ("*",)
        assert store.get(granted.key_id).allowed_tools == ()
        assert [k.allowed_tools for k in store.list()] == [("*",), ()]


# The api_keys table as schema 3 (max_priority, before tool grants) created it, verbatim.
_SCHEMA_3 = """
CREATE TABLE settings (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE api_keys (
    key_id              TEXT PRIMARY KEY,
    key_hash            BLOB NOT NULL UNIQUE,
    tenant              TEXT NOT NULL,
    allowed_models      TEXT NOT NULL,
    display_name        TEXT NOT NULL,
    create_time_unix_ms INTEGER NOT NULL,
    revoke_time_unix_ms INTEGER,
    client_cert_subject TEXT,
    client_cert_sha256  TEXT,
    max_priority        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant, create_time_unix_ms);
CREATE UNIQUE INDEX api_keys_active_cert_subject ON api_keys (client_cert_subject)
    WHERE revoke_time_unix_ms IS NULL AND client_cert_subject IS NOT NULL;
CREATE UNIQUE INDEX api_keys_active_cert_sha256 ON api_keys (client_cert_sha256)
    WHERE revoke_time_unix_ms IS NULL AND client_cert_sha256 IS NOT NULL;
PRAGMA user_version=3;
"""


def test_a_schema_3_store_gains_tool_grants_and_its_keys_keep_working_with_no_tool(tmp_path: Path) -> None:
    pepper = bytes(range(32))
    keys = {"key_0000000a": "lmk_" + "a" * 43, "key_0000000b": "lmk_" + "b" * 43}
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(_SCHEMA_3)
    db.execute("INSERT INTO settings (name, value) VALUES ('key_pepper', ?)", (pepper,))
    for index, (key_id, plaintext) in enumerate(keys.items()):
        db.execute("INSERT INTO api_keys (key_id, key_hash, tenant, allowed_models, display_name, "
                   "create_time_unix_ms, client_cert_subject, max_priority) VALUES (?, ?, 'acme', ?, 'old', ?, ?, ?)",
                   (key_id, hmac.new(pepper, plaintext.encode(), sha256).digest(), json.dumps(["smollm2-*"]),
                    1000 + index, "CN=old" if index else None, 5))
    db.commit()
    db.close()
    with KeyStore(tmp_path) as store:
        for key_id, plaintext in keys.items():
            principal = store.authorize(plaintext, "smollm2-135m")  # still authenticates and authorizes
            assert (principal.key_id, principal.allowed_models, principal.max_priority) == (
                key_id, ("smollm2-*",), 5)
            assert principal.allowed_tools == () and not principal.may_call_tool("calculator")
        assert [k.allowed_tools for k in store.list("acme")] == [(), ()]
        assert store.set_allowed_tools("key_0000000a", ["calculator"]).allowed_tools == ("calculator",)
        assert store.authenticate(keys["key_0000000a"]).may_call_tool("calculator")
        _, new_key = store.create("acme", allowed_tools=["*"])
        assert store.authenticate(new_key).allowed_tools == ("*",)
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    db.close()
    with KeyStore(tmp_path) as store:  # opening a migrated store again changes nothing
        assert store.get("key_0000000a").allowed_tools == ("calculator",)
        assert store.get("key_0000000b").allowed_tools == ()


# ---- the service over gRPC -------------------------------------------------------------------------------------

@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def policy(consul_agent: ConsulAgent,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PolicyInstance]:
    instance = await start_policy(consul_agent, tmp_path_factory.mktemp("tool-grants"))
    yield instance
    await instance.stop()


async def _principals(policy: PolicyInstance, api_key: str) -> list[policy_pb2.Principal]:
    """The principal as Authenticate and as Reserve return it to the gateway."""
    authenticated = await _call(policy.stub, "Authenticate", policy_pb2.AuthenticateRequest(api_key=api_key))
    reserved = await _call(policy.stub, "Reserve", policy_pb2.ReserveRequest(
        api_key=api_key, model="smollm2", prompt_tokens=1, max_tokens=1, reservation_id=uuid.uuid4().hex))
    return [authenticated.principal, reserved.principal]  # type: ignore[attr-defined]


async def _update(policy: PolicyInstance, request: policy_pb2.UpdateApiKeyRequest) -> policy_pb2.ApiKey:
    response = await _call(policy.stub, "UpdateApiKey", request)
    return response.key  # type: ignore[attr-defined]


class TestToolGrantsOverGrpc:

    async def test_create_with_tools_then_replace_leave_and_clear_them(self, policy: PolicyInstance) -> None:
        created = await _call(policy.stub, "CreateApiKey", policy_pb2.CreateApiKeyRequest(
            tenant="tools", allowed_tools=["calculator", "search_*", "calculator"], max_priority=3))
        key_id, api_key = created.key.key_id, created.api_key  # type: ignore[attr-defined]
        assert list(created.key.allowed_tools) == ["calculator", "search_*"]  # type: ignore[attr-defined]
        for principal in await _principals(policy, api_key):
            assert list(principal.allowed_tools) == ["calculator", "search_*"] and principal.max_priority == 3

        replaced = await _update(policy, policy_pb2.UpdateApiKeyRequest(
            key_id=key_id, tools=policy_pb2.ToolGrant(allowed_tools=["convert_units"])))
        assert list(replaced.allowed_tools) == ["convert_units"] and replaced.max_priority == 3
        assert [list(p.allowed_tools) for p in await _principals(policy, api_key)] == [["convert_units"]] * 2

        # Limits alone, and the priority alone, leave the grant as it is.
        limited = await _update(policy, policy_pb2.UpdateApiKeyRequest(
            key_id=key_id, limits=policy_pb2.LimitsUpdate(requests_per_minute=50)))
        assert list(limited.allowed_tools) == ["convert_units"] and limited.limits.requests_per_minute == 50
        prioritized = await _update(policy, policy_pb2.UpdateApiKeyRequest(key_id=key_id, max_priority=1))
        assert list(prioritized.allowed_tools) == ["convert_units"] and prioritized.max_priority == 1
        assert prioritized.limits.requests_per_minute == 50

        # A grant set with no entries clears it: the key may then call no tool.
        cleared = await _update(policy, policy_pb2.UpdateApiKeyRequest(key_id=key_id, tools=policy_pb2.ToolGrant()))
        assert list(cleared.allowed_tools) == [] and cleared.limits.requests_per_minute == 50
        assert [list(p.allowed_tools) for p in await _principals(policy, api_key)] == [[], []]

        everything = await _update(policy, policy_pb2.UpdateApiKeyRequest(
            key_id=key_id, tools=policy_pb2.ToolGrant(allowed_tools=["*"]), max_priority=2,
            limits=policy_pb2.LimitsUpdate(requests_per_minute=0)))
        assert (list(everything.allowed_tools), everything.max_priority) == (["*"], 2)
        assert everything.limits.requests_per_minute == 0

        plain = await _call(policy.stub, "CreateApiKey", policy_pb2.CreateApiKeyRequest(tenant="tools"))
        assert list(plain.key.allowed_tools) == []  # type: ignore[attr-defined]
        assert [list(p.allowed_tools) for p in await _principals(policy, plain.api_key)] == [[], []]  # type: ignore[attr-defined]

        listed = await _call(policy.stub, "ListApiKeys", policy_pb2.ListApiKeysRequest(tenant="tools"))
        assert {k.key_id: list(k.allowed_tools) for k in listed.keys} == {  # type: ignore[attr-defined]
            key_id: ["*"], plain.key.key_id: []}  # type: ignore[attr-defined]
        audit = await _call(policy.stub, "TailAudit", policy_pb2.TailAuditRequest(
            limit=10, filter=policy_pb2.AuditFilter(action="key.tools", principal=key_id)))
        assert [r.detail.split("; ")[-1] for r in audit.records] == [  # type: ignore[attr-defined]
            "tools: convert_units", "tools: none", "tools: *"]
        created_record = await _call(policy.stub, "TailAudit", policy_pb2.TailAuditRequest(
            limit=1, filter=policy_pb2.AuditFilter(action="key.create", principal=key_id)))
        assert created_record.records[0].detail.endswith("; tools calculator,search_*")  # type: ignore[attr-defined]

    async def test_a_malformed_grant_is_invalid_named_and_changes_nothing(self, policy: PolicyInstance) -> None:
        before = await _call(policy.stub, "ListApiKeys", policy_pb2.ListApiKeysRequest(tenant="tools-bad"))
        for tools, field in ((["calculator", "Calculator"], "allowed_tools[1]"), ([""], "allowed_tools[0]"),
                             (["x" * 49], "allowed_tools[0]"), (["a-b"], "allowed_tools[0]"),
                             ([f"t{i}" for i in range(65)], "allowed_tools")):
            code, details = await _status(policy.stub, "CreateApiKey", policy_pb2.CreateApiKeyRequest(
                tenant="tools-bad", allowed_tools=tools))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}: "), (tools, details)
        after = await _call(policy.stub, "ListApiKeys", policy_pb2.ListApiKeysRequest(tenant="tools-bad"))
        assert after == before == policy_pb2.ListApiKeysResponse()

        created = await _call(policy.stub, "CreateApiKey", policy_pb2.CreateApiKeyRequest(
            tenant="tools-bad", allowed_tools=["calculator"], max_priority=4))
        key_id = created.key.key_id  # type: ignore[attr-defined]
        code, details = await _status(policy.stub, "UpdateApiKey", policy_pb2.UpdateApiKeyRequest(
            key_id=key_id, max_priority=9, tools=policy_pb2.ToolGrant(allowed_tools=["ok", "n?t ok"])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("tools.allowed_tools[1]: "), details
        listed = await _call(policy.stub, "ListApiKeys", policy_pb2.ListApiKeysRequest(tenant="tools-bad"))
        [key] = listed.keys  # type: ignore[attr-defined]
        assert (list(key.allowed_tools), key.max_priority) == (["calculator"], 4)  # neither changed

        await _call(policy.stub, "RevokeApiKey", policy_pb2.RevokeApiKeyRequest(key_id=key_id))
        code, _ = await _status(policy.stub, "UpdateApiKey", policy_pb2.UpdateApiKeyRequest(
            key_id=key_id, tools=policy_pb2.ToolGrant()))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        audit = await _call(policy.stub, "TailAudit", policy_pb2.TailAuditRequest(
            limit=10, filter=policy_pb2.AuditFilter(action="key.tools", principal=key_id)))
        assert [r.outcome for r in audit.records] == ["invalid", "error"]  # type: ignore[attr-defined]

    # ---- `lmesh keys` ----------------------------------------------------------------------------------------

    async def test_the_cli_grants_lists_replaces_and_clears_a_keys_tools(
            self, policy: PolicyInstance, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv("LMESH_MTLS", "off")  # this policy serves plaintext
        monkeypatch.setenv("LMESH_ADMIN_TOKEN", "")
        monkeypatch.setenv("LMESH_HOME", str(tmp_path))

        async def lmesh(*argv: str) -> tuple[int, str, str]:
            return await asyncio.to_thread(run_cli, list(argv))

        code, out, err = await lmesh("keys", "create", "--tenant", "cli-grants", "--tools", "calculator,convert_units",
                                     "--tools", "search_*")
        assert code == 0, err
        lines = out.strip().splitlines()
        assert lines[-1].startswith("lmk_") and len(lines[-1]) == 47  # the key alone on the last line
        assert "tools: calculator, convert_units, search_*" in lines[0]
        key_id = lines[0].split()[1]
        principal = (await _principals(policy, lines[-1]))[0]
        assert list(principal.allowed_tools) == ["calculator", "convert_units", "search_*"]

        code, out, err = await lmesh("keys", "create", "--tenant", "cli-grants", "--max-priority", "2")
        assert code == 0, err
        plain_lines = out.strip().splitlines()
        assert "; tools" not in plain_lines[0]  # a key without tools prints the line it always did
        plain_id = plain_lines[0].split()[1]
        code, out, err = await lmesh("keys", "create", "--tenant", "cli-grants", "--tools", "*")
        assert code == 0 and "tools: *" in out.splitlines()[0], err
        star_id = out.splitlines()[0].split()[1]

        code, out, err = await lmesh("keys", "list", "--tenant", "cli-grants")
        assert code == 0, err
        header, *rows = out.splitlines()
        assert header.split() == ["KEY", "ID", "TENANT", "MODELS", "STATUS", "LIMITS", "MAX", "PRIORITY", "TOOLS",
                                  "CLIENT", "CERTIFICATE"]
        tools_at, priority_at = header.index("TOOLS"), header.index("MAX PRIORITY")
        shown = {row.split()[0]: (row[priority_at:tools_at].strip(), row[tools_at:].split()[0]) for row in rows}
        assert shown == {key_id: ("0", "calculator,convert_units,search_*"), plain_id: ("2", "none"),
                         star_id: ("0", "*")}
        assert all(row.rstrip().endswith(" -") for row in rows)  # no client certificate: still the last column

        code, out, err = await lmesh("keys", "update", key_id, "--tools", "search_people")
        assert code == 0, err
        assert out.strip().endswith("; max priority 0; tools: search_people")
        code, out, err = await lmesh("keys", "update", key_id, "--rpm", "7")
        assert code == 0 and "; tools" not in out, (out, err)  # a grant left alone: the line it always printed
        assert list((await _principals(policy, lines[-1]))[0].allowed_tools) == ["search_people"]
        code, out, err = await lmesh("keys", "update", key_id, "--no-tools")
        assert code == 0 and out.strip().endswith("; tools: none"), (out, err)
        assert list((await _principals(policy, lines[-1]))[0].allowed_tools) == []

        # Mistakes: one `lmesh: ...` line each, and nothing changes.
        for argv, expected in (
                (["keys", "update", key_id], "nothing to change"),
                (["keys", "update", key_id, "--tools", "calc,,x"], "--tools"),
                # Policy's refusal under the flag and the entry typed, not its field (`tools.allowed_tools[1]`).
                (["keys", "update", key_id, "--tools", "calculator,Bad"], "INVALID_ARGUMENT: --tools 'Bad': "),
                (["keys", "create", "--tenant", "cli-grants", "--tools", "no spaces"],
                 "INVALID_ARGUMENT: --tools 'no spaces': ")):
            code, out, err = await lmesh(*argv)
            error = err.strip().splitlines()
            assert code == 2 and len(error) == 1 and error[0].startswith("lmesh: ") and expected in error[0], (
                argv, out, err)
        code, _, err = await lmesh("keys", "update", key_id, "--tools", "x", "--no-tools")
        assert code != 0 and "not allowed with argument" in err  # argparse refuses the pair
        listed = await _call(policy.stub, "ListApiKeys", policy_pb2.ListApiKeysRequest(tenant="cli-grants"))
        assert len(listed.keys) == 3  # type: ignore[attr-defined]
        assert {k.key_id: list(k.allowed_tools) for k in listed.keys}[key_id] == []  # type: ignore[attr-defined]
