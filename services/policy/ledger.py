"""The ledger: limits, reservations, rate windows and per-period counters, changed only in atomic steps.

Two implementations decide the same way (tests/test_accounting.py runs one suite against both):

- `SqliteLedger` (the default, one policy replica): `<data_dir>/ledger.sqlite3`, WAL, every step one
  `BEGIN IMMEDIATE` transaction, so it is durable across restarts and exact even with several processes on one
  file.
- `RedisLedger` (services/policy/redis_ledger.py, several replicas): every step one Lua script.

What a step keeps true, whatever runs concurrently: for every subject (a key, a tenant) and every period,
`spent + reserved` only grows by an admission that fits the budget; a reservation is released exactly once
(settled, or expired and charged in full); a settle after expiry corrects the charge to the real usage; a repeated
settle changes nothing.

A request counts once against `requests_per_minute`: a Reserve that continues an admitted request (Order.continues,
a tool chat's answer after its plan) adds a window entry that holds its tokens and counts no request.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from services.common.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from services.policy.limits import (
    Admission,
    CounterUsage,
    Limits,
    Order,
    Period,
    PeriodWindow,
    Refusal,
    Reservation,
    Settlement,
    State,
    SubjectState,
    WindowUse,
    most_waiting,
    periods_at,
)

log = logging.getLogger("lmesh.policy")

DB_NAME = "ledger.sqlite3"
SCHEMA_VERSION = 2  # 2: window_entries.requests
RETENTION_MS = 24 * 3_600_000  # settled and expired reservations are kept this long (idempotent Settle)
DAY_COUNTERS_KEPT_MS = 62 * 86_400_000
EXPIRE_BATCH = 256


class LedgerUnavailable(Unavailable):
    """The ledger's store cannot be reached (Redis down): the caller decides whether to fail closed or open."""


