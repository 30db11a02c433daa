"""Unit conversion with exact factors (fractions.Fraction, from the units' legal definitions: 1 in = 0.0254 m,
1 lb = 0.45359237 kg, 1 US gal = 231 in³), temperatures affinely through kelvin.

Lookup: a unit's symbol exactly as written ("MB", "Mb", "mL") first, then any of its names and aliases
case-insensitively, singular or plural ("Kilometres", "FEET"). Where case alone tells units apart ("MB" bytes,
"Mb" bits), the case-insensitive form names the byte unit, which people mean far more often.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from services.common.errors import InvalidArgument
from services.tools.calculator import fraction_str, rounded_decimal, terminating_decimal

F = Fraction
ZERO = Fraction(0)


@dataclass(frozen=True)
class UnitDef:
    symbol: str
    name: str
    quantity: str
    # value in the quantity's base unit = value * scale + offset (offset: temperatures only)
    scale: Fraction
    offset: Fraction = ZERO
    aliases: tuple[str, ...] = ()


INCH = F("0.0254")
FOOT = 12 * INCH
YARD = 3 * FOOT
MILE = 1760 * YARD
POUND = F("0.45359237")
LITRE = F(1, 1000)  # m³
US_GALLON = 231 * INCH**3
US_FLUID_OUNCE = US_GALLON / 128
MINUTE, HOUR, DAY = F(60), F(3600), F(86400)

_DEFS: list[UnitDef] = [
    # length (base: metre)
    UnitDef("m", "meter", "length", F(1), aliases=("metre",)),
    UnitDef("km", "kilometer", "length", F(1000), aliases=("kilometre",)),
    UnitDef("cm", "centimeter", "length", F(1, 100), aliases=("centimetre",)),
    UnitDef("mm", "millimeter", "length", F(1, 1000), aliases=("millimetre",)),
    UnitDef("µm", "micrometer", "length", F(1, 10**6), aliases=("um", "micrometre", "micron")),
    UnitDef("nm", "nanometer", "length", F(1, 10**9), aliases=("nanometre",)),
    UnitDef("in", "inch", "length", INCH, aliases=("inches", '"')),
    UnitDef("ft", "foot", "length", FOOT, aliases=("feet", "'")),
    UnitDef("yd", "yard", "length", YARD),
    UnitDef("mi", "mile", "length", MILE),
    UnitDef("nmi", "nautical mile", "length", F(1852)),
    # mass (base: kilogram)
    UnitDef("kg", "kilogram", "mass", F(1), aliases=("kilo",)),
    UnitDef("g", "gram", "mass", F(1, 1000), aliases=("gramme",)),
    UnitDef("mg", "milligram", "mass", F(1, 10**6)),
    UnitDef("µg", "microgram", "mass", F(1, 10**9), aliases=("ug", "mcg")),
    UnitDef("t", "tonne", "mass", F(1000), aliases=("metric ton",)),
    UnitDef("lb", "pound", "mass", POUND, aliases=("lbs",)),
    UnitDef("oz", "ounce", "mass", POUND / 16),
    UnitDef("st", "stone", "mass", 14 * POUND),
    UnitDef("short ton", "US ton", "mass", 2000 * POUND, aliases=("ton",)),
    # volume (base: cubic metre)
    UnitDef("m³", "cubic meter", "volume", F(1), aliases=("m3", "cubic metre")),
    UnitDef("L", "liter", "volume", LITRE, aliases=("l", "litre")),
    UnitDef("mL", "milliliter", "volume", LITRE / 1000, aliases=("ml", "millilitre", "cm3", "cm³", "cc")),
    UnitDef("cL", "centiliter", "volume", LITRE / 100, aliases=("cl", "centilitre")),
    UnitDef("gal", "US gallon", "volume", US_GALLON, aliases=("gallon",)),
    UnitDef("imp gal", "imperial gallon", "volume", F("4.54609") * LITRE, aliases=("uk gallon",)),
    UnitDef("qt", "US quart", "volume", US_GALLON / 4, aliases=("quart",)),
    UnitDef("pt", "US pint", "volume", US_GALLON / 8, aliases=("pint",)),
    UnitDef("cup", "US cup", "volume", US_GALLON / 16),
    UnitDef("fl oz", "US fluid ounce", "volume", US_FLUID_OUNCE, aliases=("fluid ounce", "floz")),
    UnitDef("tbsp", "US tablespoon", "volume", US_FLUID_OUNCE / 2, aliases=("tablespoon",)),
    UnitDef("tsp", "US teaspoon", "volume", US_FLUID_OUNCE / 6, aliases=("teaspoon",)),
    UnitDef("ft³", "cubic foot", "volume", FOOT**3, aliases=("ft3", "cubic feet")),
    # temperature (base: kelvin)
    UnitDef("K", "kelvin", "temperature", F(1), aliases=("k",)),
    UnitDef("°C", "celsius", "temperature", F(1), F("273.15"), aliases=("c", "degc", "degree celsius", "centigrade")),
    UnitDef("°F", "fahrenheit", "temperature", F(5, 9), F("273.15") - 32 * F(5, 9),
            aliases=("f", "degf", "degree fahrenheit")),
    UnitDef("°R", "rankine", "temperature", F(5, 9), aliases=("r", "degr")),
    # time (base: second); a year is the Julian year, 365.25 days
    UnitDef("s", "second", "time", F(1), aliases=("sec", "secs")),
    UnitDef("ms", "millisecond", "time", F(1, 1000)),
    UnitDef("µs", "microsecond", "time", F(1, 10**6), aliases=("us",)),
    UnitDef("ns", "nanosecond", "time", F(1, 10**9)),
    UnitDef("min", "minute", "time", MINUTE, aliases=("mins",)),
    UnitDef("h", "hour", "time", HOUR, aliases=("hr", "hrs")),
    UnitDef("d", "day", "time", DAY),
    UnitDef("wk", "week", "time", 7 * DAY),
    UnitDef("yr", "year", "time", F("365.25") * DAY, aliases=("julian year",)),
    # data size (base: byte); k, M, G... are powers of 1000, Ki, Mi, Gi... powers of 1024
    UnitDef("B", "byte", "data", F(1), aliases=("b",)),
    UnitDef("bit", "bit", "data", F(1, 8)),
    UnitDef("kB", "kilobyte", "data", F(10**3), aliases=("kb",)),
    UnitDef("MB", "megabyte", "data", F(10**6), aliases=("mb",)),
    UnitDef("GB", "gigabyte", "data", F(10**9), aliases=("gb",)),
    UnitDef("TB", "terabyte", "data", F(10**12), aliases=("tb",)),
    UnitDef("PB", "petabyte", "data", F(10**15), aliases=("pb",)),
    UnitDef("KiB", "kibibyte", "data", F(2**10), aliases=("kib",)),
    UnitDef("MiB", "mebibyte", "data", F(2**20), aliases=("mib",)),
    UnitDef("GiB", "gibibyte", "data", F(2**30), aliases=("gib",)),
    UnitDef("TiB", "tebibyte", "data", F(2**40), aliases=("tib",)),
    UnitDef("kbit", "kilobit", "data", F(10**3, 8), aliases=("kilobits",)),
    UnitDef("Mb", "megabit", "data", F(10**6, 8), aliases=("mbit",)),
    UnitDef("Gb", "gigabit", "data", F(10**9, 8), aliases=("gbit",)),
    # speed (base: metre per second)
    UnitDef("m/s", "meter per second", "speed", F(1), aliases=("metre per second", "mps")),
    UnitDef("km/h", "kilometer per hour", "speed", F(1000) / HOUR, aliases=("kmh", "kph", "kilometre per hour")),
    UnitDef("mph", "mile per hour", "speed", MILE / HOUR, aliases=("mi/h", "miles per hour")),
    UnitDef("kn", "knot", "speed", F(1852) / HOUR, aliases=("kt",)),
    UnitDef("ft/s", "foot per second", "speed", FOOT, aliases=("fps", "feet per second")),
    # area (base: square metre)
    UnitDef("m²", "square meter", "area", F(1), aliases=("m2", "sq m", "square metre")),
    UnitDef("km²", "square kilometer", "area", F(10**6), aliases=("km2", "sq km", "square kilometre")),
    UnitDef("ha", "hectare", "area", F(10**4)),
    UnitDef("acre", "acre", "area", 4840 * YARD**2, aliases=("ac",)),
    UnitDef("ft²", "square foot", "area", FOOT**2, aliases=("ft2", "sq ft", "square feet")),
    UnitDef("mi²", "square mile", "area", MILE**2, aliases=("mi2", "sq mi")),
]

QUANTITIES = tuple(dict.fromkeys(unit.quantity for unit in _DEFS))


def _fold(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower().replace("degrees ", "degree "))


def _build_index() -> tuple[dict[str, UnitDef], dict[str, UnitDef]]:
    exact: dict[str, UnitDef] = {}
    folded: dict[str, UnitDef] = {}
    for unit in _DEFS:
        exact[unit.symbol] = unit
        for spelling in (unit.symbol, unit.name, *unit.aliases):
            for form in (spelling, _plural(spelling)):
                folded.setdefault(_fold(form), unit)
    return exact, folded


def _plural(name: str) -> str:
    if " per " in name:  # "mile per hour" -> "miles per hour"
        head, tail = name.split(" per ", 1)
        return f"{_plural(head)} per {tail}"
    if len(name) <= 3 or not name[-1].isalpha():
        return name
    return name + ("es" if name.endswith(("s", "sh", "ch", "x")) else "s")


_EXACT, _FOLDED = _build_index()


def find_unit(spelling: str, field: str) -> UnitDef:
    unit = _EXACT.get(spelling.strip()) or _FOLDED.get(_fold(spelling))
    if unit is None:
        if not spelling.strip():
            raise InvalidArgument(field, "empty: name a unit such as km, lb, °C or MiB")
        raise InvalidArgument(field, f"unknown unit {spelling.strip()[:64]!r}; ListUnits lists the known ones")
    return unit


def parse_number(text: str, field: str = "value") -> Fraction:
    """A decimal ("-3.5", "1e3") or a fraction ("1/3") as an exact Fraction."""
    cleaned = text.strip().replace("\u2212", "-")  # the Unicode minus sign
    if len(cleaned) > 200 or not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?(/\d+)?", cleaned):
        raise InvalidArgument(field, f"not a number: {text[:64]!r} (write e.g. 3.5, -40 or 1/3)")
    try:
        return Fraction(cleaned)
    except ZeroDivisionError:
        raise InvalidArgument(field, "division by zero in the fraction") from None


@dataclass(frozen=True)
class Conversion:
    value: Fraction
    from_unit: UnitDef
    to_unit: UnitDef

    @property
    def exact(self) -> str:
        return terminating_decimal(self.value) or fraction_str(self.value)

    @property
    def decimal(self) -> str:
        text = rounded_decimal(self.value, 12)
        text = text.rstrip("0").rstrip(".") if "." in text else text
        return "0" if text in ("-0", "") else text


def convert(value: str, from_unit: str, to_unit: str) -> Conversion:
    amount = parse_number(value)
    source, target = find_unit(from_unit, "from_unit"), find_unit(to_unit, "to_unit")
    if source.quantity != target.quantity:
        raise InvalidArgument("to_unit", f"{target.symbol} is a unit of {target.quantity}, {source.symbol} one of "
                                         f"{source.quantity}: they do not convert")
    base = amount * source.scale + source.offset
    return Conversion((base - target.offset) / target.scale, source, target)


def list_units(quantity: str = "") -> list[UnitDef]:
    wanted = quantity.strip().lower()
    if wanted and wanted not in QUANTITIES:
        raise InvalidArgument("quantity", f"unknown quantity {quantity[:64]!r}; one of {', '.join(QUANTITIES)}")
    return [unit for unit in _DEFS if not wanted or unit.quantity == wanted]
