from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EvaluateRequest(_message.Message):
    __slots__ = ("expression", "decimal_places")
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    DECIMAL_PLACES_FIELD_NUMBER: _ClassVar[int]
    expression: str
    decimal_places: int
    def __init__(self, expression: _Optional[str] = ..., decimal_places: _Optional[int] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("value", "fraction", "decimal", "exact_decimal")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    DECIMAL_FIELD_NUMBER: _ClassVar[int]
    EXACT_DECIMAL_FIELD_NUMBER: _ClassVar[int]
    value: str
    fraction: str
    decimal: str
    exact_decimal: bool
    def __init__(self, value: _Optional[str] = ..., fraction: _Optional[str] = ..., decimal: _Optional[str] = ..., exact_decimal: _Optional[bool] = ...) -> None: ...

class ConvertRequest(_message.Message):
    __slots__ = ("value", "from_unit", "to_unit")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    FROM_UNIT_FIELD_NUMBER: _ClassVar[int]
    TO_UNIT_FIELD_NUMBER: _ClassVar[int]
    value: str
    from_unit: str
    to_unit: str
    def __init__(self, value: _Optional[str] = ..., from_unit: _Optional[str] = ..., to_unit: _Optional[str] = ...) -> None: ...

class ConvertResponse(_message.Message):
    __slots__ = ("value", "decimal", "from_unit", "to_unit", "quantity")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DECIMAL_FIELD_NUMBER: _ClassVar[int]
    FROM_UNIT_FIELD_NUMBER: _ClassVar[int]
    TO_UNIT_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    value: str
    decimal: str
    from_unit: str
    to_unit: str
    quantity: str
    def __init__(self, value: _Optional[str] = ..., decimal: _Optional[str] = ..., from_unit: _Optional[str] = ..., to_unit: _Optional[str] = ..., quantity: _Optional[str] = ...) -> None: ...

class ListUnitsRequest(_message.Message):
    __slots__ = ("quantity",)
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    quantity: str
    def __init__(self, quantity: _Optional[str] = ...) -> None: ...

class Unit(_message.Message):
    __slots__ = ("symbol", "name", "quantity", "aliases")
    SYMBOL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    symbol: str
    name: str
    quantity: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, symbol: _Optional[str] = ..., name: _Optional[str] = ..., quantity: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class ListUnitsResponse(_message.Message):
    __slots__ = ("units",)
    UNITS_FIELD_NUMBER: _ClassVar[int]
    units: _containers.RepeatedCompositeFieldContainer[Unit]
    def __init__(self, units: _Optional[_Iterable[_Union[Unit, _Mapping]]] = ...) -> None: ...

class NowRequest(_message.Message):
    __slots__ = ("timezone",)
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    timezone: str
    def __init__(self, timezone: _Optional[str] = ...) -> None: ...

class ConvertTimeZoneRequest(_message.Message):
    __slots__ = ("datetime", "from_timezone", "to_timezone")
    DATETIME_FIELD_NUMBER: _ClassVar[int]
    FROM_TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    TO_TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    datetime: str
    from_timezone: str
    to_timezone: str
    def __init__(self, datetime: _Optional[str] = ..., from_timezone: _Optional[str] = ..., to_timezone: _Optional[str] = ...) -> None: ...

class AddDurationRequest(_message.Message):
    __slots__ = ("datetime", "weeks", "days", "hours", "minutes", "seconds", "timezone")
    DATETIME_FIELD_NUMBER: _ClassVar[int]
    WEEKS_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    HOURS_FIELD_NUMBER: _ClassVar[int]
    MINUTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    datetime: str
    weeks: int
    days: int
    hours: int
    minutes: int
    seconds: int
    timezone: str
    def __init__(self, datetime: _Optional[str] = ..., weeks: _Optional[int] = ..., days: _Optional[int] = ..., hours: _Optional[int] = ..., minutes: _Optional[int] = ..., seconds: _Optional[int] = ..., timezone: _Optional[str] = ...) -> None: ...

class DateTimeResponse(_message.Message):
    __slots__ = ("datetime", "timezone", "utc_offset", "day_of_week", "daylight_saving")
    DATETIME_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    UTC_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DAY_OF_WEEK_FIELD_NUMBER: _ClassVar[int]
    DAYLIGHT_SAVING_FIELD_NUMBER: _ClassVar[int]
    datetime: str
    timezone: str
    utc_offset: str
    day_of_week: str
    daylight_saving: bool
    def __init__(self, datetime: _Optional[str] = ..., timezone: _Optional[str] = ..., utc_offset: _Optional[str] = ..., day_of_week: _Optional[str] = ..., daylight_saving: _Optional[bool] = ...) -> None: ...

class DifferenceRequest(_message.Message):
    __slots__ = ("start", "end", "timezone")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    start: str
    end: str
    timezone: str
    def __init__(self, start: _Optional[str] = ..., end: _Optional[str] = ..., timezone: _Optional[str] = ...) -> None: ...

class DifferenceResponse(_message.Message):
    __slots__ = ("total_seconds", "days", "hours", "minutes", "seconds", "human_readable")
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DAYS_FIELD_NUMBER: _ClassVar[int]
    HOURS_FIELD_NUMBER: _ClassVar[int]
    MINUTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    HUMAN_READABLE_FIELD_NUMBER: _ClassVar[int]
    total_seconds: int
    days: int
    hours: int
    minutes: int
    seconds: int
    human_readable: str
    def __init__(self, total_seconds: _Optional[int] = ..., days: _Optional[int] = ..., hours: _Optional[int] = ..., minutes: _Optional[int] = ..., seconds: _Optional[int] = ..., human_readable: _Optional[str] = ...) -> None: ...

class DayOfWeekRequest(_message.Message):
    __slots__ = ("date",)
    DATE_FIELD_NUMBER: _ClassVar[int]
    date: str
    def __init__(self, date: _Optional[str] = ...) -> None: ...

class DayOfWeekResponse(_message.Message):
    __slots__ = ("day_of_week", "iso_week", "day_of_year", "is_weekend")
    DAY_OF_WEEK_FIELD_NUMBER: _ClassVar[int]
    ISO_WEEK_FIELD_NUMBER: _ClassVar[int]
    DAY_OF_YEAR_FIELD_NUMBER: _ClassVar[int]
    IS_WEEKEND_FIELD_NUMBER: _ClassVar[int]
    day_of_week: str
    iso_week: int
    day_of_year: int
    is_weekend: bool
    def __init__(self, day_of_week: _Optional[str] = ..., iso_week: _Optional[int] = ..., day_of_year: _Optional[int] = ..., is_weekend: _Optional[bool] = ...) -> None: ...

class Person(_message.Message):
    __slots__ = ("name", "title", "department", "email", "phone", "office_city", "manager_name", "manager_email")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DEPARTMENT_FIELD_NUMBER: _ClassVar[int]
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    PHONE_FIELD_NUMBER: _ClassVar[int]
    OFFICE_CITY_FIELD_NUMBER: _ClassVar[int]
    MANAGER_NAME_FIELD_NUMBER: _ClassVar[int]
    MANAGER_EMAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    title: str
    department: str
    email: str
    phone: str
    office_city: str
    manager_name: str
    manager_email: str
    def __init__(self, name: _Optional[str] = ..., title: _Optional[str] = ..., department: _Optional[str] = ..., email: _Optional[str] = ..., phone: _Optional[str] = ..., office_city: _Optional[str] = ..., manager_name: _Optional[str] = ..., manager_email: _Optional[str] = ...) -> None: ...

class SearchPeopleRequest(_message.Message):
    __slots__ = ("query", "department", "limit")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DEPARTMENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    query: str
    department: str
    limit: int
    def __init__(self, query: _Optional[str] = ..., department: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class PeopleResponse(_message.Message):
    __slots__ = ("people", "total_matches")
    PEOPLE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MATCHES_FIELD_NUMBER: _ClassVar[int]
    people: _containers.RepeatedCompositeFieldContainer[Person]
    total_matches: int
    def __init__(self, people: _Optional[_Iterable[_Union[Person, _Mapping]]] = ..., total_matches: _Optional[int] = ...) -> None: ...

class GetPersonRequest(_message.Message):
    __slots__ = ("email",)
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    email: str
    def __init__(self, email: _Optional[str] = ...) -> None: ...

class ListDepartmentRequest(_message.Message):
    __slots__ = ("department",)
    DEPARTMENT_FIELD_NUMBER: _ClassVar[int]
    department: str
    def __init__(self, department: _Optional[str] = ...) -> None: ...

class CityDistanceRequest(_message.Message):
    __slots__ = ("from_city", "to_city")
    FROM_CITY_FIELD_NUMBER: _ClassVar[int]
    TO_CITY_FIELD_NUMBER: _ClassVar[int]
    from_city: str
    to_city: str
    def __init__(self, from_city: _Optional[str] = ..., to_city: _Optional[str] = ...) -> None: ...

class CityDistanceResponse(_message.Message):
    __slots__ = ("kilometers", "miles", "initial_bearing_degrees", "from_city", "to_city")
    KILOMETERS_FIELD_NUMBER: _ClassVar[int]
    MILES_FIELD_NUMBER: _ClassVar[int]
    INITIAL_BEARING_DEGREES_FIELD_NUMBER: _ClassVar[int]
    FROM_CITY_FIELD_NUMBER: _ClassVar[int]
    TO_CITY_FIELD_NUMBER: _ClassVar[int]
    kilometers: float
    miles: float
    initial_bearing_degrees: float
    from_city: City
    to_city: City
    def __init__(self, kilometers: _Optional[float] = ..., miles: _Optional[float] = ..., initial_bearing_degrees: _Optional[float] = ..., from_city: _Optional[_Union[City, _Mapping]] = ..., to_city: _Optional[_Union[City, _Mapping]] = ...) -> None: ...

class CityInfoRequest(_message.Message):
    __slots__ = ("city",)
    CITY_FIELD_NUMBER: _ClassVar[int]
    city: str
    def __init__(self, city: _Optional[str] = ...) -> None: ...

class City(_message.Message):
    __slots__ = ("name", "country", "latitude", "longitude", "timezone", "population")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNTRY_FIELD_NUMBER: _ClassVar[int]
    LATITUDE_FIELD_NUMBER: _ClassVar[int]
    LONGITUDE_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    POPULATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    country: str
    latitude: float
    longitude: float
    timezone: str
    population: int
    def __init__(self, name: _Optional[str] = ..., country: _Optional[str] = ..., latitude: _Optional[float] = ..., longitude: _Optional[float] = ..., timezone: _Optional[str] = ..., population: _Optional[int] = ...) -> None: ...

class CountTextRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class CountTextResponse(_message.Message):
    __slots__ = ("words", "characters", "characters_without_spaces", "sentences", "lines", "paragraphs", "reading_time_minutes")
    WORDS_FIELD_NUMBER: _ClassVar[int]
    CHARACTERS_FIELD_NUMBER: _ClassVar[int]
    CHARACTERS_WITHOUT_SPACES_FIELD_NUMBER: _ClassVar[int]
    SENTENCES_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    PARAGRAPHS_FIELD_NUMBER: _ClassVar[int]
    READING_TIME_MINUTES_FIELD_NUMBER: _ClassVar[int]
    words: int
    characters: int
    characters_without_spaces: int
    sentences: int
    lines: int
    paragraphs: int
    reading_time_minutes: float
    def __init__(self, words: _Optional[int] = ..., characters: _Optional[int] = ..., characters_without_spaces: _Optional[int] = ..., sentences: _Optional[int] = ..., lines: _Optional[int] = ..., paragraphs: _Optional[int] = ..., reading_time_minutes: _Optional[float] = ...) -> None: ...

class ChangeCaseRequest(_message.Message):
    __slots__ = ("text", "target_case")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TARGET_CASE_FIELD_NUMBER: _ClassVar[int]
    text: str
    target_case: str
    def __init__(self, text: _Optional[str] = ..., target_case: _Optional[str] = ...) -> None: ...

class ChangeCaseResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...