class Ledger(Protocol):
    """What the accounting domain needs from a store. Times are Unix milliseconds; `now_ms` is the caller's
    clock (a ledger with a clock of its own, such as Redis's, may use that instead for windows and leases)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def reserve(self, order: Order) -> Admission: ...

    async def renew(self, reservation_id: str, now_ms: int, lease_ms: int) -> Reservation: ...

    async def settle(self, reservation_id: str, used_tokens: int, now_ms: int) -> Settlement: ...

    async def expire_due(self, now_ms: int, limit: int = EXPIRE_BATCH) -> list[Reservation]: ...

    async def purge(self, now_ms: int, window_ms: int) -> None: ...

    async def get_limits(self, subjects: Sequence[str]) -> dict[str, Limits]: ...

    async def set_limits(self, subject: str, limits: Limits, now_ms: int) -> None: ...

    async def limited_subjects(self, prefix: str) -> list[str]: ...

    async def subject_state(self, subject: str, now_ms: int, window_ms: int) -> SubjectState: ...

    async def get(self, reservation_id: str) -> Reservation: ...


def refusals_for(order: Order, subject: str, limits: Limits, window: Sequence[tuple[int, int, int]],
                 counters: dict[str, tuple[int, int]], first_lease_end: int | None, now: int,
                 counts_request: bool = True) -> list[Refusal]:
    """Every limit of `subject` that `order` does not fit, with when it would (the Lua scripts in
    redis_ledger.py mirror this). `window`: (admission time, tokens, requests: 1, or 0 for a continuation) of the
    subject's entries younger than the window, oldest first; `counters`: label → (spent, reserved);
    `first_lease_end`: the soonest lease end of the subject's open reservations; `counts_request`: False for an
    order that continues a request this subject already counted."""
    refusals: list[Refusal] = []
    width = order.window_ms
    requests = [at for at, _, counted in window if counted]
    if counts_request and limits.requests_per_minute and len(requests) + 1 > limits.requests_per_minute:
        # The window holds len(requests) requests; once the oldest len(requests) - rpm + 1 leave, one more fits.
        leaving = requests[len(requests) - limits.requests_per_minute]
        refusals.append(Refusal(subject, "requests_per_minute", limits.requests_per_minute, len(requests), 0, 1,
                                max(1, leaving + width - now)))
    need = order.tokens
    if limits.tokens_per_minute:
        total = sum(tokens for _, tokens, _ in window)
        if need > limits.tokens_per_minute:
            refusals.append(Refusal(subject, "tokens_per_minute", limits.tokens_per_minute, total, 0, need, None))
        elif total + need > limits.tokens_per_minute:
            excess, freed, frees_at = total + need - limits.tokens_per_minute, 0, 1
            for at, tokens, _ in window:
                freed += tokens
                if freed >= excess:
                    frees_at = max(1, at + width - now)
                    break
            refusals.append(Refusal(subject, "tokens_per_minute", limits.tokens_per_minute, total, 0, need,
                                    frees_at))
    if limits.budget_tokens:
        period = order.periods[limits.budget_period]
        spent, reserved = counters.get(period.label, (0, 0))
        budget = limits.budget_tokens
        retry: int | None
        if need > budget:
            retry = None
        elif spent + need > budget:  # only the next period helps
            retry = max(1, period.end_ms - now) if period.end_ms else None
        elif spent + reserved + need > budget:  # open reservations hold it: they end by settling, at the latest
            ends = [t for t in (first_lease_end, period.end_ms or None) if t is not None]
            retry = max(1, min(ends) - now) if ends else None
        else:
            return refusals
        refusals.append(Refusal(subject, "budget_tokens", budget, spent, reserved, need, retry,
                                limits.budget_period))
    return refusals


_SCHEMA = """
CREATE TABLE IF NOT EXISTS limits (
    subject             TEXT PRIMARY KEY,   -- key:<key id> or tenant:<tenant>
    requests_per_minute INTEGER NOT NULL,
    tokens_per_minute   INTEGER NOT NULL,
    budget_tokens       INTEGER NOT NULL,
    budget_period       TEXT NOT NULL,
    update_time_unix_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    id             TEXT PRIMARY KEY,
    key_id         TEXT NOT NULL,
    tenant         TEXT NOT NULL,
    model          TEXT NOT NULL,
    prompt_tokens  INTEGER NOT NULL,
    max_tokens     INTEGER NOT NULL,
    reserved       INTEGER NOT NULL,
    charged        INTEGER NOT NULL,
    state          TEXT NOT NULL,         -- open, settled, expired
    created_ms     INTEGER NOT NULL,
    lease_until_ms INTEGER NOT NULL,
    ended_ms       INTEGER,
    labels         TEXT NOT NULL,         -- the period counters it counts in: d:<day>,m:<month>,all
    trace_id       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_open ON reservations (lease_until_ms) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS reservations_open_by_key ON reservations (key_id) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS reservations_open_by_tenant ON reservations (tenant) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS reservations_ended ON reservations (ended_ms) WHERE state != 'open';
CREATE TABLE IF NOT EXISTS window_entries (
    subject        TEXT NOT NULL,
    reservation_id TEXT NOT NULL,
    at_ms          INTEGER NOT NULL,
    tokens         INTEGER NOT NULL,
    requests       INTEGER NOT NULL DEFAULT 1,  -- 0: a continuation of a request already counted
    PRIMARY KEY (subject, reservation_id)
);
CREATE INDEX IF NOT EXISTS window_by_time ON window_entries (subject, at_ms);
CREATE TABLE IF NOT EXISTS counters (
    subject  TEXT NOT NULL,
    label    TEXT NOT NULL,
    spent    INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (subject, label)
);
"""

_RESERVATION_COLUMNS = ("id, key_id, tenant, model, prompt_tokens, max_tokens, reserved, charged, state, created_ms, "
                        "lease_until_ms, trace_id")


def _reservation(row: Sequence[object]) -> Reservation:
    (rid, key_id, tenant, model, prompt, max_tokens, reserved, charged, state, created, lease, trace_id) = row
    return Reservation(id=str(rid), key_id=str(key_id), tenant=str(tenant), model=str(model),
                       prompt_tokens=int(prompt), max_tokens=int(max_tokens),  # type: ignore[call-overload]
                       reserved=int(reserved), charged=int(charged), state=State(str(state)),  # type: ignore[call-overload]
                       created_ms=int(created), lease_until_ms=int(lease),  # type: ignore[call-overload]
                       trace_id=str(trace_id))


def _limits(row: Sequence[object] | None) -> Limits:
    if row is None:
        return Limits()
    rpm, tpm, budget, period = row
    return Limits(int(rpm), int(tpm), int(budget), Period(str(period)))  # type: ignore[call-overload]


class SqliteLedger:
    """The ledger in one SQLite file (see the module's docstring). Steps are short indexed statements on a local
    file, run on the caller's thread, as the key store's are."""

    def __init__(self, data_dir: Path | str) -> None:
        self.path = Path(data_dir) / DB_NAME if str(data_dir) != ":memory:" else Path(":memory:")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        if self._db is not None:
            return
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: survives a crash of the process, not of the machine
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {version}; this build knows {SCHEMA_VERSION}")
            db.executescript(_SCHEMA)
            columns = {str(row[1]) for row in db.execute("PRAGMA table_info(window_entries)")}
            if "requests" not in columns:  # a version 1 ledger: every entry it holds is a request
                db.execute("ALTER TABLE window_entries ADD COLUMN requests INTEGER NOT NULL DEFAULT 1")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        self._db = db
        log.info("policy ledger open at %s", self.path)

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise LedgerUnavailable("the policy ledger is not open")
        return self._db

    def _write(self) -> _Transaction:
        return _Transaction(self._conn)

    # -- admissions ----------------------------------------------------------------------------------------------

    async def reserve(self, order: Order) -> Admission:
        db = self._conn
        with self._write():
            row = db.execute(f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE id = ?",
                             (order.reservation_id,)).fetchone()
            read = [self._read_limits(subject) for subject in order.subjects]
            both = (read[0], read[1])
            if row is not None:
                found = _reservation(row)
                if found.key_id != order.key_id:
                    raise AlreadyExists(f"reservation_id: {order.reservation_id} is another request's reservation")
                return Admission(found, repeated=True, limits=both)
            counted = self._counted_already(order)
            now = order.now_ms
            expired = self._expire_due(now, EXPIRE_BATCH)
            refusals: list[Refusal] = []
            windows: dict[str, list[tuple[int, int, int]]] = {}  # of the subjects with a limit
            for subject, column, value, limits in zip(order.subjects, ("key_id", "tenant"),
                                                      (order.key_id, order.tenant), both, strict=True):
                db.execute("DELETE FROM window_entries WHERE subject = ? AND at_ms <= ?",
                           (subject, now - order.window_ms))
                if limits.unlimited:
                    continue
                window = windows[subject] = db.execute(
                    "SELECT at_ms, tokens, requests FROM window_entries WHERE subject = ? ORDER BY at_ms, "
                    "reservation_id", (subject,)).fetchall()
                counters = {str(label): (int(spent), int(reserved)) for label, spent, reserved in db.execute(
                    "SELECT label, spent, reserved FROM counters WHERE subject = ?", (subject,))}
                first_end = db.execute(f"SELECT MIN(lease_until_ms) FROM reservations WHERE state = 'open' AND "
                                       f"{column} = ?", (value,)).fetchone()[0]
                refusals += refusals_for(order, subject, limits, window, counters, first_end, now,
                                         counts_request=subject not in counted)
            refusal = most_waiting(refusals)
            if refusal is not None:
                return Admission(None, refusal, tuple(expired), limits=both)
            labels = [p.label for p in order.periods.values()]
            reservation = Reservation(order.reservation_id, order.key_id, order.tenant, order.model,
                                      order.prompt_tokens, order.max_tokens, order.tokens, 0, State.OPEN, now,
                                      now + order.lease_ms, order.trace_id)
            db.execute(f"INSERT INTO reservations ({_RESERVATION_COLUMNS}, labels) VALUES "
                       "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (reservation.id, reservation.key_id, reservation.tenant, reservation.model,
                        reservation.prompt_tokens, reservation.max_tokens, reservation.reserved, 0, State.OPEN.value,
                        now, reservation.lease_until_ms, reservation.trace_id, ",".join(labels)))
            for subject in order.subjects:
                db.execute("INSERT INTO window_entries (subject, reservation_id, at_ms, tokens, requests) "
                           "VALUES (?, ?, ?, ?, ?)",
                           (subject, reservation.id, now, reservation.reserved, int(subject not in counted)))
                for label in labels:
                    self._count(subject, label, 0, reservation.reserved)
            key_window = None
            if both[0].requests_per_minute or both[0].tokens_per_minute:
                window = windows[order.subjects[0]]
                requests = sum(r for _, _, r in window) + int(order.subjects[0] not in counted)
                key_window = WindowUse(requests, sum(t for _, t, _ in window) + reservation.reserved,
                                       (window[0][0] - now if window else 0) + order.window_ms)
            return Admission(reservation, None, tuple(expired), limits=both, key_window=key_window)

    def _counted_already(self, order: Order) -> set[str]:
        """The subjects whose windows already counted the request `order` continues: its key's, and its tenant's
        when the key is still in it. None when it continues nothing or a reservation this ledger does not hold."""
        if not order.continues:
            return set()
        row = self._conn.execute("SELECT key_id, tenant FROM reservations WHERE id = ?",
                                 (order.continues,)).fetchone()
        if row is None:
            return set()
        if row[0] != order.key_id:
            raise InvalidArgument("continues", f"{order.continues} is another key's reservation")
        key, tenant = order.subjects
        return {key, tenant} if row[1] == order.tenant else {key}

    def _read_limits(self, subject: str) -> Limits:
        return _limits(self._conn.execute(
            "SELECT requests_per_minute, tokens_per_minute, budget_tokens, budget_period FROM limits WHERE subject = ?",
            (subject,)).fetchone())

    def _count(self, subject: str, label: str, spent: int, reserved: int) -> None:
        self._conn.execute(
            "INSERT INTO counters (subject, label, spent, reserved) VALUES (?, ?, ?, ?) ON CONFLICT (subject, label) "
            "DO UPDATE SET spent = spent + excluded.spent, reserved = reserved + excluded.reserved",
            (subject, label, spent, reserved))

    def _labels(self, reservation_id: str) -> list[str]:
        row = self._conn.execute("SELECT labels FROM reservations WHERE id = ?", (reservation_id,)).fetchone()
        return str(row[0]).split(",") if row else []

    def _subjects(self, reservation: Reservation) -> tuple[str, str]:
        return f"key:{reservation.key_id}", f"tenant:{reservation.tenant}"

    def _expire_due(self, now: int, limit: int) -> list[Reservation]:
        db = self._conn
        rows = db.execute(f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE state = 'open' AND "
                          "lease_until_ms <= ? ORDER BY lease_until_ms LIMIT ?", (now, limit)).fetchall()
        expired = []
        for row in rows:
            reservation = _reservation(row)
            labels = self._labels(reservation.id)
            for subject in self._subjects(reservation):
                for label in labels:
                    self._count(subject, label, reservation.reserved, -reservation.reserved)
            db.execute("UPDATE reservations SET state = 'expired', charged = reserved, ended_ms = ? WHERE id = ?",
                       (now, reservation.id))
            expired.append(Reservation(**{**reservation.__dict__, "state": State.EXPIRED,
                                          "charged": reservation.reserved}))
        return expired

    async def expire_due(self, now_ms: int, limit: int = EXPIRE_BATCH) -> list[Reservation]:
        with self._write():
            return self._expire_due(now_ms, limit)

    async def renew(self, reservation_id: str, now_ms: int, lease_ms: int) -> Reservation:
        with self._write():
            self._conn.execute("UPDATE reservations SET lease_until_ms = ? WHERE id = ? AND state = 'open'",
                               (now_ms + lease_ms, reservation_id))
            return self._get(reservation_id)

    async def settle(self, reservation_id: str, used_tokens: int, now_ms: int) -> Settlement:
        db = self._conn
        with self._write():
            reservation = self._get(reservation_id)
            if reservation.state == State.SETTLED:
                return Settlement(reservation, State.SETTLED)
            used = min(max(used_tokens, 0), reservation.reserved)
            labels = self._labels(reservation_id)
            for subject in self._subjects(reservation):
                for label in labels:
                    if reservation.state == State.OPEN:
                        self._count(subject, label, used, -reservation.reserved)
                    else:  # expired: charged in full then, corrected now
                        self._count(subject, label, used - reservation.charged, 0)
                db.execute("UPDATE window_entries SET tokens = ? WHERE subject = ? AND reservation_id = ?",
                           (used, subject, reservation_id))
            db.execute("UPDATE reservations SET state = 'settled', charged = ?, ended_ms = ? WHERE id = ?",
                       (used, now_ms, reservation_id))
            return Settlement(self._get(reservation_id), reservation.state)

    def _get(self, reservation_id: str) -> Reservation:
        row = self._conn.execute(f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE id = ?",
                                 (reservation_id,)).fetchone()
        if row is None:
            raise NotFound(f"no reservation {reservation_id}")
        return _reservation(row)

    async def get(self, reservation_id: str) -> Reservation:
        return self._get(reservation_id)

    async def purge(self, now_ms: int, window_ms: int) -> None:
        with self._write():
            db = self._conn
            db.execute("DELETE FROM reservations WHERE state != 'open' AND ended_ms < ?", (now_ms - RETENTION_MS,))
            db.execute("DELETE FROM window_entries WHERE at_ms <= ?", (now_ms - window_ms,))
            oldest_day = periods_at(now_ms - DAY_COUNTERS_KEPT_MS)[Period.DAY].label
            db.execute("DELETE FROM counters WHERE label LIKE 'd:%' AND label < ? AND reserved = 0", (oldest_day,))

    # -- limits and usage ------------------------------------------------------------------------------------------

    async def get_limits(self, subjects: Sequence[str]) -> dict[str, Limits]:
        return {subject: self._read_limits(subject) for subject in subjects}

    async def set_limits(self, subject: str, limits: Limits, now_ms: int) -> None:
        with self._write():
            self._conn.execute(
                "INSERT INTO limits (subject, requests_per_minute, tokens_per_minute, budget_tokens, budget_period, "
                "update_time_unix_ms) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (subject) DO UPDATE SET "
                "requests_per_minute = excluded.requests_per_minute, tokens_per_minute = excluded.tokens_per_minute, "
                "budget_tokens = excluded.budget_tokens, budget_period = excluded.budget_period, "
                "update_time_unix_ms = excluded.update_time_unix_ms",
                (subject, limits.requests_per_minute, limits.tokens_per_minute, limits.budget_tokens,
                 limits.budget_period.value, now_ms))

    async def limited_subjects(self, prefix: str) -> list[str]:
        return [str(row[0]) for row in self._conn.execute(
            "SELECT subject FROM limits WHERE substr(subject, 1, ?) = ? ORDER BY subject", (len(prefix), prefix))]

    async def subject_state(self, subject: str, now_ms: int, window_ms: int) -> SubjectState:
        db = self._conn
        limits = (await self.get_limits([subject]))[subject]
        periods: Iterable[PeriodWindow] = periods_at(now_ms).values()
        usage = []
        for period in periods:
            row = db.execute("SELECT spent, reserved FROM counters WHERE subject = ? AND label = ?",
                             (subject, period.label)).fetchone()
            usage.append(CounterUsage(period, int(row[0]) if row else 0, int(row[1]) if row else 0))
        count, tokens = db.execute("SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(tokens), 0) FROM window_entries "
                                   "WHERE subject = ? AND at_ms > ?", (subject, now_ms - window_ms)).fetchone()
        return SubjectState(subject, limits, tuple(usage), int(count), int(tokens))


class _Transaction:
    """`BEGIN IMMEDIATE` … `COMMIT` (ROLLBACK on an exception): one atomic step, also across processes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:  # locked past busy_timeout by another process, disk trouble
            raise LedgerUnavailable(f"the policy ledger cannot be written: {exc}") from None

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
