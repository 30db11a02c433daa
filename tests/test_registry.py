"""lmesh-registry: the stores directly, then the service over gRPC through a real Consul agent."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from lmesh.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.config import ServiceConfig
from services.common.consul_agent import ConsulAgent
from services.common.discovery import Mesh, ServiceResolver
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.common.peers import PeerService, past_send_race
from services.common.rpc import call_options
from services.common.server import RunningService, start_service
from services.registry import client
from services.registry.main import RegistrySettings, build
from services.registry.store import (
    CHUNK_SIZE,
    Architecture,
    Artifact,
    ArtifactKind,
    BlobStore,
    ModelFormat,
    ModelStore,
    ModelVersion,
)

MiB = 1024 * 1024
Code = grpc.StatusCode


def data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


async def chunks_of(blob: bytes, size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    for start in range(0, len(blob), size):
        yield blob[start : start + size]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def version(name: str, ver: str, model_sha: str, tokenizer_sha: str, **changes: Any) -> ModelVersion:
    base = ModelVersion(
        name=name,
        version=ver,
        format=ModelFormat.ONNX,
        artifacts=(
            Artifact(kind=ArtifactKind.MODEL, sha256=model_sha, file_name="model.onnx"),
            Artifact(kind=ArtifactKind.TOKENIZER, sha256=tokenizer_sha, file_name="tokenizer.json"),
        ),
        chat_template="{{ messages }}",
        context_length=2048,
        eos_token_ids=(2,),
        bos_token_id=1,
        architecture=Architecture(num_layers=2, num_kv_heads=1, head_dim=8, vocab_size=100, dtype="float32"),
        labels={"source": "test"},
    )
    return replace(base, **changes)


# ============================================================================================ unit: blobs


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    store = BlobStore(tmp_path)
    store.open()
    return store


async def read_all(store: BlobStore, digest: str) -> list[bytes]:
    return [chunk async for chunk in store.read_chunks(digest)]


async def test_blob_roundtrip_layout_and_chunking(blobs: BlobStore) -> None:
    blob = data(2 * MiB + 123, seed=1)
    digest = sha(blob)
    stored = await blobs.put(digest, chunks_of(blob, 300_000), size_bytes=len(blob))
    assert (stored.sha256, stored.size_bytes, stored.already_stored) == (digest, len(blob), False)
    assert blobs.path(digest) == blobs.root / digest[:2] / digest
    assert files_under(blobs.root) == [blobs.path(digest)]
    assert blobs.stat(digest) == len(blob)
    chunks = await read_all(blobs, digest)
    assert [len(c) for c in chunks] == [MiB, MiB, 123]
    assert b"".join(chunks) == blob


async def test_blob_already_stored_is_a_noop_that_reads_nothing(blobs: BlobStore) -> None:
    blob = data(1000, seed=2)
    await blobs.put(sha(blob), chunks_of(blob))

    async def must_not_be_read() -> AsyncIterator[bytes]:
        raise AssertionError("an already stored blob's bytes were read")
        yield b""  # pragma: no cover

    again = await blobs.put(sha(blob), must_not_be_read(), size_bytes=len(blob))
    assert again.already_stored and again.size_bytes == len(blob)
    with pytest.raises(InvalidArgument) as info:
        await blobs.put(sha(blob), must_not_be_read(), size_bytes=999)
    assert info.value.field == "size_bytes"


@pytest.mark.parametrize(
    ("announce", "size_bytes", "field"),
    [
        ("wrong-digest", 0, "sha256"),
        ("", 0, "sha256"),
        ("ABC", 0, "sha256"),
        ("upper", 0, "sha256"),
        ("right", -1, "size_bytes"),
        ("right", 10, "size_bytes"),  # upload longer than announced
        ("right", 5000, "size_bytes"),  # upload shorter than announced
    ],
)
async def test_blob_refused_uploads_leave_nothing(
    blobs: BlobStore, announce: str, size_bytes: int, field: str
) -> None:
    blob = data(3000, seed=3)
    digest = {"wrong-digest": sha(b"other bytes"), "right": sha(blob), "upper": sha(blob).upper()}.get(
        announce, announce
    )
    with pytest.raises(InvalidArgument) as info:
        await blobs.put(digest, chunks_of(blob, 1000), size_bytes=size_bytes)
    assert info.value.field == field
    if field == "sha256" and announce == "wrong-digest":
        assert "does not match" in info.value.message
    assert files_under(blobs.root) == []
    assert blobs.uploads_in_progress() == {}


async def test_blob_empty_upload_is_refused(blobs: BlobStore) -> None:
    with pytest.raises(InvalidArgument) as info:
        await blobs.put(sha(b""), chunks_of(b""))
    assert info.value.field == "chunk"
    assert files_under(blobs.root) == []


async def test_blob_cancelled_upload_leaves_nothing(blobs: BlobStore) -> None:
    blob = data(2 * MiB, seed=4)
    never = asyncio.Event()

    async def half_then_hang() -> AsyncIterator[bytes]:
        yield blob[:MiB]
        await never.wait()
        yield blob[MiB:]  # pragma: no cover

    task = asyncio.create_task(blobs.put(sha(blob), half_then_hang()))
    async with asyncio.timeout(5):
        await blobs.wait_uploads(lambda writing: MiB in writing.values())
    assert [p.name.endswith(".part") for p in files_under(blobs.root)] == [True]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files_under(blobs.root) == []
    assert blobs.uploads_in_progress() == {}


async def test_blob_open_removes_leftover_temp_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.open()
    leftover = store.root / "ab" / ".abcdef.xyz.part"
    leftover.parent.mkdir()
    leftover.write_bytes(b"half a blob")
    BlobStore(tmp_path).open()
    assert not leftover.exists()


async def test_blob_missing_and_malformed_reads(blobs: BlobStore) -> None:
    with pytest.raises(NotFound):
        blobs.stat("0" * 64)
    with pytest.raises(NotFound):
        await read_all(blobs, "0" * 64)
    for bad in ("", "zz", "A" * 64):
        with pytest.raises(InvalidArgument) as info:
            blobs.stat(bad)
        assert info.value.field == "sha256"


# ============================================================================================ unit: models


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[BlobStore, ModelStore, Path]]:
    blob_store = BlobStore(tmp_path)
    blob_store.open()
    models = ModelStore(tmp_path / "registry.sqlite3", blob_store)
    models.open()
    yield blob_store, models, tmp_path
    models.close()


async def stored_pair(store: BlobStore, seed: int) -> tuple[str, str]:
    model_blob, tokenizer_blob = data(4000, seed), data(500, seed + 1000)
    await store.put(sha(model_blob), chunks_of(model_blob))
    await store.put(sha(tokenizer_blob), chunks_of(tokenizer_blob))
    return sha(model_blob), sha(tokenizer_blob)


async def test_models_register_get_resolve_list_alias(stores: tuple[BlobStore, ModelStore, Path]) -> None:
    blob_store, models, tmp = stores
    m, t = await stored_pair(blob_store, 10)
    first = models.register(version("alpha", "1", m, t), aliases=["prod", "prod"])
    assert first.aliases == ("prod",)
    assert [a.size_bytes for a in first.artifacts] == [4000, 500]  # filled from the blob store
    assert first.create_time_unix_ms > 0
    second = models.register(version("alpha", "2", m, t, labels={"k": "v"}), aliases=["canary"])
    models.register(version("beta", "1", m, t))

    assert models.get("alpha", "1") == first
    assert models.resolve("alpha:1").version == "1"
    assert models.resolve("alpha").version == "2"  # bare name: most recently registered
    models.register(version("alpha", "2-int8", m, t))  # a variant, registered later, is not "newer"
    assert models.resolve("alpha").version == "2"
    assert models.resolve("alpha:2-int8").version == "2-int8"
    models.register(version("gamma", "1-fp16", m, t))
    assert models.resolve("gamma").version == "1-fp16"  # only variants: the newest of them
    assert models.resolve("prod").ref == "alpha:1"
    assert models.resolve("canary") == second

    moved = models.set_alias("prod", "alpha", "2")
    assert moved.aliases == ("canary", "prod")
    assert models.get("alpha", "1").aliases == ()
    assert [m.ref for m in models.list()] == ["alpha:2-int8", "alpha:2", "alpha:1", "beta:1", "gamma:1-fp16"]
    assert [m.ref for m in models.list("alpha")] == ["alpha:2-int8", "alpha:2", "alpha:1"]
    assert models.list("nope") == []

    # Everything survives closing and reopening the database.
    before = models.list()
    models.close()
    reopened = ModelStore(tmp / "registry.sqlite3", blob_store)
    reopened.open()
    assert reopened.list() == before
    assert reopened.resolve("prod").ref == "alpha:2"
    reopened.close()


async def test_models_refusals(stores: tuple[BlobStore, ModelStore, Path]) -> None:
    blob_store, models, _ = stores
    m, t = await stored_pair(blob_store, 20)
    models.register(version("alpha", "1", m, t), aliases=["prod"])

    with pytest.raises(AlreadyExists):
        models.register(version("alpha", "1", m, t))
    with pytest.raises(FailedPrecondition) as precondition:
        models.register(version("alpha", "2", "f" * 64, t))
    assert "f" * 64 in precondition.value.message
    with pytest.raises(InvalidArgument) as info:
        models.register(version("prod", "1", m, t))  # a name equal to an alias
    assert info.value.field == "model.name"
    with pytest.raises(InvalidArgument) as info:
        models.set_alias("alpha", "alpha", "1")  # an alias equal to a name
    assert info.value.field == "alias"
    with pytest.raises(NotFound, match="model 'alpha:9' not found"):
        models.set_alias("x", "alpha", "9")
    for missing in ("gamma", "gamma:1", "alpha:9", "Unknown-Alias"):
        with pytest.raises(NotFound, match=f"model '{missing}' not found"):
            models.resolve(missing)

    # A refused registration is all-or-nothing: a bad alias leaves no version behind.
    with pytest.raises(InvalidArgument) as info:
        models.register(version("delta", "1", m, t), aliases=["ok", "alpha"])
    assert info.value.field == "aliases[1]"
    with pytest.raises(NotFound):
        models.get("delta", "1")
    with pytest.raises(NotFound):
        models.resolve("ok")


async def test_models_not_open_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        ModelStore(tmp_path / "registry.sqlite3", BlobStore(tmp_path)).list()


# ============================================================================================ integration


class Registry:
    """One in-process registry under a Consul name of its own, so other tests' registries never answer."""

    def __init__(self, agent: ConsulAgent, data_dir: Path, settings: RegistrySettings | None = None) -> None:
        self.agent = agent
        self.data_dir = data_dir
        self.settings = settings
        self.service = f"registry-{uuid.uuid4().hex[:8]}"
        self.mesh = Mesh(agent.http_addr)
        self.peer = self.mesh.peer(PeerService(f"lmesh-{self.service}", registry_pb2_grpc.RegistryStub))
        self.resolver: ServiceResolver = self.peer.resolver
        self.running: RunningService | None = None

    async def start(self) -> None:
        config = ServiceConfig(mtls=False, service=self.service, consul_addr=self.agent.http_addr,
                               data_dir=self.data_dir, settings=self.settings)
        self.running = await start_service(config, build)
        port = self.running.port
        await self.resolver.wait_for(lambda endpoint: endpoint.port == port)

    async def stop(self) -> None:
        if self.running is not None:
            await self.running.stop()
            self.running = None

    @property
    def blobs(self) -> BlobStore:
        assert self.running is not None
        store: BlobStore = self.running.parts.extra["blobs"]
        return store

    async def stub(self) -> registry_pb2_grpc.RegistryStub:
        endpoint = await self.resolver.pick()
        return endpoint.stub(registry_pb2_grpc.RegistryStub)

    async def call(self, method: str, request: Any) -> Any:
        return await self.peer.call(lambda stub: getattr(stub, method), request, timeout=10)

    async def upload(self, blob: bytes, digest: str | None = None, size: int = 0) -> Any:
        async def requests() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
            header = registry_pb2.UploadArtifactHeader(sha256=digest or sha(blob), size_bytes=size)
            yield registry_pb2.UploadArtifactRequest(header=header)
            async for chunk in chunks_of(blob, 256 * 1024):
                yield registry_pb2.UploadArtifactRequest(chunk=chunk)

        stub = await self.stub()
        return await past_send_race(lambda: stub.UploadArtifact(requests(), **call_options(timeout=10)))

    async def fetch(self, digest: str) -> tuple[Any, bytes]:
        stub = await self.stub()
        messages = [m async for m in stub.FetchArtifact(registry_pb2.FetchArtifactRequest(sha256=digest))]
        assert messages[0].WhichOneof("kind") == "header"
        assert all(m.WhichOneof("kind") == "chunk" and len(m.chunk) <= MiB for m in messages[1:])
        return messages[0].header, b"".join(m.chunk for m in messages[1:])


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def registry(
    consul_agent: ConsulAgent, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Registry]:
    service = Registry(consul_agent, tmp_path_factory.mktemp("registry"))
    await service.start()
    yield service
    await service.stop()
    await service.mesh.close()


