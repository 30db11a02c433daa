"""Policy's audit trail: every decision, appended as it is made (see AuditEvent for what a record holds).

This module holds the interface the deciding code writes to (AuditEvent, AuditSink, MemoryAudit) and the durable,
hash-chained log behind it (AuditLog), with its verification (verify_sources, verify_path). A record never holds
an API key, an admin token or the text a guardrail matched: rule ids and positions only (AuditLog also redacts
anything shaped like a key that reaches it by mistake).

**Storage.** JSON lines under `<policy data dir>/audit/`: `current.jsonl` is appended to; when it passes the segment
size it is renamed `segment-<first seq, 12 digits>.jsonl` (closed for good: an operator may archive it) and a new
`current.jsonl` continues the chain. One line per record, in one canonical form (fixed key order, no spaces, ASCII):

    {"v":1,"seq":7,"time_unix_ms":...,"action":"authorize","outcome":"allowed","principal":"key_3f9a1c2b",
     "tenant":"acme","model":"smollm2:1","rule_id":"","tokens":{"input":12,"max":64},"trace_id":"...","detail":"",
     "prev":"<hash of record 6>","hash":"<SHA-256 of this line up to prev, closed with '}'>"}

**Chain.** `hash` = SHA-256 over the canonical encoding of the record without `hash` (which includes `prev`, the
hash of the record before; 64 zeros before the first). Verification recomputes every hash and link and names the
first record that is edited, missing, out of order, or rewritten with a recomputed hash. A plain hash chain cannot
tell a cut-off tail or a wholesale rewrite from an honest log on its own: the running policy checks the log against
the head it wrote itself (`AuditLog.verify`), logs its head at start and stop, and `lmesh audit verify` prints it, so
an operator can keep heads elsewhere.

**Durability.** `append` writes the record (one `write`, in order, under a lock) and then makes it durable with
`fdatasync`. Inside `decisions()` (which policy's servicer wraps every unary RPC in) `append` returns at once and the
RPC awaits one group `fdatasync` when it ends, before its answer is sent: concurrent decisions share one sync, and the
event loop never waits on the disk. Outside it (a thread) `append` syncs before it returns; async code outside a
decision (a background task) uses `await record(event)`, which does not block the loop while it waits. If a
write or sync fails, the log refuses every later append (UNAVAILABLE) until policy restarts: no decision takes effect
unrecorded. One writing process per log (a lock file); a line cut by a crash was never acknowledged and is cut off
when the log is next opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _quote
from pathlib import Path
from typing import IO, Any, Protocol

from opentelemetry import trace

from services.common.errors import ResourceExhausted, Unavailable

log = logging.getLogger("lmesh.policy.audit")


@dataclass(frozen=True)
class AuditEvent:
    """One decision. `action`: what was decided (authenticate, authorize, reserve, settle, expire, block, redact,
    flag, key.create, key.update, key.revoke, tenant.set, ...); `outcome`: allowed, denied, ok, ...; `principal`:
    the key id (never the key); `tokens`: counts that matter to the decision (prompt, completion, reserved,
    charged); `detail`: a short human-readable note, never a secret or matched text."""

    action: str
    outcome: str
    principal: str = ""
    tenant: str = ""
    model: str = ""
    rule_id: str = ""
    tokens: Mapping[str, int] = field(default_factory=dict)
    trace_id: str = ""
    detail: str = ""
    time_unix_ms: int = field(default_factory=lambda: int(time.time() * 1000))


class AuditSink(Protocol):
    """Where decisions go: `append` must be durable (or raise) before the decision takes effect."""

    def append(self, event: AuditEvent) -> None: ...


class MemoryAudit:
    """An AuditSink that keeps events in memory (unit tests)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def append(self, event: AuditEvent) -> None:
        self.events.append(event)


# ---- records: the canonical encoding ---------------------------------------------------------------------------

FORMAT_VERSION = 1
GENESIS = "0" * 64
AUDIT_DIR = "audit"
CURRENT = "current.jsonl"
LOCK_FILE = "writer.lock"
SEGMENT_NAME = re.compile(r"segment-(\d{12,})\.jsonl")
DEFAULT_SEGMENT_MB = 64
# Field bounds keep any record under ~2.5 KB, so a tail of MAX_TAIL records fits a 4 MiB gRPC message.
TEXT_LIMITS = {"action": 64, "outcome": 64, "principal": 256, "tenant": 256, "model": 512, "rule_id": 256,
               "trace_id": 64, "detail": 512}
