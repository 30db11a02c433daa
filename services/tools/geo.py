"""Distances and facts about major world cities from a built-in table (coordinates to 0.01°, metropolitan
populations rounded); great-circle distances by the haversine formula on a sphere of the mean Earth radius."""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

from services.common.errors import InvalidArgument, NotFound

EARTH_RADIUS_KM = 6371.0088  # IUGG mean radius
KM_PER_MILE = 1.609344


@dataclass(frozen=True)
class City:
    name: str
    country: str
    latitude: float
    longitude: float
    timezone: str
    population: int


# name, country, latitude, longitude, IANA zone, metropolitan population in thousands
_TABLE: tuple[tuple[str, str, float, float, str, int], ...] = (
    ("Tokyo", "Japan", 35.68, 139.69, "Asia/Tokyo", 37_400),
    ("Delhi", "India", 28.61, 77.21, "Asia/Kolkata", 31_000),
    ("Shanghai", "China", 31.23, 121.47, "Asia/Shanghai", 27_800),
    ("São Paulo", "Brazil", -23.55, -46.63, "America/Sao_Paulo", 22_400),
    ("Mexico City", "Mexico", 19.43, -99.13, "America/Mexico_City", 21_800),
    ("Cairo", "Egypt", 30.04, 31.24, "Africa/Cairo", 21_300),
    ("Mumbai", "India", 19.08, 72.88, "Asia/Kolkata", 20_700),
    ("Beijing", "China", 39.90, 116.41, "Asia/Shanghai", 20_500),
    ("Dhaka", "Bangladesh", 23.81, 90.41, "Asia/Dhaka", 21_700),
    ("Osaka", "Japan", 34.69, 135.50, "Asia/Tokyo", 19_100),
    ("New York", "United States", 40.71, -74.01, "America/New_York", 18_800),
    ("Karachi", "Pakistan", 24.86, 67.01, "Asia/Karachi", 16_500),
    ("Buenos Aires", "Argentina", -34.60, -58.38, "America/Argentina/Buenos_Aires", 15_200),
    ("Chongqing", "China", 29.56, 106.55, "Asia/Shanghai", 16_000),
    ("Istanbul", "Turkey", 41.01, 28.98, "Europe/Istanbul", 15_400),
    ("Kolkata", "India", 22.57, 88.36, "Asia/Kolkata", 14_900),
    ("Manila", "Philippines", 14.60, 120.98, "Asia/Manila", 13_900),
    ("Lagos", "Nigeria", 6.52, 3.38, "Africa/Lagos", 14_400),
    ("Rio de Janeiro", "Brazil", -22.91, -43.17, "America/Sao_Paulo", 13_500),
    ("Tianjin", "China", 39.34, 117.36, "Asia/Shanghai", 13_600),
    ("Kinshasa", "DR Congo", -4.44, 15.27, "Africa/Kinshasa", 14_300),
    ("Guangzhou", "China", 23.13, 113.26, "Asia/Shanghai", 13_300),
    ("Los Angeles", "United States", 34.05, -118.24, "America/Los_Angeles", 12_500),
    ("Moscow", "Russia", 55.76, 37.62, "Europe/Moscow", 12_600),
    ("Shenzhen", "China", 22.54, 114.06, "Asia/Shanghai", 12_400),
    ("Lahore", "Pakistan", 31.55, 74.34, "Asia/Karachi", 12_600),
    ("Bangalore", "India", 12.97, 77.59, "Asia/Kolkata", 12_300),
    ("Paris", "France", 48.86, 2.35, "Europe/Paris", 11_000),
    ("Bogotá", "Colombia", 4.71, -74.07, "America/Bogota", 11_000),
    ("Jakarta", "Indonesia", -6.21, 106.85, "Asia/Jakarta", 10_800),
    ("Chennai", "India", 13.08, 80.27, "Asia/Kolkata", 11_000),
    ("Lima", "Peru", -12.05, -77.04, "America/Lima", 10_700),
    ("Bangkok", "Thailand", 13.76, 100.50, "Asia/Bangkok", 10_500),
    ("Seoul", "South Korea", 37.57, 126.98, "Asia/Seoul", 9_900),
    ("Nagoya", "Japan", 35.18, 136.91, "Asia/Tokyo", 9_500),
    ("Hyderabad", "India", 17.39, 78.49, "Asia/Kolkata", 10_000),
    ("London", "United Kingdom", 51.51, -0.13, "Europe/London", 9_500),
    ("Tehran", "Iran", 35.69, 51.39, "Asia/Tehran", 9_100),
    ("Chicago", "United States", 41.88, -87.63, "America/Chicago", 8_900),
    ("Chengdu", "China", 30.57, 104.07, "Asia/Shanghai", 9_100),
    ("Nanjing", "China", 32.06, 118.80, "Asia/Shanghai", 9_000),
    ("Wuhan", "China", 30.59, 114.31, "Asia/Shanghai", 8_400),
    ("Ho Chi Minh City", "Vietnam", 10.82, 106.63, "Asia/Ho_Chi_Minh", 9_000),
    ("Luanda", "Angola", -8.84, 13.23, "Africa/Luanda", 8_600),
    ("Ahmedabad", "India", 23.02, 72.57, "Asia/Kolkata", 8_400),
    ("Kuala Lumpur", "Malaysia", 3.14, 101.69, "Asia/Kuala_Lumpur", 8_400),
    ("Xi'an", "China", 34.34, 108.94, "Asia/Shanghai", 8_300),
    ("Hong Kong", "China", 22.32, 114.17, "Asia/Hong_Kong", 7_500),
    ("Dongguan", "China", 23.02, 113.75, "Asia/Shanghai", 7_400),
    ("Hangzhou", "China", 30.27, 120.16, "Asia/Shanghai", 7_600),
    ("Foshan", "China", 23.02, 113.12, "Asia/Shanghai", 7_300),
    ("Riyadh", "Saudi Arabia", 24.71, 46.68, "Asia/Riyadh", 7_500),
    ("Baghdad", "Iraq", 33.32, 44.37, "Asia/Baghdad", 7_500),
    ("Santiago", "Chile", -33.45, -70.67, "America/Santiago", 6_800),
    ("Surat", "India", 21.17, 72.83, "Asia/Kolkata", 7_500),
    ("Madrid", "Spain", 40.42, -3.70, "Europe/Madrid", 6_700),
    ("Pune", "India", 18.52, 73.86, "Asia/Kolkata", 6_800),
    ("Houston", "United States", 29.76, -95.37, "America/Chicago", 7_100),
    ("Dallas", "United States", 32.78, -96.80, "America/Chicago", 7_600),
    ("Toronto", "Canada", 43.65, -79.38, "America/Toronto", 6_300),
    ("Dar es Salaam", "Tanzania", -6.79, 39.21, "Africa/Dar_es_Salaam", 7_400),
    ("Miami", "United States", 25.76, -80.19, "America/New_York", 6_100),
    ("Belo Horizonte", "Brazil", -19.92, -43.94, "America/Sao_Paulo", 6_200),
    ("Singapore", "Singapore", 1.35, 103.82, "Asia/Singapore", 6_000),
    ("Philadelphia", "United States", 39.95, -75.17, "America/New_York", 6_200),
    ("Atlanta", "United States", 33.75, -84.39, "America/New_York", 6_200),
    ("Barcelona", "Spain", 41.39, 2.17, "Europe/Madrid", 5_600),
    ("Khartoum", "Sudan", 15.50, 32.56, "Africa/Khartoum", 6_200),
    ("Johannesburg", "South Africa", -26.20, 28.05, "Africa/Johannesburg", 6_200),
    ("Saint Petersburg", "Russia", 59.93, 30.34, "Europe/Moscow", 5_500),
    ("Washington", "United States", 38.91, -77.04, "America/New_York", 6_300),
    ("Alexandria", "Egypt", 31.20, 29.92, "Africa/Cairo", 5_500),
    ("Sydney", "Australia", -33.87, 151.21, "Australia/Sydney", 5_300),
    ("Melbourne", "Australia", -37.81, 144.96, "Australia/Melbourne", 5_100),
    ("Nairobi", "Kenya", -1.29, 36.82, "Africa/Nairobi", 5_100),
    ("Abidjan", "Ivory Coast", 5.36, -4.01, "Africa/Abidjan", 5_500),
    ("Ankara", "Turkey", 39.93, 32.86, "Europe/Istanbul", 5_300),
    ("Yangon", "Myanmar", 16.84, 96.17, "Asia/Yangon", 5_600),
    ("Casablanca", "Morocco", 33.57, -7.59, "Africa/Casablanca", 3_800),
    ("Berlin", "Germany", 52.52, 13.40, "Europe/Berlin", 4_600),
    ("Rome", "Italy", 41.90, 12.50, "Europe/Rome", 4_300),
    ("Montreal", "Canada", 45.50, -73.57, "America/Toronto", 4_300),
    ("Boston", "United States", 42.36, -71.06, "America/New_York", 4_900),
    ("San Francisco", "United States", 37.77, -122.42, "America/Los_Angeles", 4_700),
    ("Seattle", "United States", 47.61, -122.33, "America/Los_Angeles", 4_000),
    ("Phoenix", "United States", 33.45, -112.07, "America/Phoenix", 4_900),
    ("Cape Town", "South Africa", -33.92, 18.42, "Africa/Johannesburg", 4_800),
    ("Accra", "Ghana", 5.60, -0.19, "Africa/Accra", 2_600),
    ("Addis Ababa", "Ethiopia", 9.03, 38.74, "Africa/Addis_Ababa", 5_200),
    ("Athens", "Greece", 37.98, 23.73, "Europe/Athens", 3_200),
    ("Kyiv", "Ukraine", 50.45, 30.52, "Europe/Kyiv", 3_000),
    ("Lisbon", "Portugal", 38.72, -9.14, "Europe/Lisbon", 2_900),
    ("Warsaw", "Poland", 52.23, 21.01, "Europe/Warsaw", 1_800),
    ("Vienna", "Austria", 48.21, 16.37, "Europe/Vienna", 2_000),
    ("Budapest", "Hungary", 47.50, 19.04, "Europe/Budapest", 1_800),
    ("Amsterdam", "Netherlands", 52.37, 4.90, "Europe/Amsterdam", 1_200),
    ("Stockholm", "Sweden", 59.33, 18.07, "Europe/Stockholm", 1_700),
    ("Copenhagen", "Denmark", 55.68, 12.57, "Europe/Copenhagen", 1_400),
    ("Dublin", "Ireland", 53.35, -6.26, "Europe/Dublin", 1_300),
    ("Zurich", "Switzerland", 47.38, 8.54, "Europe/Zurich", 1_400),
    ("Dubai", "United Arab Emirates", 25.20, 55.27, "Asia/Dubai", 3_500),
    ("Tel Aviv", "Israel", 32.09, 34.78, "Asia/Jerusalem", 4_200),
    ("Vancouver", "Canada", 49.28, -123.12, "America/Vancouver", 2_600),
    ("Auckland", "New Zealand", -36.85, 174.76, "Pacific/Auckland", 1_700),
    ("Honolulu", "United States", 21.31, -157.86, "Pacific/Honolulu", 1_000),
    ("Reykjavik", "Iceland", 64.15, -21.94, "Atlantic/Reykjavik", 200),
    ("Anchorage", "United States", 61.22, -149.90, "America/Anchorage", 400),
)

