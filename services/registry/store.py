"""The registry's state: a content-addressed blob store and a SQLite catalogue of model versions and aliases.

Blobs live at `<data_dir>/blobs/sha256/<first two hex digits>/<digest>`. A write goes to a temporary file
in the same folder, is hashed while written, fsync'd, and renamed into place only when it hashes to the
announced digest, so a blob path either holds exactly the bytes its name promises or does not exist.

Model versions and aliases live in `<data_dir>/registry.sqlite3` (WAL). A registration, with its aliases,
is one transaction. Aliases are global, and an alias never equals a model name, so a reference
(`name:version`, an alias, or a bare name) always means one thing.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import os
import random
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import overload

from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    Unavailable,
)
from services.common.references import check_reference, is_label, is_name

CHUNK_SIZE = 1024 * 1024
TEMP_SUFFIX = ".part"

SHA256_RE = re.compile(r"[0-9a-f]{64}")


class ArtifactKind(IntEnum):
    """Mirrors lmesh.registry.v1.ArtifactKind (same numbers)."""

    UNSPECIFIED = 0
    MODEL = 1
    TOKENIZER = 2


class ModelFormat(IntEnum):
    """Mirrors lmesh.registry.v1.ModelFormat (same numbers)."""

    UNSPECIFIED = 0
    ONNX = 1


@dataclass(frozen=True)
class Artifact:
    kind: int
    sha256: str
    size_bytes: int = 0
    file_name: str = ""


@dataclass(frozen=True)
class Architecture:
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    dtype: str = ""


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version; `aliases` and `create_time_unix_ms` are output only."""

    name: str
    version: str
    format: int
    artifacts: tuple[Artifact, ...]
    chat_template: str = ""
    context_length: int = 0
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int = -1
    architecture: Architecture = field(default_factory=Architecture)
    labels: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    create_time_unix_ms: int = 0

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size_bytes: int
    already_stored: bool


# ---------------------------------------------------------------------------------------------- validation


def check_name(value: str, field_name: str) -> str:
    if not value:
        raise InvalidArgument(field_name, "is required")
    if not is_name(value):
        raise InvalidArgument(
            field_name,
            f"{value!r} is not a model name (lower-case letters, digits, '.', "
            "'_' and '-', starting with a letter or digit, at most 128)",
        )
    return value


def check_label(value: str, field_name: str, what: str) -> str:
    if not value:
        raise InvalidArgument(field_name, "is required")
    if not is_label(value):
        raise InvalidArgument(
            field_name,
            f"{value!r} is not a valid {what} (letters, digits, '.', '_' and "
            "'-', starting with a letter or digit, at most 64)",
        )
    return value


def check_version(value: str, field_name: str) -> str:
    return check_label(value, field_name, "version")


def check_alias(value: str, field_name: str) -> str:
    return check_label(value, field_name, "alias")


def check_sha256(value: str, field_name: str) -> str:
    if not value:
        raise InvalidArgument(field_name, "is required")
    if not SHA256_RE.fullmatch(value):
        raise InvalidArgument(field_name, f"{value!r} is not a sha256 digest (64 lower-case hex characters)")
    return value


# Bounds on what a manifest may carry, so a model list stays a small message (real chat templates are a few KB).
MAX_CHAT_TEMPLATE_CHARS = 64 * 1024
MAX_EOS_TOKEN_IDS = 64
MAX_LABELS = 64
MAX_LABEL_CHARS = 256
MAX_DTYPE_CHARS = 32
MAX_FILE_NAME_CHARS = 255
# Aliases one version may hold: the gateway hands them all to policy, which takes at most 256.
MAX_ALIASES_PER_VERSION = 64