def model_proto(name: str, ver: str, model_sha: str, tokenizer_sha: str) -> registry_pb2.ModelVersion:
    return registry_pb2.ModelVersion(
        name=name,
        version=ver,
        format=registry_pb2.MODEL_FORMAT_ONNX,
        artifacts=[
            registry_pb2.Artifact(
                kind=registry_pb2.ARTIFACT_KIND_MODEL, sha256=model_sha, file_name="m.onnx"
            ),
            registry_pb2.Artifact(kind=registry_pb2.ARTIFACT_KIND_TOKENIZER, sha256=tokenizer_sha),
        ],
        chat_template="{% for m in messages %}{{ m.content }}{% endfor %}",
        context_length=8192,
        eos_token_ids=[2],
        bos_token_id=-1,
        architecture=registry_pb2.ModelArchitecture(
            num_layers=30, num_kv_heads=3, head_dim=64, vocab_size=49152, dtype="float32"
        ),
        labels={"source": "unit"},
    )


async def expect_error(code: grpc.StatusCode, awaitable: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


async def uploaded_pair(registry: Registry, seed: int) -> tuple[bytes, bytes]:
    model_blob, tokenizer_blob = data(MiB + 77, seed), data(3000, seed + 1)
    for blob in (model_blob, tokenizer_blob):
        response = await registry.upload(blob, size=len(blob))
        assert response.artifact.sha256 == sha(blob) and response.artifact.size_bytes == len(blob)
    return model_blob, tokenizer_blob


async def test_upload_register_resolve_alias_list_fetch(registry: Registry, tmp_path: Path) -> None:
    model_blob, tokenizer_blob = await uploaded_pair(registry, seed=100)
    m, t = sha(model_blob), sha(tokenizer_blob)
    again = await registry.upload(model_blob)
    assert again.already_stored

    registered = await registry.call(
        "RegisterModel",
        registry_pb2.RegisterModelRequest(model=model_proto("flow", "1", m, t), aliases=["flow-prod"]),
    )
    assert list(registered.model.aliases) == ["flow-prod"]
    assert [a.size_bytes for a in registered.model.artifacts] == [len(model_blob), len(tokenizer_blob)]
    assert registered.model.architecture.num_layers == 30 and registered.model.labels["source"] == "unit"
    v2 = model_proto("flow", "2", m, t)
    await registry.call("RegisterModel", registry_pb2.RegisterModelRequest(model=v2))

    async def resolve(reference: str) -> Any:
        return (
            await registry.call("ResolveModel", registry_pb2.ResolveModelRequest(reference=reference))
        ).model

    assert (await resolve("flow:1")).version == "1"
    assert (await resolve("flow")).version == "2"
    assert (await resolve("flow-prod")).version == "1"

    moved = await registry.call(
        "SetAlias", registry_pb2.SetAliasRequest(alias="flow-prod", name="flow", version="2")
    )
    assert list(moved.model.aliases) == ["flow-prod"]
    assert (await resolve("flow-prod")).version == "2"
    got = await registry.call("GetModel", registry_pb2.GetModelRequest(name="flow", version="1"))
    assert list(got.model.aliases) == []
    assert got.model == replace_aliases(registered.model, [])

    listed = await registry.call("ListModels", registry_pb2.ListModelsRequest(name="flow"))
    assert [(x.version, list(x.aliases)) for x in listed.models] == [("2", ["flow-prod"]), ("1", [])]
    everything = await registry.call("ListModels", registry_pb2.ListModelsRequest())
    assert {"flow:1", "flow:2"} <= {f"{x.name}:{x.version}" for x in everything.models}

    header, fetched = await registry.fetch(m)
    assert (header.sha256, header.size_bytes, fetched) == (m, len(model_blob), model_blob)

    # The client helper: cached, verified, returned at once the second time.
    path = await client.fetch_to_cache(registry.peer, t, tmp_path / "cache")
    assert path == tmp_path / "cache" / t and path.read_bytes() == tokenizer_blob
    assert await client.fetch_to_cache(registry.peer, t, tmp_path / "cache") == path
    assert files_under(tmp_path / "cache") == [path]


def replace_aliases(model: Any, aliases: list[str]) -> Any:
    copy = registry_pb2.ModelVersion()
    copy.CopyFrom(model)
    del copy.aliases[:]
    copy.aliases.extend(aliases)
    return copy


async def test_upload_with_wrong_bytes_is_refused_and_leaves_nothing(registry: Registry) -> None:
    blob = data(2 * MiB, seed=200)
    claimed = sha(b"the bytes the client meant")
    details = await expect_error(Code.INVALID_ARGUMENT, registry.upload(blob, digest=claimed))
    assert details.startswith("sha256:") and "does not match" in details
    assert not registry.blobs.path(claimed).exists() and not registry.blobs.path(sha(blob)).exists()
    assert not [p for p in files_under(registry.blobs.root) if p.name.endswith(".part")]


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "header"),
        ([{"chunk": b"abc"}], "header"),
        ([{"header": {"sha256": "xyz"}}, {"chunk": b"abc"}], "sha256"),
        ([{"header": {"sha256": ""}}, {"chunk": b"abc"}], "sha256"),
        ([{"header": {"sha256": sha(b"abc"), "size_bytes": -1}}, {"chunk": b"abc"}], "size_bytes"),
        ([{"header": {"sha256": sha(b"abc"), "size_bytes": 2}}, {"chunk": b"abc"}], "size_bytes"),
        ([{"header": {"sha256": sha(b"abc")}}], "chunk"),
        ([{"header": {"sha256": sha(b"abc")}}, {"header": {"sha256": sha(b"abc")}}], "chunk"),
        ([{"header": {"sha256": sha(b"abc")}}, {}], "chunk"),
    ],
)
async def test_malformed_uploads(registry: Registry, messages: list[dict[str, Any]], field: str) -> None:
    async def requests() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
        for message in messages:
            yield registry_pb2.UploadArtifactRequest(**message)

    stub = await registry.stub()
    details = await expect_error(Code.INVALID_ARGUMENT, stub.UploadArtifact(requests(), timeout=10))
    assert details.startswith(f"{field}:")
    assert not [p for p in files_under(registry.blobs.root) if p.name.endswith(".part")]


