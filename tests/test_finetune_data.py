"""The tool fine-tune's synthetic data (services.model.tool_data, services.model.finetune without training): plans the
constraint accepts, the gateway's own prompts and real tool results, no bench question, the same data every run."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from lmesh.tools.v1 import tools_pb2, tools_pb2_grpc

from bench.calculator import questions
from services.common.server import enable_reflection
from services.gateway.mesh_tools import DEFAULT_MAX_CALLS, plan_instructions, plan_schema, results_message
from services.gateway.tool_catalog import ToolFailure
from services.gateway.tool_graph import CallFinished, parse_plan
from services.gateway.tool_schema import describe_method
from services.model import finetune, tool_data
from services.model.manifest import ModelManifest
from services.tools import servicer as tool_servicers
from services.tools.calculator import evaluate
from services.tools.catalog import TOOLS

EXAMPLES = 600
TOOL_LINE = re.compile(r"^- ([a-z_]+)\(", re.MULTILINE)


@pytest.fixture(scope="module")
def examples() -> list[tool_data.Example]:
    return tool_data.tool_examples(EXAMPLES)


def _described(system: str) -> list[Any]:
    return [tool_data.described_tool(name) for name in TOOL_LINE.findall(system)]


def test_every_plan_is_one_call_the_plan_schema_accepts_and_the_gateway_parses(examples: list[Any]) -> None:
    plans = [e for e in examples if e.kind == "plan"]
    assert len(plans) > EXAMPLES // 3
    named = set()
    for example in plans:
        (role, system), (user_role, question) = example.messages
        assert (role, user_role) == ("system", "user")
        described = _described(system)
        assert 1 <= len(described) <= 3
        plan = json.loads(example.target)
        jsonschema.Draft202012Validator(plan_schema(described, DEFAULT_MAX_CALLS)).validate(plan)
        assert example.target == json.dumps(plan)  # one line, json.dumps' separators
        [call] = parse_plan(example.target, DEFAULT_MAX_CALLS)
        named.add(call.tool)
        if call.tool == "calculator":
            expression = plan["calls"][0]["arguments"]["expression"]
            assert list(plan["calls"][0]["arguments"]) == ["expression"]  # optional fields left out
            assert expression in question  # copied verbatim
            evaluate(expression)  # and the calculator reads it
    assert {"calculator", *tool_data.OTHER_TOOLS} <= named  # the choice is learnt, not always the calculator


def test_plan_prompts_are_the_gateways(examples: list[Any]) -> None:
    for example in (e for e in examples if e.kind == "plan"):
        system = example.messages[0][1]
        assert system == plan_instructions(_described(system))


def test_calculator_plans_cover_2_to_12_operands_in_symbols_and_words(examples: list[Any]) -> None:
    expressions = [json.loads(e.target)["calls"][0]["arguments"]["expression"] for e in examples
                   if e.kind == "plan" and '"calculator"' in e.target]
    operands = {len(re.findall(r"\d+(?:\.\d+)?", x)) for x in expressions}
    assert {2, 5, 10, 12} <= operands
    assert any(" times " in x for x in expressions) and any(" * " in x for x in expressions)
    assert any("divided by" in x for x in expressions) and any("(" in x for x in expressions)


def test_answers_state_the_real_result_from_the_gateways_results_turn(examples: list[Any]) -> None:
    answers = [e for e in examples if e.kind == "answer"]
    assert len(answers) > EXAMPLES // 5
    failures = 0
    for example in answers:
        (_, question), (role, results) = example.messages
        assert role == "user"
        line = results.splitlines()[1]
        tool, arguments_text = re.match(r"1\. ([a-z_]+) (\{.*?\}) returned ", line).groups()  # type: ignore[union-attr]
        arguments = json.loads(arguments_text)
        outcome = tool_data.call_tool(tool, arguments)
        if isinstance(outcome, ToolFailure):
            failures += 1
            finished = CallFinished(1, tool, arguments, None, outcome, 0.0)
            assert outcome.message.rstrip(".") in example.target
        else:
            finished = CallFinished(1, tool, arguments, outcome, None, 0.0)
            if tool == "calculator":
                assert outcome["value"] in example.target
                assert Fraction(outcome["value"]) == evaluate(arguments["expression"])
        assert results == results_message([finished], question)
    assert failures >= 1


def test_no_training_question_is_a_bench_question(examples: list[Any]) -> None:
    bench = questions(50)
    texts = {q.text for q in bench} | {f"{q.text} Answer with the number." for q in bench}
    expressions = {q.expression for q in bench}
    for example in examples:
        asked = example.messages[-1][1] if example.kind == "plan" else example.messages[0][1]
        assert asked not in texts
        if example.kind == "plan" and '"calculator"' in example.target:
            assert json.loads(example.target)["calls"][0]["arguments"]["expression"] not in expressions
    assert tool_data.DATA_SEED != questions.__globals__["SEED"]


def test_the_data_are_the_same_every_run_and_follow_the_seed() -> None:
    assert tool_data.tool_examples(80) == tool_data.tool_examples(80)
    assert tool_data.tool_examples(80) != tool_data.tool_examples(80, seed=tool_data.DATA_SEED + 1)


@pytest.fixture
async def tools_server() -> AsyncIterator[str]:
    """The shipped tool servicers on a plain server with reflection, as the gateway's catalog reads them."""
    server = grpc.aio.server()
    tools_pb2_grpc.add_CalculatorServicer_to_server(tool_servicers.CalculatorServicer(), server)
    tools_pb2_grpc.add_GeoServicer_to_server(tool_servicers.GeoServicer(), server)
    enable_reflection(server, [s.full_name for s in tools_pb2.DESCRIPTOR.services_by_name.values()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_schemas_and_results_are_what_reflection_and_a_real_call_give(tools_server: str) -> None:
    async with grpc.aio.insecure_channel(tools_server) as channel:
        for name, arguments in (("calculator", {"expression": "12 plus 7 times 3"}),
                                ("city_distance", {"from_city": "Paris", "to_city": "Tokyo"})):
            entry = next(e for e in TOOLS if e.name == name)
            method = await describe_method(channel, entry.method_path)
            tool, parameters = tool_data.described_tool(name)
            assert parameters == method.parameters
            assert (tool.name, tool.method_path, tool.description) == (name, entry.method_path, entry.description)
            call = channel.unary_unary(method.path, request_serializer=type(method.request_class()).SerializeToString,
                                       response_deserializer=method.response_class.FromString)
            response = await call(method.request_from_json(arguments))
            assert tool_data.call_tool(name, arguments) == method.result_to_json(response)


def test_a_failed_call_reports_the_tools_own_message() -> None:
    failure = tool_data.call_tool("calculator", {"expression": "1/0"})
    assert failure == ToolFailure("INVALID_ARGUMENT", "expression: division by zero at position 1")


def test_examples_tokenize_with_the_model_template_and_train_only_the_assistant(built_model: Path,
                                                                               examples: list[Any]) -> None:
    manifest = ModelManifest.load(built_model)
    encoder = finetune.Encoder(built_model, manifest)
    chat = tool_data.Example("chat", [("user", "Hi!")], "Hello", complete=False)
    for example in [*examples[:20], chat]:
        ids, labels = encoder.example_ids(example)
        assert len(ids) == len(labels)
        prompt = encoder.prompt_ids(example.messages)
        assert ids[:len(prompt)] == prompt and set(labels[:len(prompt)]) == {-100}
        trained = labels[len(prompt):]
        assert (trained[-1] == encoder.im_end) == example.complete
        text = encoder.tokenizer.decode(trained, skip_special_tokens=False)
        assert text == example.target + (finetune.IM_END if example.complete else "")
        rendered = encoder.tokenizer.decode(prompt, skip_special_tokens=False)
        assert rendered.endswith("<|im_start|>assistant\n")


def test_a_finished_build_is_found_by_its_recipe(built_model: Path, tmp_path: Path) -> None:
    base = ModelManifest.load(built_model)
    record = finetune.source_record(base, 80, 1e-4)
    assert finetune.cached_tuned(tmp_path, record) is None
    for name in ("model.onnx", "tokenizer.json"):
        (tmp_path / name).write_bytes(b"x")
    dataclasses.replace(base, name=finetune.MODEL_NAME, version="1",
                        source=finetune.tuned_source(base, record)).save(tmp_path)
    source = json.loads((tmp_path / "lmesh_model.json").read_text())["source"]
    assert len(json.dumps(source, sort_keys=True)) <= 256  # the registry's label limit
    assert base.source.sha256[:16] in source["file"] and "steps=80" in source["file"]
    assert finetune.cached_tuned(tmp_path, record) is not None
    assert finetune.cached_tuned(tmp_path, finetune.source_record(base, 81, 1e-4)) is None
    assert finetune.main(["--base", str(built_model), "--out", str(tmp_path), "--steps", "80", "--lr", "1e-4",
                          "--check"]) == 0
    assert finetune.main(["--base", str(built_model), "--out", str(tmp_path), "--steps", "5", "--check"]) == 1
