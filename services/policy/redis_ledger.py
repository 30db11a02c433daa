"""The ledger in Redis, shared by several policy replicas: every step that reads and changes counters is one Lua
script, which Redis runs atomically (no other command runs meanwhile), so two replicas admitting at the same
moment cannot both take the last tokens of a budget.

Time: the scripts take the Redis server's clock (`TIME`) for windows and leases, so replicas whose clocks differ
still share one window; the budget periods' labels (the UTC day and month) come from the replica's clock, which
matters only within its skew of midnight. Tests inject a clock instead (`clock=`), which the scripts then use.

Keys, under a prefix (`lmesh:` by default; one Redis may serve several meshes with different prefixes):

    limits:<subject>          hash  rpm, tpm, budget, period          (limited: the set of subjects that have some)
    res:<id>                  hash  the reservation (expires 24 h after it ends)
    leases                    zset  open reservation id → lease end (what the sweeper expires)
    open:<subject>            zset  the subject's open reservation ids → lease end
    win:<subject>             zset  reservation id → admission time (the sliding window's requests)
    wcont:<subject>           zset  the same for continuations (Order.continues): tokens, no request
    wtok:<subject>            hash  reservation id → its tokens in the window (both zsets'), and `_sum`
    ctr:<subject>:<label>     hash  spent, reserved for a period label (d:2026-12-06, m:2026-12, all)

A standalone Redis (or one behind Sentinel): the scripts reach keys named inside them, which Redis Cluster does
not allow.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from services.policy.ledger import EXPIRE_BATCH, RETENTION_MS, LedgerUnavailable
from services.policy.limits import (
    Admission,
    Clock,
    CounterUsage,
    Limits,
    Order,
    Period,
    Refusal,
    Reservation,
    Settlement,
    State,
    SubjectState,
    WindowUse,
    most_waiting,
    now_ms,
    periods_at,
)

log = logging.getLogger("lmesh.policy")
T = TypeVar("T")

MAX_CONNECTIONS = 32
DAY_COUNTER_TTL_MS = 62 * 86_400_000
MONTH_COUNTER_TTL_MS = 400 * 86_400_000

# Shared by every script: ARGV[1] is the key prefix, ARGV[2] the caller's clock (-1: the server's).
_PRELUDE = """
local P = ARGV[1]
local function clock()
  local given = tonumber(ARGV[2])
  if given and given >= 0 then return given end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local FIELDS = {'key_id', 'tenant', 'model', 'prompt', 'max', 'reserved', 'charged', 'state', 'created', 'lease',
                'trace'}
local function res_get(id)
  local v = redis.call('HMGET', P .. 'res:' .. id, unpack(FIELDS))
  if not v[1] then return nil end
  return {id, v[1], v[2], v[3], tonumber(v[4]), tonumber(v[5]), tonumber(v[6]), tonumber(v[7]), v[8],
          tonumber(v[9]), tonumber(v[10]), v[11]}
end
local function subjects(key_id, tenant) return {'key:' .. key_id, 'tenant:' .. tenant} end
local function count(s, label, spent, reserved)
  local k = P .. 'ctr:' .. s .. ':' .. label
  if spent ~= 0 then redis.call('HINCRBY', k, 'spent', spent) end
  if reserved ~= 0 then redis.call('HINCRBY', k, 'reserved', reserved) end
  if spent == 0 and reserved == 0 then redis.call('HINCRBY', k, 'spent', 0) end
  if string.sub(label, 1, 2) == 'd:' then redis.call('PEXPIRE', k, @DAY_TTL@)
  elseif string.sub(label, 1, 2) == 'm:' then redis.call('PEXPIRE', k, @MONTH_TTL@) end
