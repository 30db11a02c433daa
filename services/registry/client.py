"""Helpers other services and the CLI use to talk to lmesh-registry.

- `upload_file`: streams a local file as an artifact (1 MiB chunks, digest computed first).
- `fetch_to_cache`: downloads an artifact into `<cache_dir>/<sha256>`, verified, atomically.
- `register_model_dir`: uploads a built model directory (`lmesh_model.json`) and registers it, idempotently.

All take the registry's peer (`mesh.peer(REGISTRY)`); writes carry its admin token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from lmesh.registry.v1 import registry_pb2
from lmesh.registry.v1.registry_pb2_grpc import RegistryStub

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.peers import Lease, Peer, past_send_race
from services.registry.store import CHUNK_SIZE, HashingWriter, check_sha256

log = logging.getLogger("lmesh.registry.client")

MANIFEST_NAME = "lmesh_model.json"

# Manifest keys that become ModelVersion fields; every other key becomes a label.
_MANIFEST_FIELDS = frozenset(
    {
        "name",
        "version",
        "format",
        "model_file",
        "tokenizer_file",
        "chat_template",
        "context_length",
        "eos_token_ids",
        "bos_token_id",
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "vocab_size",
        "dtype",
    }
)
_FORMATS = {"onnx": registry_pb2.MODEL_FORMAT_ONNX}


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


async def file_sha256(path: Path) -> tuple[str, int]:
    """The file's sha256 hex digest and size, computed in a worker thread."""
    return await asyncio.to_thread(_hash_file, Path(path))


async def _upload_requests(
    path: Path, sha256: str, size: int
) -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
    yield registry_pb2.UploadArtifactRequest(
        header=registry_pb2.UploadArtifactHeader(sha256=sha256, size_bytes=size, file_name=path.name)
    )
    file = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(file.read, CHUNK_SIZE):
            yield registry_pb2.UploadArtifactRequest(chunk=chunk)
    finally:
        file.close()


async def upload_file(
    registry: Peer[RegistryStub],
    path: Path | str,
    kind: registry_pb2.ArtifactKind.ValueType = registry_pb2.ARTIFACT_KIND_UNSPECIFIED,
    *,
    sha256: str | None = None,
) -> registry_pb2.Artifact:
    """Uploads `path` and returns its Artifact (`kind`, digest, size, file name).

    `sha256` skips hashing when the caller already knows the digest. A blob the registry already stores is
    not sent again: the registry answers right after the header. Content-addressed, so safe to repeat.
    """
    path = Path(path)
    if sha256 is None:
        sha256, size = await file_sha256(path)
    else:
        size = path.stat().st_size

    async def upload(lease: Lease[RegistryStub]) -> registry_pb2.UploadArtifactResponse:
        response: registry_pb2.UploadArtifactResponse = await lease.stub.UploadArtifact(
            _upload_requests(path, sha256, size), **lease.options(timeout=None, admin=True))
        return response

    # Content-addressed, so safe to send again when a refusal was lost to grpc-aio's send race.
    response = await past_send_race(lambda: registry.with_lease(upload))
    return registry_pb2.Artifact(
        kind=kind,
        sha256=response.artifact.sha256,
        size_bytes=response.artifact.size_bytes,
        file_name=path.name,
    )


async def _fetch_into(lease: Lease[RegistryStub], sha256: str, final: Path) -> Path:
    call = lease.stub.FetchArtifact(registry_pb2.FetchArtifactRequest(sha256=sha256), **lease.options(timeout=None))
    writer = HashingWriter(final.parent, sha256)
    try:
        expected_size: int | None = None
        async for message in call:
            if expected_size is None:
                if message.WhichOneof("kind") != "header" or message.header.sha256 != sha256:
                    raise FailedPrecondition(
                        f"artifact {sha256}: the registry's answer did not start with its header"
                    )
                expected_size = message.header.size_bytes
                continue
            await asyncio.to_thread(writer.write, message.chunk)
        digest = await asyncio.to_thread(writer.finish)
        if digest != sha256 or writer.size != expected_size:
            raise FailedPrecondition(
                f"artifact {sha256} digest mismatch: received {writer.size} bytes hashing "
                f"to {digest} (expected {expected_size} bytes)"
            )
        await asyncio.to_thread(os.replace, writer.tmp_path, final)
    except BaseException:
        writer.discard()
        call.cancel()
        raise
    return final


