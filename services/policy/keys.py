"""API keys: creation, storage as hashes only, authentication and model authorization (no grpc here).

Keys look like `lmk_` + 43 URL-safe characters (256 random bits). The store keeps only
HMAC-SHA256(pepper, key), where the pepper is 32 random bytes created with the store and kept in the same
SQLite file's `settings` table, so a backup of the file is always self-consistent. A 256-bit random key
cannot be brute-forced from its hash anyway; the pepper only makes a leaked hash useless on its own.
Nothing is cached: every authentication reads the database, so a revocation applies to the next call.

A key may also be bound to a client certificate identity: a subject (RFC 4514 distinguished name, kept in a
canonical form, so it survives the certificate's renewal) or one certificate's SHA-256 fingerprint. A verified
client certificate that the gateway presents on the caller's behalf then authenticates as that key (the key's
revocation ends both). At most one active key per subject and per fingerprint.
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

from services.common.access import (
    TOOL_GRANT_PATTERN,
    TOOL_NAME_PATTERN,
    reference_allowed,
    tool_allowed,
    version_allowed,
)
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LmeshError,
    NotFound,
    PermissionDenied,
    Reason,
    Unauthenticated,
    Unavailable,
)
from services.common.telemetry import current_trace_id
from services.policy.audit import AuditEvent, AuditSink

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
SCHEMA_VERSION = 4  # 2: client certificate bindings; 3: max_priority; 4: allowed_tools
INVALID_KEY = "invalid API key"
UNBOUND_CERTIFICATE = "the client certificate is not bound to an active API key"
MAX_SUBJECT_LEN = 1024
# Request priorities, as inference's queue orders them (GenerateStart.priority): higher first. A key's cap is
# the lowest unless an operator raises it, so priority is something granted, never something a caller takes.
MIN_PRIORITY, MAX_PRIORITY = 0, 9
DEFAULT_MAX_PRIORITY = MIN_PRIORITY
# A key's tool grant: deny by default (no entry, no tool), at most this many names or patterns.
MAX_ALLOWED_TOOLS = 64

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
    revoke_time_unix_ms INTEGER,        -- NULL while the key is active
    client_cert_subject TEXT,           -- canonical RFC 4514 subject a verified client certificate maps from
    client_cert_sha256  TEXT,           -- or one certificate's SHA-256 (lowercase hex); NULL when unbound
    max_priority        INTEGER NOT NULL DEFAULT 0,  -- the highest request priority its chats may run at
    allowed_tools       TEXT NOT NULL DEFAULT '[]'  -- JSON array of mesh tool names or globs; empty: none
);
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant, create_time_unix_ms);
"""

# After the columns exist (schema 1 files gain them first): one active key per certificate identity.
_BINDING_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_active_cert_subject ON api_keys (client_cert_subject)
    WHERE revoke_time_unix_ms IS NULL AND client_cert_subject IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_active_cert_sha256 ON api_keys (client_cert_sha256)
    WHERE revoke_time_unix_ms IS NULL AND client_cert_sha256 IS NOT NULL;
"""
_COLUMNS = ("key_id, tenant, allowed_models, display_name, create_time_unix_ms, revoke_time_unix_ms, "
            "client_cert_subject, client_cert_sha256, max_priority, allowed_tools")


@dataclass(frozen=True)
class Principal:
    """The identity behind an API key."""

    key_id: str
    tenant: str
    # Empty allows every model.
    allowed_models: tuple[str, ...]
    max_priority: int = DEFAULT_MAX_PRIORITY  # the highest request priority its chats may run at
    # Mesh tool names or globs its chats may call; empty allows none (deny by default, unlike models).
    allowed_tools: tuple[str, ...] = ()

    def may_use(self, model: str) -> bool:
        """Whether `model` (as the client referenced it) matches one of the allowed references or globs."""
        return reference_allowed(self.allowed_models, model)

    def may_call_tool(self, tool_name: str) -> bool:
        """Whether the mesh tool `tool_name` matches one of the granted names or globs (none: no tool)."""
        return tool_allowed(self.allowed_tools, tool_name)


@dataclass(frozen=True)
class ApiKey:
    """A stored key's public record (never its secret)."""

    key_id: str
    tenant: str
    allowed_models: tuple[str, ...]
    display_name: str
    create_time_unix_ms: int
    revoked: bool
    client_cert_subject: str = ""
    client_cert_sha256: str = ""
    max_priority: int = DEFAULT_MAX_PRIORITY
    allowed_tools: tuple[str, ...] = ()

    @property
    def principal(self) -> Principal:
        return Principal(self.key_id, self.tenant, self.allowed_models, self.max_priority, self.allowed_tools)


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