CITIES = tuple(City(n, c, lat, lon, tz, pop * 1000) for n, c, lat, lon, tz, pop in _TABLE)


def _fold(name: str) -> str:
    """Lower case, accents and punctuation dropped, spaces collapsed: "São Paulo" and "sao  paulo" match."""
    decomposed = unicodedata.normalize("NFKD", name.casefold())
    kept = "".join(ch if ch.isalnum() else " " for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(kept.split())


_BY_NAME = {_fold(city.name): city for city in CITIES}
_ALIASES = {"nyc": "new york", "new york city": "new york", "la": "los angeles", "sf": "san francisco",
            "bombay": "mumbai", "calcutta": "kolkata", "madras": "chennai", "bengaluru": "bangalore",
            "peking": "beijing", "saigon": "ho chi minh city", "kiev": "kyiv", "st petersburg": "saint petersburg",
            "washington dc": "washington", "washington d c": "washington", "rangoon": "yangon"}


def find_city(name: str, field: str) -> City:
    folded = _fold(name)
    if not folded:
        raise InvalidArgument(field, "empty: name a city such as Paris or Tokyo")
    city = _BY_NAME.get(_ALIASES.get(folded, folded))
    if city is None:
        raise NotFound(f"{name.strip()[:64]!r} is not among the {len(CITIES)} cities of the built-in table",
                       metadata={"field": field})
    return city


def haversine_km(a: City, b: City) -> float:
    lat1, lat2 = math.radians(a.latitude), math.radians(b.latitude)
    dlat, dlon = lat2 - lat1, math.radians(b.longitude - a.longitude)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def initial_bearing(a: City, b: City) -> float:
    lat1, lat2 = math.radians(a.latitude), math.radians(b.latitude)
    dlon = math.radians(b.longitude - a.longitude)
    x = math.sin(dlon) * math.cos(lat2)
    y = math.cos(lat1) * math.sin(lat2) - math.sin(lat1) * math.cos(lat2) * math.cos(dlon)
    return (math.degrees(math.atan2(x, y)) + 360.0) % 360.0


@dataclass(frozen=True)
class Distance:
    from_city: City
    to_city: City
    kilometers: float
    miles: float
    initial_bearing_degrees: float


def city_distance(from_city: str, to_city: str) -> Distance:
    a, b = find_city(from_city, "from_city"), find_city(to_city, "to_city")
    km = haversine_km(a, b)
    return Distance(a, b, round(km, 1), round(km / KM_PER_MILE, 1), round(initial_bearing(a, b), 1))