MAX_TOKEN_KINDS = 16
MAX_TOKEN_KIND_LEN = 32
MAX_LINE_BYTES = 16 * 1024  # a longer line is not a record policy wrote
INT64_MAX = 2 ** 63 - 1
# Anything shaped like an API key, even cut short, is a secret: it never reaches the file.
KEY_SHAPED = re.compile(r"lmk_[A-Za-z0-9_-]{8,}")
REDACTED = "[redacted]"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class AuditRecord:
    """One record as stored: the event's fields, its place in the chain (`seq`, `prev`) and its own `hash`."""

    seq: int
    time_unix_ms: int
    action: str
    outcome: str
    principal: str
    tenant: str
    model: str
    rule_id: str
    tokens: Mapping[str, int]
    trace_id: str
    detail: str
    prev: str
    hash: str

    def as_json(self) -> dict[str, Any]:
        """The record as a JSON object (what `lmesh audit tail --json` prints)."""
        return {"seq": self.seq, "time_unix_ms": self.time_unix_ms, "action": self.action, "outcome": self.outcome,
                "principal": self.principal, "tenant": self.tenant, "model": self.model, "rule_id": self.rule_id,
                "tokens": dict(self.tokens), "trace_id": self.trace_id, "detail": self.detail, "prev": self.prev,
                "hash": self.hash}


def _body(seq: int, time_unix_ms: int, text: Mapping[str, str], tokens: Mapping[str, int], prev: str) -> str:
    """The canonical encoding of a record without its hash (what the hash is taken over): what
    `json.dumps(record, separators=(",", ":"), ensure_ascii=True)` writes for the fields in this order, the tokens
    sorted by kind; built by hand, as this runs for every decision."""
    counts = ",".join(f"{_quote(kind)}:{count}" for kind, count in sorted(tokens.items()))
    return (f'{{"v":{FORMAT_VERSION},"seq":{seq},"time_unix_ms":{time_unix_ms},"action":{_quote(text["action"])},'
            f'"outcome":{_quote(text["outcome"])},"principal":{_quote(text["principal"])},'
            f'"tenant":{_quote(text["tenant"])},"model":{_quote(text["model"])},"rule_id":{_quote(text["rule_id"])},'
            f'"tokens":{{{counts}}},"trace_id":{_quote(text["trace_id"])},"detail":{_quote(text["detail"])},'
            f'"prev":{_quote(prev)}}}')


def _line(body: str, digest: str) -> str:
    return f'{body[:-1]},"hash":"{digest}"}}'


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode("ascii")).hexdigest()


class Malformed(ValueError):
    """A line that is not a record in the form policy writes (its message says how)."""


_TEXT_FIELDS = ("action", "outcome", "principal", "tenant", "model", "rule_id", "trace_id", "detail")


def parse_line(line: bytes) -> tuple[AuditRecord, bool, bool]:
    """The record a line holds, whether its hash matches its content, and whether the line is in the canonical
    form policy writes; Malformed when it is not a record at all."""
    if len(line) > MAX_LINE_BYTES:
        raise Malformed(f"a line of {len(line)} bytes")
    try:
        text = line.decode("ascii")
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise Malformed("not a JSON object in ASCII") from None
    if not isinstance(data, dict):
        raise Malformed("not a JSON object")
    expected = {"v", "seq", "time_unix_ms", *_TEXT_FIELDS, "tokens", "prev", "hash"}
    if set(data) != expected:
        missing, extra = sorted(expected - set(data)), sorted(set(data) - expected)
        raise Malformed("fields " + ", ".join([*(f"{m} missing" for m in missing), *(f"{e} unknown" for e in extra)]))
    if data["v"] != FORMAT_VERSION or type(data["v"]) is not int:
        raise Malformed(f"format version {data['v']!r}, not {FORMAT_VERSION}")
    for name in ("seq", "time_unix_ms"):
        if type(data[name]) is not int or not 0 <= data[name] <= INT64_MAX:
            raise Malformed(f"{name} is not a non-negative integer")
    if data["seq"] < 1:
        raise Malformed("seq is not ≥ 1")
    for name in _TEXT_FIELDS:
        if not isinstance(data[name], str) or not data[name].isprintable():
            raise Malformed(f"{name} is not a string of printable characters")
    tokens = data["tokens"]
    if not isinstance(tokens, dict) or not all(type(v) is int and -INT64_MAX - 1 <= v <= INT64_MAX and k.isprintable()
                                               for k, v in tokens.items()):
        raise Malformed("tokens is not an object of integers")
    for name in ("prev", "hash"):
        if not isinstance(data[name], str) or not _HEX64.fullmatch(data[name]):
            raise Malformed(f"{name} is not 64 lowercase hex digits")
    texts = {name: data[name] for name in _TEXT_FIELDS}
    body = _body(data["seq"], data["time_unix_ms"], texts, tokens, data["prev"])
    record = AuditRecord(seq=data["seq"], time_unix_ms=data["time_unix_ms"], tokens=dict(sorted(tokens.items())),
                         prev=data["prev"], hash=data["hash"], **texts)
    return record, _digest(body) == data["hash"], _line(body, data["hash"]) == text