end
local function expire_due(now, n)
  local ids = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now, 'LIMIT', 0, n)
  local out = {}
  for _, id in ipairs(ids) do
    local k = P .. 'res:' .. id
    local r = redis.call('HMGET', k, 'key_id', 'tenant', 'reserved', 'state', 'labels')
    redis.call('ZREM', P .. 'leases', id)
    if r[4] == 'open' then
      local reserved = tonumber(r[3])
      for _, s in ipairs(subjects(r[1], r[2])) do
        for label in string.gmatch(r[5], '[^,]+') do count(s, label, reserved, -reserved) end
        redis.call('ZREM', P .. 'open:' .. s, id)
      end
      redis.call('HSET', k, 'state', 'expired', 'charged', reserved, 'ended', now)
      redis.call('PEXPIRE', k, @RETENTION@)
      table.insert(out, res_get(id))
    end
  end
  return out
end
"""

# ARGV: 3 id, 4 key_id, 5 tenant, 6 model, 7 prompt, 8 max, 9 lease_ms, 10 window_ms, 11 trace, 12 labels
# (comma-separated), 13 day label, 14 day end, 15 month label, 16 month end, 17 expire batch, 18 the reservation it
# continues ('' none). Returns {'conflict'} | {'foreign'} (it continues another key's reservation) |
# {'repeated', reservation, limits} | {'refused', expired, refusals, limits} |
# {'admitted', expired, now, key window, limits}; limits: rpm, tpm, budget, period of the key, then of the tenant
# ('' unset); key window: requests, tokens, and ms until the oldest leaves, of the key's window with this admission.
# A refusal: {subject, limit, value, used, held, asked, retry_ms (-1: never), period}.
_RESERVE = _PRELUDE + """
local id, key_id, tenant = ARGV[3], ARGV[4], ARGV[5]
local limits = {}
for _, s in ipairs(subjects(key_id, tenant)) do
  local L = redis.call('HMGET', P .. 'limits:' .. s, 'rpm', 'tpm', 'budget', 'period')
  for i = 1, 4 do table.insert(limits, L[i] or '') end
end
local existing = res_get(id)
if existing then
  if existing[2] ~= key_id then return {'conflict'} end
  return {'repeated', existing, limits}
end
-- The subjects whose windows already counted the request this one continues (none: a request of its own).
local counted = {}
if ARGV[18] ~= '' then
  local c = redis.call('HMGET', P .. 'res:' .. ARGV[18], 'key_id', 'tenant')
  if c[1] then
    if c[1] ~= key_id then return {'foreign'} end
    counted['key:' .. key_id] = true
    if c[2] == tenant then counted['tenant:' .. tenant] = true end
  end
