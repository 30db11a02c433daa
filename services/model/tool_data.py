"""Synthetic training data for the tool-use fine-tune (services.model.finetune): the gateway's own plan and answer
turns, built with the gateway's functions so the prompts are byte-identical to what a chat sends.

- Plan examples: `[("system", plan_instructions(described)), ("user", question)]` -> the plan JSON, exactly as
  json.dumps writes it, the arithmetic span copied verbatim into `expression`, optional fields left out; checked
  against plan_schema (what the constraint accepts).
- Answer examples: `[("user", question), ("user", results_message(...))]` with the tool's REAL result (the
  servicer run in-process, converted as the gateway's ToolMethod.result_to_json does) -> a short sentence stating
  the result's value exactly; a failed call -> a sentence saying why it could not be answered.
- Plain chat examples (self-distilled from the base model) are added by finetune.py; this module has no torch.

Everything comes from one random.Random(DATA_SEED), a seed other than bench/calculator.py's, and no question equals
one of the bench's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any, cast

from google.protobuf import json_format, message
from lmesh.tools.v1 import tools_pb2

from services.common.errors import LmeshError
from services.gateway.mesh_tools import DEFAULT_MAX_CALLS, plan_instructions, plan_schema, results_message
from services.gateway.tool_catalog import Tool, ToolFailure
from services.gateway.tool_graph import CallFinished
from services.gateway.tool_schema import ToolMethod, message_schema
from services.tools import servicer as tool_servicers
from services.tools.catalog import TOOLS
from services.tools.directory import DirectoryStore

DATA_SEED = 1180517  # not bench.calculator.SEED: the bench's questions stay unseen
PROVIDER = "lmesh-tools"
# The calculator is the tool the bench (and the issue) is about; the others keep the choice honest.
OTHER_TOOLS = ("convert_units", "city_distance", "day_of_week", "current_time", "convert_time_zone",
               "search_people", "count_text")
FIXED_NOW = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)  # current_time's answers are reproducible

Conversation = list[tuple[str, str]]


@dataclass(frozen=True)
class Example:
    kind: str  # "plan", "answer" or "chat"
    messages: Conversation  # the conversation the gateway sends (without the assistant's turn)
    target: str  # what the assistant should write
    complete: bool = True  # whether the target ends the turn (<|im_end|> is then trained too)


# --------------------------------------------------------------------------- tools as the gateway sees them

_REQUESTS: dict[str, type[message.Message]] = {
    "calculator": tools_pb2.EvaluateRequest, "convert_units": tools_pb2.ConvertRequest,
    "list_units": tools_pb2.ListUnitsRequest, "current_time": tools_pb2.NowRequest,
    "convert_time_zone": tools_pb2.ConvertTimeZoneRequest, "add_duration": tools_pb2.AddDurationRequest,
    "time_between": tools_pb2.DifferenceRequest, "day_of_week": tools_pb2.DayOfWeekRequest,
    "search_people": tools_pb2.SearchPeopleRequest, "get_person": tools_pb2.GetPersonRequest,
    "list_department": tools_pb2.ListDepartmentRequest, "city_distance": tools_pb2.CityDistanceRequest,
    "city_info": tools_pb2.CityInfoRequest, "count_text": tools_pb2.CountTextRequest,
    "change_case": tools_pb2.ChangeCaseRequest,
}


def described_tool(name: str) -> tuple[Tool, dict[str, Any]]:
    """(Tool, parameters schema) as the gateway's catalog gives them for a shipped tool."""
    entry = next(e for e in TOOLS if e.name == name)
    return (Tool(entry.name, PROVIDER, entry.method_path, entry.description),
            message_schema(_REQUESTS[name].DESCRIPTOR))


_STORE: DirectoryStore | None = None