def _clean_text(value: object, limit: int, redact: Sequence[str]) -> str:
    text = value if isinstance(value, str) else str(value)
    if "lmk_" in text:
        text = KEY_SHAPED.sub(REDACTED, text)
    for secret in redact:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else "\ufffd" for ch in text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _clean_tokens(tokens: Mapping[str, int], redact: Sequence[str]) -> dict[str, int]:
    cleaned: dict[str, int] = {}
    for kind, count in list(tokens.items())[:MAX_TOKEN_KINDS]:
        try:
            number = int(count)
        except (TypeError, ValueError):
            continue
        cleaned[_clean_text(kind, MAX_TOKEN_KIND_LEN, redact)] = max(-INT64_MAX - 1, min(INT64_MAX, number))
    return cleaned


def _current_trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


# ---- verification ---------------------------------------------------------------------------------------------

EDITED, MISSING, REORDERED, REWRITTEN, MALFORMED, TRUNCATED = (
    "edited", "missing", "reordered", "rewritten", "malformed", "truncated")


@dataclass(frozen=True)
class Problem:
    """The first bad record: its sequence number (the one expected at that place, for a gap, a malformed line or a
    record out of order), what is wrong (`kind`: edited, missing, reordered, rewritten, malformed, truncated) and a
    one-line explanation naming where."""

    seq: int
    kind: str
    message: str


@dataclass(frozen=True)
class Verification:
    """What verifying a log found: `records` checked, from `first_seq` to `last_seq` (its `head_hash`), and the
    first `problem` (None: the chain verifies). `note` says what was taken on trust (the link before `first_seq`
    when earlier records are not there, an unfinished last line)."""

    records: int
    first_seq: int
    last_seq: int
    head_hash: str
    problem: Problem | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        """One line for people."""
        if self.problem is not None:
            return f"record #{self.problem.seq} {self.problem.message}"
        if not self.records:
            return "ok: the audit log is empty" + (f" ({self.note})" if self.note else "")
        text = (f"ok: {self.records} records, #{self.first_seq} to #{self.last_seq}, head sha256 {self.head_hash}")
        return text + (f" ({self.note})" if self.note else "")


@dataclass
class Source:
    """One file of a log, read up to `end` (None: to its end): a segment, or the current file."""

    name: str
    file: IO[bytes]
    end: int | None = None
    first: int | None = None  # the seq its first record must have, when known (a segment's name says it)


def _lines(sources: Sequence[Source], start: int = 0, offset: int = 0,
           ) -> Iterator[tuple[int, int, int, bytes, bool]]:
    """(source index, line number, offset after the line, the line without its newline, whether it ended with a
    newline) over `sources` from `start` at `offset`. A line longer than MAX_LINE_BYTES comes out cut there."""
    for index in range(start, len(sources)):
        source = sources[index]
        source.file.seek(offset if index == start else 0)
        position = offset if index == start else 0
        number = 0 if position == 0 else -1  # line numbers are only known when reading from the start
        while source.end is None or position < source.end:
            budget = MAX_LINE_BYTES + 1
            if source.end is not None:
                budget = min(budget, source.end - position)
            line = source.file.readline(budget)
            if not line:
                break
            position += len(line)
            complete = line.endswith(b"\n")
            while not complete and len(line) > MAX_LINE_BYTES:  # skip the rest of an over-long line
                if source.end is not None and position >= source.end:
                    break
                rest = source.file.readline(MAX_LINE_BYTES + 1 if source.end is None else
                                            min(MAX_LINE_BYTES + 1, source.end - position))
                if not rest:
                    break
                position += len(rest)
                complete = rest.endswith(b"\n")
            number = number + 1 if number >= 0 else -1
            yield index, number, position, line.rstrip(b"\n") if complete else line, complete


def _where(sources: Sequence[Source], index: int, number: int) -> str:
    return f"{sources[index].name} line {number}" if number > 0 else sources[index].name


def _find_seq(sources: Sequence[Source], start: int, offset: int, seq: int) -> str | None:
    """Where record `seq` appears after (start, offset), or None."""
    for index, _, _, line, _ in _lines(sources, start, offset):
        try:
            record, _, _ = parse_line(line)
        except Malformed:
            continue
        if record.seq == seq:
            return f"later, in {sources[index].name}" if index != start else "later in the file"
    return None