async def fetch_to_cache(registry: Peer[RegistryStub], sha256: str, cache_dir: Path | str) -> Path:
    """`<cache_dir>/<sha256>`, downloaded from the registry unless already there intact; the digest is verified
    either way (a cached file that no longer hashes to its name is fetched again).

    Raises Unavailable (no registry), NotFound (no such artifact), FailedPrecondition (corrupt transfer).
    """
    check_sha256(sha256, "sha256")
    cache_dir = Path(cache_dir)
    final = cache_dir / sha256
    if final.exists():
        # Renamed into place only after verification, but a disk can rot and a hand can edit: hashed again (off
        # the event loop) before anything loads it.
        digest, _ = await file_sha256(final)
        if digest == sha256:
            return final
        log.warning("corrupted cached artifact %s (its bytes hash to %s), fetching it again", final, digest)
        await asyncio.to_thread(final.unlink, missing_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        return await registry.with_lease(lambda lease: _fetch_into(lease, sha256, final))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            raise NotFound(f"artifact {sha256} is not stored in the registry") from exc
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise Unavailable(f"fetching artifact {sha256} timed out") from exc
        raise


# ---------------------------------------------------------------------------------------------- model dirs


def _manifest_value(manifest: dict[str, Any], key: str, kind: type, where: Path) -> Any:
    if key not in manifest:
        raise InvalidArgument(key, f"missing from {where}")
    value = manifest[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidArgument(key, f"must be an integer in {where}, got {value!r}")
    if kind is str and not isinstance(value, str | int):
        raise InvalidArgument(key, f"must be a string in {where}, got {value!r}")
    return str(value) if kind is str else value


def read_model_manifest(
    model_dir: Path | str, manifest_name: str = MANIFEST_NAME
) -> tuple[registry_pb2.ModelVersion, Path, Path]:
    """The ModelVersion a built model directory describes (artifacts not filled in), and its two files.

    `manifest_name` picks a variant in the same folder (e.g. `lmesh_model.int8.json`, its own version).
    """
    model_dir = Path(model_dir)
    path = model_dir / manifest_name
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FailedPrecondition(f"no model manifest at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FailedPrecondition(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise FailedPrecondition(f"{path} must hold a JSON object")

    fmt = _manifest_value(manifest, "format", str, path)
    if fmt.lower() not in _FORMATS:
        raise InvalidArgument(
            "format", f"{fmt!r} in {path} is not a supported format ({', '.join(_FORMATS)})"
        )
    eos = manifest.get("eos_token_ids", [])
    eos = [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
        raise InvalidArgument("eos_token_ids", f"must be a list of integers in {path}, got {eos!r}")
    bos = manifest.get("bos_token_id")
    bos = -1 if bos is None else _manifest_value(manifest, "bos_token_id", int, path)
    labels = {
        key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        for key, value in manifest.items()
        if key not in _MANIFEST_FIELDS
    }
    model = registry_pb2.ModelVersion(
        name=_manifest_value(manifest, "name", str, path),
        version=_manifest_value(manifest, "version", str, path),
        format=_FORMATS[fmt.lower()],
        chat_template=_manifest_value(manifest, "chat_template", str, path),
        context_length=_manifest_value(manifest, "context_length", int, path),
        eos_token_ids=eos,
        bos_token_id=bos,
        architecture=registry_pb2.ModelArchitecture(
            num_layers=_manifest_value(manifest, "num_layers", int, path),
            num_kv_heads=_manifest_value(manifest, "num_kv_heads", int, path),
            head_dim=_manifest_value(manifest, "head_dim", int, path),
            vocab_size=_manifest_value(manifest, "vocab_size", int, path),
            dtype=_manifest_value(manifest, "dtype", str, path),
        ),
        labels=labels,
    )
    model_file = model_dir / _manifest_value(manifest, "model_file", str, path)
    tokenizer_file = model_dir / _manifest_value(manifest, "tokenizer_file", str, path)
    for key, file in (("model_file", model_file), ("tokenizer_file", tokenizer_file)):
        if not file.is_file():
            raise FailedPrecondition(f"{path}: {key} {file} does not exist")
    return model, model_file, tokenizer_file


def _digests(model: registry_pb2.ModelVersion) -> dict[int, str]:
    return {int(a.kind): a.sha256 for a in model.artifacts}


async def set_alias(registry: Peer[RegistryStub], alias: str, name: str, version: str) -> None:
    """Points `alias` at name:version (moving it from any other version)."""
    await registry.call(lambda r: r.SetAlias, registry_pb2.SetAliasRequest(alias=alias, name=name, version=version),
                        admin=True, retry=False)


async def _get_model(registry: Peer[RegistryStub], name: str, version: str) -> registry_pb2.ModelVersion | None:
    try:
        response = await registry.call(lambda r: r.GetModel, registry_pb2.GetModelRequest(name=name, version=version))
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    model: registry_pb2.ModelVersion = response.model
    return model


# What a manifest says about a version beyond its files: a rebuild that changes one of these is another build.
MANIFEST_FIELDS = ("format", "chat_template", "context_length", "eos_token_ids", "bos_token_id", "architecture")


def _same_or_conflict(
    existing: registry_pb2.ModelVersion, wanted: dict[int, str], manifest: registry_pb2.ModelVersion | None = None,
) -> registry_pb2.ModelVersion:
    if _digests(existing) != wanted:
        raise AlreadyExists(
            f"model '{existing.name}:{existing.version}' is already registered with other "
            "artifacts; give the new build another version"
        )
    changed = [f for f in MANIFEST_FIELDS if manifest is not None and getattr(existing, f) != getattr(manifest, f)]
    if changed:  # versions are immutable: reporting success would leave the old values in force silently
        raise AlreadyExists(
            f"model '{existing.name}:{existing.version}' is already registered with another {', '.join(changed)}; "
            "give the changed manifest another version"
        )
    return existing


async def register_model_dir(
    registry: Peer[RegistryStub],
    model_dir: Path | str,
    aliases: Sequence[str] = ("default",),
    manifest_name: str = MANIFEST_NAME,
    move_aliases: bool = False,
) -> registry_pb2.ModelVersion:
    """Uploads a built model directory's files and registers its version with `aliases`.

    Idempotent: when the version is already registered with the same artifact digests nothing is uploaded
    and the registered version is returned; with other digests, AlreadyExists. Its aliases are left as they
    are (a restarted `lmesh dev` must not take back `default` from the version an operator moved it to),
    unless `move_aliases`: an operator who names aliases wants them on this version either way.
    """
    model, model_file, tokenizer_file = read_model_manifest(model_dir, manifest_name)
    (model_sha, _), (tokenizer_sha, _) = await asyncio.gather(
        file_sha256(model_file), file_sha256(tokenizer_file)
    )
    wanted = {
        registry_pb2.ARTIFACT_KIND_MODEL: model_sha,
        registry_pb2.ARTIFACT_KIND_TOKENIZER: tokenizer_sha,
    }

    existing = await _get_model(registry, model.name, model.version)
    if existing is not None:
        registered = _same_or_conflict(existing, wanted, model)
        if not move_aliases or set(aliases) <= set(registered.aliases):
            return registered
        for alias in aliases:
            await set_alias(registry, alias, model.name, model.version)
        return await _get_model(registry, model.name, model.version) or registered

    model_artifact = await upload_file(registry, model_file, registry_pb2.ARTIFACT_KIND_MODEL, sha256=model_sha)
    tokenizer_artifact = await upload_file(registry, tokenizer_file, registry_pb2.ARTIFACT_KIND_TOKENIZER,
                                           sha256=tokenizer_sha)
    model.artifacts.extend([model_artifact, tokenizer_artifact])
    request = registry_pb2.RegisterModelRequest(model=model, aliases=list(aliases))
    try:
        # Not retried: a registration is not idempotent on the wire.
        response = await registry.call(lambda r: r.RegisterModel, request, admin=True, retry=False)
        return response.model
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        # Someone registered it between our check and our registration (two `make run`s at once).
        raced = await _get_model(registry, model.name, model.version)
        if raced is None:
            raise
        return _same_or_conflict(raced, wanted, model)