def call_tool(name: str, arguments: dict[str, Any]) -> dict[str, Any] | ToolFailure:
    """Runs a shipped tool in-process through its servicer: the result JSON the gateway would put in the
    conversation, or the failure it would report."""
    global _STORE
    entry = next(e for e in TOOLS if e.name == name)
    service = entry.service.rsplit(".", 1)[1]
    servicer: Any
    if service == "Directory":
        _STORE = _STORE or DirectoryStore()
        servicer = tool_servicers.DirectoryServicer(_STORE)
    elif service == "Clock":
        servicer = tool_servicers.ClockServicer(now=lambda: FIXED_NOW)
    else:
        servicer = getattr(tool_servicers, f"{service}Servicer")()
    request = json_format.ParseDict(arguments, _REQUESTS[name]())
    try:
        response = _finish(getattr(servicer, entry.method)(request, None))
    except LmeshError as exc:  # what the common interceptor sends and the catalog turns into a ToolFailure
        return ToolFailure(exc.code.name, exc.message)
    return ToolMethod.result_to_json(response)


def _finish(call: Coroutine[Any, Any, message.Message]) -> message.Message:
    """The result of a servicer method that never waits (the shipped tools compute in place): run without an event
    loop, so the data build works inside one too."""
    try:
        call.send(None)
    except StopIteration as done:
        return cast(message.Message, done.value)
    call.close()
    raise RuntimeError("a tool servicer waited on something; the data build runs them without an event loop")


def plan_text(tool: str, arguments: dict[str, Any]) -> str:
    return json.dumps({"calls": [{"tool": tool, "arguments": arguments}]})


# --------------------------------------------------------------------------- arithmetic questions

_WORD_OPS = {"+": ("plus",), "-": ("minus",), "*": ("times", "times", "multiplied by"), "/": ("divided by",)}


def _number(rng: random.Random, after: str) -> str:
    roll = rng.random()
    if after == "*" and roll < 0.5:
        return str(rng.randint(2, 12))
    if roll < 0.12:
        return f"{rng.randint(0, 99)}.{rng.randint(1, 99)}".rstrip("0")
    if roll < 0.22:
        return str(rng.randint(100, 9999))
    return str(rng.randint(1, 99))


def make_expression(rng: random.Random, operands: int) -> tuple[str, str]:
    """(the span as the question writes it, its form): symbols spaced or not, words, with parentheses or not."""
    numbers = [_number(rng, "")]
    ops: list[str] = []
    for _ in range(operands - 1):
        op = rng.choice("+-*/")
        ops.append(op)
        numbers.append(_number(rng, op))
    form = rng.choices(("symbols", "words", "tight", "mixed"), weights=(45, 40, 8, 7))[0]
    parts = list(numbers)
    if rng.random() < 0.2 and operands >= 3:  # one parenthesized group of two or more operands
        start = rng.randrange(0, operands - 1)
        end = rng.randrange(start + 1, min(operands, start + 4))
        if (start, end) != (0, operands - 1):
            parts[start] = "(" + parts[start]
            parts[end] = parts[end] + ")"
    pieces = [parts[0]]
    for op, part in zip(ops, parts[1:], strict=True):
        if form == "words" or (form == "mixed" and rng.random() < 0.5):
            pieces += [rng.choice(_WORD_OPS[op]), part]
        elif form == "tight":
            pieces[-1] += op + part
            continue
        else:
            pieces += [op, part]
    return " ".join(pieces), form


_PLAN_PHRASES = (
    "What is {e}?", "What is {e}?", "What is {e}?", "what is {e}", "What's {e}?", "Calculate {e}.", "Calculate {e}",
    "How much is {e}?", "Compute {e}, please.", "Please compute {e}.", "{e} = ?", "{e} =", "Evaluate {e}.",
    "Can you work out {e}?", "Tell me the result of {e}.", "I need the value of {e}.", "Solve {e}.",
    "What does {e} come to?", "Quick question: what is {e}?", "Find {e}.",
    "A shop adds up an order as {e}. What is the total?", "My budget is {e}. How much is that?",
    "The score was computed as {e}. What is it?",
)
_SUFFIXES = ("", "", "", " Answer with the number.", " Answer with the number.", " Answer with the number.",
             " Just give the number.", " Thanks!")


