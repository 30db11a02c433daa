"""The tools lmesh-tools offers, and the Consul meta format that announces tools mesh-wide.

The contract (the gateway reads it): a tool provider is a Consul service tagged `lmesh-tool`; each tool is one
unary gRPC method, announced in the instance's service meta as key `tool_<name>` with value
`<package.Service>/<Method> <description>` (the full method path, one space, a natural-language description of
what the tool does and when to use it). `<name>` matches [a-z][a-z0-9_]{0,47}; the value is at most 512
characters (Consul's limit on a meta value; Consul also allows at most 64 meta keys per instance). Request and
response schemas come from gRPC server reflection, not from Consul.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TOOL_TAG = "lmesh-tool"
META_PREFIX = "tool_"
MAX_META_VALUE = 512
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,47}")
# package.Service/Method: a dotted package (one part at least), a service and a method, protobuf identifiers.
METHOD_PATH_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+/[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ToolEntry:
    name: str
    method_path: str  # "lmesh.tools.v1.Calculator/Evaluate"
    description: str

    @property
    def service(self) -> str:
        return self.method_path.split("/", 1)[0]

    @property
    def method(self) -> str:
        return self.method_path.split("/", 1)[1]


def tool_entry_problem(entry: ToolEntry) -> str | None:
    """Why `entry` cannot be announced, or None."""
    if not NAME_PATTERN.fullmatch(entry.name):
        return f"tool name {entry.name!r} does not match {NAME_PATTERN.pattern}"
    if not METHOD_PATH_PATTERN.fullmatch(entry.method_path):
        return f"tool {entry.name}: {entry.method_path!r} is not a package.Service/Method path"
    if not entry.description.strip() or entry.description != entry.description.strip():
        return f"tool {entry.name}: the description is empty or has surrounding whitespace"
    value = f"{entry.method_path} {entry.description}"
    if len(value) > MAX_META_VALUE:
        return f"tool {entry.name}: its meta value has {len(value)} characters, over {MAX_META_VALUE}"
    return None


def format_tool_meta(entries: Iterable[ToolEntry]) -> dict[str, str]:
    """The Consul meta announcing `entries`; ValueError on an entry that breaks the contract or a repeated name."""
    meta: dict[str, str] = {}
    for entry in entries:
        problem = tool_entry_problem(entry)
        if problem is not None:
            raise ValueError(problem)
        key = META_PREFIX + entry.name
        if key in meta:
            raise ValueError(f"tool name {entry.name!r} is announced twice")
        meta[key] = f"{entry.method_path} {entry.description}"
    return meta


def parse_tool_meta(meta: Mapping[str, str]) -> list[ToolEntry]:
    """The tools an instance's Consul meta announces, by name; entries that break the contract (bad name, no
    method path, no description, an over-long value) are skipped, and other meta keys ignored."""
    entries = []
    for key, value in meta.items():
        if not key.startswith(META_PREFIX) or not isinstance(value, str):
            continue
        path, _, description = value.partition(" ")
        entry = ToolEntry(key[len(META_PREFIX):], path, description.strip())
        if description and tool_entry_problem(entry) is None:
            entries.append(entry)
    return sorted(entries, key=lambda e: e.name)


_PACKAGE = "lmesh.tools.v1"


def _tool(name: str, service: str, method: str, description: str) -> ToolEntry:
    return ToolEntry(name, f"{_PACKAGE}.{service}/{method}", " ".join(description.split()))


# Descriptions are what a retrieval model matches requests against: say what each tool does and when to use it,
# distinct from its neighbours.
TOOLS: tuple[ToolEntry, ...] = (
    _tool("calculator", "Calculator", "Evaluate",
          "Evaluate an arithmetic expression exactly, with no floating-point error: + - * / powers (^ or **) and "
          "parentheses over integers and decimals, e.g. '(1.5 + 2) * 3^4', '1/3 + 1/6' or '12 plus 7 times 3'. "
          "Use it for any sum, "
          "product, percentage written as a fraction, or big-number computation; returns the exact decimal or "
          "fraction."),
    _tool("convert_units", "UnitConverter", "Convert",
          "Convert a quantity from one unit of measure to another: length (km, miles, feet), mass (kg, pounds), "
          "volume (liters, gallons, cups), temperature (Celsius, Fahrenheit, kelvin), time, area, speed (km/h, "
          "mph, knots) and data sizes (MB, GiB, bits). Exact factors."),
    _tool("list_units", "UnitConverter", "ListUnits",
          "List the units of measure the unit converter knows, optionally only those of one quantity such as "
          "length, mass, volume, temperature, time, data, speed or area, with their symbols and spellings."),
    _tool("current_time", "Clock", "Now",
          "Get the current date and time right now in a given IANA time zone (e.g. Asia/Tokyo), with its UTC "
          "offset and weekday. Use it to answer what time or what day it is now somewhere."),
    _tool("convert_time_zone", "Clock", "ConvertTimeZone",
          "Convert a given date and time from one time zone to another, e.g. 9:00 in New York is what time in "
          "Berlin; handles daylight-saving time."),
    _tool("add_duration", "Clock", "AddDuration",
          "Add or subtract weeks, days, hours, minutes or seconds to a date and time, e.g. what date is 90 days "
          "after 2024-03-01, or a deadline 36 hours from a timestamp."),
    _tool("time_between", "Clock", "Difference",
          "Compute the elapsed time between two dates or date-times: how many days, hours, minutes and seconds "
          "from a start to an end, e.g. days until a deadline or the length of a period."),
    _tool("day_of_week", "Clock", "DayOfWeek",
          "Tell which day of the week a calendar date falls on (Monday to Sunday), with its ISO week number and "
          "day of the year, and whether it is a weekend."),
    _tool("search_people", "Directory", "SearchPeople",
          "Search the company's employee directory by name, job title, department or office city, e.g. find "
          "engineers in Toronto or someone named Chen; returns contact details and managers."),
    _tool("get_person", "Directory", "GetPerson",
          "Look up one employee of the company by their email address: name, job title, department, phone "
          "number, office city and manager."),
    _tool("list_department", "Directory", "ListDepartment",
          "List every employee of one company department (e.g. Legal, Sales, Engineering), its head first: who "
          "works in a team and who leads it."),
    _tool("city_distance", "Geo", "CityDistance",
          "Compute the straight-line great-circle distance between two major world cities in kilometers and "
          "miles, with the compass bearing, e.g. how far Paris is from Tokyo as the crow flies."),
    _tool("city_info", "Geo", "CityInfo",
          "Look up facts about a major world city: its country, latitude and longitude, time zone and "
          "metropolitan population."),
    _tool("count_text", "Text", "CountText",
          "Count the words, characters, sentences, lines and paragraphs of a piece of text and estimate its "
          "reading time, e.g. check an essay's word count."),
    _tool("change_case", "Text", "ChangeCase",
          "Rewrite a piece of text in another letter case: UPPER, lower, Title Case, Sentence case, snake_case, "
          "camelCase or kebab-case."),
)


def tool_meta() -> dict[str, str]:
    """lmesh-tools' own Consul meta."""
    return format_tool_meta(TOOLS)


def matched_text(name: str, description: str) -> str:
    """What a tool is matched by in retrieval, and trained on: its name's words, then its description."""
    return f"{name.replace('_', ' ')}: {description}"