async def test_cancelled_upload_leaves_no_half_blob(registry: Registry) -> None:
    blob = data(3 * MiB, seed=300)
    never = asyncio.Event()

    async def half_then_hang() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
        header = registry_pb2.UploadArtifactHeader(sha256=sha(blob), size_bytes=len(blob))
        yield registry_pb2.UploadArtifactRequest(header=header)
        yield registry_pb2.UploadArtifactRequest(chunk=blob[: MiB + MiB // 2])
        await never.wait()

    stub = await registry.stub()
    call = stub.UploadArtifact(half_then_hang(), timeout=10)
    async with asyncio.timeout(5):
        await registry.blobs.wait_uploads(lambda writing: MiB + MiB // 2 in writing.values())
    assert [p for p in files_under(registry.blobs.root) if p.name.endswith(".part")]
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    async with asyncio.timeout(5):
        await registry.blobs.wait_uploads(lambda writing: not writing)
    assert not registry.blobs.path(sha(blob)).exists()
    assert not [p for p in files_under(registry.blobs.root) if p.name.endswith(".part")]


async def test_register_unknown_digest_and_duplicate(registry: Registry) -> None:
    model_blob, tokenizer_blob = await uploaded_pair(registry, seed=400)
    m, t = sha(model_blob), sha(tokenizer_blob)
    unknown = "e" * 64
    details = await expect_error(
        Code.FAILED_PRECONDITION,
        registry.call(
            "RegisterModel", registry_pb2.RegisterModelRequest(model=model_proto("dup", "1", unknown, t))
        ),
    )
    assert unknown in details
    request = registry_pb2.RegisterModelRequest(model=model_proto("dup", "1", m, t))
    await registry.call("RegisterModel", request)
    await expect_error(Code.ALREADY_EXISTS, registry.call("RegisterModel", request))


def _mutate(path: str, value: Any) -> Callable[[registry_pb2.RegisterModelRequest], None]:
    def apply(request: registry_pb2.RegisterModelRequest) -> None:
        *parents, leaf = path.split(".")
        target: Any = request
        for part in parents:
            target = getattr(target, part)
        if isinstance(value, list):
            del getattr(target, leaf)[:]
            getattr(target, leaf).extend(value)
        elif isinstance(value, dict):
            getattr(target, leaf).update(value)
        else:
            setattr(target, leaf, value)

    return apply


def _artifacts(*kinds: int) -> Callable[[registry_pb2.RegisterModelRequest], None]:
    def apply(request: registry_pb2.RegisterModelRequest) -> None:
        existing = {a.kind: a for a in request.model.artifacts}
        del request.model.artifacts[:]
        for kind in kinds:
            artifact = registry_pb2.Artifact()
            artifact.CopyFrom(existing.get(kind, existing[registry_pb2.ARTIFACT_KIND_MODEL]))
            artifact.kind = kind
            request.model.artifacts.append(artifact)

    return apply


MODEL, TOKENIZER = registry_pb2.ARTIFACT_KIND_MODEL, registry_pb2.ARTIFACT_KIND_TOKENIZER
MALFORMED_REGISTRATIONS: list[tuple[str, Callable[[registry_pb2.RegisterModelRequest], None], str]] = [
    ("no model", lambda r: r.ClearField("model"), "model"),
    ("empty name", _mutate("model.name", ""), "model.name"),
    ("upper-case name", _mutate("model.name", "Valid"), "model.name"),
    ("name with a space", _mutate("model.name", "a b"), "model.name"),
    ("name starting with '-'", _mutate("model.name", "-a"), "model.name"),
    ("name too long", _mutate("model.name", "a" * 129), "model.name"),
    ("empty version", _mutate("model.version", ""), "model.version"),
    ("version with '/'", _mutate("model.version", "1/2"), "model.version"),
    ("version with ':'", _mutate("model.version", "1:2"), "model.version"),
    ("version too long", _mutate("model.version", "1" * 65), "model.version"),
    ("unspecified format", _mutate("model.format", 0), "model.format"),
    ("unknown format", _mutate("model.format", 7), "model.format"),
    ("zero context", _mutate("model.context_length", 0), "model.context_length"),
    ("negative context", _mutate("model.context_length", -5), "model.context_length"),
    ("no artifacts", _artifacts(), "model.artifacts"),
    ("no tokenizer", _artifacts(MODEL), "model.artifacts"),
    ("no model artifact", _artifacts(TOKENIZER), "model.artifacts"),
    ("two models", _artifacts(MODEL, TOKENIZER, MODEL), "model.artifacts[2].kind"),
    ("unspecified kind", _artifacts(0, TOKENIZER), "model.artifacts[0].kind"),
    ("empty digest", lambda r: setattr(r.model.artifacts[0], "sha256", ""), "model.artifacts[0].sha256"),
    (
        "short digest",
        lambda r: setattr(r.model.artifacts[1], "sha256", "ab" * 10),
        "model.artifacts[1].sha256",
    ),
    (
        "upper-case digest",
        lambda r: setattr(r.model.artifacts[0], "sha256", r.model.artifacts[0].sha256.upper()),
        "model.artifacts[0].sha256",
    ),
    (
        "negative size",
        lambda r: setattr(r.model.artifacts[0], "size_bytes", -1),
        "model.artifacts[0].size_bytes",
    ),
    ("wrong size", lambda r: setattr(r.model.artifacts[1], "size_bytes", 1), "model.artifacts[1].size_bytes"),
    ("negative eos", _mutate("model.eos_token_ids", [2, -1]), "model.eos_token_ids[1]"),
    ("bos below -1", _mutate("model.bos_token_id", -2), "model.bos_token_id"),
    ("negative layers", _mutate("model.architecture.num_layers", -1), "model.architecture.num_layers"),
    ("negative heads", _mutate("model.architecture.num_kv_heads", -1), "model.architecture.num_kv_heads"),
    ("negative head dim", _mutate("model.architecture.head_dim", -1), "model.architecture.head_dim"),
    ("negative vocab", _mutate("model.architecture.vocab_size", -1), "model.architecture.vocab_size"),
    ("empty label key", _mutate("model.labels", {"": "x"}), "model.labels"),
    ("empty alias", _mutate("aliases", [""]), "aliases[0]"),
    ("alias with a space", _mutate("aliases", ["ok", "not ok"]), "aliases[1]"),
    ("alias equal to its own name", _mutate("aliases", ["bad-fields"]), "aliases[0]"),
    ("alias equal to another model", _mutate("aliases", ["fields-other"]), "aliases[0]"),
    ("name equal to an alias", _mutate("model.name", "fields-alias"), "model.name"),
]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [case[1:] for case in MALFORMED_REGISTRATIONS],
    ids=[case[0] for case in MALFORMED_REGISTRATIONS],
)
async def test_malformed_registration_names_the_field(
    registry: Registry, mutate: Callable[[registry_pb2.RegisterModelRequest], None], field: str
) -> None:
    model_blob, tokenizer_blob = data(2000, 500), data(100, 501)
    await registry.upload(model_blob)
    await registry.upload(tokenizer_blob)
    m, t = sha(model_blob), sha(tokenizer_blob)
    try:
        await registry.call(
            "RegisterModel",
            registry_pb2.RegisterModelRequest(
                model=model_proto("fields-other", "1", m, t), aliases=["fields-alias"]
            ),
        )
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == Code.ALREADY_EXISTS  # registered by an earlier case
    request = registry_pb2.RegisterModelRequest(model=model_proto("bad-fields", "1", m, t))
    mutate(request)
    details = await expect_error(Code.INVALID_ARGUMENT, registry.call("RegisterModel", request))
    assert details.startswith(f"{field}:"), details
    await expect_error(
        Code.NOT_FOUND,
        registry.call("GetModel", registry_pb2.GetModelRequest(name="bad-fields", version="1")),
    )


MALFORMED_READS: list[tuple[str, Any, str]] = [
    ("GetModel", registry_pb2.GetModelRequest(name="", version="1"), "name"),
    ("GetModel", registry_pb2.GetModelRequest(name="Bad", version="1"), "name"),
    ("GetModel", registry_pb2.GetModelRequest(name="ok", version=""), "version"),
    ("GetModel", registry_pb2.GetModelRequest(name="ok", version="a b"), "version"),
    ("ResolveModel", registry_pb2.ResolveModelRequest(reference=""), "reference"),
    ("ResolveModel", registry_pb2.ResolveModelRequest(reference="a:b:c"), "reference"),
    ("ResolveModel", registry_pb2.ResolveModelRequest(reference="Bad:1"), "reference"),
    ("ResolveModel", registry_pb2.ResolveModelRequest(reference="ok:"), "reference"),
    ("ResolveModel", registry_pb2.ResolveModelRequest(reference="has space"), "reference"),
    ("SetAlias", registry_pb2.SetAliasRequest(alias="", name="ok", version="1"), "alias"),
    ("SetAlias", registry_pb2.SetAliasRequest(alias="a b", name="ok", version="1"), "alias"),
    ("SetAlias", registry_pb2.SetAliasRequest(alias="flow", name="flow", version="1"), "alias"),
    ("SetAlias", registry_pb2.SetAliasRequest(alias="x", name="", version="1"), "name"),
    ("SetAlias", registry_pb2.SetAliasRequest(alias="x", name="ok", version=""), "version"),
    ("FetchArtifact", registry_pb2.FetchArtifactRequest(sha256=""), "sha256"),
    ("FetchArtifact", registry_pb2.FetchArtifactRequest(sha256="xyz"), "sha256"),
]


@pytest.mark.parametrize(("method", "request_", "field"), MALFORMED_READS)
async def test_malformed_requests_name_the_field(
    registry: Registry, method: str, request_: Any, field: str
) -> None:
    if method == "SetAlias" and request_.name == "flow":
        model_blob, tokenizer_blob = await uploaded_pair(registry, seed=600)
        model = model_proto("flow", "1", sha(model_blob), sha(tokenizer_blob))
        try:
            await registry.call("RegisterModel", registry_pb2.RegisterModelRequest(model=model))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == Code.ALREADY_EXISTS
    if method == "FetchArtifact":
        stub = await registry.stub()
        details = await expect_error(Code.INVALID_ARGUMENT, _drain(stub.FetchArtifact(request_, timeout=10)))
    else:
        details = await expect_error(Code.INVALID_ARGUMENT, registry.call(method, request_))
    assert details.startswith(f"{field}:"), details


async def _drain(stream: Any) -> list[Any]:
    return [message async for message in stream]


async def test_unknown_things_are_not_found(registry: Registry, tmp_path: Path) -> None:
    for method, request in [
        ("GetModel", registry_pb2.GetModelRequest(name="nosuch", version="1")),
        ("ResolveModel", registry_pb2.ResolveModelRequest(reference="nosuch")),
        ("ResolveModel", registry_pb2.ResolveModelRequest(reference="nosuch:1")),
        ("ResolveModel", registry_pb2.ResolveModelRequest(reference="No-Such-Alias")),
        ("SetAlias", registry_pb2.SetAliasRequest(alias="someday", name="nosuch", version="1")),
    ]:
        details = await expect_error(Code.NOT_FOUND, registry.call(method, request))
        assert "not found" in details
    stub = await registry.stub()
    missing = "d" * 64
    await expect_error(
        Code.NOT_FOUND, _drain(stub.FetchArtifact(registry_pb2.FetchArtifactRequest(sha256=missing)))
    )
    with pytest.raises(NotFound):
        await client.fetch_to_cache(registry.peer, missing, tmp_path)
    assert files_under(tmp_path) == []
    listed = await registry.call("ListModels", registry_pb2.ListModelsRequest(name="nosuch"))
    assert list(listed.models) == []


async def test_fetch_to_cache_refuses_corrupt_bytes(registry: Registry, tmp_path: Path) -> None:
    blob = data(5000, seed=700)
    await registry.upload(blob)
    # Bit rot on the registry's disk: the bytes served no longer hash to their name.
    registry.blobs.path(sha(blob)).write_bytes(b"rotten" + blob[6:])
    with pytest.raises(FailedPrecondition, match="digest mismatch"):
        await client.fetch_to_cache(registry.peer, sha(blob), tmp_path)
    assert files_under(tmp_path) == []


async def test_restart_loses_nothing(consul_agent: ConsulAgent, tmp_path: Path) -> None:
    service = Registry(consul_agent, tmp_path / "data")
    try:
        await service.start()
        model_blob, tokenizer_blob = await uploaded_pair(service, seed=800)
        request = registry_pb2.RegisterModelRequest(
            model=model_proto("durable", "1", sha(model_blob), sha(tokenizer_blob)), aliases=["durable-prod"]
        )
        registered = (await service.call("RegisterModel", request)).model
        before = await service.call("ListModels", registry_pb2.ListModelsRequest())
        await service.stop()

        await service.start()
        after = await service.call("ListModels", registry_pb2.ListModelsRequest())
        assert after == before
        resolved = await service.call(
            "ResolveModel", registry_pb2.ResolveModelRequest(reference="durable-prod")
        )
        assert resolved.model == registered
        _, fetched = await service.fetch(sha(model_blob))
        assert fetched == model_blob
        await expect_error(Code.ALREADY_EXISTS, service.call("RegisterModel", request))
    finally:
        await service.stop()
        await service.mesh.close()


async def test_register_model_dir_is_idempotent(registry: Registry, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(data(300_000, seed=900))
    (model_dir / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    manifest = {
        "name": "tiny-chat",
        "version": "1",
        "format": "onnx",
        "model_file": "model.onnx",
        "tokenizer_file": "tokenizer.json",
        "chat_template": "{{ messages[0].content }}",
        "context_length": 512,
        "eos_token_ids": [2],
        "bos_token_id": None,
        "num_layers": 2,
        "num_kv_heads": 1,
        "head_dim": 8,
        "vocab_size": 16,
        "dtype": "float32",
        "source": {"file": "tiny.gguf", "sha256": "0" * 64},
        "converter_version": 1,
    }
    (model_dir / "lmesh_model.json").write_text(json.dumps(manifest))

    first = await client.register_model_dir(registry.peer, model_dir, aliases=("tiny-default",))
    assert (first.name, first.version, first.bos_token_id) == ("tiny-chat", "1", -1)
    assert list(first.aliases) == ["tiny-default"]
    assert first.labels["converter_version"] == "1"
    assert json.loads(first.labels["source"]) == manifest["source"]
    assert {a.kind: a.file_name for a in first.artifacts} == {
        MODEL: "model.onnx",
        TOKENIZER: "tokenizer.json",
    }
    second = await client.register_model_dir(registry.peer, model_dir, aliases=("tiny-default",))
    assert second == first
    # The same files with a changed manifest: refused, not reported as registered with the old values in force.
    (model_dir / "lmesh_model.json").write_text(json.dumps({**manifest, "context_length": 256}))
    with pytest.raises(AlreadyExists, match="already registered with another context_length; give the changed"):
        await client.register_model_dir(registry.peer, model_dir)
    (model_dir / "lmesh_model.json").write_text(json.dumps(manifest))
    resolved = await registry.call("ResolveModel", registry_pb2.ResolveModelRequest(reference="tiny-default"))
    assert resolved.model == first
    path = await client.fetch_to_cache(
        registry.peer, next(a.sha256 for a in first.artifacts if a.kind == MODEL), tmp_path / "cache"
    )
    assert path.read_bytes() == (model_dir / "model.onnx").read_bytes()

    # The same version rebuilt with other bytes is a conflict, not a silent overwrite.
    (model_dir / "model.onnx").write_bytes(data(300_000, seed=901))
    with pytest.raises(AlreadyExists):
        await client.register_model_dir(registry.peer, model_dir)
    # A new version of it registers, and the upload helper reports the artifact it stored.
    (model_dir / "lmesh_model.json").write_text(json.dumps({**manifest, "version": "2"}))
    newer = await client.register_model_dir(registry.peer, model_dir, aliases=())
    assert newer.version == "2" and list(newer.aliases) == []
    # Registered again: aliases stay where they are (a restarted `lmesh dev`), unless an operator names them.
    again = await client.register_model_dir(registry.peer, model_dir, aliases=("tiny-default",))
    assert list(again.aliases) == []
    moved = await client.register_model_dir(registry.peer, model_dir, aliases=("tiny-default", "tiny-new"),
                                            move_aliases=True)
    assert moved.version == "2" and sorted(moved.aliases) == ["tiny-default", "tiny-new"]
    resolved = await registry.call("ResolveModel", registry_pb2.ResolveModelRequest(reference="tiny-default"))
    assert resolved.model.version == "2"
    with pytest.raises(grpc.aio.AioRpcError) as bad:  # the alias is checked as when registering a new version
        await client.register_model_dir(registry.peer, model_dir, aliases=("bad alias!",), move_aliases=True)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Its "model" is random bytes: an inference replica asked to serve it says so in one line, no traceback.
    from services.inference.engine import EngineLimits
    from services.inference.loader import load_version

    with pytest.raises(FailedPrecondition, match=r"tiny-chat:2 cannot be served: its model file is not a decoder"):
        await load_version(registry.peer, newer, tmp_path / "artifacts", EngineLimits(), threads=1)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"name": None}, InvalidArgument),
        ({"context_length": "many"}, InvalidArgument),
        ({"format": "gguf"}, InvalidArgument),
        ({"eos_token_ids": ["x"]}, InvalidArgument),
        ({"model_file": "absent.onnx"}, FailedPrecondition),
    ],
)
def test_read_model_manifest_refusals(tmp_path: Path, change: dict[str, Any], error: type[Exception]) -> None:
    (tmp_path / "model.onnx").write_bytes(b"m")
    (tmp_path / "tokenizer.json").write_bytes(b"{}")
    manifest: dict[str, Any] = {
        "name": "x", "version": "1", "format": "onnx", "model_file": "model.onnx",
        "tokenizer_file": "tokenizer.json", "chat_template": "", "context_length": 8,
        "eos_token_ids": [0], "bos_token_id": 0, "num_layers": 1, "num_kv_heads": 1, "head_dim": 1,
        "vocab_size": 1, "dtype": "float32",
    }  # fmt: skip
    manifest.update(change)
    manifest = {k: v for k, v in manifest.items() if v is not None}
    (tmp_path / "lmesh_model.json").write_text(json.dumps(manifest))
    with pytest.raises(error):
        client.read_model_manifest(tmp_path)
    with pytest.raises(FailedPrecondition):
        client.read_model_manifest(tmp_path / "nowhere")