def bench_texts() -> set[str]:
    """Every question text and expression the calculator bench can ask (up to 200 per size)."""
    from bench.calculator import questions

    asked = questions(200)
    return {q.text for q in asked} | {q.expression for q in asked} | {q.text.removeprefix("What is ").rstrip("?")
                                                                     for q in asked}


def calculator_question(rng: random.Random, forbidden: set[str]) -> tuple[str, str]:
    """(user text, arithmetic span) with 2 to 12 operands, never a bench question or expression."""
    while True:
        operands = rng.choices(range(2, 13), weights=(10, 10, 10, 10, 10, 10, 10, 10, 10, 6, 6))[0]
        span, _ = make_expression(rng, operands)
        text = rng.choice(_PLAN_PHRASES).format(e=span) + rng.choice(_SUFFIXES)
        if span not in forbidden and text.removesuffix(" Answer with the number.") not in forbidden:
            return text, span


# --------------------------------------------------------------------------- other tools' questions

_CITIES = ("Paris", "Tokyo", "London", "New York", "Berlin", "Sydney", "Toronto", "Madrid", "Rome", "Cairo",
           "Mumbai", "Singapore", "Chicago", "Seoul", "Lima", "Nairobi")
_ZONES = ("Asia/Tokyo", "Europe/Berlin", "America/New_York", "Europe/London", "Australia/Sydney",
          "America/Los_Angeles", "Asia/Kolkata", "Europe/Paris")
_UNITS = (("km", "miles"), ("miles", "km"), ("kg", "pounds"), ("pounds", "kg"), ("celsius", "fahrenheit"),
          ("fahrenheit", "celsius"), ("liters", "gallons"), ("feet", "meters"), ("GiB", "MB"), ("mph", "km/h"),
          ("cups", "liters"), ("hours", "minutes"))
_TEXTS = ("The quick brown fox jumps over the lazy dog.", "It was a dark and stormy night. The rain fell.",
          "Hello world, this is a short test sentence.", "We ship on Fridays. Orders placed later wait a week.",
          "Small models can use tools to answer exactly.")
_PEOPLE = (("engineers in Toronto", "engineer Toronto"), ("someone named Chen", "Chen"),
           ("lawyers in London", "lawyer London"), ("the sales people in Berlin", "sales Berlin"),
           ("a designer called Ana", "Ana designer"), ("managers in Singapore", "manager Singapore"))


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1990, 2035)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def other_question(rng: random.Random, tool: str) -> tuple[str, dict[str, Any]]:
    """(user text, the call's arguments) for a non-calculator tool."""
    if tool == "convert_units":
        value = str(rng.choice((rng.randint(1, 500), round(rng.uniform(0.5, 99), 1))))
        src, dst = rng.choice(_UNITS)
        text = rng.choice(("Convert {v} {a} to {b}.", "How many {b} is {v} {a}?", "What is {v} {a} in {b}?"))
        return text.format(v=value, a=src, b=dst), {"value": value, "from_unit": src, "to_unit": dst}
    if tool == "city_distance":
        a, b = rng.sample(_CITIES, 2)
        text = rng.choice(("How far is {a} from {b}?", "What is the distance between {a} and {b}?",
                           "Distance from {a} to {b} as the crow flies?"))
        return text.format(a=a, b=b), {"from_city": a, "to_city": b}
    if tool == "day_of_week":
        date = _date(rng)
        text = rng.choice(("What day of the week is {d}?", "Which weekday was {d}?", "Is {d} a weekend?"))
        return text.format(d=date), {"date": date}
    if tool == "current_time":
        zone = rng.choice(_ZONES)
        text = rng.choice(("What time is it now in {z}?", "What is the current time in {z}?",
                           "What day is it right now in {z}?"))
        return text.format(z=zone), {"timezone": zone}
    if tool == "convert_time_zone":
        a, b = rng.sample(_ZONES, 2)
        moment = f"{_date(rng)}T{rng.randint(0, 23):02d}:{rng.choice((0, 15, 30, 45)):02d}"
        text = rng.choice(("When it is {m} in {a}, what time is it in {b}?", "Convert {m} from {a} to {b}."))
        return text.format(m=moment, a=a, b=b), {"datetime": moment, "from_timezone": a, "to_timezone": b}
    if tool == "search_people":
        asked, query = rng.choice(_PEOPLE)
        text = rng.choice(("Find {p} in the company directory.", "Who are {p}?", "Search the directory for {p}."))
        return text.format(p=asked), {"query": query}
    if tool == "count_text":
        passage = rng.choice(_TEXTS)
        text = rng.choice(('How many words are in "{t}"?', 'Count the words of this text: {t}'))
        return text.format(t=passage), {"text": passage}
    raise ValueError(tool)