def _check_model_fields(model: ModelVersion) -> None:
    """Every field of a version to register, named as in RegisterModelRequest."""
    check_name(model.name, "model.name")
    check_version(model.version, "model.version")
    if model.format not in (ModelFormat.ONNX,):
        raise InvalidArgument("model.format", f"{model.format} is not a supported model format (ONNX)")
    if model.context_length <= 0:
        raise InvalidArgument("model.context_length", f"must be positive, got {model.context_length}")
    if len(model.chat_template) > MAX_CHAT_TEMPLATE_CHARS:
        raise InvalidArgument("model.chat_template", f"must be at most {MAX_CHAT_TEMPLATE_CHARS} characters, got "
                                                     f"{len(model.chat_template)}")
    if len(model.eos_token_ids) > MAX_EOS_TOKEN_IDS:
        raise InvalidArgument("model.eos_token_ids", f"at most {MAX_EOS_TOKEN_IDS} entries, got "
                                                     f"{len(model.eos_token_ids)}")
    if len(model.labels) > MAX_LABELS:
        raise InvalidArgument("model.labels", f"at most {MAX_LABELS} labels, got {len(model.labels)}")
    for key, value in model.labels.items():
        if len(key) > MAX_LABEL_CHARS or len(value) > MAX_LABEL_CHARS:
            raise InvalidArgument("model.labels", f"keys and values must be at most {MAX_LABEL_CHARS} characters")
    for i, token in enumerate(model.eos_token_ids):
        if token < 0:
            raise InvalidArgument(f"model.eos_token_ids[{i}]", f"must be a token id (>= 0), got {token}")
    if model.bos_token_id < -1:
        raise InvalidArgument("model.bos_token_id", f"must be a token id or -1, got {model.bos_token_id}")
    arch = model.architecture
    if len(arch.dtype) > MAX_DTYPE_CHARS:
        raise InvalidArgument("model.architecture.dtype", f"must be at most {MAX_DTYPE_CHARS} characters")
    for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"):
        if getattr(arch, name) < 0:
            raise InvalidArgument(
                f"model.architecture.{name}", f"must not be negative, got {getattr(arch, name)}"
            )
    for key in model.labels:
        if not key:
            raise InvalidArgument("model.labels", "label keys must not be empty")
    kinds: dict[int, int] = {}
    for i, artifact in enumerate(model.artifacts):
        where = f"model.artifacts[{i}]"
        if artifact.kind not in (ArtifactKind.MODEL, ArtifactKind.TOKENIZER):
            raise InvalidArgument(f"{where}.kind", f"{artifact.kind} is not MODEL or TOKENIZER")
        if artifact.kind in kinds:
            raise InvalidArgument(
                f"{where}.kind",
                f"a second {ArtifactKind(artifact.kind).name} artifact (one of each is allowed)",
            )
        kinds[artifact.kind] = i
        check_sha256(artifact.sha256, f"{where}.sha256")
        if len(artifact.file_name) > MAX_FILE_NAME_CHARS:
            raise InvalidArgument(f"{where}.file_name", f"must be at most {MAX_FILE_NAME_CHARS} characters")
        if artifact.size_bytes < 0:
            raise InvalidArgument(f"{where}.size_bytes", f"must not be negative, got {artifact.size_bytes}")
    for kind in (ArtifactKind.MODEL, ArtifactKind.TOKENIZER):
        if kind not in kinds:
            raise InvalidArgument("model.artifacts", f"exactly one {kind.name} artifact is required")


# ---------------------------------------------------------------------------------------------- blob store