@pytest.mark.parametrize(("changes", "field"), [
    ({"chat_template": "x" * (64 * 1024 + 1)}, "model.chat_template"),
    ({"eos_token_ids": tuple(range(65))}, "model.eos_token_ids"),
    ({"labels": {f"k{i}": "v" for i in range(65)}}, "model.labels"),
    ({"labels": {"k": "v" * 257}}, "model.labels"),
    ({"architecture": Architecture(dtype="f" * 33)}, "model.architecture.dtype"),
    ({"artifacts": "long file name"}, "model.artifacts[0].file_name"),
])
async def test_a_manifest_too_big_for_a_model_list_is_refused(stores: tuple[BlobStore, ModelStore, Path],
                                                              changes: dict[str, Any], field: str) -> None:
    """A few oversized registrations would otherwise make every ListModels answer exceed gRPC's message limit, for
    good (versions are immutable)."""
    blob_store, models, _ = stores
    m, t = await stored_pair(blob_store, 77)
    if changes.get("artifacts") == "long file name":
        changes = {"artifacts": (Artifact(kind=ArtifactKind.MODEL, sha256=m, file_name="x" * 256),
                                 Artifact(kind=ArtifactKind.TOKENIZER, sha256=t, file_name="tokenizer.json"))}
    with pytest.raises(InvalidArgument) as info:
        models.register(version("big", "1", m, t, **changes))
    assert info.value.field == field
    assert models.list() == []