# --------------------------------------------------------------------------- answers


def _answer_sentence(rng: random.Random, tool: str, result: dict[str, Any]) -> str:
    if tool == "calculator":
        return rng.choice(("The answer is {v}.", "The answer is {v}.", "{v}", "The result is {v}.",
                           "It is {v}.")).format(v=result["value"])
    if tool == "convert_units":
        return f"That is {result['value']} {result['to_unit']}."
    if tool == "city_distance":
        return (f"The distance is {result['kilometers']:.0f} km ({result['miles']:.0f} miles).")
    if tool == "day_of_week":
        return f"It is a {result['day_of_week']}."
    if tool in ("current_time", "convert_time_zone"):
        return f"It is {result['datetime']} ({result['day_of_week']}) in {result['timezone']}."
    if tool == "search_people":
        people = result["people"][:3]
        if not people:
            return "I found no one matching that in the directory."
        return "I found " + "; ".join(f"{p['name']}, {p['title']} in {p['office_city']}" for p in people) + "."
    if tool == "count_text":
        return f"The text has {result['words']} words."
    raise ValueError(tool)


def _failure_sentence(failure: ToolFailure) -> str:
    return f"I could not compute it: {failure.message.rstrip('.')}."


def answer_example(rng: random.Random, question: str, tool: str, arguments: dict[str, Any]) -> Example | None:
    outcome = call_tool(tool, arguments)
    if isinstance(outcome, ToolFailure):
        finished = CallFinished(1, tool, arguments, None, outcome, 0.01)
        target = _failure_sentence(outcome)
    else:
        finished = CallFinished(1, tool, arguments, outcome, None, 0.01)
        target = _answer_sentence(rng, tool, outcome)
    return Example("answer", [("user", question), ("user", results_message([finished], question))], target)


_BROKEN = ("12 / 0", "5 / (3 - 3)", "7 divided by 0", "2 ^ 0.5", "4 + * 2", "(3 + 4", "0 ^ -1")


# --------------------------------------------------------------------------- the data set


