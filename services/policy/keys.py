"""API keys: creation, storage as hashes only, authentication and model authorization (no grpc here).

Keys look like `lmk_` + 43 URL-safe characters (256 random bits). The store keeps only
HMAC-SHA256(pepper, key), where the pepper is 32 random bytes created with the store and kept in the same
SQLite file's `settings` table, so a backup of the file is always self-consistent. A 256-bit random key
cannot be brute-forced from its hash anyway; the pepper only makes a leaked hash useless on its own.
Nothing is cached: every authentication reads the database, so a revocation applies to the next call.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from services.common.access import reference_allowed, version_allowed
from services.common.errors import InvalidArgument, NotFound, PermissionDenied, Reason, Unauthenticated, Unavailable

log = logging.getLogger("lmesh.policy")

KEY_PREFIX = "lmk_"
# token_urlsafe(32) is 32 bytes base64url-encoded without padding: always 43 characters.
KEY_PATTERN = re.compile(r"lmk_[A-Za-z0-9_-]{43}")
KEY_ID_PATTERN = re.compile(r"key_[0-9a-f]{8}")
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_MODEL_PATTERN_LEN = 256
MAX_ALLOWED_MODELS = 256
MAX_DISPLAY_NAME_LEN = 256
DB_NAME = "policy.sqlite3"
SCHEMA_VERSION = 1
INVALID_KEY = "invalid API key"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id              TEXT PRIMARY KEY,
    key_hash            BLOB NOT NULL UNIQUE,
    tenant              TEXT NOT NULL,
    allowed_models      TEXT NOT NULL,  -- JSON array of references or glob patterns
    display_name        TEXT NOT NULL,
    create_time_unix_ms INTEGER NOT NULL,
    revoke_time_unix_ms INTEGER         -- NULL while the key is active
);
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant, create_time_unix_ms);
"""


@dataclass(frozen=True)
class Principal:
    """The identity behind an API key."""

    key_id: str
    tenant: str
    # Empty allows every model.
    allowed_models: tuple[str, ...]

    def may_use(self, model: str) -> bool:
        """Whether `model` (as the client referenced it) matches one of the allowed references or globs."""
        return reference_allowed(self.allowed_models, model)


@dataclass(frozen=True)
class ApiKey:
    """A stored key's public record (never its secret)."""

    key_id: str
    tenant: str
    allowed_models: tuple[str, ...]
    display_name: str
    create_time_unix_ms: int
    revoked: bool

    @property
    def principal(self) -> Principal:
        return Principal(self.key_id, self.tenant, self.allowed_models)


