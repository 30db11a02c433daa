"""lmesh-tools' domain modules besides the calculator: units, clock, directory, geo, text, and the catalog's
Consul meta format."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument, NotFound
from services.tools import clock, geo, text, units
from services.tools.catalog import (
    MAX_META_VALUE,
    TOOLS,
    ToolEntry,
    format_tool_meta,
    parse_tool_meta,
    tool_meta,
)
from services.tools.directory import HEADCOUNT, DirectoryStore, generate_people


def invalid(field: str, call: object, *args: object, **kwargs: object) -> str:
    assert callable(call)
    with pytest.raises(InvalidArgument) as info:
        call(*args, **kwargs)
    assert info.value.field == field, info.value
    return info.value.problem


# ------------------------------------------------------------------------------------------------------ units


@pytest.mark.parametrize(("value", "source", "target", "exact"), [
    ("100", "°C", "°F", "212"),
    ("-40", "fahrenheit", "Celsius", "-40"),
    ("0", "K", "degrees celsius", "-273.15"),
    ("98.6", "F", "C", "37"),
    ("1", "mile", "kilometers", "1.609344"),
    ("3", "feet", "inches", "36"),
    ("1", "lb", "g", "453.59237"),
    ("1", "gallon", "L", "3.785411784"),
    ("1", "MiB", "kB", "1048.576"),
    ("1", "Mb", "MB", "0.125"),
    ("1", "GB", "Mbit", "8000"),
    ("60", "mph", "km/h", "96.56064"),
    ("1/3", "h", "min", "20"),
    ("1", "acre", "m2", "4046.8564224"),
    ("1", "km", "mi", "15625/25146"),
])
def test_conversions_are_exact(value: str, source: str, target: str, exact: str) -> None:
    assert units.convert(value, source, target).exact == exact


def test_conversion_round_trips_exactly_for_every_pair_of_a_quantity() -> None:
    amount = Fraction(12345, 7)
    for quantity in units.QUANTITIES:
        members = units.list_units(quantity)
        for a in members:
            for b in members:
                there = units.convert("12345/7", a.symbol, b.symbol).value
                back = units.convert(f"{there.numerator}/{there.denominator}", b.symbol, a.symbol).value
                assert back == amount, (a.symbol, b.symbol)


def test_conversion_errors_name_the_field() -> None:
    assert "unknown unit 'furlong'" in invalid("from_unit", units.convert, "1", "furlong", "m")
    assert "unknown unit" in invalid("to_unit", units.convert, "1", "m", "parsec")
    assert "do not convert" in invalid("to_unit", units.convert, "1", "kg", "m")
    assert "not a number" in invalid("value", units.convert, "ten", "m", "km")
    assert "not a number" in invalid("value", units.convert, "1e99999", "m", "km")
    assert "division by zero" in invalid("value", units.convert, "1/0", "m", "km")
    assert "unknown quantity" in invalid("quantity", units.list_units, "happiness")
    assert units.convert("2.50", "km", "m").decimal == "2500"
    assert units.convert("1", "km", "mi").decimal == "0.621371192237"


# ------------------------------------------------------------------------------------------------------ clock


def test_now_in_a_zone_uses_the_given_clock() -> None:
    moment = clock.now("Asia/Tokyo", lambda: datetime(2024, 7, 4, 12, 0, tzinfo=UTC))
    assert moment.iso == "2024-07-04T21:00:00+09:00"
    assert (moment.zone, moment.utc_offset, moment.day_of_week, moment.daylight_saving) == (
        "Asia/Tokyo", "+09:00", "Thursday", False)
    assert clock.now("", lambda: datetime(2024, 1, 1, tzinfo=UTC)).zone == "UTC"
    assert "unknown time zone" in invalid("timezone", clock.now, "Mars/Olympus")
    assert "not an IANA" in invalid("timezone", clock.now, "../../etc/passwd")


def test_convert_time_zone_handles_daylight_saving() -> None:
    summer = clock.convert_time_zone("2024-07-01T09:00:00", "America/New_York", "Europe/Berlin")
    assert summer.iso == "2024-07-01T15:00:00+02:00" and summer.daylight_saving
    winter = clock.convert_time_zone("2024-01-15T09:00:00", "America/New_York", "Europe/Berlin")
    assert winter.iso == "2024-01-15T15:00:00+01:00" and not winter.daylight_saving
    # An explicit offset wins over from_timezone.
    assert clock.convert_time_zone("2024-01-15T09:00:00+00:00", "Asia/Tokyo", "UTC").iso == "2024-01-15T09:00:00+00:00"
    assert "not an ISO 8601" in invalid("datetime", clock.convert_time_zone, "tomorrow", "", "UTC")
    assert "unknown" in invalid("to_timezone", clock.convert_time_zone, "2024-01-01", "", "Nowhere/City")


def test_add_duration_keeps_wall_time_across_dst() -> None:
    # Europe/Paris moves to summer time on 2024-03-31: one day later is still 12:00, 23 hours elapsed.
    moved = clock.add_duration("2024-03-30T12:00:00", days=1, timezone="Europe/Paris")
    assert moved.iso == "2024-03-31T12:00:00+02:00"
    assert clock.add_duration("2024-03-01", days=90).iso == "2024-05-30T00:00:00+00:00"
    assert clock.add_duration("2024-03-01T10:00:00+05:30", hours=-36).iso == "2024-02-28T22:00:00+05:30"
    assert clock.add_duration("2024-01-31T00:00:00", weeks=1, minutes=90, seconds=5).iso == (
        "2024-02-07T01:30:05+00:00")
    assert "years 1 to 9999" in invalid("days", clock.add_duration, "9999-12-31", days=1)
    assert "years 1 to 9999" in invalid("weeks", clock.add_duration, "2024-01-01", weeks=10**12)


def test_difference_is_elapsed_time() -> None:
    diff = clock.difference("2024-03-30T12:00:00", "2024-03-31T12:00:00", "Europe/Paris")
    assert diff.total_seconds == 23 * 3600 and diff.parts() == (0, 23, 0, 0)
    back = clock.difference("2024-01-02T00:00:05", "2023-12-29T20:00:00")
    assert back.total_seconds == -(3 * 86400 + 4 * 3600 + 5)
    assert back.parts() == (-3, -4, 0, -5)
    assert back.human_readable == "-3 days, 4 hours, 0 minutes, 5 seconds"
    assert "empty" in invalid("end", clock.difference, "2024-01-01", "")


def test_day_of_week() -> None:
    day = clock.day_of_week("2024-07-04")
    assert (day.day_of_week, day.iso_week, day.day_of_year, day.is_weekend) == ("Thursday", 27, 186, False)
    assert clock.day_of_week("2000-01-01").is_weekend
    assert "YYYY-MM-DD" in invalid("date", clock.day_of_week, "2024-02-30")
    assert "YYYY-MM-DD" in invalid("date", clock.day_of_week, "2024-07-04T10:00:00")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=70))
def test_clock_garbage_is_invalid_argument(garbage: str) -> None:
    for call in (lambda: clock.convert_time_zone(garbage, garbage, "UTC"), lambda: clock.day_of_week(garbage),
                 lambda: clock.difference(garbage, "2024-01-01"), lambda: clock.add_duration(garbage, days=1)):
        try:
            call()
        except InvalidArgument:
            pass


# -------------------------------------------------------------------------------------------------- directory


@pytest.fixture(scope="module")
def directory() -> DirectoryStore:
    return DirectoryStore()


def test_people_are_deterministic_and_consistent() -> None:
    people = generate_people()
    assert people == generate_people() and people != generate_people(seed=19)
    assert len(people) == HEADCOUNT and len({p.email for p in people}) == HEADCOUNT
    by_email = {p.email: p for p in people}
    chiefs = [p for p in people if not p.manager_email]
    assert len(chiefs) == 1
    for person in people:
        if person.manager_email:
            assert by_email[person.manager_email].name == person.manager_name


def test_search(directory: DirectoryStore) -> None:
    found, total = directory.search("eng toronto", limit=100)
    assert total == len(found) > 0
    assert all("eng" in (p.department + p.title).lower() and p.office_city == "Toronto" for p in found)
    _, all_engineering = directory.search("", department="engineering", limit=100)
    assert all_engineering == len(directory.list_department("Engineering"))
    limited, total = directory.search("a", limit=3)
    assert len(limited) == 3 and total >= 3
    assert directory.search("zzzzqqq") == ([], 0)
    # SQL and FTS syntax are data, not code.
    assert directory.search("' OR 1=1 --") == ([], 0)
    assert directory.search('"NEAR(a b)" *')[1] >= 0
    assert "empty" in invalid("query", directory.search, "  ")
    assert "at most 100" in invalid("limit", directory.search, "a", limit=101)
    assert "unknown department" in invalid("department", directory.search, "a", department="Astrology")


def test_search_by_like_matches_fts(directory: DirectoryStore) -> None:
    plain = DirectoryStore()
    plain.fts = False
    for query in ("sales", "chen", "senior engineer", "paris"):
        assert {p.email for p in plain.search(query, limit=100)[0]} <= {
            p.email for p in directory.search(query, limit=100)[0]}
        assert plain.search(query, limit=100)[1] > 0


def test_get_and_list(directory: DirectoryStore) -> None:
    someone = generate_people()[57]
    assert directory.get(someone.email.upper()) == someone
    with pytest.raises(NotFound):
        directory.get("nobody@example.com")
    assert "empty" in invalid("email", directory.get, " ")
    legal = directory.list_department("legal")
    assert legal[0].title == "Head of Legal" and all(p.department == "Legal" for p in legal)
    assert [p.name for p in legal[1:]] == sorted(p.name for p in legal[1:])
    assert "Engineering" in invalid("department", directory.list_department, "")


# -------------------------------------------------------------------------------------------------------- geo


def test_city_distance() -> None:
    paris_nyc = geo.city_distance("paris", "New York City")
    assert 5830 < paris_nyc.kilometers < 5845 and abs(paris_nyc.miles - paris_nyc.kilometers / 1.609344) < 0.1
    assert 285 < paris_nyc.initial_bearing_degrees < 300  # west-north-west
    assert geo.city_distance("sao paulo", "São Paulo").kilometers == 0
    london_sydney = geo.city_distance("London", "Sydney")
    assert 16_950 < london_sydney.kilometers < 17_050
    with pytest.raises(NotFound):
        geo.city_distance("Paris", "Atlantis")
    assert "empty" in invalid("from_city", geo.city_distance, " ", "Paris")


def test_city_table_is_sound() -> None:
    assert len(geo.CITIES) >= 100 and len({geo._fold(c.name) for c in geo.CITIES}) == len(geo.CITIES)
    for city in geo.CITIES:
        assert -90 <= city.latitude <= 90 and -180 <= city.longitude <= 180 and city.population > 0
        zoneinfo.ZoneInfo(city.timezone)  # raises for a zone the database does not know
    assert geo.find_city("Bombay", "city").name == "Mumbai"


# ------------------------------------------------------------------------------------------------------- text


def test_count_text() -> None:
    counts = text.count_text("Hello world. It's me!\n\nA second paragraph, with no full stop")
    assert (counts.words, counts.sentences, counts.lines, counts.paragraphs) == (11, 3, 3, 2)
    assert counts.characters == 60 and counts.characters_without_spaces == 49
    assert text.count_text("") == text.TextCounts(0, 0, 0, 0, 0, 0, 0.0)
    assert text.count_text("word " * 476).reading_time_minutes == 2.0
    assert "over" in invalid("text", text.count_text, "x" * (text.MAX_TEXT_BYTES + 1))


def test_change_case() -> None:
    source = "parseHTTPResponse now. hello WORLD"
    assert text.change_case(source, "snake") == "parse_http_response_now_hello_world"
    assert text.change_case(source, "kebab") == "parse-http-response-now-hello-world"
    assert text.change_case(source, "camel") == "parseHttpResponseNowHelloWorld"
    assert text.change_case("the cat's HAT", "title") == "The Cat's Hat"
    assert text.change_case("ONE. two! three", "sentence") == "One. Two! Three"
    assert text.change_case("abc", "UPPER") == "ABC"
    assert "unknown case" in invalid("target_case", text.change_case, "abc", "sarcasm")


# ---------------------------------------------------------------------------------------------------- catalog


def test_catalog_meta_round_trips() -> None:
    meta = tool_meta()
    assert len(meta) == len(TOOLS) and all(key.startswith("tool_") for key in meta)
    assert all(len(value) <= MAX_META_VALUE for value in meta.values())
    assert parse_tool_meta({**meta, "metrics_port": "9100"}) == sorted(TOOLS, key=lambda t: t.name)
    assert meta["tool_calculator"].startswith("lmesh.tools.v1.Calculator/Evaluate Evaluate an arithmetic")
    # Descriptions are distinct enough to retrieve from: no two share their first eight words.
    openings = {" ".join(t.description.split()[:8]) for t in TOOLS}
    assert len(openings) == len(TOOLS)


def test_parse_skips_entries_that_break_the_contract() -> None:
    good = "pkg.Svc/Do Does it."
    meta = {
        "tool_ok": good,
        "tool_Bad": good,  # upper case in the name
        "tool_": good,
        "tool_" + "a" * 49: good,  # name over 48 characters
        "tool_no_space": "pkg.Svc/Do",
        "tool_no_description": "pkg.Svc/Do   ",
        "tool_no_package": "Svc/Do Does it.",
        "tool_no_method": "pkg.Svc Does it.",
        "tool_too_long": "pkg.Svc/Do " + "x" * 502,
        "tool_longest": "pkg.Svc/Do " + "x" * 501,
        "other": good,
    }
    assert [e.name for e in parse_tool_meta(meta)] == ["longest", "ok"]
    assert parse_tool_meta(meta)[1] == ToolEntry("ok", "pkg.Svc/Do", "Does it.")


def test_format_refuses_what_parse_would_skip() -> None:
    with pytest.raises(ValueError, match="does not match"):
        format_tool_meta([ToolEntry("Bad", "pkg.Svc/Do", "d")])
    with pytest.raises(ValueError, match="over 512"):
        format_tool_meta([ToolEntry("long", "pkg.Svc/Do", "x" * 600)])
    with pytest.raises(ValueError, match="twice"):
        format_tool_meta([ToolEntry("a", "pkg.Svc/Do", "d"), ToolEntry("a", "pkg.Svc/Re", "d")])
    with pytest.raises(ValueError, match="whitespace"):
        format_tool_meta([ToolEntry("a", "pkg.Svc/Do", " d")])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=20).map(lambda s: "tool_" + s), st.text(max_size=40), max_size=6))
def test_parse_never_raises_and_formats_back(meta: dict[str, str]) -> None:
    entries = parse_tool_meta(meta)
    assert parse_tool_meta(format_tool_meta(entries)) == entries