end
local prompt, max_tokens = tonumber(ARGV[7]), tonumber(ARGV[8])
local lease_ms, width = tonumber(ARGV[9]), tonumber(ARGV[10])
local periods = {day = {ARGV[13], tonumber(ARGV[14])}, month = {ARGV[15], tonumber(ARGV[16])}, none = {'all', 0}}
local need = prompt + max_tokens
local now = clock()
local expired = expire_due(now, tonumber(ARGV[17]))
local refusals = {}
for _, s in ipairs(subjects(key_id, tenant)) do
  local wk, ck, tk = P .. 'win:' .. s, P .. 'wcont:' .. s, P .. 'wtok:' .. s
  for _, z in ipairs({wk, ck}) do
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', now - width)
    if #old > 0 then
      local sum = tonumber(redis.call('HGET', tk, '_sum') or '0')
      for _, gone in ipairs(old) do
        sum = sum - tonumber(redis.call('HGET', tk, gone) or '0')
        redis.call('HDEL', tk, gone)
      end
      redis.call('HSET', tk, '_sum', sum)
      redis.call('ZREMRANGEBYSCORE', z, '-inf', now - width)
    end
  end
  local L = redis.call('HMGET', P .. 'limits:' .. s, 'rpm', 'tpm', 'budget', 'period')
  local rpm, tpm, budget, period = tonumber(L[1] or '0'), tonumber(L[2] or '0'), tonumber(L[3] or '0'), L[4] or 'none'
  if rpm > 0 and not counted[s] then
    local n = redis.call('ZCARD', wk)
    if n + 1 > rpm then
      local e = redis.call('ZRANGE', wk, n - rpm, n - rpm, 'WITHSCORES')
      table.insert(refusals, {s, 'requests_per_minute', rpm, n, 0, 1, math.max(1, tonumber(e[2]) + width - now),
                              period})
    end
  end
  if tpm > 0 then
    local total = tonumber(redis.call('HGET', tk, '_sum') or '0')
    if need > tpm then
      table.insert(refusals, {s, 'tokens_per_minute', tpm, total, 0, need, -1, period})
    elseif total + need > tpm then
      local excess, freed, retry = total + need - tpm, 0, 1
      local entries = {}
      for _, z in ipairs({wk, ck}) do
        local e = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
        for i = 1, #e, 2 do table.insert(entries, {e[i], tonumber(e[i + 1])}) end
      end
      table.sort(entries, function(a, b) return a[2] < b[2] or (a[2] == b[2] and a[1] < b[1]) end)
      for _, e in ipairs(entries) do
        freed = freed + tonumber(redis.call('HGET', tk, e[1]) or '0')
        if freed >= excess then retry = math.max(1, e[2] + width - now); break end
      end
      table.insert(refusals, {s, 'tokens_per_minute', tpm, total, 0, need, retry, period})
    end
  end
  if budget > 0 then
    local label, period_end = periods[period][1], periods[period][2]
    local c = redis.call('HMGET', P .. 'ctr:' .. s .. ':' .. label, 'spent', 'reserved')
    local spent, reserved = tonumber(c[1] or '0'), tonumber(c[2] or '0')
    local retry = nil
    if need > budget then
      retry = -1
    elseif spent + need > budget then
      if period_end > 0 then retry = math.max(1, period_end - now) else retry = -1 end
    elseif spent + reserved + need > budget then
      local soonest = -1
      local first = redis.call('ZRANGE', P .. 'open:' .. s, 0, 0, 'WITHSCORES')
      if #first > 0 then soonest = tonumber(first[2]) end
      if period_end > 0 and (soonest < 0 or period_end < soonest) then soonest = period_end end
      if soonest >= 0 then retry = math.max(1, soonest - now) else retry = -1 end
    end
    if retry then table.insert(refusals, {s, 'budget_tokens', budget, spent, reserved, need, retry, period}) end
  end
end
if #refusals > 0 then return {'refused', expired, refusals, limits} end
local lease = now + lease_ms
redis.call('HSET', P .. 'res:' .. id, 'key_id', key_id, 'tenant', tenant, 'model', ARGV[6], 'prompt', prompt,
           'max', max_tokens, 'reserved', need, 'charged', 0, 'state', 'open', 'created', now, 'lease', lease,
           'trace', ARGV[11], 'labels', ARGV[12])
redis.call('ZADD', P .. 'leases', lease, id)
for _, s in ipairs(subjects(key_id, tenant)) do
  local wk, tk = P .. 'win:' .. s, P .. 'wtok:' .. s
  if counted[s] then wk = P .. 'wcont:' .. s end
  redis.call('ZADD', wk, now, id)
  redis.call('HSET', tk, id, need)
  redis.call('HINCRBY', tk, '_sum', need)
  redis.call('PEXPIRE', wk, width)
  redis.call('PEXPIRE', tk, width)
  redis.call('ZADD', P .. 'open:' .. s, lease, id)
  for label in string.gmatch(ARGV[12], '[^,]+') do count(s, label, 0, need) end
end
local kw, kt = P .. 'win:key:' .. key_id, P .. 'wtok:key:' .. key_id
local oldest = now
for _, z in ipairs({kw, P .. 'wcont:key:' .. key_id}) do
  local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
  if #first > 0 and tonumber(first[2]) < oldest then oldest = tonumber(first[2]) end
