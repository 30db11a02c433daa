"""lmesh-policy: the key store on its own, then the service over gRPC through Consul."""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.cli import build_parser
from services.common.admin import ADMIN_TOKEN_ENV, AdminGuard
from services.common.config import ServiceConfig, config_from_args
from services.common.consul_agent import ConsulAgent
from services.common.discovery import Mesh
from services.common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from services.common.peers import POLICY, Peer
from services.common.rpc import call_options
from services.common.server import RunningService, start_service
from services.policy import client
from services.policy.keys import (
    DB_NAME,
    SCHEMA_VERSION,
    CertificateIdentity,
    KeyStore,
    normalize_fingerprint,
    normalize_subject,
)
from services.policy.main import PolicySettings, build

# Anything shaped like a plaintext key; no log line may ever contain one.
PLAINTEXT_KEY = re.compile(r"lmk_[A-Za-z0-9_-]{43}")
UNKNOWN_KEY = "lmk_" + "A" * 43
ADMIN_TOKEN = "s3cret-admin-token"


@pytest.fixture(autouse=True)
def no_key_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test (and its fixtures' set-up) runs with DEBUG logging captured and checked for keys."""
    caplog.set_level(logging.DEBUG)
    yield
    for when in ("setup", "call"):
        for record in caplog.get_records(when):
            text = " ".join([record.getMessage(), record.exc_text or "", str(record.args)])
            assert not PLAINTEXT_KEY.search(text), f"a log record contains an API key: {record.name}"


# -- KeyStore -----------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    with KeyStore(tmp_path / "policy") as opened:
        yield opened


def test_create_then_authenticate_gives_principal(store: KeyStore) -> None:
    record, plaintext = store.create("acme", ["smollm2-*"], "ci runner")
    assert re.fullmatch(r"lmk_[A-Za-z0-9_-]{43}", plaintext)
    assert re.fullmatch(r"key_[0-9a-f]{8}", record.key_id)
    assert (record.tenant, record.allowed_models, record.display_name, record.revoked) == (
        "acme", ("smollm2-*",), "ci runner", False)
    assert record.create_time_unix_ms > 0
    principal = store.authenticate(plaintext)
    assert (principal.key_id, principal.tenant, principal.allowed_models) == (
        record.key_id, "acme", ("smollm2-*",))
    assert store.authorize(plaintext, "smollm2-135m") == principal
    other, other_plaintext = store.create("acme")
    assert other.key_id != record.key_id and other_plaintext != plaintext
    assert [k.key_id for k in store.list("acme")] == [record.key_id, other.key_id]


def test_plaintext_key_is_nowhere_in_the_database_files(tmp_path: Path) -> None:
    data_dir = tmp_path / "policy"
    keys: list[str] = []
    with KeyStore(data_dir) as store:
        for i in range(5):
            keys.append(store.create(f"tenant-{i}", display_name=f"key {i}")[1])
        files = sorted(data_dir.iterdir())
        assert any(f.name.endswith("-wal") for f in files)  # WAL mode
        _assert_keys_absent(files, keys)
        assert stat.S_IMODE((data_dir / DB_NAME).stat().st_mode) == 0o600
    _assert_keys_absent(sorted(data_dir.iterdir()), keys)  # after the checkpoint on close too


def _assert_keys_absent(files: list[Path], keys: list[str]) -> None:
    for path in files:
        content = path.read_bytes()
        for key in keys:
            assert key.encode() not in content, f"plaintext key found in {path.name}"
            assert key[4:].encode() not in content, f"key secret found in {path.name}"


@pytest.mark.parametrize("api_key",
                         ["", "lmk_", "not-a-key", UNKNOWN_KEY, UNKNOWN_KEY + "\n", "lmk_" + "é" * 43])
def test_unknown_or_malformed_key_is_unauthenticated(store: KeyStore, api_key: str) -> None:
    store.create("acme")
    with pytest.raises(Unauthenticated, match=r"^invalid API key$"):
        store.authenticate(api_key)
    with pytest.raises(Unauthenticated, match=r"^invalid API key$"):
        store.authorize(api_key, "smollm2")


def test_altered_and_revoked_keys_are_unauthenticated(store: KeyStore) -> None:
    record, plaintext = store.create("acme")
    altered = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    with pytest.raises(Unauthenticated):
        store.authenticate(altered)
    revoked = store.revoke(record.key_id)
    assert revoked.revoked and revoked.key_id == record.key_id
    with pytest.raises(Unauthenticated, match=r"^invalid API key$"):
        store.authenticate(plaintext)
    assert store.revoke(record.key_id).revoked  # idempotent
    assert [k.revoked for k in store.list()] == [True]


def test_revocation_applies_at_once_across_store_instances(tmp_path: Path) -> None:
    # Two stores on one file stand for two policy replicas sharing a volume: nothing may be cached.
    with KeyStore(tmp_path) as first, KeyStore(tmp_path) as second:
        record, plaintext = first.create("acme")
        assert second.authenticate(plaintext).key_id == record.key_id
        second.revoke(record.key_id)
        with pytest.raises(Unauthenticated):
            first.authenticate(plaintext)


@pytest.mark.parametrize(
    ("allowed", "model", "allowed_to_use"),
    [
        ((), "anything:7", True),
        (("*",), "smollm2-135m", True),
        (("smollm2-*",), "smollm2-135m", True),
        (("smollm2-*",), "smollm2-135m:2", True),
        (("smollm2-*",), "llama3", False),
        (("smollm2-*",), "my-smollm2-135m", False),
        (("smollm2-135m",), "smollm2-135m", True),
        (("smollm2-135m",), "smollm2-135m:3", True),  # a name allows each of its versions
        (("smollm2-135m:1",), "smollm2-135m:1", True),
        (("smollm2-135m:1",), "smollm2-135m:2", False),
        (("smollm2-135m:1",), "smollm2-135m", False),
        (("SmolLM2",), "smollm2", False),  # case-sensitive
        (("llama?",), "llama3", True),
        (("llama?",), "llama31", False),
        (("llama3", "qwen-*"), "qwen-0.5b", True),
        (("chat",), "chat", True),  # an alias is matched as the client wrote it
    ],
)
def test_allowed_models_glob_semantics(store: KeyStore, allowed: tuple[str, ...], model: str,
                                       allowed_to_use: bool) -> None:
    record, plaintext = store.create("acme", allowed)
    if allowed_to_use:
        assert store.authorize(plaintext, model).key_id == record.key_id
    else:
        with pytest.raises(PermissionDenied) as denied:
            store.authorize(plaintext, model)
        assert denied.value.message == f"key {record.key_id} may not use model '{model}'"


@pytest.mark.parametrize(
    ("allowed", "reference", "resolved", "aliases", "allowed_to_use"),
    [
        (("smollm2-*",), "default", "smollm2-135m:1", ("default",), True),  # the model behind the alias
        (("smollm2-*",), "", "smollm2-135m:1", ("default",), True),  # no reference: the default
        (("other-*",), "default", "smollm2-135m:1", ("default",), False),
        (("other-*",), "other-fast", "smollm2-135m:1", ("other-fast",), True),  # an alias is a grant handle
        (("default",), "smollm2-135m:1", "smollm2-135m:1", ("default",), True),  # ...however it is referenced
        (("smollm2-135m",), "smollm2-135m", "smollm2-135m:2", (), True),
        (("smollm2-135m:1",), "smollm2-135m", "smollm2-135m:2", (), False),  # the name resolved to another
    ],
)
def test_authorization_is_on_the_model_a_reference_resolved_to(
        store: KeyStore, allowed: tuple[str, ...], reference: str, resolved: str, aliases: tuple[str, ...],
        allowed_to_use: bool) -> None:
    record, plaintext = store.create("acme", allowed)
    model = reference or "default"
    if allowed_to_use:
        principal = store.authorize(plaintext, model, resolved_model=resolved, resolved_aliases=aliases)
        assert principal.key_id == record.key_id
    else:
        with pytest.raises(PermissionDenied) as denied:
            store.authorize(plaintext, model, resolved_model=resolved, resolved_aliases=aliases)
        behind = "" if model == resolved else f" ({resolved})"
        assert denied.value.message == f"key {record.key_id} may not use model '{model}'{behind}"


@pytest.mark.parametrize("resolved", ["smollm2", " x:1", "a:" + "b" * 300])
def test_malformed_resolved_model_is_invalid_argument(store: KeyStore, resolved: str) -> None:
    _, plaintext = store.create("acme")
    with pytest.raises(InvalidArgument) as bad:
        store.authorize(plaintext, "smollm2", resolved_model=resolved)
    assert bad.value.field == "resolved_model"


@pytest.mark.parametrize("model", ["", " ", "smollm2 135m", "smollm2\n", "m" * 257])
def test_malformed_model_is_invalid_argument(store: KeyStore, model: str) -> None:
    _, plaintext = store.create("acme")
    with pytest.raises(InvalidArgument) as bad:
        store.authorize(plaintext, model)
    assert bad.value.field == "model" and bad.value.message.startswith("model: ")


def test_authentication_is_checked_before_the_model(store: KeyStore) -> None:
    with pytest.raises(Unauthenticated):
        store.authorize("", "")


@pytest.mark.parametrize("tenant",
                         ["", " ", "-acme", ".acme", "acme corp", "acme/x", "acme\n", "tén", "a" * 65])
def test_bad_tenant_is_invalid_argument(store: KeyStore, tenant: str) -> None:
    with pytest.raises(InvalidArgument) as bad:
        store.create(tenant)
    assert bad.value.field == "tenant" and bad.value.message.startswith("tenant: ")
    if tenant:
        with pytest.raises(InvalidArgument, match=r"^tenant: "):
            store.list(tenant)
    assert store.list() == []


@pytest.mark.parametrize("tenant", ["a", "A9", "acme.corp_eu-1", "a" * 64])
def test_good_tenants_are_accepted(store: KeyStore, tenant: str) -> None:
    assert store.create(tenant)[0].tenant == tenant


@pytest.mark.parametrize(
    ("allowed", "field"),
    [([""], "allowed_models[0]"), (["ok", "a b"], "allowed_models[1]"), (["x\ty"], "allowed_models[0]"),
     (["m" * 257], "allowed_models[0]"), ([f"m{i}" for i in range(257)], "allowed_models")],
)
def test_bad_allowed_models_are_invalid_argument(store: KeyStore, allowed: list[str], field: str) -> None:
    with pytest.raises(InvalidArgument) as bad:
        store.create("acme", allowed)
    assert bad.value.field == field


def test_allowed_models_are_deduplicated_in_order(store: KeyStore) -> None:
    assert store.create("acme", ["b*", "a", "b*"])[0].allowed_models == ("b*", "a")


@pytest.mark.parametrize("display_name", ["x" * 257, "line\nbreak", "bell\x07"])
def test_bad_display_name_is_invalid_argument(store: KeyStore, display_name: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^display_name: "):
        store.create("acme", display_name=display_name)


def test_revoke_unknown_is_not_found_and_malformed_id_is_invalid(store: KeyStore) -> None:
    with pytest.raises(NotFound):
        store.revoke("key_00000000")
    for key_id in ("", "key_xyz", "KEY_0000000A", "key_000000000"):
        with pytest.raises(InvalidArgument, match=r"^key_id: "):
            store.revoke(key_id)


def test_keys_survive_reopening(tmp_path: Path) -> None:
    with KeyStore(tmp_path) as store:
        record, plaintext = store.create("acme", ["smollm2-*"])
    with KeyStore(tmp_path) as store:
        assert store.authorize(plaintext, "smollm2-135m").key_id == record.key_id


def test_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    with pytest.raises(Unavailable):
        store.authenticate(UNKNOWN_KEY)


@pytest.mark.parametrize(
    ("header", "ok"),
    [(None, False), ("", False), ("Bearer", False), ("Bearer wrong", False), (f"Basic {ADMIN_TOKEN}", False),
     (f"Bearer {ADMIN_TOKEN}x", False), ("Bearer é", False), (f"Bearer {ADMIN_TOKEN}", True),
     (f"bearer {ADMIN_TOKEN}", True)],
)
def test_admin_guard(header: str | None, ok: bool) -> None:
    AdminGuard(None).check(header)  # no token configured: open
    if ok:
        AdminGuard(ADMIN_TOKEN).check(header)
    else:
        with pytest.raises(Unauthenticated):
            AdminGuard(ADMIN_TOKEN).check(header)


def test_admin_token_comes_from_the_environment_and_stays_out_of_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve", "policy"])
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    assert config_from_args("policy", args, PolicySettings).settings == PolicySettings(admin_token=None)
    monkeypatch.setenv(ADMIN_TOKEN_ENV, ADMIN_TOKEN)
    config = config_from_args("policy", args, PolicySettings)
    assert config.settings_as(PolicySettings).admin_token == ADMIN_TOKEN
    assert ADMIN_TOKEN not in repr(config) and ADMIN_TOKEN not in str(config.settings)
    with pytest.raises(SystemExit):  # never a flag: it would show in `ps`
        build_parser().parse_args(["serve", "policy", "--admin-token", ADMIN_TOKEN])


# -- the service over gRPC, found through Consul ----------------------------------------------------------


@dataclass
class PolicyInstance:
    running: RunningService
    mesh: Mesh
    peer: Peer[policy_pb2_grpc.PolicyStub]
    stub: policy_pb2_grpc.PolicyStub
    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.running.stop()
            await self.mesh.close()


async def start_policy(consul_agent: ConsulAgent, data_dir: Path,
                       admin_token: str | None = None) -> PolicyInstance:
    config = ServiceConfig(mtls=False, service="policy", consul_addr=consul_agent.http_addr, data_dir=data_dir,
                           settings=PolicySettings(admin_token=admin_token))
    running = await start_service(config, build)
    mesh = Mesh(consul_agent.http_addr)
    peer = mesh.peer(POLICY)
    # This very instance, as Consul lists it once its health check passes.
    endpoint = await peer.wait_for(lambda e: e.port == running.port, timeout=15)
    return PolicyInstance(running, mesh, peer, endpoint.stub(policy_pb2_grpc.PolicyStub))


StartPolicy = Callable[..., Awaitable[PolicyInstance]]


@pytest_asyncio.fixture(loop_scope="session")
async def policy_factory(consul_agent: ConsulAgent) -> AsyncIterator[StartPolicy]:
    started: list[PolicyInstance] = []

    async def start(data_dir: Path, admin_token: str | None = None) -> PolicyInstance:
        instance = await start_policy(consul_agent, data_dir, admin_token)
        started.append(instance)
        return instance

    yield start
    for instance in started:
        await instance.stop()


async def _call(stub: policy_pb2_grpc.PolicyStub, method: str, request: object,
                metadata: tuple[tuple[str, str], ...] = ()) -> object:
    options = call_options(5.0)
    options["metadata"] = [*options["metadata"], *metadata]
    return await getattr(stub, method)(request, **options)


async def _status(stub: policy_pb2_grpc.PolicyStub, method: str, request: object,
                  metadata: tuple[tuple[str, str], ...] = ()) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await _call(stub, method, request, metadata)
    return failed.value.code(), failed.value.details() or ""


@pytest_asyncio.fixture(loop_scope="session", scope="class")
async def policy(consul_agent: ConsulAgent,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PolicyInstance]:
    """One open (no admin token) instance, shared by the tests of a class and stopped after them."""
    instance = await start_policy(consul_agent, tmp_path_factory.mktemp("policy"))
    yield instance
    await instance.stop()


class TestPolicyOverGrpc:

    async def test_authorize_happy_path(self, policy: PolicyInstance) -> None:
        created = await client.create_key(policy.peer, "acme", ["smollm2-*"], "ci")
        assert PLAINTEXT_KEY.fullmatch(created.api_key)
        assert (created.key.tenant, list(created.key.allowed_models), created.key.display_name) == (
            "acme", ["smollm2-*"], "ci")
        request = policy_pb2.AuthorizeRequest(api_key=created.api_key, model="smollm2-135m",
                                              input_tokens=12, max_tokens=64)
        # Authorize is idempotent, so it goes through the resolver's failover path like the gateway's.
        response = await policy.peer.call(lambda p: p.Authorize, request, timeout=5)
        assert response.principal == policy_pb2.Principal(key_id=created.key.key_id, tenant="acme",
                                                          allowed_models=["smollm2-*"])
        assert response.limits == policy_pb2.Limits()
        authenticated = await _call(policy.stub, "Authenticate",
                                    policy_pb2.AuthenticateRequest(api_key=created.api_key))
        assert authenticated == policy_pb2.AuthenticateResponse(principal=response.principal)

    async def test_bad_keys_are_unauthenticated(self, policy: PolicyInstance) -> None:
        created = await client.create_key(policy.peer, "acme")
        for api_key in ("", UNKNOWN_KEY, created.api_key[:-2]):
            for method, request in (
                ("Authorize", policy_pb2.AuthorizeRequest(api_key=api_key, model="smollm2")),
                ("Authenticate", policy_pb2.AuthenticateRequest(api_key=api_key)),
            ):
                assert await _status(policy.stub, method, request) == (grpc.StatusCode.UNAUTHENTICATED,
                                                                       "invalid API key")
        revoked = await client.revoke_key(policy.peer, created.key.key_id)
        assert revoked.key.revoked
        code, details = await _status(policy.stub, "Authorize",
                                      policy_pb2.AuthorizeRequest(api_key=created.api_key, model="smollm2"))
        assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "invalid API key")

    async def test_model_not_allowed_is_permission_denied(self, policy: PolicyInstance) -> None:
        created = await client.create_key(policy.peer, "acme", ["smollm2-*"])
        code, details = await _status(policy.stub, "Authorize",
                                      policy_pb2.AuthorizeRequest(api_key=created.api_key, model="llama3:1"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert details == f"key {created.key.key_id} may not use model 'llama3:1'"

    async def test_malformed_fields_are_invalid_argument(self, policy: PolicyInstance) -> None:
        created = await client.create_key(policy.peer, "acme")
        cases: list[tuple[str, object, str]] = [
            ("Authorize", policy_pb2.AuthorizeRequest(api_key=created.api_key, model=""), "model"),
            ("Authorize", policy_pb2.AuthorizeRequest(api_key=created.api_key, model="a b"), "model"),
            ("Authorize", policy_pb2.AuthorizeRequest(api_key=created.api_key, model="m", input_tokens=-1),
             "input_tokens"),
            ("Authorize", policy_pb2.AuthorizeRequest(api_key=created.api_key, model="m", max_tokens=-5),
             "max_tokens"),
            ("CreateApiKey", policy_pb2.CreateApiKeyRequest(tenant=""), "tenant"),
            ("CreateApiKey", policy_pb2.CreateApiKeyRequest(tenant="acme corp"), "tenant"),
            ("CreateApiKey", policy_pb2.CreateApiKeyRequest(tenant="acme", allowed_models=["ok", ""]),
             "allowed_models[1]"),
            ("CreateApiKey", policy_pb2.CreateApiKeyRequest(tenant="acme", display_name="a\nb"),
             "display_name"),
            ("ListApiKeys", policy_pb2.ListApiKeysRequest(tenant="-x"), "tenant"),
            ("ListApiKeys", policy_pb2.ListApiKeysRequest(page_size=-1), "page_size"),
            ("ListApiKeys", policy_pb2.ListApiKeysRequest(page_token="not-a-token"), "page_token"),
            ("RevokeApiKey", policy_pb2.RevokeApiKeyRequest(key_id=""), "key_id"),
            ("RevokeApiKey", policy_pb2.RevokeApiKeyRequest(key_id="lmk_x"), "key_id"),
        ]
        for method, request, field in cases:
            code, details = await _status(policy.stub, method, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, field)
            assert details.startswith(f"{field}: "), (method, field, details)

    async def test_a_bound_client_certificate_is_a_credential(self, policy: PolicyInstance) -> None:
        created = await client.create_key(policy.peer, "certs", ["smollm2-*"], client_cert_subject="o=acme , cn=grpc")
        assert created.key.client_cert_subject == "O=acme,CN=grpc" and not created.key.client_cert_sha256
        certificate = policy_pb2.ClientCertificate(subject="O=acme,CN=grpc", sha256_fingerprint="0" * 64)
        authenticated = await _call(policy.stub, "Authenticate",
                                    policy_pb2.AuthenticateRequest(client_certificate=certificate))
        assert authenticated.principal.key_id == created.key.key_id  # type: ignore[attr-defined]
        authorized = await _call(policy.stub, "Authorize", policy_pb2.AuthorizeRequest(
            client_certificate=certificate, model="smollm2-135m"))
        assert authorized.principal.key_id == created.key.key_id  # type: ignore[attr-defined]
        assert (await _status(policy.stub, "Authorize", policy_pb2.AuthorizeRequest(
            client_certificate=certificate, model="llama3")))[0] == grpc.StatusCode.PERMISSION_DENIED
        unbound = policy_pb2.ClientCertificate(subject="O=acme,CN=someone", sha256_fingerprint="0" * 64)
        for method, request in (("Authenticate", policy_pb2.AuthenticateRequest(client_certificate=unbound)),
                                ("Authorize", policy_pb2.AuthorizeRequest(client_certificate=unbound, model="m")),
                                ("Authenticate", policy_pb2.AuthenticateRequest())):
            code, details = await _status(policy.stub, method, request)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, details)
        reordered = await client.create_key(policy.peer, "certs", client_cert_subject="CN=grpc,O=acme")
        assert reordered.key.client_cert_subject == "CN=grpc,O=acme"  # another order is another name
        code, details = await _status(policy.stub, "CreateApiKey", policy_pb2.CreateApiKeyRequest(
            tenant="certs", client_cert_subject="O=acme,CN=grpc"))
        assert code == grpc.StatusCode.ALREADY_EXISTS and created.key.key_id in details
        bad = policy_pb2.ClientCertificate(subject="O=acme,CN=grpc", sha256_fingerprint="xyz")
        code, details = await _status(policy.stub, "Authenticate", policy_pb2.AuthenticateRequest(
            client_certificate=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("client_certificate.sha256_fingerprint: ")
        for request, field in ((policy_pb2.CreateApiKeyRequest(tenant="certs", client_cert_subject="alice"),
                                "client_cert_subject"),
                               (policy_pb2.CreateApiKeyRequest(tenant="certs", client_cert_sha256="ab:cd"),
                                "client_cert_sha256"),
                               (policy_pb2.CreateApiKeyRequest(tenant="certs", client_cert_subject="CN=x",
                                                               client_cert_sha256="ab" * 32), "client_cert_sha256")):
            code, details = await _status(policy.stub, "CreateApiKey", request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}: "), details

    async def test_list_and_revoke(self, policy: PolicyInstance) -> None:
        first = await client.create_key(policy.peer, "listing", display_name="one")
        second = await client.create_key(policy.peer, "listing", ["a*"])
        await client.create_key(policy.peer, "someone-else")
        listed = await client.list_keys(policy.peer, "listing")
        assert [k.key_id for k in listed.keys] == [first.key.key_id, second.key.key_id]
        assert listed.keys[0] == first.key
        everything = await client.list_keys(policy.peer)
        assert {"listing", "someone-else"} <= {k.tenant for k in everything.keys}
        await client.revoke_key(policy.peer, first.key.key_id)
        listed = await client.list_keys(policy.peer, "listing")
        assert [k.revoked for k in listed.keys] == [True, False]
        code, _ = await _status(policy.stub, "RevokeApiKey",
                                policy_pb2.RevokeApiKeyRequest(key_id="key_00000000"))
        assert code == grpc.StatusCode.NOT_FOUND

    async def test_keys_are_listed_a_page_at_a_time(self, policy: PolicyInstance) -> None:
        created = [(await client.create_key(policy.peer, "pages", [f"m{i}-*"])).key.key_id for i in range(5)]
        pages, token = [], ""
        while True:
            page = await policy.stub.ListApiKeys(policy_pb2.ListApiKeysRequest(tenant="pages", page_size=2,
                                                                               page_token=token))
            pages.append([k.key_id for k in page.keys])
            token = page.next_page_token
            if not token:
                break
        assert pages == [created[:2], created[2:4], created[4:]]
        # A token carries its listing: another tenant's is refused, not silently reused.
        first = await policy.stub.ListApiKeys(policy_pb2.ListApiKeysRequest(tenant="pages", page_size=2))
        code, details = await _status(policy.stub, "ListApiKeys", policy_pb2.ListApiKeysRequest(
            tenant="someone-else", page_token=first.next_page_token))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("page_token: ")

    async def test_a_page_of_big_keys_fits_a_default_grpc_client(self, policy: PolicyInstance) -> None:
        """Keys at the documented maximum (256 patterns of 256 characters, ~66 KB each): 60 of them would be
        4 MB, over the 4 MiB a gRPC client accepts by default, so one answer holds fewer and says where to go on."""
        patterns = [f"{i:03d}" + "x" * 253 for i in range(256)]
        created = {(await client.create_key(policy.peer, "big-keys", patterns)).key.key_id for _ in range(60)}
        first = await policy.stub.ListApiKeys(policy_pb2.ListApiKeysRequest(tenant="big-keys"))
        assert first.next_page_token and first.ByteSize() < 3.1 * 1024 * 1024
        listed = await client.list_keys(policy.peer, "big-keys")  # follows every page
        assert {k.key_id for k in listed.keys} == created


async def test_admin_token_guards_key_management(policy_factory: StartPolicy, tmp_path: Path) -> None:
    guarded = await policy_factory(tmp_path / "guarded", admin_token=ADMIN_TOKEN)
    management: list[tuple[str, object]] = [
        ("CreateApiKey", policy_pb2.CreateApiKeyRequest(tenant="acme")),
        ("ListApiKeys", policy_pb2.ListApiKeysRequest()),
        ("RevokeApiKey", policy_pb2.RevokeApiKeyRequest(key_id="key_00000000")),
    ]
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", ADMIN_TOKEN),)):
        for method, request in management:
            code, details = await _status(guarded.stub, method, request, metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, metadata)
            assert ADMIN_TOKEN not in details
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await client.create_key(guarded.peer.with_admin_token("wrong"), "acme")
    assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED

    admin = guarded.peer.with_admin_token(ADMIN_TOKEN)
    created = await client.create_key(admin, "acme", ["smollm2-*"])
    listed = await client.list_keys(admin)
    assert [k.key_id for k in listed.keys] == [created.key.key_id]
    # Authorize and Authenticate never need the admin token.
    authorized = await _call(guarded.stub, "Authorize",
                             policy_pb2.AuthorizeRequest(api_key=created.api_key, model="smollm2-135m"))
    assert isinstance(authorized, policy_pb2.AuthorizeResponse)
    assert authorized.principal.key_id == created.key.key_id
    revoked = await client.revoke_key(admin, created.key.key_id)
    assert revoked.key.revoked


async def test_restart_keeps_keys(policy_factory: StartPolicy, tmp_path: Path) -> None:
    data_dir = tmp_path / "policy"
    first = await policy_factory(data_dir)
    kept = await client.create_key(first.peer, "acme", ["smollm2-*"], "kept")
    gone = await client.create_key(first.peer, "acme")
    await client.revoke_key(first.peer, gone.key.key_id)
    await first.stop()

    second = await policy_factory(data_dir)
    authorized = await _call(second.stub, "Authorize",
                             policy_pb2.AuthorizeRequest(api_key=kept.api_key, model="smollm2-135m"))
    assert isinstance(authorized, policy_pb2.AuthorizeResponse)
    assert authorized.principal.key_id == kept.key.key_id
    code, _ = await _status(second.stub, "Authorize",
                            policy_pb2.AuthorizeRequest(api_key=gone.api_key, model="smollm2-135m"))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    listed = await client.list_keys(second.peer, "acme")
    assert [(k.key_id, k.revoked) for k in listed.keys] == [(kept.key.key_id, False), (gone.key.key_id, True)]


# -- start-up failures an operator meets: one line that says what to do -------------------------------------


async def test_a_second_server_on_a_taken_port_fails_instead_of_sharing_it(policy_factory: StartPolicy,
                                                                           consul_agent: ConsulAgent,
                                                                           tmp_path: Path) -> None:
    first = await policy_factory(tmp_path / "a")
    # gRPC's default SO_REUSEPORT would let this bind succeed and split the port's traffic between the two.
    config = ServiceConfig(mtls=False, service="policy", consul_addr=consul_agent.http_addr, data_dir=tmp_path / "b",
                           port=first.running.port)
    with pytest.raises(OSError, match=rf"could not listen on .*:{first.running.port}: the port is in use"):
        await start_service(config, build)


def test_serve_without_consul_says_so_in_one_line(tmp_path: Path) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    nobody = f"127.0.0.1:{free.getsockname()[1]}"
    free.close()
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "policy", "--port", "0", "--data-dir", str(tmp_path)],
        env={**os.environ, "CONSUL_HTTP_ADDR": nobody}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lmesh: Consul at {nobody} is out of reach") and "CONSUL_HTTP_ADDR" in last
    assert "Unclosed" not in result.stderr  # the failed start closed what it opened


def test_too_many_model_patterns_are_refused_before_comparing_them(store: KeyStore) -> None:
    from services.policy.keys import MAX_ALLOWED_MODELS

    patterns = [f"model-{i}" for i in range(40_000)]  # deduplicating these pairwise took policy seconds
    with pytest.raises(InvalidArgument) as bad:
        store.create("acme", patterns)
    assert bad.value.field == "allowed_models" and f"at most {MAX_ALLOWED_MODELS}" in bad.value.message


def test_too_many_resolved_aliases_are_refused(store: KeyStore) -> None:
    _, plaintext = store.create("acme", ["smollm2*"])
    aliases = [f"alias-{i}" for i in range(257)]
    with pytest.raises(InvalidArgument) as bad:
        store.authorize(plaintext, "smollm2", resolved_model="smollm2:1", resolved_aliases=aliases)
    assert bad.value.field == "resolved_aliases"
    assert store.authorize(plaintext, "smollm2", resolved_model="smollm2:1", resolved_aliases=aliases[:256])


# -- client certificate bindings --------------------------------------------------------------------------------


@pytest.mark.parametrize(("written", "canonical"), [
    ("CN=alice,O=acme", "CN=alice,O=acme"),
    (" cn = alice ,  o=acme ", "CN=alice,O=acme"),
    ("subject=CN=alice,O=acme", "CN=alice,O=acme"),  # openssl's output, pasted
    ("CN=Jos\\C3\\A9,O=a\\,b", "CN=José,O=a\\,b"),  # how OpenSSL (and gRPC) escape non-ASCII characters
    ("UID=x + CN=a,O=b", "CN=a+UID=x,O=b"),  # a multi-valued part, in any order
    ("CN=\\ lead\\ ,O=x", "CN=\\ lead\\ ,O=x"),  # escaped spaces are part of the value
    ("1.2.3.4=#0403616263,CN=x", "1.2.3.4=#0403616263,CN=x"),
])
def test_subjects_are_compared_in_one_canonical_form(written: str, canonical: str) -> None:
    assert normalize_subject(written) == canonical


@pytest.mark.parametrize("subject", ["alice", "CN=", "CN=a,", "=x", "CN=a\\", "CN=\\FF", "CN=a\nb", "C N=a",
                                     "CN=" + "a" * 1100])
def test_a_malformed_subject_is_invalid_argument(store: KeyStore, subject: str) -> None:
    with pytest.raises(InvalidArgument) as bad:
        store.create("acme", client_cert_subject=subject)
    assert bad.value.field == "client_cert_subject"


def test_fingerprints_ignore_colons_case_and_openssls_prefix() -> None:
    digits = "fa55c5a29bb01026210cac90b379d03c78f464d9203ecebbedb4231e4e8d31c1"
    colons = ":".join(digits[i:i + 2] for i in range(0, 64, 2)).upper()
    assert normalize_fingerprint(colons) == normalize_fingerprint(f"sha256 Fingerprint={colons}") == digits
    for bad in ("", digits[:-1], digits + "00", "g" * 64):
        with pytest.raises(InvalidArgument):
            normalize_fingerprint(bad)


def test_a_certificate_authenticates_as_the_active_key_bound_to_it(store: KeyStore) -> None:
    fingerprint = "ab" * 32
    by_subject, plaintext = store.create("acme", ["smollm2-*"], client_cert_subject="CN=alice,O=acme")
    by_fingerprint, _ = store.create("acme", ["other-*"], client_cert_sha256=fingerprint.upper())
    assert (by_subject.client_cert_subject, by_fingerprint.client_cert_sha256) == ("CN=alice,O=acme", fingerprint)
    assert store.authenticate(plaintext).key_id == by_subject.key_id  # the key itself still works
    alice = CertificateIdentity("CN=alice, O=acme", "cd" * 32)
    assert store.authenticate(alice).key_id == by_subject.key_id
    assert store.authorize(alice, "smollm2-135m").key_id == by_subject.key_id
    with pytest.raises(PermissionDenied):
        store.authorize(alice, "llama3")
    # The fingerprint binding is the more specific: it wins over the subject's.
    assert store.authenticate(CertificateIdentity("CN=alice,O=acme", fingerprint)).key_id == by_fingerprint.key_id
    for unbound in (CertificateIdentity("CN=bob,O=acme", "cd" * 32), CertificateIdentity("CN=ALICE,O=acme"),
                    CertificateIdentity()):
        with pytest.raises(Unauthenticated):
            store.authenticate(unbound)
    assert [(k.client_cert_subject, k.client_cert_sha256) for k in store.list()] == [
        ("CN=alice,O=acme", ""), ("", fingerprint)]


def test_one_active_key_per_certificate_identity_and_revoking_frees_it(store: KeyStore) -> None:
    first, _ = store.create("acme", client_cert_subject="CN=alice,O=acme")
    with pytest.raises(AlreadyExists) as taken:
        store.create("other", client_cert_subject="cn=alice, o=acme")
    assert first.key_id in taken.value.message
    with pytest.raises(InvalidArgument):
        store.create("acme", client_cert_subject="CN=x", client_cert_sha256="ab" * 32)
    store.revoke(first.key_id)
    with pytest.raises(Unauthenticated, match="not bound to an active API key"):
        store.authenticate(CertificateIdentity("CN=alice,O=acme"))
    second, _ = store.create("acme", client_cert_subject="CN=alice,O=acme")
    assert store.authenticate(CertificateIdentity("CN=alice,O=acme")).key_id == second.key_id


def test_a_schema_1_store_gains_bindings_and_keeps_its_keys(tmp_path: Path) -> None:
    import sqlite3

    with KeyStore(tmp_path) as store:
        record, plaintext = store.create("acme", ["smollm2-*"])
    db = sqlite3.connect(tmp_path / DB_NAME)  # back to what schema 1 had
    db.executescript("DROP INDEX api_keys_active_cert_subject; DROP INDEX api_keys_active_cert_sha256; "
                     "ALTER TABLE api_keys DROP COLUMN client_cert_subject; "
                     "ALTER TABLE api_keys DROP COLUMN client_cert_sha256; PRAGMA user_version=1;")
    db.close()
    with KeyStore(tmp_path) as store:
        assert store.authenticate(plaintext).key_id == record.key_id
        bound, _ = store.create("acme", client_cert_subject="CN=alice")
        assert store.authenticate(CertificateIdentity("CN=alice")).key_id == bound.key_id
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