def verify_sources(sources: Sequence[Source], anchor: tuple[int, str] | None = None) -> Verification:
    """Recomputes the chain over `sources` (oldest first) and names the first bad record. `anchor` (seq, hash):
    the head the writer knows it wrote; a log that ends before it, or with another hash there, fails."""
    expected_seq = sources[0].first if sources and sources[0].first else 0  # 0: whatever the first record says
    prev_hash: str | None = GENESIS if expected_seq == 1 else None  # None: the first link is taken on trust
    first_seq = 0
    records = 0
    notes: list[str] = []
    if expected_seq > 1:
        notes.append(f"starts at #{expected_seq}: the records before it are not here, its link to "
                     f"#{expected_seq - 1} is taken on trust")

    def failed(problem: Problem) -> Verification:
        last = expected_seq - 1 if records else 0
        return Verification(records, first_seq, last, prev_hash or GENESIS, problem, "; ".join(notes))

    for index, number, offset, line, complete in _lines(sources, 0, 0):
        where = _where(sources, index, number)
        if not complete and index == len(sources) - 1 and sources[index].end is None and len(line) <= MAX_LINE_BYTES:
            # Only ever the very end of the log: a write a crash cut short, never acknowledged.
            notes.append(f"{where} is unfinished (a crash while writing it; policy cuts it off when it next opens "
                         "the log)")
            break
        try:
            record, hash_ok, canonical = parse_line(line)
        except Malformed as exc:
            return failed(Problem(expected_seq or 1, MALFORMED, f"is unreadable: {where} is not an audit record "
                                                                f"({exc})"))
        if not hash_ok:
            named = "" if record.seq == expected_seq or not expected_seq else f" (the line says #{record.seq})"
            return failed(Problem(expected_seq or record.seq, EDITED,
                                  f"was edited{named}: its content does not match its hash ({where})"))
        if not canonical:
            return failed(Problem(record.seq, EDITED, f"was edited: its line is not in the form policy wrote it "
                                                      f"({where})"))
        if not expected_seq:  # the first record here, and nothing says which it must be
            expected_seq = record.seq
            if record.seq == 1:
                prev_hash = GENESIS
            else:
                notes.append(f"starts at #{record.seq}: the records before it are not here, its link to "
                             f"#{record.seq - 1} is taken on trust")
        if record.seq > expected_seq:
            found = _find_seq(sources, index, offset, expected_seq)
            if found is not None:
                return failed(Problem(expected_seq, REORDERED, f"is out of order: #{record.seq} comes before it "
                                                               f"({where}); #{expected_seq} is {found}"))
            if not records and index == 0 and expected_seq > 1:
                hint = f" (the oldest file here is {sources[0].name}: were segments moved away?)"
            elif not records:
                hint = " (the log starts with a later record)"
            else:
                hint = ""
            gone = f"#{expected_seq} is" if record.seq == expected_seq + 1 else \
                f"#{expected_seq} to #{record.seq - 1} are"
            return failed(Problem(expected_seq, MISSING, f"is missing: {gone} not in the log ({where} holds "
                                                         f"#{record.seq}){hint}"))
        if record.seq < expected_seq:
            return failed(Problem(record.seq, REORDERED, f"is out of order: it appears again after "
                                                         f"#{expected_seq - 1} ({where})"))
        if prev_hash is not None and record.prev != prev_hash:
            if record.seq == 1:
                return failed(Problem(1, REWRITTEN, f"was rewritten: it does not start the chain, its prev is not "
                                                    f"the genesis hash ({where})"))
            return failed(Problem(record.seq - 1, REWRITTEN, f"was rewritten: #{record.seq} ({where}) links to "
                                                             f"another hash than #{record.seq - 1} has (or "
                                                             f"#{record.seq} was rewritten)"))
        first_seq = first_seq or record.seq
        records += 1
        expected_seq = record.seq + 1
        prev_hash = record.hash
    last_seq = expected_seq - 1 if records else 0
    if anchor is not None and anchor[0] > 0:
        anchor_seq, anchor_hash = anchor
        if last_seq < anchor_seq:
            cut = f"#{last_seq + 1}" if last_seq + 1 == anchor_seq else f"#{last_seq + 1} to #{anchor_seq}"
            return failed(Problem(last_seq + 1, TRUNCATED, f"is missing: the log ends at #{last_seq}, but policy "
                                                           f"wrote up to #{anchor_seq} ({cut} cut off)"))
        if last_seq == anchor_seq and prev_hash != anchor_hash:
            return failed(Problem(anchor_seq, REWRITTEN, "was rewritten: its hash is not the one policy wrote"))
    return Verification(records, first_seq, last_seq, prev_hash or GENESIS, None, "; ".join(notes))