class HashingWriter:
    """A temporary file in `folder`, hashed while filled; `discard` waits out a write running in a thread.

    Shared with the client's artifact cache, which needs the same write-verify-rename discipline.
    """

    def __init__(self, folder: Path, sha256: str) -> None:
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{sha256[:16]}.", suffix=TEMP_SUFFIX)
        self.tmp_path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._lock = threading.Lock()
        self._closed = False
        self.size = 0

    def write(self, chunk: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            self._file.write(chunk)
            self._hash.update(chunk)
            self.size += len(chunk)

    def finish(self) -> str:
        """Flushes the bytes to disk and returns their digest."""
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._closed = True
            return self._hash.hexdigest()

    def discard(self) -> None:
        with self._lock:
            if not self._closed:
                self._file.close()
                self._closed = True
            self.tmp_path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Content-addressed artifact bytes under `<data_dir>/blobs/sha256/`."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "blobs" / "sha256"
        # Temporary file name -> bytes written so far, for uploads in progress (observability, tests, drain).
        self._writing: dict[str, int] = {}
        self._changed = asyncio.Condition()

    def open(self) -> None:
        """Creates the folders and removes temporary files a killed process left behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(f"*/*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def size_of(self, sha256: str) -> int | None:
        """The stored blob's size, or None when it is not stored."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def stat(self, sha256: str) -> int:
        """The size of a stored blob; InvalidArgument for a malformed digest, NotFound when absent."""
        check_sha256(sha256, "sha256")
        size = self.size_of(sha256)
        if size is None:
            raise NotFound(f"artifact {sha256} not found")
        return size

    async def read_chunks(self, sha256: str, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        """The blob's bytes in order, `chunk_size` at a time (read in a worker thread)."""
        check_sha256(sha256, "sha256")
        try:
            file = await asyncio.to_thread(open, self.path(sha256), "rb")
        except FileNotFoundError:
            raise NotFound(f"artifact {sha256} not found") from None
        try:
            while chunk := await asyncio.to_thread(file.read, chunk_size):
                yield chunk
        finally:
            file.close()

    def uploads_in_progress(self) -> dict[str, int]:
        return dict(self._writing)

    async def wait_uploads(self, predicate: Callable[[Mapping[str, int]], bool]) -> None:
        """Waits until `predicate(temporary file name -> bytes written)` holds (drain, tests)."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self._writing))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def put(self, sha256: str, chunks: AsyncIterable[bytes], size_bytes: int = 0) -> StoredBlob:
        """Stores the bytes `chunks` yields under `sha256`, refusing them unless they hash to it.

        When the digest is already stored the chunks are not read at all (the caller may stop sending).
        `size_bytes` > 0 also checks the size. On any failure, cancellation included, nothing is left behind.
        """
        check_sha256(sha256, "sha256")
        if size_bytes < 0:
            raise InvalidArgument("size_bytes", f"must not be negative, got {size_bytes}")
        existing = self.size_of(sha256)
        if existing is not None:
            if size_bytes and size_bytes != existing:
                raise InvalidArgument(
                    "size_bytes",
                    f"blob {sha256} is stored with {existing} bytes, which does not match {size_bytes}",
                )
            # Uploaded again: young again, so garbage collection leaves it to the registration that follows.
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path(sha256))
            return StoredBlob(sha256, existing, already_stored=True)

        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        writer = HashingWriter(final.parent, sha256)
        key = writer.tmp_path.name
        self._writing[key] = 0
        try:
            await self._notify()
            async for chunk in chunks:
                if size_bytes and writer.size + len(chunk) > size_bytes:
                    raise InvalidArgument(
                        "size_bytes",
                        f"the upload is longer than the announced {size_bytes} bytes, which does not match",
                    )
                await asyncio.to_thread(writer.write, chunk)
                self._writing[key] = writer.size
                await self._notify()
            if writer.size == 0:
                raise InvalidArgument("chunk", "empty upload: no bytes followed the header")
            digest = await asyncio.to_thread(writer.finish)
            if size_bytes and writer.size != size_bytes:
                raise InvalidArgument(
                    "size_bytes",
                    f"the upload has {writer.size} bytes, which does not match the announced {size_bytes}",
                )
            if digest != sha256:
                raise InvalidArgument(
                    "sha256", f"the uploaded bytes hash to {digest}, which does not match {sha256}"
                )
            await asyncio.to_thread(self._install, writer.tmp_path, final)
        except BaseException:
            writer.discard()
            raise
        finally:
            self._writing.pop(key, None)
            # Shielded: a cancelled upload must still wake whoever waits for the uploads to settle.
            await asyncio.shield(self._notify())
        return StoredBlob(sha256, writer.size, already_stored=False)

    def stored(self) -> Iterator[tuple[str, int, float]]:
        """(digest, size, modification time) of every installed blob; temporary upload files are not blobs."""
        for path in self.root.glob("*/*"):
            if not SHA256_RE.fullmatch(path.name) or path.parent.name != path.name[:2]:
                continue
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            yield path.name, info.st_size, info.st_mtime

    def remove(self, sha256: str) -> int | None:
        """Removes a blob; its size, or None when it was not stored."""
        path = self.path(check_sha256(sha256, "sha256"))
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return None
        return size

    @staticmethod
    def _install(tmp_path: Path, final: Path) -> None:
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)


# ---------------------------------------------------------------------------------------------- model store

# Run one statement at a time (split on ';', so no comment may hold one): executescript would commit the
# migration's transaction halfway.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS model_versions (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,  -- registration order
    name                TEXT NOT NULL,
    version             TEXT NOT NULL,
    format              INTEGER NOT NULL,
    chat_template       TEXT NOT NULL,
    context_length      INTEGER NOT NULL,
    eos_token_ids       TEXT NOT NULL,                      -- JSON list of ints
    bos_token_id        INTEGER NOT NULL,
    num_layers          INTEGER NOT NULL,
    num_kv_heads        INTEGER NOT NULL,
    head_dim            INTEGER NOT NULL,
    vocab_size          INTEGER NOT NULL,
    dtype               TEXT NOT NULL,
    labels              TEXT NOT NULL,                      -- JSON object of strings
    create_time_unix_ms INTEGER NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS artifacts (
    version_id INTEGER NOT NULL REFERENCES model_versions(id),
    position   INTEGER NOT NULL,
    kind       INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    file_name  TEXT NOT NULL,
    PRIMARY KEY (version_id, position)
);
CREATE INDEX IF NOT EXISTS artifacts_by_sha256 ON artifacts(sha256);
CREATE TABLE IF NOT EXISTS aliases (
    alias      TEXT NOT NULL,
    version_id INTEGER NOT NULL REFERENCES model_versions(id),
    weight     INTEGER NOT NULL,
    PRIMARY KEY (alias, version_id)
);
CREATE INDEX IF NOT EXISTS aliases_by_version ON aliases(version_id);
CREATE TABLE IF NOT EXISTS alias_moves (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,  -- move order
    alias        TEXT NOT NULL,
    from_targets TEXT NOT NULL,                      -- JSON list of {name, version, weight}, [] when created
    to_targets   TEXT NOT NULL,
    actor        TEXT NOT NULL,
    time_unix_ms INTEGER NOT NULL,
    action       TEXT NOT NULL                       -- register, set or rollback
);
CREATE INDEX IF NOT EXISTS alias_moves_by_alias ON alias_moves(alias, id);
CREATE TABLE IF NOT EXISTS registry_state (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
# Version 1 had one target per alias (aliases(alias PRIMARY KEY, version_id)), no history and no revision.
_SCHEMA_VERSION = 2
_MIGRATE_V1 = (
    "ALTER TABLE aliases RENAME TO aliases_v1",
    *(statement for statement in _SCHEMA.split(";") if statement.strip()),
    "INSERT INTO aliases (alias, version_id, weight) SELECT alias, version_id, 100 FROM aliases_v1",
    "DROP TABLE aliases_v1",
)

MAX_ALIAS_TARGETS = 16
MIN_WEIGHT, MAX_WEIGHT = 1, 10000
SINGLE_TARGET_WEIGHT = 100
MAX_ACTOR_CHARS = 128
UNKNOWN_ACTOR = "unknown"
DEFAULT_HISTORY_LIMIT = 100


@dataclass(frozen=True)
class AliasTarget:
    """One version an alias points at, with its share of the requests."""

    name: str
    version: str
    weight: int = SINGLE_TARGET_WEIGHT

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class Alias:
    alias: str
    targets: tuple[AliasTarget, ...]  # heaviest first, ties in registration order
    update_time_unix_ms: int = 0


@dataclass(frozen=True)
class AliasMove:
    alias: str
    from_targets: tuple[AliasTarget, ...]  # empty when the move created the alias
    to_targets: tuple[AliasTarget, ...]
    actor: str
    time_unix_ms: int
    action: str


@dataclass(frozen=True)
class ResolvedTarget:
    model: ModelVersion
    weight: int


@dataclass(frozen=True)
class RemovedBlob:
    sha256: str
    size_bytes: int
    kind: int = ArtifactKind.UNSPECIFIED
    file_name: str = ""


@dataclass(frozen=True)
class Removal:
    """What a deletion or a garbage collection removed (or would remove, on a dry run)."""

    blobs: tuple[RemovedBlob, ...]

    @property
    def freed_bytes(self) -> int:
        return sum(blob.size_bytes for blob in self.blobs)


def draw(targets: Sequence[ResolvedTarget], rng: random.Random | None = None) -> ModelVersion:
    """One target's version, drawn with probability weight / the sum of the weights."""
    if len(targets) == 1:
        return targets[0].model
    chooser = rng or random
    return chooser.choices([t.model for t in targets], weights=[t.weight for t in targets], k=1)[0]


def format_targets(targets: Sequence[AliasTarget]) -> str:
    """`name:version` for one target, `a:1=90 a:2=10` for a split; `-` for none."""
    if not targets:
        return "-"
    if len(targets) == 1:
        return targets[0].ref
    return " ".join(f"{t.ref}={t.weight}" for t in targets)


def _targets_json(targets: Sequence[AliasTarget]) -> str:
    return json.dumps([{"name": t.name, "version": t.version, "weight": t.weight} for t in targets])


def _targets_from_json(text: str) -> tuple[AliasTarget, ...]:
    return tuple(AliasTarget(t["name"], t["version"], int(t["weight"])) for t in json.loads(text))


def check_targets(targets: Sequence[AliasTarget], field_name: str = "targets") -> tuple[AliasTarget, ...]:
    """The targets to store: a single one weighs SINGLE_TARGET_WEIGHT; a split's weights must lie in
    [MIN_WEIGHT, MAX_WEIGHT]; no version twice."""
    if not targets:
        raise InvalidArgument(field_name, "at least one target is required")
    if len(targets) > MAX_ALIAS_TARGETS:
        raise InvalidArgument(field_name, f"at most {MAX_ALIAS_TARGETS} targets, got {len(targets)}")
    seen: set[tuple[str, str]] = set()
    checked: list[AliasTarget] = []
    for i, target in enumerate(targets):
        where = f"{field_name}[{i}]"
        check_name(target.name, f"{where}.name")
        check_version(target.version, f"{where}.version")
        if (target.name, target.version) in seen:
            raise InvalidArgument(where, f"{target.ref} is named twice")
        seen.add((target.name, target.version))
        if len(targets) == 1:
            if target.weight != 0 and not MIN_WEIGHT <= target.weight <= MAX_WEIGHT:
                raise InvalidArgument(f"{where}.weight", f"must be 0 or from {MIN_WEIGHT} to {MAX_WEIGHT}, "
                                                         f"got {target.weight}")
            checked.append(replace(target, weight=SINGLE_TARGET_WEIGHT))
        elif not MIN_WEIGHT <= target.weight <= MAX_WEIGHT:
            raise InvalidArgument(f"{where}.weight", f"must be from {MIN_WEIGHT} to {MAX_WEIGHT} in a split, "
                                                     f"got {target.weight}")
        else:
            checked.append(target)
    return tuple(checked)


def cut_actor(actor: str) -> str:
    return actor[:MAX_ACTOR_CHARS] or UNKNOWN_ACTOR


def _now_ms() -> int:
    return int(time.time() * 1000)


def _model_not_found(reference: str) -> NotFound:
    return NotFound(f"model '{reference}' not found", reason=Reason.MODEL_NOT_FOUND, metadata={"model": reference})


ChangeListener = Callable[[int], None]


class ModelStore:
    """Model versions and aliases in SQLite; every method is one short transaction.

    Every write that changes what a reference means (registration, alias move, deletion) bumps a persisted
    revision and then calls the listeners, so watchers can be told.
    """

    def __init__(self, path: Path, blobs: BlobStore) -> None:
        self.path = Path(path)
        self._blobs = blobs
        self._db: sqlite3.Connection | None = None
        self._revision = 0
        self._bumped = False
        self._listeners: list[ChangeListener] = []

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        db = sqlite3.connect(self.path, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a registration acknowledged is a registration kept
        db.execute("PRAGMA foreign_keys=ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            db.close()
            raise FailedPrecondition(
                f"{self.path} has schema version {version}; this registry knows {_SCHEMA_VERSION}"
            )
        try:
            self._upgrade(db, version)
        except BaseException:
            db.close()
            raise
        self._revision = self._read_revision(db)
        self._db = db

    @staticmethod
    def _upgrade(db: sqlite3.Connection, version: int) -> None:
        """Creates the schema, or migrates a version-1 database in place, in one transaction (the user_version
        pragma is part of it, so a crash leaves version 1 intact)."""
        if version == _SCHEMA_VERSION:
            return
        statements = _MIGRATE_V1 if version == 1 else tuple(s for s in _SCHEMA.split(";") if s.strip())
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                db.execute(statement)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def _read_revision(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM registry_state WHERE key = 'revision'").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise Unavailable("the registry store is not open")
        return self._db

    @property
    def revision(self) -> int:
        """Grows with every registration, alias move and deletion."""
        return self._revision

    def on_change(self, listener: ChangeListener) -> None:
        """Calls `listener(new revision)` after every committed change."""
        self._listeners.append(listener)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        self._bumped = False
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            self._bumped = False
            raise
        db.execute("COMMIT")
        if self._bumped:
            self._bumped = False
            self._revision = self._read_revision(db)
            for listener in list(self._listeners):
                listener(self._revision)

    def _bump(self, db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO registry_state (key, value) VALUES ('revision', 1) "
                   "ON CONFLICT (key) DO UPDATE SET value = value + 1")
        self._bumped = True

    # -- reads

    def _is_model_name(self, db: sqlite3.Connection, name: str) -> bool:
        return (
            db.execute("SELECT 1 FROM model_versions WHERE name = ? LIMIT 1", (name,)).fetchone() is not None
        )

    def _load(self, db: sqlite3.Connection, row: sqlite3.Row) -> ModelVersion:
        artifacts = tuple(
            Artifact(kind=a["kind"], sha256=a["sha256"], size_bytes=a["size_bytes"], file_name=a["file_name"])
            for a in db.execute(
                "SELECT * FROM artifacts WHERE version_id = ? ORDER BY position", (row["id"],)
            )
        )
        aliases = tuple(
            r["alias"]
            for r in db.execute("SELECT alias FROM aliases WHERE version_id = ? ORDER BY alias", (row["id"],))
        )
        return ModelVersion(
            name=row["name"],
            version=row["version"],
            format=row["format"],
            artifacts=artifacts,
            chat_template=row["chat_template"],
            context_length=row["context_length"],
            eos_token_ids=tuple(json.loads(row["eos_token_ids"])),
            bos_token_id=row["bos_token_id"],
            architecture=Architecture(
                num_layers=row["num_layers"],
                num_kv_heads=row["num_kv_heads"],
                head_dim=row["head_dim"],
                vocab_size=row["vocab_size"],
                dtype=row["dtype"],
            ),
            labels=json.loads(row["labels"]),
            aliases=aliases,
            create_time_unix_ms=row["create_time_unix_ms"],
        )

    def _row(self, db: sqlite3.Connection, name: str, version: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM model_versions WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        return row

    def get(self, name: str, version: str) -> ModelVersion:
        check_name(name, "name")
        check_version(version, "version")
        db = self.db
        row = self._row(db, name, version)
        if row is None:
            raise _model_not_found(f"{name}:{version}")
        return self._load(db, row)

    def list(self, name: str = "") -> list[ModelVersion]:
        """Every version (of `name`, when given): names in order, newest version first within a name."""
        db = self.db
        if name:
            rows = db.execute("SELECT * FROM model_versions WHERE name = ? ORDER BY id DESC", (name,))
        else:
            rows = db.execute("SELECT * FROM model_versions ORDER BY name, id DESC")
        return [self._load(db, row) for row in rows.fetchall()]

    @staticmethod
    def _alias_rows(db: sqlite3.Connection, alias: str) -> builtins.list[sqlite3.Row]:
        """The alias's targets: heaviest first, ties in registration order."""
        return db.execute(
            "SELECT v.*, a.weight AS alias_weight FROM aliases a JOIN model_versions v ON v.id = a.version_id "
            "WHERE a.alias = ? ORDER BY a.weight DESC, v.id",
            (alias,),
        ).fetchall()

    def _targets(self, db: sqlite3.Connection, alias: str) -> tuple[AliasTarget, ...]:
        return tuple(AliasTarget(r["name"], r["version"], r["alias_weight"]) for r in self._alias_rows(db, alias))

    def resolve_targets(self, reference: str) -> builtins.list[ResolvedTarget]:
        """Every version `reference` means, with its weight: `name:version`, else an alias (all of its targets,
        heaviest first), else a bare name's most recently registered version."""
        check_reference(reference, "reference")
        db = self.db
        if ":" in reference:
            name, _, version = reference.partition(":")
            row = self._row(db, name, version)
            if row is None:
                raise _model_not_found(reference)
            return [ResolvedTarget(self._load(db, row), SINGLE_TARGET_WEIGHT)]
        alias_rows = self._alias_rows(db, reference)
        if alias_rows:
            return [ResolvedTarget(self._load(db, r), r["alias_weight"]) for r in alias_rows]
        # A variant ("1-int8", "1-fp16") is never newer than its plain version: registering one must not
        # move what the bare name means for every client. Variants are reached by `name:version` or alias.
        row = db.execute(
            "SELECT * FROM model_versions WHERE name = ? ORDER BY instr(version, '-') > 0, id DESC LIMIT 1",
            (reference,),
        ).fetchone()
        if row is None:
            raise _model_not_found(reference)
        return [ResolvedTarget(self._load(db, row), SINGLE_TARGET_WEIGHT)]

    def resolve(self, reference: str) -> ModelVersion:
        """The version `reference` means; for a split alias, one of its targets drawn by weight."""
        return draw(self.resolve_targets(reference))

    def _alias(self, db: sqlite3.Connection, alias: str) -> Alias:
        updated = db.execute("SELECT MAX(time_unix_ms) FROM alias_moves WHERE alias = ?", (alias,)).fetchone()[0]
        return Alias(alias, self._targets(db, alias), updated or 0)

    def list_aliases(self) -> builtins.list[Alias]:
        """Every alias, ordered by name."""
        db = self.db
        names = [r[0] for r in db.execute("SELECT DISTINCT alias FROM aliases ORDER BY alias")]
        return [self._alias(db, name) for name in names]

    def get_alias(self, alias: str) -> Alias:
        check_alias(alias, "alias")
        found = self._alias(self.db, alias)
        if not found.targets:
            raise NotFound(f"alias '{alias}' not found")
        return found

    @staticmethod
    def _move(row: sqlite3.Row) -> AliasMove:
        return AliasMove(row["alias"], _targets_from_json(row["from_targets"]), _targets_from_json(row["to_targets"]),
                         row["actor"], row["time_unix_ms"], row["action"])

    def history(self, alias: str, limit: int = 0) -> builtins.list[AliasMove]:
        """The alias's moves, newest first; `limit` 0 means DEFAULT_HISTORY_LIMIT."""
        check_alias(alias, "alias")
        if limit < 0:
            raise InvalidArgument("limit", f"must not be negative, got {limit}")
        db = self.db
        rows = db.execute("SELECT * FROM alias_moves WHERE alias = ? ORDER BY id DESC LIMIT ?",
                          (alias, limit or DEFAULT_HISTORY_LIMIT)).fetchall()
        if not rows and not self._targets(db, alias):
            raise NotFound(f"alias '{alias}' was never set")
        return [self._move(row) for row in rows]

    # -- writes

    def _check_alias_free(
        self, db: sqlite3.Connection, alias: str, field_name: str, new_name: str = ""
    ) -> None:
        if alias == new_name or self._is_model_name(db, alias):
            raise InvalidArgument(field_name, f"alias {alias!r} equals a model name")

    def _point(self, db: sqlite3.Connection, alias: str, rows: Sequence[tuple[int, int]],
               to_targets: tuple[AliasTarget, ...], actor: str, action: str) -> AliasMove | None:
        """Points `alias` at (version id, weight) `rows` and records the move; None when nothing changed."""
        before = self._targets(db, alias)
        if sorted((t.ref, t.weight) for t in before) == sorted((t.ref, t.weight) for t in to_targets):
            return None
        db.execute("DELETE FROM aliases WHERE alias = ?", (alias,))
        db.executemany("INSERT INTO aliases (alias, version_id, weight) VALUES (?, ?, ?)",
                       [(alias, version_id, weight) for version_id, weight in rows])
        after = self._targets(db, alias)  # in the stored order: heaviest first
        move = AliasMove(alias, before, after, cut_actor(actor), _now_ms(), action)
        db.execute(
            "INSERT INTO alias_moves (alias, from_targets, to_targets, actor, time_unix_ms, action) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (alias, _targets_json(before), _targets_json(after), move.actor, move.time_unix_ms, action),
        )
        return move

    def _target_rows(self, db: sqlite3.Connection, alias: str, targets: Sequence[AliasTarget],
                     field_name: str) -> builtins.list[tuple[int, int]]:
        """(version id, weight) per target: NotFound for a missing version, InvalidArgument for one that holds
        MAX_ALIASES_PER_VERSION aliases besides this one."""
        rows: builtins.list[tuple[int, int]] = []
        for target in targets:
            row = self._row(db, target.name, target.version)
            if row is None:
                raise _model_not_found(target.ref)
            held = db.execute("SELECT COUNT(*) FROM aliases WHERE version_id = ? AND alias != ?",
                              (row["id"], alias)).fetchone()[0]
            if held >= MAX_ALIASES_PER_VERSION:
                raise InvalidArgument(field_name, f"{target.ref} already holds {held} aliases, the most a version "
                                                  "may have; move one away first")
            rows.append((row["id"], target.weight))
        return rows

    def register(self, model: ModelVersion, aliases: Sequence[str] = (), actor: str = UNKNOWN_ACTOR) -> ModelVersion:
        """Registers a new version whose artifacts are stored, and points `aliases` at it, atomically."""
        _check_model_fields(model)
        if len(aliases) > MAX_ALIASES_PER_VERSION:
            raise InvalidArgument("aliases", f"at most {MAX_ALIASES_PER_VERSION} per version, got {len(aliases)}")
        wanted_aliases = list(dict.fromkeys(aliases))  # ordered, without repeats
        for i, alias in enumerate(aliases):
            check_alias(alias, f"aliases[{i}]")
        artifacts: builtins.list[Artifact] = []
        for i, artifact in enumerate(model.artifacts):
            stored = self._blobs.size_of(artifact.sha256)
            if stored is None:
                raise FailedPrecondition(
                    f"artifact {artifact.sha256} (model.artifacts[{i}]) is not stored; upload it first"
                )
            if artifact.size_bytes and artifact.size_bytes != stored:
                raise InvalidArgument(
                    f"model.artifacts[{i}].size_bytes",
                    f"{artifact.size_bytes} does not match the stored blob's {stored} bytes",
                )
            artifacts.append(replace(artifact, size_bytes=stored))
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM aliases WHERE alias = ?", (model.name,)).fetchone() is not None:
                raise InvalidArgument(
                    "model.name", f"{model.name!r} is already an alias; a model name must not equal an alias"
                )
            for i, alias in enumerate(aliases):
                self._check_alias_free(db, alias, f"aliases[{i}]", new_name=model.name)
            if self._row(db, model.name, model.version) is not None:
                raise AlreadyExists(f"model '{model.ref}' is already registered")
            arch = model.architecture
            cursor = db.execute(
                "INSERT INTO model_versions (name, version, format, chat_template, context_length, "
                "eos_token_ids, bos_token_id, num_layers, num_kv_heads, head_dim, vocab_size, dtype, labels, "
                "create_time_unix_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    model.name,
                    model.version,
                    int(model.format),
                    model.chat_template,
                    model.context_length,
                    json.dumps(list(model.eos_token_ids)),
                    model.bos_token_id,
                    arch.num_layers,
                    arch.num_kv_heads,
                    arch.head_dim,
                    arch.vocab_size,
                    arch.dtype,
                    json.dumps(dict(model.labels), sort_keys=True),
                    _now_ms(),
                ),
            )
            version_id = cursor.lastrowid
            assert version_id is not None
            db.executemany(
                "INSERT INTO artifacts (version_id, position, kind, sha256, size_bytes, file_name) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (version_id, i, int(a.kind), a.sha256, a.size_bytes, a.file_name)
                    for i, a in enumerate(artifacts)
                ],
            )
            target = (AliasTarget(model.name, model.version),)
            for alias in wanted_aliases:
                self._point(db, alias, [(version_id, SINGLE_TARGET_WEIGHT)], target, actor, "register")
            self._bump(db)
            row = db.execute("SELECT * FROM model_versions WHERE id = ?", (version_id,)).fetchone()
            return self._load(db, row)

    @overload
    def set_alias(self, alias: str, targets: Sequence[AliasTarget], *, actor: str = UNKNOWN_ACTOR) -> ModelVersion:
        ...

    @overload
    def set_alias(self, alias: str, targets: str, version: str, *, actor: str = UNKNOWN_ACTOR) -> ModelVersion:
        ...

    def set_alias(self, alias: str, targets: Sequence[AliasTarget] | str, version: str = "", *,
                  actor: str = UNKNOWN_ACTOR) -> ModelVersion:
        """Creates or moves `alias` to `targets` (or to the one version `name`, `version`) and returns its
        heaviest target. Setting what it already is records no move and leaves the revision alone."""
        check_alias(alias, "alias")
        if isinstance(targets, str):
            check_name(targets, "name")
            check_version(version, "version")
            wanted: tuple[AliasTarget, ...] = (AliasTarget(targets, version),)
        else:
            wanted = check_targets(targets)
        with self._transaction() as db:
            self._check_alias_free(db, alias, "alias")
            rows = self._target_rows(db, alias, wanted, "alias")
            if self._point(db, alias, rows, wanted, actor, "set") is not None:
                self._bump(db)
            first = self._alias_rows(db, alias)[0]
            return self._load(db, first)

    def rollback(self, alias: str, actor: str = UNKNOWN_ACTOR) -> tuple[Alias, AliasMove]:
        """Moves `alias` back to the targets it had before its latest move (itself a move: a second rollback
        undoes the first)."""
        check_alias(alias, "alias")
        with self._transaction() as db:
            latest = db.execute("SELECT * FROM alias_moves WHERE alias = ? ORDER BY id DESC LIMIT 1",
                                (alias,)).fetchone()
            if latest is None:
                if not self._targets(db, alias):
                    raise NotFound(f"alias '{alias}' not found")
                raise FailedPrecondition(f"alias '{alias}' was never moved: there is nothing to roll back to")
            previous = _targets_from_json(latest["from_targets"])
            if not previous:
                raise FailedPrecondition(f"alias '{alias}' was created by its last move: there is nothing to roll "
                                         "back to")
            missing = [t.ref for t in previous if self._row(db, t.name, t.version) is None]
            if missing:
                raise FailedPrecondition(f"alias '{alias}' cannot roll back: {', '.join(missing)} was deleted since; "
                                         "point it with `lmesh models alias` instead")
            rows = self._target_rows(db, alias, previous, "alias")
            move = self._point(db, alias, rows, previous, actor, "rollback")
            if move is None:  # its latest move changed nothing visible (cannot happen: moves are recorded changes)
                raise FailedPrecondition(f"alias '{alias}' already has the targets it had before its last move")
            self._bump(db)
            return self._alias(db, alias), move

    def delete(self, name: str, version: str) -> Removal:
        """Deletes a version no alias targets, then its blobs that no remaining version references."""
        check_name(name, "name")
        check_version(version, "version")
        with self._transaction() as db:
            row = self._row(db, name, version)
            if row is None:
                raise _model_not_found(f"{name}:{version}")
            aliases = [r[0] for r in db.execute("SELECT alias FROM aliases WHERE version_id = ? ORDER BY alias",
                                                (row["id"],))]
            if aliases:
                raise model_in_use(f"{name}:{version}", aliases, [])
            artifacts = self._load(db, row).artifacts
            db.execute("DELETE FROM artifacts WHERE version_id = ?", (row["id"],))
            db.execute("DELETE FROM model_versions WHERE id = ?", (row["id"],))
            self._bump(db)
            referenced = "SELECT 1 FROM artifacts WHERE sha256 = ? LIMIT 1"
            orphans = [a for a in artifacts if db.execute(referenced, (a.sha256,)).fetchone() is None]
        # After the commit: a crash between the two leaves unreferenced blobs, which garbage collection removes.
        removed: dict[str, RemovedBlob] = {}
        for artifact in orphans:
            size = self._blobs.remove(artifact.sha256)
            if size is not None and artifact.sha256 not in removed:
                removed[artifact.sha256] = RemovedBlob(artifact.sha256, size, artifact.kind, artifact.file_name)
        return Removal(tuple(removed.values()))

    def collect_garbage(self, min_age_s: float, dry_run: bool = False) -> Removal:
        """Removes the blobs no version references whose files are at least `min_age_s` old (a blob uploaded for
        a registration still to come is younger). Temporary upload files are never touched."""
        if min_age_s < 0:
            raise InvalidArgument("min_age_seconds", f"must not be negative, got {min_age_s}")
        referenced = {r[0] for r in self.db.execute("SELECT DISTINCT sha256 FROM artifacts")}
        cutoff = time.time() - min_age_s
        removed: builtins.list[RemovedBlob] = []
        for digest, size, mtime in self._blobs.stored():
            if digest in referenced or mtime > cutoff:
                continue
            if dry_run:
                removed.append(RemovedBlob(digest, size))
            elif (freed := self._blobs.remove(digest)) is not None:
                removed.append(RemovedBlob(digest, freed))
        return Removal(tuple(removed))


def model_in_use(model_id: str, aliases: Sequence[str], replicas: Sequence[str]) -> FailedPrecondition:
    """DeleteModel's refusal: what uses the version, and what to do about it."""
    uses: list[str] = []
    if aliases:
        uses.append(f"aliases {', '.join(aliases)} point at it (move them first: lmesh models alias ALIAS "
                    "NAME:VERSION)")
    if replicas:
        uses.append(f"inference replicas {', '.join(replicas)} serve, load or drain it (stop them or point them at "
                    "another model first)")
    return FailedPrecondition(f"model '{model_id}' is in use: {'; '.join(uses)}", reason=Reason.MODEL_IN_USE,
                              metadata={"aliases": ",".join(aliases), "replicas": ",".join(replicas)})