def validate_tenant(tenant: str, field: str = "tenant") -> str:
    if not tenant:
        raise InvalidArgument(field, "must not be empty")
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidArgument(field, "must be 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                                     "letter or digit")
    return tenant


# A model version's aliases as the registry reports them; each is matched against every pattern of the key.
MAX_RESOLVED_ALIASES = 256


def validate_allowed_models(patterns: Iterable[str]) -> tuple[str, ...]:
    """The patterns in order, without duplicates; each a non-empty reference or glob without whitespace."""
    patterns = list(patterns)
    if len(patterns) > MAX_ALLOWED_MODELS:  # before the duplicate check, which compares every pair
        raise InvalidArgument("allowed_models", f"at most {MAX_ALLOWED_MODELS} entries, got {len(patterns)}")
    result: list[str] = []
    for index, pattern in enumerate(patterns):
        field = f"allowed_models[{index}]"
        if not pattern:
            raise InvalidArgument(field, "must not be empty")
        if len(pattern) > MAX_MODEL_PATTERN_LEN:
            raise InvalidArgument(field, f"must be at most {MAX_MODEL_PATTERN_LEN} characters")
        if any(ch.isspace() or not ch.isprintable() for ch in pattern):
            raise InvalidArgument(field, "must not contain whitespace or control characters")
        if pattern not in result:
            result.append(pattern)
    if len(result) > MAX_ALLOWED_MODELS:
        raise InvalidArgument("allowed_models", f"at most {MAX_ALLOWED_MODELS} entries")
    return tuple(result)


def validate_display_name(display_name: str) -> str:
    if len(display_name) > MAX_DISPLAY_NAME_LEN:
        raise InvalidArgument("display_name", f"must be at most {MAX_DISPLAY_NAME_LEN} characters")
    if any(not ch.isprintable() for ch in display_name):
        raise InvalidArgument("display_name", "must not contain control characters")
    return display_name


def validate_model(model: str, field: str = "model") -> str:
    if not model:
        raise InvalidArgument(field, "must not be empty")
    if len(model) > MAX_MODEL_PATTERN_LEN:
        raise InvalidArgument(field, f"must be at most {MAX_MODEL_PATTERN_LEN} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in model):
        raise InvalidArgument(field, "must not contain whitespace or control characters")
    return model


def validate_key_id(key_id: str) -> str:
    if not key_id:
        raise InvalidArgument("key_id", "must not be empty")
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise InvalidArgument("key_id", "must look like key_ followed by 8 hex digits")
    return key_id


class KeyStore:
    """API keys in `<data_dir>/policy.sqlite3` (WAL). Calls are short indexed statements on a local file,
    so they run on the caller's thread; `open()` before use, `close()` at the end."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / DB_NAME
        self._db: sqlite3.Connection | None = None
        self._pepper = b""

    # -- lifecycle ---------------------------------------------------------------------------------------

    def open(self) -> None:
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Create the file owner-only before SQLite does; SQLite gives -wal/-shm the database file's mode.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {version}; "
                                   f"this build knows {SCHEMA_VERSION}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("INSERT OR IGNORE INTO settings (name, value) VALUES ('key_pepper', ?)",
                       (secrets.token_bytes(32),))
            pepper = db.execute("SELECT value FROM settings WHERE name = 'key_pepper'").fetchone()[0]
            self._pepper = bytes(pepper)
        except BaseException:
            db.close()
            raise
        self._db = db
        log.info("policy key store open at %s", self.path)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> KeyStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise Unavailable("policy key store is not open")
        return self._db

    # -- keys --------------------------------------------------------------------------------------------

    def _hash(self, api_key: str) -> bytes:
        return hmac.new(self._pepper, api_key.encode("utf-8"), sha256).digest()

    def create(self, tenant: str, allowed_models: Iterable[str] = (),
               display_name: str = "") -> tuple[ApiKey, str]:
        """A new key for `tenant`: its public record and the plaintext secret (returned here only)."""
        tenant = validate_tenant(tenant)
        models = validate_allowed_models(allowed_models)
        display_name = validate_display_name(display_name)
        db = self._conn
        now_ms = int(time.time() * 1000)
        for attempt in range(8):
            plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
            key_id = "key_" + secrets.token_hex(4)
            try:
                db.execute(
                    "INSERT INTO api_keys (key_id, key_hash, tenant, allowed_models, display_name, "
                    "create_time_unix_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    (key_id, self._hash(plaintext), tenant, json.dumps(models), display_name, now_ms),
                )
                break
            except sqlite3.IntegrityError:
                # A key_id collision (1 in 4 billion per existing key): draw another.
                if attempt == 7:
                    raise
        log.info("created API key %s for tenant %s", key_id, tenant)
        return ApiKey(key_id, tenant, models, display_name, now_ms, revoked=False), plaintext

    def authenticate(self, api_key: str) -> Principal:
        """The principal of an active key; Unauthenticated for an empty, malformed, unknown or revoked key."""
        if not api_key or not KEY_PATTERN.fullmatch(api_key):
            raise Unauthenticated(INVALID_KEY)
        digest = self._hash(api_key)
        row = self._conn.execute(
            "SELECT key_hash, key_id, tenant, allowed_models, display_name, create_time_unix_ms, "
            "revoke_time_unix_ms FROM api_keys WHERE key_hash = ?", (digest,),
        ).fetchone()
        # The lookup is by hash, so its timing says nothing about the key; compare in constant time anyway.
        if row is None or not hmac.compare_digest(bytes(row[0]), digest):
            raise Unauthenticated(INVALID_KEY)
        record = _record(row[1:])
        if record.revoked:
            raise Unauthenticated(INVALID_KEY)
        return record.principal

    def authorize(self, api_key: str, model: str, input_tokens: int = 0, max_tokens: int = 0, *,
                  resolved_model: str = "", resolved_aliases: Sequence[str] = ()) -> Principal:
        """The principal of `api_key` if it may use `model` for a request of the given size.

        With `resolved_model` (`name:version`, what `model` resolved to) the decision is on that model: its
        name, `name:version` or one of its aliases must match a pattern, so an alias grants no more and no less
        than the model behind it. Authentication comes first, so a caller without a valid key learns nothing
        about models.
        """
        principal = self.authenticate(api_key)
        validate_model(model)
        if input_tokens < 0:
            raise InvalidArgument("input_tokens", "must not be negative")
        if max_tokens < 0:
            raise InvalidArgument("max_tokens", "must not be negative")
        if len(resolved_aliases) > MAX_RESOLVED_ALIASES:
            raise InvalidArgument("resolved_aliases", f"at most {MAX_RESOLVED_ALIASES} entries, got "
                                                      f"{len(resolved_aliases)}")
        if resolved_model:
            if ":" not in validate_model(resolved_model, "resolved_model"):
                raise InvalidArgument("resolved_model", f"must be `name:version`, got {resolved_model!r}")
            if not version_allowed(principal.allowed_models, resolved_model, resolved_aliases):
                behind = "" if model == resolved_model else f" ({resolved_model})"
                raise PermissionDenied(f"key {principal.key_id} may not use model '{model}'{behind}",
                                       reason=Reason.MODEL_NOT_ALLOWED, metadata={"model": model})
        elif not principal.may_use(model):
            raise PermissionDenied(f"key {principal.key_id} may not use model '{model}'",
                                   reason=Reason.MODEL_NOT_ALLOWED, metadata={"model": model})
        return principal

    def list(self, tenant: str = "") -> list[ApiKey]:
        """Every key (active and revoked), oldest first; only `tenant`'s when given."""
        columns = "key_id, tenant, allowed_models, display_name, create_time_unix_ms, revoke_time_unix_ms"
        if tenant:
            validate_tenant(tenant)
            rows = self._conn.execute(
                f"SELECT {columns} FROM api_keys WHERE tenant = ? ORDER BY create_time_unix_ms, rowid",
                (tenant,),
            ).fetchall()
        else:
            rows = self._conn.execute(
                f"SELECT {columns} FROM api_keys ORDER BY create_time_unix_ms, rowid").fetchall()
        return [_record(row) for row in rows]

    def get(self, key_id: str) -> ApiKey:
        validate_key_id(key_id)
        row = self._conn.execute(
            "SELECT key_id, tenant, allowed_models, display_name, create_time_unix_ms, revoke_time_unix_ms "
            "FROM api_keys WHERE key_id = ?", (key_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no API key {key_id}")
        return _record(row)

    def revoke(self, key_id: str) -> ApiKey:
        """Revokes a key for good (idempotent); the next authentication with it fails."""
        validate_key_id(key_id)
        now_ms = int(time.time() * 1000)
        cursor = self._conn.execute(
            "UPDATE api_keys SET revoke_time_unix_ms = COALESCE(revoke_time_unix_ms, ?) WHERE key_id = ?",
            (now_ms, key_id),
        )
        if cursor.rowcount == 0:
            raise NotFound(f"no API key {key_id}")
        log.info("revoked API key %s", key_id)
        return self.get(key_id)


def _record(row: Sequence[Any]) -> ApiKey:
    key_id, tenant, models_json, display_name, create_ms, revoke_ms = row
    return ApiKey(
        key_id=str(key_id),
        tenant=str(tenant),
        allowed_models=tuple(json.loads(str(models_json))),
        display_name=str(display_name),
        create_time_unix_ms=int(create_ms),
        revoked=revoke_ms is not None,
    )