end
local window = {redis.call('ZCARD', kw), tonumber(redis.call('HGET', kt, '_sum') or '0'), oldest + width - now}
return {'admitted', expired, now, window, limits}
"""

# ARGV: 3 id, 4 used tokens. Returns {'missing'} | {previous state, reservation}.
_SETTLE = _PRELUDE + """
local id = ARGV[3]
local k = P .. 'res:' .. id
local r = redis.call('HMGET', k, 'key_id', 'tenant', 'reserved', 'charged', 'state', 'labels')
if not r[1] then return {'missing'} end
if r[5] == 'settled' then return {'settled', res_get(id)} end
local now = clock()
local reserved, charged = tonumber(r[3]), tonumber(r[4])
local used = math.min(math.max(tonumber(ARGV[4]), 0), reserved)
for _, s in ipairs(subjects(r[1], r[2])) do
  for label in string.gmatch(r[6], '[^,]+') do
    if r[5] == 'open' then count(s, label, used, -reserved) else count(s, label, used - charged, 0) end
  end
  local tk = P .. 'wtok:' .. s
  local old = redis.call('HGET', tk, id)
  if old then
    redis.call('HSET', tk, id, used)
    redis.call('HINCRBY', tk, '_sum', used - tonumber(old))
  end
  redis.call('ZREM', P .. 'open:' .. s, id)
end
redis.call('ZREM', P .. 'leases', id)
redis.call('HSET', k, 'state', 'settled', 'charged', used, 'ended', now)
redis.call('PEXPIRE', k, @RETENTION@)
return {r[5], res_get(id)}
"""

# ARGV: 3 id, 4 lease_ms. Returns {'missing'} | {'ok', reservation}.
_RENEW = _PRELUDE + """
local id = ARGV[3]
local k = P .. 'res:' .. id
local r = redis.call('HMGET', k, 'key_id', 'tenant', 'state')
if not r[1] then return {'missing'} end
if r[3] == 'open' then
  local lease = clock() + tonumber(ARGV[4])
  redis.call('HSET', k, 'lease', lease)
  redis.call('ZADD', P .. 'leases', lease, id)
  for _, s in ipairs(subjects(r[1], r[2])) do redis.call('ZADD', P .. 'open:' .. s, 'XX', lease, id) end
end
return {'ok', res_get(id)}
"""

# ARGV: 3 batch. Returns the reservations it expired.
_EXPIRE = _PRELUDE + """
return expire_due(clock(), tonumber(ARGV[3]))
"""

# ARGV: 3 subject, 4 window_ms, 5 day label, 6 month label. Returns {rpm, tpm, budget, period, requests, tokens,
# day spent, day reserved, month spent, month reserved, all spent, all reserved}.
_STATE = _PRELUDE + """
local s, width = ARGV[3], tonumber(ARGV[4])
local now = clock()
local L = redis.call('HMGET', P .. 'limits:' .. s, 'rpm', 'tpm', 'budget', 'period')
local requests, tokens = 0, 0
for _, z in ipairs({'win:', 'wcont:'}) do
  local live = redis.call('ZRANGEBYSCORE', P .. z .. s, '(' .. (now - width), '+inf')
  for _, id in ipairs(live) do
    if z == 'win:' then requests = requests + 1 end
    tokens = tokens + tonumber(redis.call('HGET', P .. 'wtok:' .. s, id) or '0')
  end
end
local out = {tonumber(L[1] or '0'), tonumber(L[2] or '0'), tonumber(L[3] or '0'), L[4] or 'none', requests, tokens}
for _, label in ipairs({ARGV[5], ARGV[6], 'all'}) do
  local c = redis.call('HMGET', P .. 'ctr:' .. s .. ':' .. label, 'spent', 'reserved')
  table.insert(out, tonumber(c[1] or '0'))
  table.insert(out, tonumber(c[2] or '0'))
