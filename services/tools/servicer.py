"""The tool families' gRPC servicers: protos in, domain calls, protos out. Domain errors (InvalidArgument,
NotFound) reach clients through the common interceptor."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import grpc
from lmesh.tools.v1 import tools_pb2, tools_pb2_grpc

from services.tools import calculator, clock, geo, text, units
from services.tools.directory import DirectoryStore, Person


class CalculatorServicer(tools_pb2_grpc.CalculatorServicer):
    async def Evaluate(self, request: tools_pb2.EvaluateRequest,
                       context: grpc.aio.ServicerContext) -> tools_pb2.EvaluateResponse:
        result = calculator.calculate(request.expression, request.decimal_places)
        return tools_pb2.EvaluateResponse(value=result.value, fraction=result.fraction, decimal=result.decimal,
                                          exact_decimal=result.exact_decimal)


class UnitConverterServicer(tools_pb2_grpc.UnitConverterServicer):
    async def Convert(self, request: tools_pb2.ConvertRequest,
                      context: grpc.aio.ServicerContext) -> tools_pb2.ConvertResponse:
        result = units.convert(request.value, request.from_unit, request.to_unit)
        return tools_pb2.ConvertResponse(value=result.exact, decimal=result.decimal,
                                         from_unit=result.from_unit.symbol, to_unit=result.to_unit.symbol,
                                         quantity=result.from_unit.quantity)

    async def ListUnits(self, request: tools_pb2.ListUnitsRequest,
                        context: grpc.aio.ServicerContext) -> tools_pb2.ListUnitsResponse:
        return tools_pb2.ListUnitsResponse(units=[
            tools_pb2.Unit(symbol=u.symbol, name=u.name, quantity=u.quantity, aliases=list(u.aliases))
            for u in units.list_units(request.quantity)])


def _moment(moment: clock.Moment) -> tools_pb2.DateTimeResponse:
    return tools_pb2.DateTimeResponse(datetime=moment.iso, timezone=moment.zone, utc_offset=moment.utc_offset,
                                      day_of_week=moment.day_of_week, daylight_saving=moment.daylight_saving)


class ClockServicer(tools_pb2_grpc.ClockServicer):
    def __init__(self, now: Callable[[], datetime] | None = None) -> None:
        self._now = now

    async def Now(self, request: tools_pb2.NowRequest, context: grpc.aio.ServicerContext) -> tools_pb2.DateTimeResponse:
        if self._now is None:
            return _moment(clock.now(request.timezone))
        return _moment(clock.now(request.timezone, self._now))

    async def ConvertTimeZone(self, request: tools_pb2.ConvertTimeZoneRequest,
                              context: grpc.aio.ServicerContext) -> tools_pb2.DateTimeResponse:
        return _moment(clock.convert_time_zone(request.datetime, request.from_timezone, request.to_timezone))

    async def AddDuration(self, request: tools_pb2.AddDurationRequest,
                          context: grpc.aio.ServicerContext) -> tools_pb2.DateTimeResponse:
        return _moment(clock.add_duration(request.datetime, weeks=request.weeks, days=request.days,
                                          hours=request.hours, minutes=request.minutes, seconds=request.seconds,
                                          timezone=request.timezone))

    async def Difference(self, request: tools_pb2.DifferenceRequest,
                         context: grpc.aio.ServicerContext) -> tools_pb2.DifferenceResponse:
        result = clock.difference(request.start, request.end, request.timezone)
        days, hours, minutes, seconds = result.parts()
        return tools_pb2.DifferenceResponse(total_seconds=result.total_seconds, days=days, hours=hours,
                                            minutes=minutes, seconds=seconds, human_readable=result.human_readable)

    async def DayOfWeek(self, request: tools_pb2.DayOfWeekRequest,
                        context: grpc.aio.ServicerContext) -> tools_pb2.DayOfWeekResponse:
        day = clock.day_of_week(request.date)
        return tools_pb2.DayOfWeekResponse(day_of_week=day.day_of_week, iso_week=day.iso_week,
                                           day_of_year=day.day_of_year, is_weekend=day.is_weekend)


def _person(person: Person) -> tools_pb2.Person:
    return tools_pb2.Person(name=person.name, title=person.title, department=person.department, email=person.email,
                            phone=person.phone, office_city=person.office_city, manager_name=person.manager_name,
                            manager_email=person.manager_email)


class DirectoryServicer(tools_pb2_grpc.DirectoryServicer):
    def __init__(self, store: DirectoryStore) -> None:
        self._store = store

    async def SearchPeople(self, request: tools_pb2.SearchPeopleRequest,
                           context: grpc.aio.ServicerContext) -> tools_pb2.PeopleResponse:
        people, total = self._store.search(request.query, request.department, request.limit)
        return tools_pb2.PeopleResponse(people=[_person(p) for p in people], total_matches=total)

    async def GetPerson(self, request: tools_pb2.GetPersonRequest,
                        context: grpc.aio.ServicerContext) -> tools_pb2.Person:
        return _person(self._store.get(request.email))

    async def ListDepartment(self, request: tools_pb2.ListDepartmentRequest,
                             context: grpc.aio.ServicerContext) -> tools_pb2.PeopleResponse:
        people = self._store.list_department(request.department)
        return tools_pb2.PeopleResponse(people=[_person(p) for p in people], total_matches=len(people))


def _city(city: geo.City) -> tools_pb2.City:
    return tools_pb2.City(name=city.name, country=city.country, latitude=city.latitude, longitude=city.longitude,
                          timezone=city.timezone, population=city.population)


class GeoServicer(tools_pb2_grpc.GeoServicer):
    async def CityDistance(self, request: tools_pb2.CityDistanceRequest,
                           context: grpc.aio.ServicerContext) -> tools_pb2.CityDistanceResponse:
        result = geo.city_distance(request.from_city, request.to_city)
        return tools_pb2.CityDistanceResponse(kilometers=result.kilometers, miles=result.miles,
                                              initial_bearing_degrees=result.initial_bearing_degrees,
                                              from_city=_city(result.from_city), to_city=_city(result.to_city))

    async def CityInfo(self, request: tools_pb2.CityInfoRequest, context: grpc.aio.ServicerContext) -> tools_pb2.City:
        return _city(geo.find_city(request.city, "city"))


class TextServicer(tools_pb2_grpc.TextServicer):
    async def CountText(self, request: tools_pb2.CountTextRequest,
                        context: grpc.aio.ServicerContext) -> tools_pb2.CountTextResponse:
        counts = text.count_text(request.text)
        return tools_pb2.CountTextResponse(
            words=counts.words, characters=counts.characters,
            characters_without_spaces=counts.characters_without_spaces, sentences=counts.sentences,
            lines=counts.lines, paragraphs=counts.paragraphs, reading_time_minutes=counts.reading_time_minutes)

    async def ChangeCase(self, request: tools_pb2.ChangeCaseRequest,
                         context: grpc.aio.ServicerContext) -> tools_pb2.ChangeCaseResponse:
        return tools_pb2.ChangeCaseResponse(text=text.change_case(request.text, request.target_case))