def validate_allowed_tools(patterns: Iterable[str], field: str = "allowed_tools") -> tuple[str, ...]:
    """A tool grant's entries in order, without duplicates: each a tool name (`[a-z][a-z0-9_]{0,47}`) or a glob
    of a-z, 0-9, `_`, `*` and `?`, at most 48 characters; at most 64 entries. Empty: no tool."""
    patterns = list(patterns)
    if len(patterns) > MAX_ALLOWED_TOOLS:
        raise InvalidArgument(field, f"at most {MAX_ALLOWED_TOOLS} entries, got {len(patterns)}")
    result: list[str] = []
    for index, pattern in enumerate(patterns):
        entry = f"{field}[{index}]"
        if not pattern:
            raise InvalidArgument(entry, "must not be empty")
        if not TOOL_GRANT_PATTERN.fullmatch(pattern):
            raise InvalidArgument(entry, "must be a tool name or a glob of at most 48 lowercase letters, digits, "
                                         f"'_', '*' and '?', got {pattern[:64]!r}")
        if "*" not in pattern and "?" not in pattern and not TOOL_NAME_PATTERN.fullmatch(pattern):
            # Without a wildcard it names one tool, and tool names start with a letter: it would match nothing.
            raise InvalidArgument(entry, f"must start with a letter (a tool name), got {pattern!r}")
        if pattern not in result:
            result.append(pattern)
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


def validate_max_priority(value: int, field: str = "max_priority") -> int:
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidArgument(field, f"must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {value}")
    return value


def validate_key_id(key_id: str) -> str:
    if not key_id:
        raise InvalidArgument("key_id", "must not be empty")
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise InvalidArgument("key_id", "must look like key_ followed by 8 hex digits")
    return key_id


@dataclass(frozen=True)
class CertificateIdentity:
    """A client certificate the gateway verified, as policy sees it: its subject and fingerprint, never itself."""

    subject: str = ""
    sha256_fingerprint: str = ""


_DN_SPECIAL = ',+"\\<>;='
_HEX = frozenset("0123456789abcdefABCDEF")


def normalize_subject(subject: str, field: str = "client_cert_subject") -> str:
    """A distinguished name in RFC 4514 form (as gRPC and `openssl x509 -nameopt RFC2253` print it), canonical:
    attribute names upper-cased, spaces around `,`, `+` and `=` dropped, escapes decoded (OpenSSL writes a
    non-ASCII character as `\\C3\\A9`) and written again one way. Values are compared exactly.
    A leading `subject=` (openssl's output, pasted) is ignored."""
    text = subject.strip()
    if text[:8].lower() == "subject=":
        text = text[8:].strip()
    if not text:
        raise InvalidArgument(field, "must not be empty")
    if len(text) > MAX_SUBJECT_LEN:
        raise InvalidArgument(field, f"must be at most {MAX_SUBJECT_LEN} characters")
    if any(not ch.isprintable() for ch in text):
        raise InvalidArgument(field, "must not contain control characters")
    rdns: list[list[str]] = [[]]
    i, n = 0, len(text)
    while True:
        equals = text.find("=", i)
        name = text[i:equals].strip() if equals >= 0 else ""
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+", name):
            raise InvalidArgument(field, "must be a distinguished name such as 'CN=alice,O=acme' (RFC 4514)")
        i = equals + 1
        while i < n and text[i] == " ":
            i += 1
        value, i, end = _dn_value(text, i, field)
        rdns[-1].append(f"{name.upper() if name[0].isalpha() else name}={value}")
        if end == "":
            break
        if end == ",":
            rdns.append([])
    return ",".join("+".join(sorted(rdn)) if len(rdn) > 1 else rdn[0] for rdn in rdns)


