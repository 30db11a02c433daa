"""Model lifecycle without downtime, the registry's side: weighted aliases, their history and rollback, deletion,
garbage collection, WatchModels, and `lmesh models`' commands for them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lmesh.registry.v1 import registry_pb2, registry_pb2_grpc
from opentelemetry import trace

from services.common.config import ServiceConfig
from services.common.consul_agent import ConsulAgent
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Reason, Unavailable
from services.common.rpc import ServerInterceptor
from services.common.server import start_service
from services.registry.main import build
from services.registry.servicer import RegistryServicer, meta_models, replica_uses
from services.registry.store import (
    TEMP_SUFFIX,
    AliasTarget,
    Architecture,
    Artifact,
    ArtifactKind,
    BlobStore,
    ModelFormat,
    ModelStore,
    ModelVersion,
    check_targets,
)

Code = grpc.StatusCode


def blob_of(seed: int, size: int = 3000) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


async def one_chunk(blob: bytes) -> AsyncIterator[bytes]:
    yield blob


async def put(blobs: BlobStore, blob: bytes) -> str:
    await blobs.put(sha(blob), one_chunk(blob))
    return sha(blob)


def version(name: str, ver: str, model_sha: str, tokenizer_sha: str) -> ModelVersion:
    return ModelVersion(
        name=name, version=ver, format=ModelFormat.ONNX,
        artifacts=(Artifact(kind=ArtifactKind.MODEL, sha256=model_sha, file_name="model.onnx"),
                   Artifact(kind=ArtifactKind.TOKENIZER, sha256=tokenizer_sha, file_name="tokenizer.json")),
        chat_template="{{ messages }}", context_length=2048, eos_token_ids=(2,), bos_token_id=1,
        architecture=Architecture(num_layers=2, num_kv_heads=1, head_dim=8, vocab_size=100, dtype="float32"),
    )


@dataclass
class Stores:
    blobs: BlobStore
    models: ModelStore
    root: Path
    shared_tokenizer: str = ""
    registered: dict[str, str] = field(default_factory=dict)  # name:version -> its own model blob's digest

    async def register(self, name: str, ver: str, aliases: Sequence[str] = (), seed: int | None = None) -> str:
        """Registers name:ver with a model blob of its own and the tokenizer every version shares."""
        if not self.shared_tokenizer:
            self.shared_tokenizer = await put(self.blobs, blob_of(1, 500))
        own = await put(self.blobs, blob_of(seed if seed is not None else int(sha(f"{name}:{ver}".encode())[:8], 16)))
        self.models.register(version(name, ver, own, self.shared_tokenizer), aliases, actor="tester")
        self.registered[f"{name}:{ver}"] = own
        return own


def open_stores(root: Path) -> Stores:
    blobs = BlobStore(root)
    blobs.open()
    models = ModelStore(root / "registry.sqlite3", blobs)
    models.open()
    return Stores(blobs, models, root)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    opened = open_stores(tmp_path)
    yield opened
    opened.models.close()


def refs(targets: Sequence[Any]) -> list[tuple[str, int]]:
    return [(f"{t.model.name}:{t.model.version}", t.weight) for t in targets]


def split(*pairs: tuple[str, int]) -> list[AliasTarget]:
    return [AliasTarget(ref.partition(":")[0], ref.partition(":")[2], weight) for ref, weight in pairs]


# ============================================================================================ unit: store


async def test_split_alias_resolves_to_every_target_heaviest_first(stores: Stores) -> None:
    for ver in ("1", "2", "3"):
        await stores.register("alpha", ver)
    models = stores.models
    models.set_alias("prod", split(("alpha:1", 10), ("alpha:2", 90)), actor="ann")
    assert refs(models.resolve_targets("prod")) == [("alpha:2", 90), ("alpha:1", 10)]
    models.set_alias("tie", split(("alpha:3", 50), ("alpha:1", 50)))  # ties: registration order
    assert refs(models.resolve_targets("tie")) == [("alpha:1", 50), ("alpha:3", 50)]
    assert refs(models.resolve_targets("alpha:3")) == [("alpha:3", 100)]
    assert refs(models.resolve_targets("alpha")) == [("alpha:3", 100)]

    random.seed(7)
    drawn = [models.resolve("prod").version for _ in range(400)]
    assert 300 < drawn.count("2") < 400 and drawn.count("1") + drawn.count("2") == 400

    # Every alias that targets a version is listed on it, split or not.
    assert models.get("alpha", "1").aliases == ("prod", "tie")
    assert models.get("alpha", "2").aliases == ("prod",)
    listed = {a.alias: [(t.ref, t.weight) for t in a.targets] for a in models.list_aliases()}
    assert listed == {"prod": [("alpha:2", 90), ("alpha:1", 10)], "tie": [("alpha:1", 50), ("alpha:3", 50)]}
    assert all(a.update_time_unix_ms > 0 for a in models.list_aliases())

    # A single target weighs 100, whatever weight (0 or in range) it was given.
    models.set_alias("one", [AliasTarget("alpha", "1", 0)])
    models.set_alias("two", [AliasTarget("alpha", "2", 7)])
    assert refs(models.resolve_targets("one")) == [("alpha:1", 100)]
    assert refs(models.resolve_targets("two")) == [("alpha:2", 100)]


async def test_alias_validation(stores: Stores) -> None:
    await stores.register("alpha", "1")
    await stores.register("alpha", "2")
    models = stores.models

    def field_of(targets: list[AliasTarget], alias: str = "prod") -> str:
        with pytest.raises(InvalidArgument) as info:
            models.set_alias(alias, targets)
        return info.value.field

    assert field_of([]) == "targets"
    assert field_of([AliasTarget("alpha", str(i), 1) for i in range(17)]) == "targets"
    assert field_of(split(("alpha:1", 0), ("alpha:2", 5))) == "targets[0].weight"
    assert field_of(split(("alpha:1", 5), ("alpha:2", 10001))) == "targets[1].weight"
    assert field_of(split(("alpha:1", 5), ("alpha:2", -1))) == "targets[1].weight"
    assert field_of([AliasTarget("alpha", "1", 10001)]) == "targets[0].weight"
    assert field_of(split(("alpha:1", 5), ("alpha:1", 6))) == "targets[1]"
    assert field_of(split(("Alpha:1", 5), ("alpha:2", 6))) == "targets[0].name"
    assert field_of(split(("alpha:1", 5), ("alpha:", 6))) == "targets[1].version"
    assert field_of(split(("alpha:1", 5)), alias="alpha") == "alias"  # an alias must not equal a model name
    assert field_of(split(("alpha:1", 5)), alias="-x") == "alias"
    with pytest.raises(NotFound) as missing:
        models.set_alias("prod", split(("alpha:1", 5), ("alpha:9", 6)))
    assert missing.value.reason == Reason.MODEL_NOT_FOUND and missing.value.metadata == {"model": "alpha:9"}
    # Nothing refused moved anything or bumped the revision.
    assert models.list_aliases() == [] and models.revision == 2


async def test_the_per_version_alias_cap_holds_for_splits(stores: Stores) -> None:
    await stores.register("alpha", "1")
    await stores.register("alpha", "2")
    for i in range(64):
        stores.models.set_alias(f"a{i}", "alpha", "1")
    with pytest.raises(InvalidArgument) as info:
        stores.models.set_alias("more", split(("alpha:2", 50), ("alpha:1", 50)))
    assert info.value.field == "alias" and "64 aliases" in info.value.message
    stores.models.set_alias("a0", split(("alpha:2", 50), ("alpha:1", 50)))  # a held alias may be re-split


async def test_history_records_moves_and_setting_the_same_is_no_move(stores: Stores) -> None:
    await stores.register("alpha", "1", aliases=["prod"])
    await stores.register("alpha", "2")
    models = stores.models
    revision = models.revision
    models.set_alias("prod", split(("alpha:1", 90), ("alpha:2", 10)), actor="ann")
    assert models.revision == revision + 1
    models.set_alias("prod", split(("alpha:2", 10), ("alpha:1", 90)), actor="bob")  # the same, in another order
    assert models.revision == revision + 1
    moves = models.history("prod")
    assert [(m.action, m.actor) for m in moves] == [("set", "ann"), ("register", "tester")]
    assert [t.ref for t in moves[1].from_targets] == [] and [t.ref for t in moves[1].to_targets] == ["alpha:1"]
    assert [(t.ref, t.weight) for t in moves[0].to_targets] == [("alpha:1", 90), ("alpha:2", 10)]
    assert [(t.ref, t.weight) for t in moves[0].from_targets] == [("alpha:1", 100)]
    assert len(models.history("prod", limit=1)) == 1
    with pytest.raises(InvalidArgument) as info:
        models.history("prod", limit=-1)
    assert info.value.field == "limit"
    with pytest.raises(NotFound):
        models.history("never-set")
    models.set_alias("long", "alpha", "1", actor="x" * 500)
    assert models.history("long")[0].actor == "x" * 128


async def test_rollback_twice_and_its_refusals(stores: Stores) -> None:
    await stores.register("alpha", "1", aliases=["prod"])
    await stores.register("alpha", "2")
    models = stores.models
    with pytest.raises(FailedPrecondition, match="nothing to roll back"):
        models.rollback("prod")  # created only
    with pytest.raises(NotFound):
        models.rollback("nope")
    models.set_alias("prod", split(("alpha:2", 10), ("alpha:1", 90)))
    alias, move = models.rollback("prod", actor="carol")
    assert [t.ref for t in alias.targets] == ["alpha:1"] and move.action == "rollback" and move.actor == "carol"
    assert [(t.ref, t.weight) for t in move.from_targets] == [("alpha:1", 90), ("alpha:2", 10)]
    alias, _ = models.rollback("prod")  # a second rollback undoes the first
    assert [(t.ref, t.weight) for t in alias.targets] == [("alpha:1", 90), ("alpha:2", 10)]
    assert [m.action for m in models.history("prod")] == ["rollback", "rollback", "set", "register"]

    # A previous target deleted since: refused, nothing moved.
    models.set_alias("prod", "alpha", "1")
    models.delete("alpha", "2")
    with pytest.raises(FailedPrecondition, match="alpha:2 was deleted"):
        models.rollback("prod")
    assert [t.ref for t in models.get_alias("prod").targets] == ["alpha:1"]


async def test_delete_is_refused_while_an_alias_targets_the_version(stores: Stores) -> None:
    own1 = await stores.register("alpha", "1", aliases=["prod"])
    await stores.register("alpha", "2")
    stores.models.set_alias("canary", split(("alpha:2", 90), ("alpha:1", 10)))
    with pytest.raises(FailedPrecondition) as info:
        stores.models.delete("alpha", "1")
    assert info.value.reason == Reason.MODEL_IN_USE
    assert info.value.metadata["aliases"] == "canary,prod" and "canary, prod" in info.value.message
    assert stores.models.get("alpha", "1").ref == "alpha:1" and stores.blobs.size_of(own1) is not None

    stores.models.set_alias("prod", "alpha", "2")
    stores.models.set_alias("canary", "alpha", "2")
    revision = stores.models.revision
    removal = stores.models.delete("alpha", "1")
    # Its own model blob goes; the tokenizer that alpha:2 shares stays.
    assert [b.sha256 for b in removal.blobs] == [own1] and removal.freed_bytes == 3000
    assert removal.blobs[0].kind == ArtifactKind.MODEL and removal.blobs[0].file_name == "model.onnx"
    assert stores.blobs.size_of(own1) is None and stores.blobs.size_of(stores.shared_tokenizer) == 500
    assert stores.models.revision == revision + 1
    with pytest.raises(NotFound) as gone:
        stores.models.delete("alpha", "1")
    assert gone.value.reason == Reason.MODEL_NOT_FOUND
    with pytest.raises(InvalidArgument):
        stores.models.delete("alpha", "")


async def test_a_blob_two_versions_share_outlives_one_of_them(stores: Stores) -> None:
    shared = await stores.register("alpha", "1", seed=5)
    await stores.register("beta", "1", seed=5)  # the same model bytes
    removal = stores.models.delete("alpha", "1")
    assert removal.blobs == () and removal.freed_bytes == 0 and stores.blobs.size_of(shared) == 3000


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_garbage_collection_removes_only_old_unreferenced_blobs(stores: Stores) -> None:
    await stores.register("alpha", "1")
    referenced = stores.registered["alpha:1"]
    old = await put(stores.blobs, blob_of(900, 1234))
    young = await put(stores.blobs, blob_of(901, 99))
    for digest in (referenced, old, stores.shared_tokenizer):
        age(stores.blobs.path(digest), 7200)
    temp = stores.blobs.path(old).parent / f".{old[:16]}.abc{TEMP_SUFFIX}"
    temp.write_bytes(b"an upload in progress")
    age(temp, 7200)

    dry = stores.models.collect_garbage(3600, dry_run=True)
    assert [(b.sha256, b.size_bytes) for b in dry.blobs] == [(old, 1234)] and dry.freed_bytes == 1234
    assert stores.blobs.size_of(old) == 1234  # a dry run removes nothing

    removal = stores.models.collect_garbage(3600)
    assert [b.sha256 for b in removal.blobs] == [old]
    assert stores.blobs.size_of(old) is None and temp.exists()
    assert stores.blobs.size_of(young) == 99 and stores.blobs.size_of(referenced) == 3000
    # With no age at all, the young one goes too, and still never a referenced one.
    assert [b.sha256 for b in stores.models.collect_garbage(0).blobs] == [young]
    assert stores.blobs.size_of(referenced) == 3000 and stores.blobs.size_of(stores.shared_tokenizer) == 500
    with pytest.raises(InvalidArgument):
        stores.models.collect_garbage(-1)


async def test_uploading_a_stored_blob_again_makes_it_young(stores: Stores) -> None:
    digest = await put(stores.blobs, blob_of(77))
    age(stores.blobs.path(digest), 7200)
    await put(stores.blobs, blob_of(77))  # already stored: its registration is about to follow
    assert stores.models.collect_garbage(3600).blobs == ()


_V1_SCHEMA = """
CREATE TABLE model_versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version TEXT NOT NULL, format INTEGER NOT NULL,
    chat_template TEXT NOT NULL, context_length INTEGER NOT NULL, eos_token_ids TEXT NOT NULL,
    bos_token_id INTEGER NOT NULL, num_layers INTEGER NOT NULL, num_kv_heads INTEGER NOT NULL,
    head_dim INTEGER NOT NULL, vocab_size INTEGER NOT NULL, dtype TEXT NOT NULL, labels TEXT NOT NULL,
    create_time_unix_ms INTEGER NOT NULL, UNIQUE (name, version));