def tool_examples(count: int, seed: int = DATA_SEED) -> list[Example]:
    """`count` plan and answer examples (about 55% calculator plans, 12% other plans, 30% calculator answers, 5%
    other answers and failures), in a fixed order from `seed`."""
    rng = random.Random(seed)
    forbidden = bench_texts()
    calculator = described_tool("calculator")
    others = {name: described_tool(name) for name in OTHER_TOOLS}
    examples: list[Example] = []
    while len(examples) < count:
        roll = rng.random()
        if roll < 0.55:
            text, span = calculator_question(rng, forbidden)
            described = [calculator]
            if rng.random() < 0.2:  # distractors: the bench names the calculator alone, retrieval may add more
                described += [others[n] for n in rng.sample(OTHER_TOOLS, rng.randint(1, 2))]
                rng.shuffle(described)
            examples.append(plan_example(described, text, "calculator", {"expression": span}))
        elif roll < 0.67:
            tool = rng.choice(OTHER_TOOLS)
            text, arguments = other_question(rng, tool)
            pool = ["calculator", *[n for n in OTHER_TOOLS if n != tool]]
            described = [others[tool], *[described_tool(n) for n in rng.sample(pool, rng.randint(0, 2))]]
            rng.shuffle(described)
            examples.append(plan_example(described, text, tool, arguments))
        elif roll < 0.95:
            text, span = calculator_question(rng, forbidden)
            example = answer_example(rng, text, "calculator", {"expression": span})
            if example is not None:
                examples.append(example)
        elif roll < 0.975:
            tool = rng.choice(OTHER_TOOLS)
            text, arguments = other_question(rng, tool)
            example = answer_example(rng, text, tool, arguments)
            if example is not None:
                examples.append(example)
        else:
            span = rng.choice(_BROKEN)
            text = rng.choice(_PLAN_PHRASES).format(e=span)
            example = answer_example(rng, text, "calculator", {"expression": span})
            if example is not None:
                examples.append(example)
    return examples


def plan_example(described: list[tuple[Tool, dict[str, Any]]], question: str, tool: str,
                 arguments: dict[str, Any]) -> Example:
    """A plan turn as the gateway sends it; the target must be what the plan's schema accepts."""
    import jsonschema

    target = plan_text(tool, arguments)
    jsonschema.Draft202012Validator(plan_schema(described, DEFAULT_MAX_CALLS)).validate(json.loads(target))
    return Example("plan", [("system", plan_instructions(described)), ("user", question)], target)


def exact_value(text: str) -> Fraction:
    """The calculator's value of `text` (for checks)."""
    from services.tools.calculator import evaluate

    return evaluate(text)


# Ordinary requests the base model answers for the self-distilled chat examples (forgetting stays limited).
CHAT_PROMPTS = (
    "What is the capital of France?", "Write a short poem about the sea.", "List three prime numbers.",
    "Explain gravity to a child.", "Give me a tip for sleeping better.", "What is photosynthesis?",
    "Translate 'good morning' into Spanish.", "Name three colors of the rainbow.", "Who wrote Romeo and Juliet?",
    "Write a haiku about autumn.", "What is a noun?", "How do I boil an egg?", "Why is the sky blue?",
    "Suggest a name for a pet cat.", "What does a CPU do?", "Describe a cat in one sentence.",
    "What are the benefits of exercise?", "Tell me a fun fact about octopuses.", "What is the largest planet?",
    "How can I be more productive?", "Write a thank-you note to a friend.", "What is the boiling point of water?",
    "Give me a synonym for happy.", "What is machine learning?", "Summarize the story of Cinderella.",
    "What should I pack for a beach trip?", "Explain what a verb is.", "Hi!", "How are you today?",
    "What is the difference between weather and climate?", "Recommend a good habit for students.",
    "What language is spoken in Brazil?", "Write one sentence about friendship.", "What is an atom?",
    "Why do leaves change color in autumn?", "Give me three ideas for dinner.", "What is the moon made of?",
    "How do bees make honey?", "What is a good way to learn a new language?", "Describe the color blue.",
    "What is democracy?", "Tell me a short joke.", "What is the tallest mountain in the world?",
    "How many continents are there?", "What does a doctor do?", "Write a slogan for a coffee shop.",
    "Explain what the internet is.", "What is recycling and why does it matter?", "Who painted the Mona Lisa?",
    "What is your name?", "Can you help me plan my day?", "What is a healthy breakfast?",
    "Give me a motivational quote.", "What is the water cycle?", "How do plants grow?",
    "What is the speed of light?", "Explain what an email is.", "What is the main ingredient of bread?",
    "Write a two-line rhyme about rain.", "What is a volcano?", "What are clouds made of?",
    "Why do we need sleep?", "What is an ecosystem?", "Describe a sunset.",
)

Render = Callable[[Conversation], str]