end
return out
"""

_CONSTANTS = {"@DAY_TTL@": DAY_COUNTER_TTL_MS, "@MONTH_TTL@": MONTH_COUNTER_TTL_MS, "@RETENTION@": RETENTION_MS}


def _lua(source: str) -> str:
    for name, value in _CONSTANTS.items():
        source = source.replace(name, str(value))
    return source


def _reservation(values: Sequence[Any]) -> Reservation:
    rid, key_id, tenant, model, prompt, max_tokens, reserved, charged, state, created, lease, trace = values
    return Reservation(id=str(rid), key_id=str(key_id), tenant=str(tenant), model=str(model or ""),
                       prompt_tokens=int(prompt), max_tokens=int(max_tokens), reserved=int(reserved),
                       charged=int(charged), state=State(str(state)), created_ms=int(created),
                       lease_until_ms=int(lease), trace_id=str(trace or ""))


class RedisLedger:
    """The ledger in Redis at `url` (redis://[:password@]host:port/db, rediss:// for TLS). Every operation that
    cannot reach it raises LedgerUnavailable within `timeout_s`."""

    def __init__(self, url: str, *, prefix: str = "lmesh:", timeout_s: float = 2.0, clock: Clock | None = None) -> None:
        self.url = url
        self.prefix = prefix
        self._timeout_s = timeout_s
        self._clock = clock
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}

    def _now(self) -> int:
        return now_ms(self._clock) if self._clock is not None else -1

    async def open(self) -> None:
        if self._redis is not None:
            return
        import redis.asyncio as aioredis

        # A bounded pool that makes a burst wait for a connection (each script takes well under a millisecond)
        # instead of failing it.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, decode_responses=True, socket_timeout=self._timeout_s, socket_connect_timeout=self._timeout_s,
            health_check_interval=30, max_connections=MAX_CONNECTIONS, timeout=self._timeout_s)
        self._redis = aioredis.Redis(connection_pool=pool)
        for name, source in (("reserve", _RESERVE), ("settle", _SETTLE), ("renew", _RENEW), ("expire", _EXPIRE),
                             ("state", _STATE)):
            self._scripts[name] = self._redis.register_script(_lua(source))
        log.info("policy ledger in Redis at %s (prefix %r)", _without_password(self.url), self.prefix)
        try:
            await self._run(self._redis.ping)
        except LedgerUnavailable as exc:  # not fatal: admissions fail closed (or open) until it answers
            log.warning("%s", exc.message)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose(close_connection_pool=True)
            self._redis = None

    async def _run(self, work: Callable[[], Awaitable[T]]) -> T:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import ResponseError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if self._redis is None:
            raise LedgerUnavailable("the policy ledger is not open")
        try:
            return await work()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise LedgerUnavailable(f"the policy ledger (Redis) is unreachable: {exc}") from None
        except ResponseError as exc:  # e.g. a Redis that is loading its data, or read-only after a failover
            raise LedgerUnavailable(f"the policy ledger (Redis) refused: {exc}") from None

    async def _script(self, name: str, *args: object) -> Any:
        script = self._scripts[name]
        return await self._run(lambda: script(keys=[], args=[self.prefix, self._now(), *args]))

    # -- admissions ----------------------------------------------------------------------------------------------

    async def reserve(self, order: Order) -> Admission:
        from services.common.errors import AlreadyExists, InvalidArgument

        day, month = order.periods[Period.DAY], order.periods[Period.MONTH]
        labels = ",".join(p.label for p in order.periods.values())
        answer = await self._script("reserve", order.reservation_id, order.key_id, order.tenant, order.model,
                                    order.prompt_tokens, order.max_tokens, order.lease_ms, order.window_ms,
                                    order.trace_id, labels, day.label, day.end_ms, month.label, month.end_ms,
                                    EXPIRE_BATCH, order.continues)
        kind = answer[0]
        if kind == "conflict":
            raise AlreadyExists(f"reservation_id: {order.reservation_id} is another request's reservation")
        if kind == "foreign":
            raise InvalidArgument("continues", f"{order.continues} is another key's reservation")
        values = [v if v != "" else None for v in answer[-1]]
        limits = (_limits(values[:4]), _limits(values[4:]))
        if kind == "repeated":
            return Admission(_reservation(answer[1]), repeated=True, limits=limits)
        expired = tuple(_reservation(r) for r in answer[1])
        if kind == "refused":
            refusals = [Refusal(subject=str(s), limit=str(limit), value=int(value), used=int(used), held=int(held),
                                asked=int(asked), retry_after_ms=None if int(retry) < 0 else int(retry),
                                period=Period(str(period)))
                        for s, limit, value, used, held, asked, retry, period in answer[2]]
            return Admission(None, most_waiting(refusals), expired, limits=limits)
        now = int(answer[2])
        key_window = WindowUse(*(int(v) for v in answer[3])) if limits[0].requests_per_minute or \
            limits[0].tokens_per_minute else None
        return Admission(Reservation(order.reservation_id, order.key_id, order.tenant, order.model,
                                     order.prompt_tokens, order.max_tokens, order.tokens, 0, State.OPEN, now,
                                     now + order.lease_ms, order.trace_id), None, expired, limits=limits,
                         key_window=key_window)

    async def renew(self, reservation_id: str, now_ms: int, lease_ms: int) -> Reservation:
        answer = await self._script("renew", reservation_id, lease_ms)
        if answer[0] == "missing":
            raise _missing(reservation_id)
        return _reservation(answer[1])

    async def settle(self, reservation_id: str, used_tokens: int, now_ms: int) -> Settlement:
        answer = await self._script("settle", reservation_id, used_tokens)
        if answer[0] == "missing":
            raise _missing(reservation_id)
        return Settlement(_reservation(answer[1]), State(str(answer[0])))

    async def expire_due(self, now_ms: int, limit: int = EXPIRE_BATCH) -> list[Reservation]:
        return [_reservation(r) for r in await self._script("expire", limit)]

    async def purge(self, now_ms: int, window_ms: int) -> None:
        """Nothing to do: ended reservations, idle windows and old day counters expire by themselves."""

    async def get(self, reservation_id: str) -> Reservation:
        fields = ("key_id", "tenant", "model", "prompt", "max", "reserved", "charged", "state", "created", "lease",
                  "trace")
        values = await self._run(lambda: self._redis.hmget(f"{self.prefix}res:{reservation_id}", fields))
        if values[0] is None:
            raise _missing(reservation_id)
        return _reservation([reservation_id, *values])

    # -- limits and usage ------------------------------------------------------------------------------------------

    async def get_limits(self, subjects: Sequence[str]) -> dict[str, Limits]:
        async def read() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for subject in subjects:
                pipe.hmget(f"{self.prefix}limits:{subject}", ("rpm", "tpm", "budget", "period"))
            return list(await pipe.execute())

        rows = await self._run(read)
        return {subject: _limits(row) for subject, row in zip(subjects, rows, strict=True)}

    async def set_limits(self, subject: str, limits: Limits, now_ms: int) -> None:
        async def write() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(f"{self.prefix}limits:{subject}", mapping={
                "rpm": limits.requests_per_minute, "tpm": limits.tokens_per_minute, "budget": limits.budget_tokens,
                "period": limits.budget_period.value})
            pipe.sadd(f"{self.prefix}limited", subject)
            await pipe.execute()

        await self._run(write)

    async def limited_subjects(self, prefix: str) -> list[str]:
        members = await self._run(lambda: self._redis.smembers(f"{self.prefix}limited"))
        return sorted(m for m in members if m.startswith(prefix))

    async def subject_state(self, subject: str, now_ms: int, window_ms: int) -> SubjectState:
        periods = periods_at(now_ms)
        values = await self._script("state", subject, window_ms, periods[Period.DAY].label,
                                    periods[Period.MONTH].label)
        rpm, tpm, budget, period, requests, tokens, *counters = values
        usage = tuple(CounterUsage(periods[p], int(counters[2 * i]), int(counters[2 * i + 1]))
                      for i, p in enumerate((Period.DAY, Period.MONTH, Period.NONE)))
        return SubjectState(subject, Limits(int(rpm), int(tpm), int(budget), Period(str(period))), usage,
                            int(requests), int(tokens))


def _limits(row: Sequence[Any]) -> Limits:
    rpm, tpm, budget, period = row
    if rpm is None:
        return Limits()
    return Limits(int(rpm), int(tpm), int(budget), Period(str(period)))


def _missing(reservation_id: str) -> Exception:
    from services.common.errors import NotFound

    return NotFound(f"no reservation {reservation_id}")


def _without_password(url: str) -> str:
    """The URL as a log line may show it: no password."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password:
            host = parts.hostname or ""
            netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparseable URL>"
    return url