def _dn_value(text: str, i: int, field: str) -> tuple[str, int, str]:
    """One attribute value from text[i:]: (its canonical form, where the next one starts, the separator that
    ended it: ',', '+' or '' at the end)."""
    n = len(text)
    if i < n and text[i] == "#":  # a hex-encoded DER value (OpenSSL writes unknown types so): kept as it is
        j = i + 1
        while j < n and text[j] in _HEX:
            j += 1
        value, k = text[i:j].lower(), j
        while k < n and text[k] == " ":
            k += 1
        if k < n and text[k] not in ",+":
            raise InvalidArgument(field, f"has a malformed hex value at character {i + 1}")
        return value, k + 1, text[k] if k < n else ""
    raw = bytearray()
    kept = 0  # length of raw up to its last escaped or non-space byte: unescaped trailing spaces are dropped
    while i < n and text[i] not in ",+":
        ch = text[i]
        if ch == "\\":
            pair = text[i + 1:i + 3]
            if len(pair) == 2 and all(c in _HEX for c in pair):
                raw.append(int(text[i + 1:i + 3], 16))
                i += 3
            elif i + 1 < n:
                raw += text[i + 1].encode()
                i += 2
            else:
                raise InvalidArgument(field, "ends with a lone backslash")
            kept = len(raw)
            continue
        raw += ch.encode()
        i += 1
        if ch != " ":
            kept = len(raw)
    try:
        value = bytes(raw[:kept]).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(field, "has an escaped value that is not UTF-8") from None
    if not value:
        raise InvalidArgument(field, "has an attribute without a value")
    return _escape_dn_value(value), i + 1, text[i] if i < n else ""


def _escape_dn_value(value: str) -> str:
    out = []
    for index, ch in enumerate(value):
        if ch in _DN_SPECIAL or (ch in " #" and index == 0) or (ch == " " and index == len(value) - 1):
            out.append("\\" + ch)
        elif not ch.isprintable():
            out.append("".join(f"\\{b:02X}" for b in ch.encode()))
        else:
            out.append(ch)
    return "".join(out)