def log_files(directory: Path) -> list[Path]:
    """A log directory's files, oldest first: its segments by first sequence number, then the current file."""
    segments = sorted((int(m.group(1)), p) for p in directory.iterdir()
                      if (m := SEGMENT_NAME.fullmatch(p.name)) and p.is_file())
    files = [p for _, p in segments]
    if (directory / CURRENT).is_file():
        files.append(directory / CURRENT)
    return files


def open_sources(files: Sequence[Path], stack: contextlib.ExitStack, *, whole: bool,
                 current_end: int | None = None) -> list[Source]:
    """`files` (oldest first) opened for verification. With `whole` (a log directory's files, not one file given
    alone) the oldest tells where the log starts: a segment by its name, a lone current.jsonl at #1.
    `current_end`: read current.jsonl only that far (what is durable)."""
    sources = []
    for index, path in enumerate(files):
        match = SEGMENT_NAME.fullmatch(path.name)
        first = int(match.group(1)) if match else None
        if whole and index == 0 and path.name == CURRENT:
            first = 1
        sources.append(Source(path.name, stack.enter_context(path.open("rb")),
                              current_end if path.name == CURRENT else None, first))
    return sources


def verify_path(path: Path) -> Verification:
    """Verifies a log offline: a policy data dir, its `audit` dir, or one file of it (a segment, current.jsonl,
    a backup copy). OSError (one line) when there is no log there or it cannot be read."""
    path = Path(path)
    try:
        if path.is_dir():
            directory = path / AUDIT_DIR if (path / AUDIT_DIR).is_dir() else path
            files = log_files(directory)
            if not files:
                raise OSError(f"no audit log in {path} (it holds neither {CURRENT} nor segment-*.jsonl files)")
        elif path.is_file():
            files = [path]
        elif path.exists():
            raise OSError(f"{path} is neither a regular file nor a directory")
        else:
            raise OSError(f"no file or directory {path}")
        with contextlib.ExitStack() as stack:
            return verify_sources(open_sources(files, stack, whole=path.is_dir()))
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(f"cannot read {path}: {(exc.strerror or str(exc)).lower()}") from None


# ---- the log ----------------------------------------------------------------------------------------------------


class _Pending:
    """The records a decision appended (inside `AuditLog.decisions()`), made durable together when it ends."""

    __slots__ = ("seq",)

    def __init__(self) -> None:
        self.seq = 0


@dataclass(eq=False)
class _Follower:
    loop: asyncio.AbstractEventLoop
    wake: asyncio.Event


RING_RECORDS = 10_000  # records kept in memory for followers; one that falls further behind is ended
MAX_TAIL = 1000
MAX_TAIL_SCAN = 100_000  # a filtered tail looks this far back at most
_BLOCK = 64 * 1024


