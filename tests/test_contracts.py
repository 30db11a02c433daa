"""The committed gen/ matches protos/, and the contracts keep the conventions other languages rely on."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protos").rglob("*.proto"))


def _diff(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right)
    problems = [f"only in {comparison.left}: {n}" for n in comparison.left_only if n != "__pycache__"]
    problems += [f"only in {comparison.right}: {n}" for n in comparison.right_only if n != "__pycache__"]
    problems += [f"differs: {comparison.left}/{n}" for n in comparison.diff_files]
    for name, sub in comparison.subdirs.items():
        if name != "__pycache__":
            problems += _diff(Path(sub.left), Path(sub.right))
    return problems


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    script = ROOT / "deploy" / "scripts" / "gen_protos.sh"
    subprocess.run(["bash", str(script), sys.executable, str(tmp_path / "gen")], check=True, cwd=ROOT)
    problems = _diff(ROOT / "gen" / "lmesh", tmp_path / "gen" / "lmesh")
    assert not problems, "gen/ is stale, run `make proto`:\n" + "\n".join(problems)


def test_every_proto_is_packaged_per_service_with_language_options() -> None:
    # One package per service, plus lmesh.common.v1: the types several of them share.
    assert {p.parent.parent.name for p in PROTOS} == {"registry", "tokenizer", "inference", "policy", "gateway",
                                                      "tools", "embeddings", "common"}
    for proto in PROTOS:
        text = proto.read_text()
        service = proto.parent.parent.name
        assert f"package lmesh.{service}.v1;" in text, proto
        assert "option go_package" in text and "option java_package" in text, proto


def test_enums_start_unspecified_and_every_rpc_documents_its_errors() -> None:
    for proto in PROTOS:
        text = proto.read_text()
        for name, body in re.findall(r"enum (\w+) \{(.*?)\}", text, re.S):
            first = re.search(r"(\w+) = 0;", body)
            assert first and first.group(1).endswith("_UNSPECIFIED"), (proto.name, name)
        lines = text.splitlines()
        for index, line in enumerate(lines):
            if line.strip().startswith("rpc "):
                comment = []
                j = index - 1
                while j >= 0 and lines[j].strip().startswith("//"):
                    comment.append(lines[j])
                    j -= 1
                documented = "\n".join(comment)
                service_doc = text[: text.find(line)]
                assert documented, f"{proto.name}: {line.strip()} is undocumented"
                assert "Errors" in documented or "Every RPC may return" in service_doc, (proto.name, line.strip())


# Field numbers of the descriptor.proto messages, as they appear in SourceCodeInfo.Location.path.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2

SourcePath = tuple[int, ...]


def _descriptor_set(out: Path) -> descriptor_pb2.FileDescriptorSet:
    """protos/ compiled by protoc with source info (comments), one FileDescriptorProto per file."""
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", "--include_source_info",
                    f"--descriptor_set_out={out}", *map(str, PROTOS)], check=True, cwd=ROOT)
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _enum_elements(enum: descriptor_pb2.EnumDescriptorProto, scope: str,
                   path: SourcePath) -> Iterator[tuple[str, SourcePath]]:
    yield f"{scope}.{enum.name} (enum)", path
    for i, value in enumerate(enum.value):
        # Named under their enum for clarity (protobuf itself scopes a value as a sibling of its enum).
        yield f"{scope}.{enum.name}.{value.name} (enum value)", (*path, ENUM_VALUE, i)


def _message_elements(message: descriptor_pb2.DescriptorProto, scope: str,
                      path: SourcePath) -> Iterator[tuple[str, SourcePath]]:
    name = f"{scope}.{message.name}"
    yield f"{name} (message)", path
    for i, field in enumerate(message.field):
        yield f"{name}.{field.name} (field)", (*path, MESSAGE_FIELD, i)
    for i, oneof in enumerate(message.oneof_decl):
        members = [f for f in message.field if f.HasField("oneof_index") and f.oneof_index == i]
        if members and all(f.proto3_optional for f in members):
            continue  # the synthetic oneof of a proto3 `optional` field: not written in the source
        yield f"{name}.{oneof.name} (oneof)", (*path, MESSAGE_ONEOF, i)
    for i, nested in enumerate(message.nested_type):
        if nested.options.map_entry:
            continue  # the generated entry of a `map<,>` field: not written in the source
        yield from _message_elements(nested, name, (*path, MESSAGE_NESTED, i))
    for i, enum in enumerate(message.enum_type):
        yield from _enum_elements(enum, name, (*path, MESSAGE_ENUM, i))


def _elements(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, SourcePath]]:
    """Every service, rpc, message, field, oneof, enum and enum value of a file: its full name and source path."""
    for i, message in enumerate(file.message_type):
        yield from _message_elements(message, file.package, (FILE_MESSAGE, i))
    for i, enum in enumerate(file.enum_type):
        yield from _enum_elements(enum, file.package, (FILE_ENUM, i))
    for i, service in enumerate(file.service):
        yield f"{file.package}.{service.name} (service)", (FILE_SERVICE, i)
        for j, method in enumerate(service.method):
            yield f"{file.package}.{service.name}.{method.name} (rpc)", (FILE_SERVICE, i, SERVICE_METHOD, j)


def test_every_contract_element_has_a_leading_comment(tmp_path: Path) -> None:
    """Client authors in other languages see only protos/: every element says what it means, in a leading comment
    (right above it; a trailing comment or one on the enclosing message does not count)."""
    files = _descriptor_set(tmp_path / "protos.pb").file
    assert {f.name for f in files} == {str(p.relative_to(ROOT / "protos")) for p in PROTOS}
    undocumented: list[str] = []
    for file in files:
        documented = {tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()}
        undocumented += [f"{file.name}: {name}" for name, path in _elements(file) if path not in documented]
    assert not undocumented, (f"{len(undocumented)} contract elements have no leading comment:\n"
                              + "\n".join(undocumented))


def _fields(message: Any) -> list[tuple[str, int, str]]:
    return [(f.name, f.number, f.message_type.full_name if f.message_type else
             f.enum_type.full_name if f.enum_type else descriptor_pb2.FieldDescriptorProto.Type.Name(f.type))
            for f in message.DESCRIPTOR.fields]


def test_the_shared_types_kept_the_gateways_wire_format() -> None:
    """Moving FinishReason, Usage and the logprob entries to lmesh.common.v1 changed no number, name or type an
    existing client (any language) encodes, nor a JSON name or enum value name (the Node client reads those)."""
    from lmesh.common.v1 import generation_pb2
    from lmesh.gateway.v1 import gateway_pb2

    # Values and fields added later (CONTENT_FILTER, TOOL_CALLS; tool_step, function_calls) are new numbers: none
    # of those before moved.
    assert dict(generation_pb2.FinishReason.items()) == {
        "FINISH_REASON_UNSPECIFIED": 0, "FINISH_REASON_STOP": 1, "FINISH_REASON_LENGTH": 2,
        "FINISH_REASON_CANCELLED": 3, "FINISH_REASON_CONTENT_FILTER": 4, "FINISH_REASON_TOOL_CALLS": 5}
    assert _fields(gateway_pb2.ChatResponse)[:6] == [
        ("delta", 1, "TYPE_STRING"), ("finish_reason", 2, "lmesh.common.v1.FinishReason"),
        ("usage", 3, "lmesh.common.v1.Usage"), ("model", 4, "TYPE_STRING"), ("id", 5, "TYPE_STRING"),
        ("logprobs", 6, "lmesh.common.v1.TokenLogprob")]
    assert _fields(generation_pb2.Usage) == [
        ("prompt_tokens", 1, "TYPE_INT32"), ("completion_tokens", 2, "TYPE_INT32"), ("total_tokens", 3, "TYPE_INT32"),
        ("cached_prompt_tokens", 4, "TYPE_INT32"), ("cached_response", 5, "TYPE_BOOL")]  # 5 added later
    assert _fields(generation_pb2.TokenLogprob) == [
        ("token", 1, "TYPE_STRING"), ("bytes", 2, "TYPE_BYTES"), ("token_id", 3, "TYPE_INT32"),
        ("logprob", 4, "TYPE_FLOAT"), ("top_logprobs", 5, "lmesh.common.v1.TopLogprob")]
    assert _fields(generation_pb2.TopLogprob) == [
        ("token", 1, "TYPE_STRING"), ("bytes", 2, "TYPE_BYTES"), ("token_id", 3, "TYPE_INT32"),
        ("logprob", 4, "TYPE_FLOAT")]


def test_inference_never_reuses_the_numbers_of_its_old_layout() -> None:
    """Its tokens and usage moved to new field numbers with the shared types; the old ones stay reserved, so a
    gateway and a replica from either side of the change see a field missing, never one misread."""
    from lmesh.inference.v1 import inference_pb2

    chunk, finish = inference_pb2.TokenChunk.DESCRIPTOR, inference_pb2.GenerateFinish.DESCRIPTOR
    assert [(f.name, f.number) for f in chunk.fields] == [("tokens", 2)]
    assert [(f.name, f.number) for f in finish.fields] == [("reason", 1), ("usage", 3)]
    text = (ROOT / "protos" / "lmesh" / "inference" / "v1" / "inference.proto").read_text()
    assert re.search(r"message TokenChunk \{[^}]*reserved 1;", text)
    assert re.search(r"message GenerateFinish \{[^}]*reserved 2;", text)
