"""A tool's contract as its gRPC server describes it: the method's request and response messages, read through
server reflection, turned into JSON Schema (what the model's call is constrained to) and used to carry JSON
arguments into protobuf and the protobuf result back out as JSON.

Any team's gRPC service is a tool without lmesh code: reflection is all it needs (grpcio-reflection, or any
language's reflection service). Field comments do not travel through reflection; field names, types, enums and
`repeated` do, and are what the schema says.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, json_format, message, message_factory
from grpc_reflection.v1alpha import reflection_pb2

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.peers import lost_send_race, past_send_race

V1ALPHA_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
# Nested messages deeper than this are described as plain objects: a recursive message has no finite schema.
MAX_SCHEMA_DEPTH = 6

_INTEGERS = {descriptor.FieldDescriptor.TYPE_INT32, descriptor.FieldDescriptor.TYPE_SINT32,
             descriptor.FieldDescriptor.TYPE_SFIXED32, descriptor.FieldDescriptor.TYPE_UINT32,
             descriptor.FieldDescriptor.TYPE_FIXED32}
# 64-bit integers are strings in proto3's JSON mapping; json_format also takes numbers, which a model writes.
_LONG_INTEGERS = {descriptor.FieldDescriptor.TYPE_INT64, descriptor.FieldDescriptor.TYPE_SINT64,
                  descriptor.FieldDescriptor.TYPE_SFIXED64, descriptor.FieldDescriptor.TYPE_UINT64,
                  descriptor.FieldDescriptor.TYPE_FIXED64}
_NUMBERS = {descriptor.FieldDescriptor.TYPE_DOUBLE, descriptor.FieldDescriptor.TYPE_FLOAT}
_WELL_KNOWN_SCHEMAS: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.Int32Value": {"type": "integer"},
    "google.protobuf.Int64Value": {"type": "integer"},
    "google.protobuf.DoubleValue": {"type": "number"},
    "google.protobuf.FloatValue": {"type": "number"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
}


@dataclass(frozen=True)
class ToolMethod:
    """One unary method of a tool provider, with its message classes."""

    path: str  # `/package.Service/Method`, as gRPC calls it
    request_class: type[message.Message]
    response_class: type[message.Message]

    @property
    def parameters(self) -> dict[str, Any]:
        return message_schema(self.request_class.DESCRIPTOR)

    @property
    def result(self) -> dict[str, Any]:
        return message_schema(self.response_class.DESCRIPTOR)

    def request_from_json(self, arguments: dict[str, Any]) -> message.Message:
        """The request message of `arguments` (proto3 JSON); InvalidArgument naming `arguments` otherwise."""
        request = self.request_class()
        try:
            json_format.ParseDict(arguments, request, ignore_unknown_fields=False)
        except (json_format.ParseError, TypeError, ValueError) as exc:
            raise InvalidArgument("arguments", f"do not fit {self.request_class.DESCRIPTOR.full_name}: {exc}") from exc
        return request

    @staticmethod
    def result_to_json(result: message.Message) -> dict[str, Any]:
        # Every field, defaults too: the model reads `0` where proto3 would leave the field out.
        return json_format.MessageToDict(result, always_print_fields_with_no_presence=True,
                                         preserving_proto_field_name=True)


def split_method_path(method_path: str) -> tuple[str, str]:
    """`package.Service/Method` (a leading `/` allowed) -> (service, method); InvalidArgument otherwise."""
    service, _, method = method_path.lstrip("/").partition("/")
    if not service or not method or "/" in method or "." not in service:
        raise InvalidArgument("method", f"'{method_path}' is not a method path of the form package.Service/Method")
    return service, method


def message_schema(message_descriptor: descriptor.Descriptor, depth: int = 0) -> dict[str, Any]:
    """JSON Schema of a message in proto3's JSON mapping (proto field names, as json_format takes them)."""
    known = _WELL_KNOWN_SCHEMAS.get(message_descriptor.full_name)
    if known is not None:
        return dict(known)
    if depth >= MAX_SCHEMA_DEPTH:
        return {"type": "object"}
    properties = {field.name: field_schema(field, depth) for field in message_descriptor.fields}
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    # Proto3 has no required fields; a model is asked for every plain scalar one, which is what a call means.
    # Fields with presence (`optional`, messages, oneof members) and repeated ones may be left out.
    required = [field.name for field in message_descriptor.fields
                if not field.is_repeated and not field.has_presence]
    if required:
        schema["required"] = required
    return schema


def field_schema(field: descriptor.FieldDescriptor, depth: int = 0) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _single_schema(value, depth + 1)}
    single = _single_schema(field, depth)
    if field.is_repeated:
        return {"type": "array", "items": single}
    return single