class AuditLog:
    """The durable, hash-chained audit log under `<data_dir>/audit` (see the module's docstring); an AuditSink.
    `open()` before use, `close()` at the end. Safe to append from the event loop and from threads at once."""

    def __init__(self, data_dir: Path, *, segment_bytes: int = DEFAULT_SEGMENT_MB * 1024 * 1024,
                 redact: Iterable[str | None] = (), ring_records: int = RING_RECORDS) -> None:
        self.dir = Path(data_dir) / AUDIT_DIR
        self.segment_bytes = segment_bytes
        self._redact = tuple(s for s in redact if s)
        self._lock = threading.Lock()  # the file's end: writes, the head, the ring
        self._sync_lock = threading.Lock()  # one fdatasync at a time; callers that wait behind it are covered by it
        self._fd = -1
        self._lock_fd = -1
        self._seq, self._hash, self._offset = 0, GENESIS, 0  # written
        self._durable_seq, self._durable_hash, self._durable_offset = 0, GENESIS, 0  # synced
        self._current_first = 1  # the first seq of current.jsonl (names it when it becomes a segment)
        self._ring: deque[tuple[int, bytes]] = deque(maxlen=ring_records)
        self._failed: str = ""
        self._closing = False
        self._followers: set[_Follower] = set()
        self._flushing: asyncio.Future[None] | None = None
        self._scope: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar(f"audit_{id(self)}",
                                                                                      default=None)
        self.syncs = 0  # fdatasync calls made for appends (group commit: fewer than appends under load)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def open(self) -> None:
        if self._fd >= 0:
            return
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(lock_fd)
            raise OSError(f"the audit log {self.dir} is in use by another lmesh-policy (pid {holder}); run one "
                          "policy process per --data-dir") from None
        try:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
            fd = os.open(self.dir / CURRENT, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                self._recover(fd)
                os.fsync(fd)
                _fsync_dir(self.dir)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        self._fd, self._lock_fd = fd, lock_fd
        self._failed, self._closing = "", False
        self._ring.clear()
        log.info("audit log open at %s: head #%d sha256 %s", self.dir, self._seq, self._hash)

    def _recover(self, fd: int) -> None:
        """The head from what is on disk: the last record of current.jsonl, else of the newest segment. A last line
        without its newline (a crash mid-write, never acknowledged) is cut off."""
        size = os.fstat(fd).st_size
        complete = _complete_length(fd, size)
        if complete < size:
            log.warning("audit log: cut off an unfinished last line of %d bytes in %s (a crash while writing it; "
                        "it was never acknowledged)", size - complete, self.dir / CURRENT)
            os.ftruncate(fd, complete)
            size = complete
        head = _last_record(fd, size, self.dir / CURRENT)
        first = _first_seq(fd, size, head)
        if head is None:
            segments = [p for p in log_files(self.dir) if p.name != CURRENT]
            if segments:
                with segments[-1].open("rb") as segment:
                    head = _last_record(segment.fileno(), os.fstat(segment.fileno()).st_size, segments[-1])
        seq, digest = (head.seq, head.hash) if head is not None else (0, GENESIS)
        self._seq = self._durable_seq = seq
        self._hash = self._durable_hash = digest
        self._offset = self._durable_offset = size
        self._current_first = first if first is not None else seq + 1

    def close(self) -> None:
        self.end_follows()
        with self._sync_lock, self._lock:
            if self._fd < 0:
                return
            try:
                if not self._failed:
                    os.fdatasync(self._fd)
                    self._durable_seq, self._durable_hash = self._seq, self._hash
            except OSError as exc:
                log.error("audit log: the last sync failed on close: %s", exc)
            os.close(self._fd)
            os.close(self._lock_fd)  # releases the lock
            self._fd = self._lock_fd = -1
            log.info("audit log closed at head #%d sha256 %s", self._seq, self._hash)

    def __enter__(self) -> AuditLog:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last durable record ((0, GENESIS) when empty)."""
        with self._lock:
            return self._durable_seq, self._durable_hash

    # -- appending -------------------------------------------------------------------------------------------

    def append(self, event: AuditEvent) -> None:
        """Writes the event as the next record; durable before this returns, or, inside `decisions()`, before the
        decision ends. Unavailable when the log is not open or a write failed."""
        seq = self._write(event)
        pending = self._scope.get()
        if pending is not None:
            pending.seq = max(pending.seq, seq)
        else:
            self._sync_through(seq)

    def _write(self, event: AuditEvent) -> int:
        redact = self._redact
        text = {name: _clean_text(getattr(event, name), TEXT_LIMITS[name], redact) for name in _TEXT_FIELDS}
        if not text["trace_id"]:
            text["trace_id"] = _current_trace_id()
        tokens = _clean_tokens(event.tokens, redact) if event.tokens else {}
        when = event.time_unix_ms if type(event.time_unix_ms) is int and event.time_unix_ms >= 0 else int(
            time.time() * 1000)
        with self._lock:
            if self._fd < 0:
                raise Unavailable("the audit log is not open")
            if self._failed:
                raise Unavailable(f"the audit log cannot be written ({self._failed}); policy decides nothing until "
                                  "it is restarted with a writable log")
            seq = self._seq + 1
            body = _body(seq, min(when, INT64_MAX), text, tokens, self._hash)
            digest = _digest(body)
            data = (_line(body, digest) + "\n").encode("ascii")
            try:
                written = os.write(self._fd, data)
                if written != len(data):
                    raise OSError(f"a short write ({written} of {len(data)} bytes)")
            except OSError as exc:
                self._failed = f"write: {exc.strerror or exc}"
                log.error("audit log: %s; refusing every decision from now on", self._failed)
                raise Unavailable(f"the audit log cannot be written ({self._failed})") from None
            self._seq, self._hash, self._offset = seq, digest, self._offset + len(data)
            self._ring.append((seq, data))
            return seq

    def _sync_through(self, seq: int) -> None:
        """Makes every record up to `seq` durable: one fdatasync covers every write made before it starts, so
        callers queued behind one in progress usually find their record synced when they get the lock."""
        with self._sync_lock:
            with self._lock:
                if self._durable_seq >= seq:
                    return
                if self._failed or self._fd < 0:
                    raise Unavailable(f"the audit log cannot be written ({self._failed or 'closed'})")
                target = (self._seq, self._hash, self._offset)
                fd = self._fd
            try:
                os.fdatasync(fd)
            except OSError as exc:
                with self._lock:
                    self._failed = f"sync: {exc.strerror or exc}"
                log.error("audit log: %s; refusing every decision from now on", self._failed)
                raise Unavailable(f"the audit log cannot be written ({self._failed})") from None
            with self._lock:
                self._durable_seq, self._durable_hash, self._durable_offset = target
                self.syncs += 1
                rotate = self.segment_bytes > 0 and target[2] >= self.segment_bytes
            self._notify()
            if rotate:
                self._rotate()

    def _rotate(self) -> None:
        """current.jsonl becomes segment-<first seq>.jsonl and a new current.jsonl continues the chain (called with
        the sync lock held)."""
        with self._lock:
            if self._failed or self._fd < 0:
                return
            try:
                os.fdatasync(self._fd)  # what was written since the sync that asked for this
                segment = self.dir / f"segment-{self._current_first:012d}.jsonl"
                if segment.exists():
                    raise OSError(f"{segment.name} exists already")
                os.rename(self.dir / CURRENT, segment)
                fd = os.open(self.dir / CURRENT, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
                _fsync_dir(self.dir)
            except OSError as exc:
                self._failed = f"rotate: {exc.strerror or exc}"
                log.error("audit log: %s; refusing every decision from now on", self._failed)
                return
            os.close(self._fd)
            self._fd = fd
            self._durable_seq, self._durable_hash = self._seq, self._hash
            self._offset = self._durable_offset = 0
            self._current_first = self._seq + 1
            log.info("audit log: %s closed at #%d sha256 %s", segment.name, self._seq, self._hash)
        self._notify()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[_Pending]:
        """Within the block, `append` only writes; the caller makes `pending.seq` durable itself (`durable`)."""
        pending = _Pending()
        token = self._scope.set(pending)
        try:
            yield pending
        finally:
            self._scope.reset(token)

    @contextlib.asynccontextmanager
    async def decisions(self) -> AsyncIterator[None]:
        """A decision's block: its records are written as it runs and made durable, together with those of
        concurrent decisions, before the block ends (so before its answer is sent). Unavailable if they cannot
        be."""
        with self.deferred() as pending:
            try:
                yield
            finally:
                if pending.seq:
                    await self.durable(pending.seq)

    async def record(self, event: AuditEvent) -> None:
        """`append` for async code outside a decision's block (a background task): the record is durable when
        this returns, and the event loop is not blocked while it becomes so."""
        with self.deferred() as pending:
            self.append(event)
        await self.durable(pending.seq)

    async def durable(self, seq: int) -> None:
        """Waits until every record up to `seq` is durable, without blocking the event loop: one sync at a time
        runs in a thread, and each covers every record written before it starts."""
        loop = asyncio.get_running_loop()
        while self._durable_seq < seq:
            flushing = self._flushing
            if flushing is None or flushing.done() or flushing.get_loop() is not loop:
                flushing = self._flushing = asyncio.ensure_future(asyncio.to_thread(self._sync_through, seq))
                flushing.add_done_callback(_retrieve)
            await asyncio.shield(flushing)

    # -- reading ---------------------------------------------------------------------------------------------

    def _snapshot(self, stack: contextlib.ExitStack) -> tuple[list[Source], tuple[int, str]]:
        """The log's files opened as they are now, the current one up to its durable end, and the durable head."""
        with self._lock:
            if self._fd < 0:
                raise Unavailable("the audit log is not open")
            sources = open_sources(log_files(self.dir), stack, whole=True, current_end=self._durable_offset)
            return sources, (self._durable_seq, self._durable_hash)

    def verify(self) -> Verification:
        """Verifies the whole log (every segment still here, then the current file up to its durable end) against
        the head this process knows it wrote. Blocking: run it in a thread."""
        with contextlib.ExitStack() as stack:
            sources, anchor = self._snapshot(stack)
            return verify_sources(sources, anchor)

    def tail(self, limit: int, match: Callable[[AuditRecord], bool] | None = None,
             max_scan: int = MAX_TAIL_SCAN) -> tuple[list[AuditRecord], int]:
        """The last `limit` durable records (that `match`, looking back at most `max_scan` records), oldest first,
        and the durable head's seq. Lines that are not records are skipped (`verify` reports them). Blocking."""
        found: list[AuditRecord] = []
        scanned = 0
        with contextlib.ExitStack() as stack:
            sources, (head, _) = self._snapshot(stack)
            for source in reversed(sources):
                for line in _reverse_lines(source):
                    scanned += 1
                    try:
                        record, _, _ = parse_line(line)
                    except Malformed:
                        continue
                    if match is None or match(record):
                        found.append(record)
                    if len(found) >= limit or scanned >= max_scan:
                        return found[::-1], head
        return found[::-1], head

    async def follow(self, after: int) -> AsyncGenerator[list[AuditRecord], None]:
        """Durable records after seq `after` as they come, in batches; ends (Unavailable) when the log closes, and
        with ResourceExhausted when the reader falls more than the in-memory window behind."""
        follower = _Follower(asyncio.get_running_loop(), asyncio.Event())
        self._followers.add(follower)
        try:
            while True:
                follower.wake.clear()
                batch = self._after(after)
                if batch:
                    after = batch[-1].seq
                    yield batch
                    continue
                if self._closing or self._fd < 0:
                    raise Unavailable("lmesh-policy is shutting down; follow again", reason="DRAINING")
                await follower.wake.wait()
        finally:
            self._followers.discard(follower)

    def _after(self, after: int) -> list[AuditRecord]:
        with self._lock:
            durable = self._durable_seq
            if durable <= after:
                return []
            if not self._ring or self._ring[0][0] > after + 1:
                raise ResourceExhausted(f"this follower fell more than {self._ring.maxlen} records behind; follow "
                                        "again (`lmesh audit tail` shows what it missed)")
            lines = []
            for seq, data in reversed(self._ring):
                if seq <= after:
                    break
                if seq <= durable:
                    lines.append(data)
        return [parse_line(data.rstrip(b"\n"))[0] for data in reversed(lines)]

    def _notify(self) -> None:
        for follower in list(self._followers):
            with contextlib.suppress(RuntimeError):  # its loop is closed
                follower.loop.call_soon_threadsafe(follower.wake.set)

    def end_follows(self) -> None:
        """Ends every follower (policy is draining: a follow would otherwise hold the drain for its whole grace)."""
        self._closing = True
        self._notify()


def _retrieve(future: asyncio.Future[None]) -> None:
    """Reads a sync's outcome so that one every waiter gave up on is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _complete_length(fd: int, size: int) -> int:
    """The length of the file up to and including its last newline."""
    position = size
    while position > 0:
        start = max(0, position - _BLOCK)
        block = os.pread(fd, position - start, start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        position = start
    return 0


def _last_record(fd: int, size: int, path: Path) -> AuditRecord | None:
    """The last record of a file that ends with a newline, or None when it is empty; OSError when its last line
    is not a record (the chain cannot go on from it)."""
    if size == 0:
        return None
    start = max(0, size - MAX_LINE_BYTES - 1)
    block = os.pread(fd, size - start, start)
    line = block[:-1].rsplit(b"\n", 1)[-1]
    return _readable(line, path, "last")


def _first_seq(fd: int, size: int, last: AuditRecord | None) -> int | None:
    """The seq of a file's first record (what names it as a segment); counted back from its last one when the
    first line is not readable."""
    if size == 0 or last is None:
        return None
    try:
        return parse_line(os.pread(fd, min(size, MAX_LINE_BYTES + 1), 0).split(b"\n", 1)[0])[0].seq
    except Malformed:
        lines = sum(os.pread(fd, min(_BLOCK, size - start), start).count(b"\n") for start in range(0, size, _BLOCK))
        return max(1, last.seq - lines + 1)


def _readable(line: bytes, path: Path, which: str) -> AuditRecord:
    try:
        record, hash_ok, _ = parse_line(line)
    except Malformed as exc:
        raise OSError(f"the {which} line of {path} is not an audit record ({exc}): the chain cannot go on from "
                      f"it; `lmesh audit verify --file {path.parent}` says what is wrong, then move the log "
                      "aside") from None
    if not hash_ok:
        log.warning("audit log: the %s record of %s (#%d) does not match its hash; `lmesh audit verify` will name "
                    "it", which, path, record.seq)
    return record


def _reverse_lines(source: Source) -> Iterator[bytes]:
    """The lines of a source from its end backwards (an over-long line is skipped)."""
    fd = source.file.fileno()
    end = source.end if source.end is not None else os.fstat(fd).st_size
    position, rest, skipping = end, b"", False
    while position > 0:
        start = max(0, position - _BLOCK)
        block = os.pread(fd, position - start, start) + rest
        position = start
        parts = block.split(b"\n")
        rest = parts[0]
        for index, part in enumerate(reversed(parts[1:])):
            if skipping and index == 0:
                skipping = False
                continue
            if part:
                yield part
        if len(rest) > MAX_LINE_BYTES:
            rest, skipping = b"", True
    if rest and not skipping:
        yield rest
