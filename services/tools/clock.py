"""Dates, times and IANA time zones (zoneinfo; the `tzdata` package supplies the database where the system has
none). ISO 8601 in and out."""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo

from services.common.errors import InvalidArgument

_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+){0,2}")
MAX_TEXT = 64
# Amounts beyond this many seconds leave years 1..9999 whatever the start; refusing them early keeps
# timedelta from overflowing with an unhelpful message.
MAX_SPAN_S = 10_000 * 366 * 86_400


def zone(name: str, field: str) -> tzinfo:
    """The IANA zone `name` ("Europe/Paris"; empty or "UTC": UTC)."""
    text = name.strip()
    if not text or text.upper() in ("UTC", "Z", "GMT"):
        return UTC
    if len(text) > MAX_TEXT or not _ZONE_NAME.fullmatch(text) or ".." in text:
        raise InvalidArgument(field, f"not an IANA time zone name: {text[:MAX_TEXT]!r} (e.g. Europe/Paris)")
    try:
        return zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidArgument(field, f"unknown time zone {text!r}: use an IANA name such as America/New_York"
                              ) from None


def zone_name(tz: tzinfo | None) -> str:
    if tz is None or tz is UTC:
        return "UTC"
    return getattr(tz, "key", None) or str(tz)


def parse_datetime(text: str, field: str, default_zone: tzinfo) -> datetime:
    """An ISO 8601 date-time or date (midnight); without an offset it is read in `default_zone`."""
    cleaned = text.strip()
    if not cleaned or len(cleaned) > MAX_TEXT:
        raise InvalidArgument(field, "empty" if not cleaned else f"longer than {MAX_TEXT} characters")
    try:
        parsed = datetime.fromisoformat(cleaned)
    except ValueError:
        raise InvalidArgument(field, f"not an ISO 8601 date-time: {cleaned!r} (e.g. 2024-03-10T14:30:00 or "
                                     "2024-03-10T14:30:00+01:00)") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=default_zone)


@dataclass(frozen=True)
class Moment:
    value: datetime
    zone: str

    @property
    def iso(self) -> str:
        return self.value.isoformat()

    @property
    def utc_offset(self) -> str:
        offset = self.value.utcoffset() or timedelta(0)
        sign = "-" if offset < timedelta(0) else "+"
        minutes = abs(int(offset.total_seconds())) // 60
        return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"

    @property
    def day_of_week(self) -> str:
        return self.value.strftime("%A")

    @property
    def daylight_saving(self) -> bool:
        return bool(self.value.dst())


def now(timezone: str, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> Moment:
    tz = zone(timezone, "timezone")
    return Moment(clock().astimezone(tz), zone_name(tz))


def convert_time_zone(value: str, from_timezone: str, to_timezone: str) -> Moment:
    source = zone(from_timezone, "from_timezone")
    target = zone(to_timezone, "to_timezone")
    moment = parse_datetime(value, "datetime", source)
    return Moment(moment.astimezone(target), zone_name(target))


def add_duration(value: str, *, weeks: int = 0, days: int = 0, hours: int = 0, minutes: int = 0,
                 seconds: int = 0, timezone: str = "") -> Moment:
    """Wall-clock arithmetic in `timezone` (default: the date-time's own offset, or UTC): adding a day across a
    daylight-saving change keeps the time of day."""
    tz = zone(timezone, "timezone") if timezone.strip() else None
    moment = parse_datetime(value, "datetime", tz or UTC)
    if tz is not None:
        moment = moment.astimezone(tz)
    for field, amount, unit_s in (("weeks", weeks, 604_800), ("days", days, 86_400), ("hours", hours, 3600),
                                  ("minutes", minutes, 60), ("seconds", seconds, 1)):
        if abs(amount) * unit_s > MAX_SPAN_S:
            raise InvalidArgument(field, f"{amount} {field} leaves the years 1 to 9999")
    delta = timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)
    try:
        # Naive arithmetic on the wall clock, then the zone's offset for the new wall time.
        shifted = (moment.replace(tzinfo=None) + delta).replace(tzinfo=moment.tzinfo)
    except OverflowError:
        raise InvalidArgument("days", "the result leaves the years 1 to 9999") from None
    if tz is not None:
        shifted = shifted.astimezone(UTC).astimezone(tz)  # normalizes a wall time that a DST gap skipped
    return Moment(shifted, zone_name(shifted.tzinfo))


@dataclass(frozen=True)
class Difference:
    total_seconds: int

    def parts(self) -> tuple[int, int, int, int]:
        sign = -1 if self.total_seconds < 0 else 1
        rest = abs(self.total_seconds)
        days, rest = divmod(rest, 86_400)
        hours, rest = divmod(rest, 3600)
        minutes, seconds = divmod(rest, 60)
        return sign * days, sign * hours, sign * minutes, sign * seconds

    @property
    def human_readable(self) -> str:
        days, hours, minutes, seconds = (abs(part) for part in self.parts())
        sign = "-" if self.total_seconds < 0 else ""

        def unit(n: int, name: str) -> str:
            return f"{n} {name}{'' if n == 1 else 's'}"

        return sign + ", ".join((unit(days, "day"), unit(hours, "hour"), unit(minutes, "minute"),
                                 unit(seconds, "second")))


def difference(start: str, end: str, timezone: str = "") -> Difference:
    tz = zone(timezone, "timezone")
    first = parse_datetime(start, "start", tz)
    last = parse_datetime(end, "end", tz)
    # In UTC: Python subtracts two datetimes of the same tzinfo as wall times, ignoring a DST change between.
    return Difference(int((last.astimezone(UTC) - first.astimezone(UTC)).total_seconds()))


@dataclass(frozen=True)
class Weekday:
    day_of_week: str
    iso_week: int
    day_of_year: int
    is_weekend: bool


def day_of_week(value: str) -> Weekday:
    cleaned = value.strip()
    try:
        parsed = date.fromisoformat(cleaned) if len(cleaned) <= 10 else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise InvalidArgument("date", f"not a date in YYYY-MM-DD form: {cleaned[:MAX_TEXT]!r}")
    return Weekday(parsed.strftime("%A"), parsed.isocalendar().week, parsed.timetuple().tm_yday,
                   parsed.isoweekday() >= 6)