def normalize_fingerprint(fingerprint: str, field: str = "client_cert_sha256") -> str:
    """A SHA-256 fingerprint as 64 lowercase hex digits; colons, spaces and case are ignored, and so is a leading
    `sha256 Fingerprint=` (openssl's output, pasted)."""
    text = fingerprint.strip()
    if "fingerprint=" in text.lower():
        text = text[text.lower().index("fingerprint=") + len("fingerprint="):]
    digits = text.replace(":", "").replace(" ", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise InvalidArgument(field, "must be a SHA-256 fingerprint: 64 hexadecimal digits (colons allowed)")
    return digits


class KeyStore:
    """API keys in `<data_dir>/policy.sqlite3` (WAL). Calls are short indexed statements on a local file,
    so they run on the caller's thread; `open()` before use, `close()` at the end."""

    def __init__(self, data_dir: Path, audit: AuditSink | None = None) -> None:
        self.path = Path(data_dir) / DB_NAME
        self._db: sqlite3.Connection | None = None
        self._pepper = b""
        self._audit = audit

    def _record(self, action: str, outcome: str, principal: Principal | None = None, *, tenant: str = "",
                model: str = "", detail: str = "") -> None:
        """Appends a decision to the audit sink (when there is one): the key id, never the key."""
        if self._audit is None:
            return
        trace_id = current_trace_id()
        self._audit.append(AuditEvent(action, outcome, principal.key_id if principal else "",
                                      principal.tenant if principal else tenant, model,
                                      trace_id="" if trace_id == "none" else trace_id, detail=detail))

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
            columns = {row[1] for row in db.execute("PRAGMA table_info(api_keys)")}
            for column in ("client_cert_subject", "client_cert_sha256"):  # a schema 1 file: bindings came later
                if column not in columns:
                    db.execute(f"ALTER TABLE api_keys ADD COLUMN {column} TEXT")
            if "max_priority" not in columns:  # schema 2 and older: every key keeps the lowest priority
                db.execute("ALTER TABLE api_keys ADD COLUMN max_priority INTEGER NOT NULL DEFAULT 0")
            if "allowed_tools" not in columns:  # schema 3 and older: deny by default, so every key gets no tool
                db.execute("ALTER TABLE api_keys ADD COLUMN allowed_tools TEXT NOT NULL DEFAULT '[]'")
            db.executescript(_BINDING_INDEXES)
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

    def create(self, tenant: str, allowed_models: Iterable[str] = (), display_name: str = "", *,
               client_cert_subject: str = "", client_cert_sha256: str = "",
               max_priority: int = DEFAULT_MAX_PRIORITY, allowed_tools: Iterable[str] = ()) -> tuple[ApiKey, str]:
        """A new key for `tenant`: its public record and the plaintext secret (returned here only). With
        `client_cert_subject` or `client_cert_sha256` (one of them), a verified client certificate with that
        subject or fingerprint authenticates as the key too. `max_priority`: the highest request priority its
        chats may run at; `allowed_tools`: the mesh tools they may call (none unless granted)."""
        tenant = validate_tenant(tenant)
        max_priority = validate_max_priority(max_priority)
        models = validate_allowed_models(allowed_models)
        tools = validate_allowed_tools(allowed_tools)
        display_name = validate_display_name(display_name)
        if client_cert_subject and client_cert_sha256:
            raise InvalidArgument("client_cert_sha256", "give a client certificate subject or a fingerprint, not "
                                                        "both")
        subject = normalize_subject(client_cert_subject) if client_cert_subject else None
        fingerprint = normalize_fingerprint(client_cert_sha256) if client_cert_sha256 else None
        db = self._conn
        now_ms = int(time.time() * 1000)
        for attempt in range(8):
            self._check_unbound(subject, fingerprint)
            plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
            key_id = "key_" + secrets.token_hex(4)
            try:
                db.execute(
                    "INSERT INTO api_keys (key_id, key_hash, tenant, allowed_models, display_name, "
                    "create_time_unix_ms, client_cert_subject, client_cert_sha256, max_priority, allowed_tools) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key_id, self._hash(plaintext), tenant, json.dumps(models), display_name, now_ms, subject,
                     fingerprint, max_priority, json.dumps(tools)),
                )
                break
            except sqlite3.IntegrityError:
                # A key_id collision (1 in 4 billion per existing key), or another store bound the identity just
                # now (the check above says so next time round): draw another.
                if attempt == 7:
                    raise
        bound = f", bound to client certificate {_binding_text(subject, fingerprint)}" if subject or fingerprint else ""
        log.info("created API key %s for tenant %s%s", key_id, tenant, bound)
        self._record("key.create", "ok", Principal(key_id, tenant, models, max_priority, tools),
                     detail=f"models: {', '.join(models) or 'all'}{bound}; max priority {max_priority}; "
                            f"tools: {', '.join(tools) or 'none'}")
        return ApiKey(key_id, tenant, models, display_name, now_ms, revoked=False, client_cert_subject=subject or "",
                      client_cert_sha256=fingerprint or "", max_priority=max_priority, allowed_tools=tools), plaintext

    def _check_unbound(self, subject: str | None, fingerprint: str | None) -> None:
        for column, value, field in (("client_cert_subject", subject, "client_cert_subject"),
                                     ("client_cert_sha256", fingerprint, "client_cert_sha256")):
            if value is None:
                continue
            row = self._conn.execute(f"SELECT key_id FROM api_keys WHERE {column} = ? AND revoke_time_unix_ms IS "
                                     "NULL", (value,)).fetchone()
            if row is not None:
                raise AlreadyExists(f"{field}: the active key {row[0]} is bound to the same client certificate "
                                    f"{'subject' if subject else 'fingerprint'}; revoke it first")

    def authenticate(self, credential: str | CertificateIdentity) -> Principal:
        """The principal of an active key, given the key itself or a verified client certificate bound to it;
        Unauthenticated for an empty, malformed, unknown or revoked key, or a certificate bound to no active
        key."""
        try:
            principal = self._authenticate(credential)
        except LmeshError as exc:
            self._record("authenticate", "denied", detail=exc.message)
            raise
        self._record("authenticate", "allowed", principal)
        return principal

    def _authenticate(self, credential: str | CertificateIdentity) -> Principal:
        if isinstance(credential, CertificateIdentity):
            return self._authenticate_certificate(credential)
        api_key = credential
        if not api_key or not KEY_PATTERN.fullmatch(api_key):
            raise Unauthenticated(INVALID_KEY)
        digest = self._hash(api_key)
        row = self._conn.execute(
            f"SELECT key_hash, {_COLUMNS} FROM api_keys WHERE key_hash = ?", (digest,),
        ).fetchone()
        # The lookup is by hash, so its timing says nothing about the key; compare in constant time anyway.
        if row is None or not hmac.compare_digest(bytes(row[0]), digest):
            raise Unauthenticated(INVALID_KEY)
        record = _record(row[1:])
        if record.revoked:
            raise Unauthenticated(INVALID_KEY)
        return record.principal

    def _authenticate_certificate(self, certificate: CertificateIdentity) -> Principal:
        """The active key bound to the certificate's fingerprint, else to its subject."""
        field = "client_certificate"
        if not certificate.subject and not certificate.sha256_fingerprint:
            raise Unauthenticated("missing credential: an API key or a client certificate")
        lookups = []
        if certificate.sha256_fingerprint:
            lookups.append(("client_cert_sha256",
                            normalize_fingerprint(certificate.sha256_fingerprint, f"{field}.sha256_fingerprint")))
        if certificate.subject:
            lookups.append(("client_cert_subject", normalize_subject(certificate.subject, f"{field}.subject")))
        for column, value in lookups:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE {column} = ? AND revoke_time_unix_ms "
                                     "IS NULL", (value,)).fetchone()
            if row is not None:
                return _record(row).principal
        raise Unauthenticated(UNBOUND_CERTIFICATE)

    def authorize(self, credential: str | CertificateIdentity, model: str, input_tokens: int = 0,
                  max_tokens: int = 0, *, resolved_model: str = "", resolved_aliases: Sequence[str] = ()) -> Principal:
        """The principal of `credential` (an API key or a verified client certificate, as in `authenticate`) if it
        may use `model` for a request of the given size.

        With `resolved_model` (`name:version`, what `model` resolved to) the decision is on that model: its
        name, `name:version` or one of its aliases must match a pattern, so an alias grants no more and no less
        than the model behind it. Authentication comes first, so a caller without a valid key learns nothing
        about models.
        """
        try:
            principal = self._authenticate(credential)
        except LmeshError as exc:
            self._record("authorize", "denied", model=resolved_model or model[:MAX_MODEL_PATTERN_LEN],
                         detail=exc.message)
            raise
        try:
            self._authorize(principal, model, input_tokens, max_tokens, resolved_model, resolved_aliases)
        except LmeshError as exc:
            self._record("authorize", "denied", principal, model=(resolved_model or model)[:MAX_MODEL_PATTERN_LEN],
                         detail=exc.message)
            raise
        self._record("authorize", "allowed", principal, model=resolved_model or model)
        return principal

    def _authorize(self, principal: Principal, model: str, input_tokens: int, max_tokens: int, resolved_model: str,
                   resolved_aliases: Sequence[str]) -> None:
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

    def list(self, tenant: str = "") -> list[ApiKey]:
        """Every key (active and revoked), oldest first; only `tenant`'s when given."""
        columns = _COLUMNS
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
            f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no API key {key_id}")
        return _record(row)

    def set_max_priority(self, key_id: str, max_priority: int) -> ApiKey:
        """Changes the highest request priority of an active key's chats, from its next request on."""
        validate_key_id(key_id)
        max_priority = validate_max_priority(max_priority)
        record = self.get(key_id)
        if record.revoked:
            raise FailedPrecondition(f"API key {key_id} is revoked")
        self._conn.execute("UPDATE api_keys SET max_priority = ? WHERE key_id = ?", (max_priority, key_id))
        log.info("API key %s: max priority %d", key_id, max_priority)
        record = self.get(key_id)
        self._record("key.priority", "ok", record.principal, detail=f"max priority {max_priority}")
        return record

    def set_allowed_tools(self, key_id: str, allowed_tools: Iterable[str]) -> ApiKey:
        """Replaces an active key's tool grant whole (empty: no tool), from its next request on."""
        validate_key_id(key_id)
        tools = validate_allowed_tools(allowed_tools, "tools.allowed_tools")
        record = self.get(key_id)
        if record.revoked:
            raise FailedPrecondition(f"API key {key_id} is revoked")
        self._conn.execute("UPDATE api_keys SET allowed_tools = ? WHERE key_id = ?", (json.dumps(tools), key_id))
        log.info("API key %s: tools %s", key_id, ", ".join(tools) or "none")
        record = self.get(key_id)
        self._record("key.tools", "ok", record.principal, detail=f"tools: {', '.join(tools) or 'none'}")
        return record

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
        record = self.get(key_id)
        self._record("key.revoke", "ok", record.principal)
        return record


def _record(row: Sequence[Any]) -> ApiKey:
    (key_id, tenant, models_json, display_name, create_ms, revoke_ms, subject, fingerprint, max_priority,
     tools_json) = row
    return ApiKey(
        key_id=str(key_id),
        tenant=str(tenant),
        allowed_models=tuple(json.loads(str(models_json))),
        display_name=str(display_name),
        create_time_unix_ms=int(create_ms),
        revoked=revoke_ms is not None,
        client_cert_subject=str(subject or ""),
        client_cert_sha256=str(fingerprint or ""),
        max_priority=int(max_priority),
        allowed_tools=tuple(json.loads(str(tools_json))),
    )


def _binding_text(subject: str | None, fingerprint: str | None) -> str:
    return f"subject {subject}" if subject else f"SHA-256 {fingerprint}"