async def test_an_upload_whose_client_goes_quiet_ends() -> None:
    """An idle upload holds a temporary file and its descriptor: it ends after UPLOAD_IDLE_S without a message."""
    from services.registry.servicer import _chunks

    async def quiet() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
        yield registry_pb2.UploadArtifactRequest(chunk=b"first")
        await asyncio.Event().wait()  # never sends again, never ends
        yield registry_pb2.UploadArtifactRequest(chunk=b"never")

    received = []
    with pytest.raises(InvalidArgument) as info:
        async for chunk in _chunks(quiet(), idle_s=0.2):
            received.append(chunk)
    assert received == [b"first"]
    assert info.value.field == "chunk" and "within 0.2 s" in info.value.message


async def test_with_an_admin_token_only_its_holders_upload_register_and_move_aliases(
        consul_agent: ConsulAgent, tmp_path: Path) -> None:
    """Anyone on the network could otherwise point `default` at a model of their own. Reads stay open: the
    mesh's services resolve and fetch models without the token."""
    from services.registry.client import set_alias, upload_file

    service = Registry(consul_agent, tmp_path / "data", settings=RegistrySettings(admin_token="s3cret"))
    await service.start()
    admin = service.peer.with_admin_token("s3cret")
    try:
        blob_file = tmp_path / "model.onnx"
        blob_file.write_bytes(data(3000, 9))
        tokenizer_file = tmp_path / "tokenizer.json"
        tokenizer_file.write_bytes(data(300, 10))
        for attempt in (lambda: service.upload(data(3000, 9)),
                        lambda: upload_file(service.peer.with_admin_token("wrong"), blob_file),
                        lambda: set_alias(service.peer.with_admin_token("wrong"), "default", "m", "1"),
                        lambda: service.call("RegisterModel", registry_pb2.RegisterModelRequest())):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await attempt()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value.details()
        model = await upload_file(admin, blob_file, registry_pb2.ARTIFACT_KIND_MODEL)
        tokenizer = await upload_file(admin, tokenizer_file, registry_pb2.ARTIFACT_KIND_TOKENIZER)
        stub = await service.stub()
        request = registry_pb2.RegisterModelRequest(model=registry_pb2.ModelVersion(
            name="m", version="1", format=registry_pb2.MODEL_FORMAT_ONNX, context_length=64,
            artifacts=[model, tokenizer]))
        await stub.RegisterModel(request, metadata=[("authorization", "Bearer s3cret")], timeout=10)
        await set_alias(admin, "default", "m", "1")
        listed = await service.call("ListModels", registry_pb2.ListModelsRequest())  # no token
        assert [(m.name, list(m.aliases)) for m in listed.models] == [("m", ["default"])]
        _, fetched = await service.fetch(model.sha256)
        assert fetched == blob_file.read_bytes()
    finally:
        await service.stop()
        await service.mesh.close()


async def test_a_version_holds_at_most_64_aliases(stores: tuple[BlobStore, ModelStore, Path]) -> None:
    """The gateway hands a version's aliases to policy with every chat: a version with hundreds would make every
    chat with it fail."""
    from services.registry.store import MAX_ALIASES_PER_VERSION

    blob_store, models, _ = stores
    m, t = await stored_pair(blob_store, 78)
    with pytest.raises(InvalidArgument) as info:
        models.register(version("many", "1", m, t), aliases=[f"a{i}" for i in range(MAX_ALIASES_PER_VERSION + 1)])
    assert info.value.field == "aliases"
    models.register(version("many", "1", m, t), aliases=[f"a{i}" for i in range(MAX_ALIASES_PER_VERSION)])
    models.set_alias("a0", "many", "1")  # one it already holds: not a new one
    with pytest.raises(InvalidArgument) as info:
        models.set_alias("one-more", "many", "1")
    assert info.value.field == "alias" and "move one away first" in info.value.message
    models.register(version("other", "1", m, t))
    models.set_alias("a0", "other", "1")  # moved away: room for another
    assert "one-more" in models.set_alias("one-more", "many", "1").aliases