def _single_schema(field: descriptor.FieldDescriptor, depth: int) -> dict[str, Any]:
    kind = field.type
    if kind == descriptor.FieldDescriptor.TYPE_MESSAGE:
        return message_schema(field.message_type, depth + 1)
    if kind == descriptor.FieldDescriptor.TYPE_ENUM:
        return {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    if kind == descriptor.FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if kind in _INTEGERS or kind in _LONG_INTEGERS:
        return {"type": "integer"}
    if kind in _NUMBERS:
        return {"type": "number"}
    if kind == descriptor.FieldDescriptor.TYPE_BYTES:
        return {"type": "string", "contentEncoding": "base64"}
    return {"type": "string"}


async def _ask_reflection(method: grpc.aio.StreamStreamMultiCallable, symbol: str, timeout: float,
                          metadata: list[tuple[str, str]]) -> list[bytes] | None:
    """One reflection call for `symbol`; None when the server ended it without an answer."""
    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)

    async for response in method(requests(), timeout=timeout, metadata=metadata):
        if response.HasField("error_response"):
            raise FailedPrecondition(f"server reflection does not know {symbol}: "
                                     f"{response.error_response.error_message}")
        return list(response.file_descriptor_response.file_descriptor_proto)
    return None


async def _reflection_files(channel: grpc.aio.Channel, symbol: str, timeout: float,
                            metadata: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    """The serialized FileDescriptorProtos that define `symbol` and its dependencies, through server reflection
    (v1alpha, then v1 where only that is served)."""
    last: grpc.aio.AioRpcError | None = None
    for path in (V1ALPHA_METHOD, V1_METHOD):
        method = channel.stream_stream(
            path, request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        try:  # a server that refused before reading is asked again for its status
            files = await past_send_race(functools.partial(_ask_reflection, method, symbol, timeout, list(metadata)))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED and not lost_send_race(exc):
                raise
            last = exc
            continue
        if files is not None:
            return files
    raise FailedPrecondition(f"the tool's server has no server reflection ({last.details() if last else ''}); "
                             "a tool needs it for its schema")


def pool_of(files: Iterable[bytes]) -> descriptor_pool.DescriptorPool:
    """A descriptor pool holding `files`, added dependencies first (reflection sends them in any order)."""
    protos = {}
    for data in files:
        proto = descriptor_pb2.FileDescriptorProto.FromString(data)
        protos[proto.name] = proto
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str, trail: tuple[str, ...] = ()) -> None:
        if name in added or name in trail:
            return
        proto = protos.get(name)
        if proto is None:  # a well-known file the server did not send: protobuf's own copy
            try:
                default = descriptor_pool.Default().FindFileByName(name)
            except KeyError:
                raise FailedPrecondition(f"server reflection did not send {name}, which the tool's messages "
                                         "need") from None
            proto = descriptor_pb2.FileDescriptorProto()
            default.CopyToProto(proto)
        for dependency in proto.dependency:
            add(dependency, (*trail, name))
        pool.Add(proto)
        added.add(name)

    for name in protos:
        add(name)
    return pool


async def describe_method(channel: grpc.aio.Channel, method_path: str, timeout: float = 5.0,
                          metadata: Iterable[tuple[str, str]] = ()) -> ToolMethod:
    """The method `package.Service/Method` of the server behind `channel`, described through its reflection."""
    service_name, method_name = split_method_path(method_path)
    pool = pool_of(await _reflection_files(channel, service_name, timeout, metadata))
    try:
        service = pool.FindServiceByName(service_name)
    except KeyError:
        raise FailedPrecondition(f"the tool's server does not describe service {service_name}") from None
    method = service.methods_by_name.get(method_name)
    if method is None:
        raise FailedPrecondition(f"service {service_name} has no method {method_name}")
    if method.client_streaming or method.server_streaming:
        raise FailedPrecondition(f"{service_name}/{method_name} is a streaming method; a tool is a unary one")
    return ToolMethod(f"/{service_name}/{method_name}", message_factory.GetMessageClass(method.input_type),
                      message_factory.GetMessageClass(method.output_type))


# llguidance's keyword for the whitespace JSON may have between its tokens: one space, or one line break and an
# indent. SmolLM2 writes JSON indented (held to one line it writes empty strings), but left free it may also
# fill a plan's whole token bound with line breaks.
BOUNDED_WHITESPACE = {"whitespace_pattern": "( |\\n {0,8})?"}


def compact(schema: dict[str, Any]) -> str:
    """A schema as one line of JSON (the form prompts and constraints carry)."""
    return json.dumps(schema, separators=(",", ":"))  # in field order: the order the model writes them in