CREATE TABLE artifacts (
    version_id INTEGER NOT NULL REFERENCES model_versions(id), position INTEGER NOT NULL, kind INTEGER NOT NULL,
    sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL, file_name TEXT NOT NULL, PRIMARY KEY (version_id, position));
CREATE INDEX artifacts_by_sha256 ON artifacts(sha256);
CREATE TABLE aliases (alias TEXT PRIMARY KEY, version_id INTEGER NOT NULL REFERENCES model_versions(id));
PRAGMA user_version=1;
"""


def v1_database(path: Path, digest: str) -> None:
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA)
    for i, ver in enumerate(("1", "2"), start=1):
        db.execute("INSERT INTO model_versions VALUES (?, 'alpha', ?, 1, '', 2048, '[2]', 1, 2, 1, 8, 100, "
                   "'float32', '{}', 1000)", (i, ver))
        db.execute("INSERT INTO artifacts VALUES (?, 0, 1, ?, 3000, 'model.onnx')", (i, digest))
        db.execute("INSERT INTO artifacts VALUES (?, 1, 2, ?, 3000, 'tokenizer.json')", (i, digest))
    db.executemany("INSERT INTO aliases VALUES (?, ?)", [("prod", 1), ("canary", 2), ("stable", 1)])
    db.commit()
    db.close()


async def test_a_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    blobs.open()
    digest = await put(blobs, blob_of(3))
    v1_database(tmp_path / "registry.sqlite3", digest)

    models = ModelStore(tmp_path / "registry.sqlite3", blobs)
    models.open()
    try:
        assert refs(models.resolve_targets("prod")) == [("alpha:1", 100)]
        assert models.get("alpha", "1").aliases == ("prod", "stable")
        assert [a.alias for a in models.list_aliases()] == ["canary", "prod", "stable"]
        assert models.history("prod") == []  # set before history was kept: no moves, but no NotFound
        with pytest.raises(FailedPrecondition, match="never moved"):
            models.rollback("prod")
        assert models.revision == 0
        models.set_alias("prod", split(("alpha:1", 50), ("alpha:2", 50)))
        assert models.revision == 1 and len(models.history("prod")) == 1
    finally:
        models.close()
    db = sqlite3.connect(tmp_path / "registry.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert "aliases_v1" not in {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    reopened = ModelStore(tmp_path / "registry.sqlite3", blobs)
    reopened.open()  # opening a migrated database again changes nothing
    assert reopened.revision == 1 and len(reopened.resolve_targets("prod")) == 2
    reopened.close()


async def test_a_failed_migration_leaves_version_1_intact(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    blobs.open()
    path = tmp_path / "registry.sqlite3"
    v1_database(path, "a" * 64)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE alias_moves (x)")  # makes the migration's CREATE INDEX fail halfway
    db.commit()
    db.close()
    with pytest.raises(sqlite3.OperationalError):
        ModelStore(path, blobs).open()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert db.execute("SELECT COUNT(*) FROM aliases").fetchone()[0] == 3
    assert "aliases_v1" not in {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    db.close()


# ---------------------------------------------------------------------------------- property: malformed input

_texts = st.text(alphabet=st.sampled_from("aZ09.-_:= /\x00é"), max_size=12)
_targets = st.lists(st.builds(AliasTarget, _texts, _texts, st.integers(-5, 20000)), max_size=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(targets=_targets)
def test_any_targets_are_checked_or_refused_naming_a_field(targets: list[AliasTarget]) -> None:
    try:
        checked = check_targets(targets)
    except InvalidArgument as exc:
        assert exc.field.startswith("targets")
        return
    assert 1 <= len(checked) <= 16
    assert len({t.ref for t in checked}) == len(checked)
    assert all(1 <= t.weight <= 10000 for t in checked)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(alias=_texts, targets=_targets, reference=_texts)
def test_any_alias_move_or_reference_is_refused_cleanly(stores: Stores, alias: str, targets: list[AliasTarget],
                                                         reference: str) -> None:
    revision = stores.models.revision
    with pytest.raises((InvalidArgument, NotFound)):  # nothing is registered: never a move
        stores.models.set_alias(alias, targets)
    assert stores.models.revision == revision
    with pytest.raises((InvalidArgument, NotFound)) as info:
        stores.models.resolve_targets(reference)
    if isinstance(info.value, InvalidArgument):
        assert info.value.field == "reference"


# ============================================================================================ servicer over gRPC


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError(f"no ErrorInfo in {exc}")


def bad_request_field(exc: grpc.aio.AioRpcError) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    return bad.field_violations[0].field
    raise AssertionError(f"no BadRequest in {exc}")


async def refused(code: grpc.StatusCode, awaitable: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    assert info.value.code() == code, info.value.details()
    return info.value


class FakeReplicas:
    """What `replicas_using` would find in Consul: a service id per replica and its meta."""

    def __init__(self) -> None:
        self.meta: dict[str, dict[str, str]] = {}
        self.down = False

    async def __call__(self, model_id: str) -> list[str]:
        if self.down:
            raise Unavailable("lmesh-inference: Consul did not answer")
        return [service_id for service_id, meta in self.meta.items() if replica_uses(meta, model_id)]


@contextlib.asynccontextmanager
async def serving(stores: Stores, replicas: FakeReplicas | None = None,
                  ) -> AsyncIterator[tuple[registry_pb2_grpc.RegistryStub, RegistryServicer, grpc.aio.Server]]:
    servicer = RegistryServicer(stores.blobs, stores.models, replicas_using=replicas or FakeReplicas())
    server = grpc.aio.server(interceptors=[ServerInterceptor("registry", trace.get_tracer("test"))])
    registry_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield registry_pb2_grpc.RegistryStub(channel), servicer, server
    finally:
        await server.stop(None)


def target(ref: str, weight: int) -> registry_pb2.AliasTarget:
    name, _, ver = ref.partition(":")
    return registry_pb2.AliasTarget(name=name, version=ver, weight=weight)


async def test_set_resolve_list_rollback_history_over_grpc(stores: Stores) -> None:
    await stores.register("alpha", "1", aliases=["prod"])
    await stores.register("alpha", "2")
    async with serving(stores) as (stub, _, _):
        answer = await stub.SetAlias(registry_pb2.SetAliasRequest(
            alias="prod", targets=[target("alpha:1", 10), target("alpha:2", 90)], actor="ann"))
        assert answer.alias.alias == "prod" and answer.model.version == "2" and "prod" in answer.model.aliases
        assert [(t.version, t.weight) for t in answer.alias.targets] == [("2", 90), ("1", 10)]

        resolved = await stub.ResolveModel(registry_pb2.ResolveModelRequest(reference="prod"))
        assert [(t.model.version, t.weight) for t in resolved.targets] == [("2", 90), ("1", 10)]
        assert resolved.model.version in ("1", "2") and list(resolved.targets[0].model.aliases) == ["prod"]
        single = await stub.ResolveModel(registry_pb2.ResolveModelRequest(reference="alpha:1"))
        assert [(t.model.version, t.weight) for t in single.targets] == [("1", 100)]

        listed = await stub.ListModels(registry_pb2.ListModelsRequest())
        assert [(a.alias, len(a.targets)) for a in listed.aliases] == [("prod", 2)]
        assert [a.alias for a in (await stub.ListAliases(registry_pb2.ListAliasesRequest())).aliases] == ["prod"]

        rolled = await stub.RollbackAlias(registry_pb2.RollbackAliasRequest(alias="prod"))
        assert [t.version for t in rolled.alias.targets] == ["1"]
        assert rolled.move.action == "rollback" and rolled.move.actor == "unknown"  # no actor, no mesh identity
        assert [t.weight for t in getattr(rolled.move, "from")] == [90, 10]

        history = await stub.GetAliasHistory(registry_pb2.GetAliasHistoryRequest(alias="prod"))
        assert [(m.action, m.actor) for m in history.moves] == [("rollback", "unknown"), ("set", "ann"),
                                                                ("register", "tester")]
        assert all(m.time_unix_ms > 0 for m in history.moves)
        one = await stub.GetAliasHistory(registry_pb2.GetAliasHistoryRequest(alias="prod", limit=1))
        assert len(one.moves) == 1

        long_actor = await stub.SetAlias(registry_pb2.SetAliasRequest(alias="x", name="alpha", version="2",
                                                                      actor="é" * 300))
        assert long_actor.alias.targets[0].weight == 100
        assert (await stub.GetAliasHistory(registry_pb2.GetAliasHistoryRequest(alias="x"))).moves[0].actor == \
            "é" * 128


@pytest.mark.parametrize(("request_fields", "field_name"), [
    ({"alias": "p"}, "name"),
    ({"alias": "p", "name": "alpha", "version": "1", "targets": [target("alpha:1", 5)]}, "targets"),
    ({"alias": "p", "version": "1"}, "name"),
    ({"alias": "p", "name": "alpha"}, "version"),
    ({"alias": "", "name": "alpha", "version": "1"}, "alias"),
    ({"alias": "p", "targets": [target("alpha:1", 5), target("alpha:1", 6)]}, "targets[1]"),
    ({"alias": "p", "targets": [target("alpha:1", 5), target("alpha:2", 0)]}, "targets[1].weight"),
    ({"alias": "p", "targets": [target(f"alpha:{i}", 5) for i in range(17)]}, "targets"),
])
async def test_malformed_set_alias_names_the_field(stores: Stores, request_fields: dict[str, Any],
                                                   field_name: str) -> None:
    await stores.register("alpha", "1")
    async with serving(stores) as (stub, _, _):
        error = await refused(Code.INVALID_ARGUMENT, stub.SetAlias(registry_pb2.SetAliasRequest(**request_fields)))
        assert bad_request_field(error) == field_name


async def test_other_refusals_over_grpc(stores: Stores) -> None:
    await stores.register("alpha", "1", aliases=["prod"])
    async with serving(stores) as (stub, _, _):
        missing = await refused(Code.NOT_FOUND, stub.SetAlias(
            registry_pb2.SetAliasRequest(alias="p", targets=[target("alpha:1", 5), target("alpha:7", 5)])))
        assert error_info(missing).reason == "MODEL_NOT_FOUND"
        await refused(Code.FAILED_PRECONDITION, stub.RollbackAlias(registry_pb2.RollbackAliasRequest(alias="prod")))
        await refused(Code.NOT_FOUND, stub.RollbackAlias(registry_pb2.RollbackAliasRequest(alias="nope")))
        await refused(Code.INVALID_ARGUMENT, stub.RollbackAlias(registry_pb2.RollbackAliasRequest(alias="")))
        await refused(Code.NOT_FOUND, stub.GetAliasHistory(registry_pb2.GetAliasHistoryRequest(alias="nope")))
        negative = await refused(Code.INVALID_ARGUMENT,
                                 stub.GetAliasHistory(registry_pb2.GetAliasHistoryRequest(alias="prod", limit=-1)))
        assert bad_request_field(negative) == "limit"
        await refused(Code.NOT_FOUND, stub.DeleteModel(registry_pb2.DeleteModelRequest(name="alpha", version="9")))
        await refused(Code.INVALID_ARGUMENT, stub.DeleteModel(registry_pb2.DeleteModelRequest(name="alpha")))
        gc = await refused(Code.INVALID_ARGUMENT,
                           stub.CollectGarbage(registry_pb2.CollectGarbageRequest(min_age_seconds=-1)))
        assert bad_request_field(gc) == "min_age_seconds"


async def test_delete_is_refused_while_a_replica_serves_loads_or_drains_it(stores: Stores) -> None:
    own = await stores.register("alpha", "1", aliases=["prod"])
    await stores.register("alpha", "2")
    replicas = FakeReplicas()
    replicas.meta = {"inf-a": {"models": "alpha:2,beta:1"}, "inf-b": {"loading": "alpha:1"},
                     "inf-c": {"draining": "alpha:1", "models": "alpha:10"}}
    async with serving(stores, replicas) as (stub, _, _):
        delete_1 = registry_pb2.DeleteModelRequest(name="alpha", version="1")
        error = await refused(Code.FAILED_PRECONDITION, stub.DeleteModel(delete_1))
        info = error_info(error)
        assert info.reason == "MODEL_IN_USE"
        assert dict(info.metadata) == {"aliases": "prod", "replicas": "inf-b,inf-c"}
        assert "prod" in (error.details() or "") and "inf-b, inf-c" in (error.details() or "")
        assert "lmesh models alias" in (error.details() or "") and "stop them" in (error.details() or "")

        await stub.SetAlias(registry_pb2.SetAliasRequest(alias="prod", name="alpha", version="2"))
        error = await refused(Code.FAILED_PRECONDITION, stub.DeleteModel(delete_1))
        assert dict(error_info(error).metadata) == {"aliases": "", "replicas": "inf-b,inf-c"}

        replicas.down = True
        await refused(Code.UNAVAILABLE, stub.DeleteModel(delete_1))
        replicas.down = False
        replicas.meta = {"inf-a": {"models": "alpha:2"}}
        assert stores.models.get("alpha", "1").ref == "alpha:1"  # nothing refused deleted anything

        deleted = await stub.DeleteModel(delete_1)
        assert [b.sha256 for b in deleted.removed_blobs] == [own] and deleted.freed_bytes == 3000
        await refused(Code.NOT_FOUND, stub.GetModel(registry_pb2.GetModelRequest(name="alpha", version="1")))


async def test_a_replica_meta_entry_must_match_the_whole_model_id() -> None:
    assert meta_models({"models": "a:1,,a:10"}, "models") == ["a:1", "a:10"]
    assert not replica_uses({"models": "a:10", "loading": "xa:1"}, "a:1")
    assert replica_uses({"draining": "b:2,a:1"}, "a:1")


async def test_collect_garbage_over_grpc(stores: Stores) -> None:
    old = await put(stores.blobs, blob_of(500, 2048))
    age(stores.blobs.path(old), 7200)
    young = await put(stores.blobs, blob_of(501, 10))
    async with serving(stores) as (stub, _, _):
        dry = await stub.CollectGarbage(registry_pb2.CollectGarbageRequest(dry_run=True))  # 0: an hour
        assert [(b.sha256, b.size_bytes, b.kind) for b in dry.removed_blobs] == [(old, 2048, 0)]
        assert stores.blobs.size_of(old) == 2048
        done = await stub.CollectGarbage(registry_pb2.CollectGarbageRequest())
        assert done.freed_bytes == 2048 and stores.blobs.size_of(old) is None and stores.blobs.size_of(young) == 10


# ---------------------------------------------------------------------------------------------- WatchModels


async def test_watch_sends_the_state_at_once_then_after_every_change(stores: Stores) -> None:
    await stores.register("alpha", "1", aliases=["prod"])
    async with serving(stores) as (stub, _, _):
        call = stub.WatchModels(registry_pb2.WatchModelsRequest(references=["prod", "beta", "alpha:1"]))
        first = await asyncio.wait_for(call.read(), 5)
        assert first.revision == stores.models.revision
        assert [r.reference for r in first.resolutions] == ["prod", "beta", "alpha:1"]
        assert [[t.model.version for t in r.targets] for r in first.resolutions] == [["1"], [], ["1"]]

        await stores.register("beta", "1")
        second = await asyncio.wait_for(call.read(), 5)
        assert second.revision > first.revision
        assert [[t.model.name for t in r.targets] for r in second.resolutions] == [["alpha"], ["beta"], ["alpha"]]

        await stores.register("alpha", "2")
        await stub.SetAlias(registry_pb2.SetAliasRequest(alias="prod", targets=[target("alpha:1", 1),
                                                                                 target("alpha:2", 3)]))
        while (message := await asyncio.wait_for(call.read(), 5)).revision < stores.models.revision:
            pass
        assert [(t.model.version, t.weight) for t in message.resolutions[0].targets] == [("2", 3), ("1", 1)]
        call.cancel()

        revisions_only = stub.WatchModels(registry_pb2.WatchModelsRequest())
        state = await asyncio.wait_for(revisions_only.read(), 5)
        assert state.revision == stores.models.revision and list(state.resolutions) == []
        revisions_only.cancel()


async def test_watch_refuses_malformed_and_too_many_references(stores: Stores) -> None:
    async with serving(stores) as (stub, _, _):
        error = await refused(Code.INVALID_ARGUMENT, stub.WatchModels(
            registry_pb2.WatchModelsRequest(references=["ok", "a:b:c"])).read())
        assert bad_request_field(error) == "references[1]"
        error = await refused(Code.INVALID_ARGUMENT, stub.WatchModels(
            registry_pb2.WatchModelsRequest(references=[f"m{i}" for i in range(65)])).read())
        assert bad_request_field(error) == "references"


async def test_a_cancelled_watch_ends_on_the_server(stores: Stores) -> None:
    async with serving(stores) as (stub, _, server):
        call = stub.WatchModels(registry_pb2.WatchModelsRequest(references=["x"]))
        await asyncio.wait_for(call.read(), 5)
        call.cancel()
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await server.stop(5)  # nothing left running to wait for
        assert time.monotonic() - started < 2


async def test_drain_ends_every_watch_with_draining(stores: Stores) -> None:
    async with serving(stores) as (stub, servicer, _):
        calls = [stub.WatchModels(registry_pb2.WatchModelsRequest(references=["x"])) for _ in range(3)]
        for call in calls:
            await asyncio.wait_for(call.read(), 5)
        await servicer.drain()
        for call in calls:
            error = await refused(Code.UNAVAILABLE, asyncio.wait_for(call.read(), 5))
            assert error_info(error).reason == "DRAINING"
        late = stub.WatchModels(registry_pb2.WatchModelsRequest())
        await refused(Code.UNAVAILABLE, late.read())


@pytest.mark.parametrize("grace_s", [8.0])
async def test_the_built_service_deletes_and_its_stop_is_not_held_up_by_a_watch(
        consul_agent: ConsulAgent, tmp_path: Path, grace_s: float) -> None:
    config = ServiceConfig(mtls=False, service=f"registry-{uuid.uuid4().hex[:8]}", consul_addr=consul_agent.http_addr,
                           data_dir=tmp_path, grace_s=grace_s)
    running = await start_service(config, build)
    wired = Stores(running.parts.extra["blobs"], running.parts.extra["models"], tmp_path)
    name = f"lifecycle-{uuid.uuid4().hex[:8]}"
    await wired.register(name, "1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        # The wiring asks Consul for lmesh-inference replicas: none uses this version, so it goes.
        deleted = await stub.DeleteModel(registry_pb2.DeleteModelRequest(name=name, version="1"), timeout=10)
        assert deleted.freed_bytes == 3000 + 500
        call = stub.WatchModels(registry_pb2.WatchModelsRequest())
        await asyncio.wait_for(call.read(), 5)
        started = time.monotonic()
        await running.stop()
        assert time.monotonic() - started < grace_s / 2
        error = await refused(Code.UNAVAILABLE, asyncio.wait_for(call.read(), 5))
        assert error_info(error).reason == "DRAINING"


# ============================================================================================ CLI


@dataclass
class FakeEndpoint:
    service_id: str
    meta: dict[str, str]

    @property
    def models(self) -> list[str]:
        return meta_models(self.meta, "models")


class FakeInference:
    def __init__(self, endpoints: list[FakeEndpoint]) -> None:
        self._endpoints = endpoints

    async def passing(self) -> list[FakeEndpoint]:
        return self._endpoints


class FakeMesh:
    def __init__(self, endpoints: list[FakeEndpoint]) -> None:
        self.inference = FakeInference(endpoints)

    def peer(self, service: Any) -> FakeInference:
        return self.inference


class DirectPeer:
    """A registry Peer reduced to what `lmesh models` uses: `call` on one stub."""

    def __init__(self, stub: registry_pb2_grpc.RegistryStub, sent: list[Any]) -> None:
        self._stub = stub
        self._sent = sent

    async def call(self, method: Callable[[Any], Callable[..., Awaitable[Any]]], request: Any, **_: Any) -> Any:
        self._sent.append(request)
        return await method(self._stub)(request)


@dataclass
class Cli:
    root: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]
    endpoints: list[FakeEndpoint] = field(default_factory=list)
    replicas: FakeReplicas = field(default_factory=FakeReplicas)
    sent: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        import services.cli

        async def with_registry(action: Callable[[Any, Any], Awaitable[int]], admin_token: str | None) -> int:
            stores = open_stores(self.root)
            try:
                async with serving(stores, self.replicas) as (stub, _, _):
                    return await action(DirectPeer(stub, self.sent), FakeMesh(self.endpoints))
            finally:
                stores.models.close()

        self.monkeypatch.setattr(services.cli, "_with_registry", with_registry)

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        from services.cli import main

        code = main(["models", *argv])
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    async def seed() -> None:
        stores = open_stores(tmp_path)
        await stores.register("alpha", "1", aliases=["default"])
        await stores.register("alpha", "2")
        await stores.register("alpha", "3")
        stores.models.close()

    asyncio.run(seed())
    monkeypatch.setenv("LOGNAME", "opal")
    monkeypatch.setenv("USER", "opal")
    yield Cli(tmp_path, monkeypatch, capsys)


def test_cli_alias_split_promote_rollback_history(cli: Cli) -> None:
    assert cli("alias", "default", "alpha:1=90", "alpha:2=10") == (0, "default -> alpha:1=90 alpha:2=10\n", "")
    assert all(r.actor == "opal" for r in cli.sent)
    assert cli("promote", "default") == (0, "default -> alpha:2\n", "")  # the canary: the lightest
    assert cli("rollback", "default") == (0, "default -> alpha:1=90 alpha:2=10\n", "")
    assert cli("promote", "default", "alpha:3") == (0, "default -> alpha:3\n", "")
    assert cli("alias", "solo", "alpha:1") == (0, "solo -> alpha:1\n", "")

    code, out, _ = cli("history", "default")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["TIME", "ACTION", "ACTOR", "FROM", "TO"]
    assert [line.split()[1:3] for line in lines[1:]] == [["set", "opal"], ["rollback", "opal"], ["set", "opal"],
                                                         ["set", "opal"], ["register", "tester"]]
    assert lines[1].split()[3:] == ["alpha:1=90", "alpha:2=10", "alpha:3"]
    assert lines[-1].split()[3:] == ["-", "alpha:1"]
    assert lines[1].split()[0].endswith("Z") and "T" in lines[1].split()[0]
    code, out, _ = cli("history", "default", "--limit", "2")
    assert len(out.splitlines()) == 3


def test_cli_alias_and_promote_refusals(cli: Cli) -> None:
    for argv, words in [(("alias", "d", "alpha:1", "alpha:2=5"), "needs a weight"),
                        (("alias", "d", "alpha:1=x", "alpha:2=5"), "whole number"),
                        (("alias", "d", "alpha"), "NAME:VERSION"),
                        (("promote", "default"), "not split"),
                        (("promote", "nope"), "no alias"),
                        (("alias", "d", "alpha:1=0", "alpha:2=5"), "INVALID_ARGUMENT"),
                        (("rollback", "default"), "FAILED_PRECONDITION"),
                        (("history", "nope"), "NOT_FOUND")]:
        code, out, err = cli(*argv)
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and words in err, (argv, err)
    cli("alias", "tied", "alpha:1=5", "alpha:2=5", "alpha:3=50")
    code, _, err = cli("promote", "tied")
    assert code == 2 and "tied between alpha:1, alpha:2" in err


def test_cli_delete_and_its_refusal(cli: Cli) -> None:
    code, out, err = cli("delete", "alpha:1")
    assert code == 2 and out == "" and "in use" in err and "default" in err and len(err.splitlines()) == 1
    cli.replicas.meta = {"inf-9": {"loading": "alpha:2"}}
    code, _, err = cli("delete", "alpha:2")
    assert code == 2 and "inf-9" in err
    cli.replicas.meta = {}
    assert cli("delete", "alpha:2") == (0, "deleted alpha:2 (freed 0.0 MiB)\n", "")
    assert cli("delete", "alpha")[0] == 2


def test_cli_gc(cli: Cli) -> None:
    async def orphan() -> str:
        blobs = BlobStore(cli.root)
        blobs.open()
        digest = await put(blobs, blob_of(4242, 3 * 1024 * 1024))
        age(blobs.path(digest), 600)
        return digest

    digest = asyncio.run(orphan())
    code, out, _ = cli("gc", "--dry-run")  # an hour by default: too young
    assert code == 0 and out.splitlines() == ["would remove 0 blob(s), 0.0 MiB"]
    code, out, _ = cli("gc", "--dry-run", "--min-age", "60")
    assert out.splitlines() == [f"{digest[:16]}         3.0 MiB", "would remove 1 blob(s), 3.0 MiB"]
    code, out, _ = cli("gc", "--min-age", "60")
    assert code == 0 and out.splitlines()[-1] == "removed 1 blob(s), 3.0 MiB"
    assert not any(cli.root.rglob(digest))
    with pytest.raises(SystemExit):
        cli("gc", "--min-age", "0")


def test_cli_list_shows_split_weights_and_replica_state(cli: Cli) -> None:
    cli("alias", "canary", "alpha:2=90", "alpha:3=10")
    cli.endpoints = [FakeEndpoint("i1", {"models": "alpha:1,alpha:2"}), FakeEndpoint("i2", {"models": "alpha:2",
                                                                                           "loading": "alpha:3"}),
                     FakeEndpoint("i3", {"loading": "alpha:2", "draining": "alpha:1"})]
    code, out, _ = cli("list")
    assert code == 0
    header, *rows = [line.split() for line in out.splitlines()]
    assert header == ["MODEL", "ALIASES", "CONTEXT", "FORMAT", "STATE", "REPLICAS"]
    by_model = {row[0]: row[1:] for row in rows}
    assert by_model["alpha:1"] == ["default", "2048", "onnx", "warm:1,draining:1", "1"]
    assert by_model["alpha:2"] == ["canary=90", "2048", "onnx", "warm:2,loading:1", "2"]
    assert by_model["alpha:3"] == ["canary=10", "2048", "onnx", "loading", "0"]
    cli.endpoints = []
    _, out, _ = cli("list")
    assert [line.split()[-2:] for line in out.splitlines()[1:]] == [["-", "0"]] * 3


def test_cli_parser_keeps_the_admin_token_anywhere() -> None:
    from services.cli import build_parser

    for argv in (["models", "alias", "x", "m:1=5", "m:2=5", "--admin-token", "T"],
                 ["models", "--admin-token", "T", "rollback", "x"], ["models", "gc", "--admin-token", "T"],
                 ["models", "delete", "m:1", "--admin-token", "T"], ["models", "promote", "x", "--admin-token", "T"]):
        assert build_parser().parse_args(argv).admin_token == "T"
