"""How an answer with client-side functions comes out of the gateway (services.gateway.functions.calls_or_text):
a whole plan becomes calls, text stays text, and a plan cut short by max_tokens is neither."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from lmesh.common.v1 import generation_pb2

from services.gateway.chat import ChatDelta, ChatEnd
from services.gateway.functions import CALL_MARK, FunctionCalling, calls_or_text

WEATHER = ("get_weather", "The weather in a city.",
           json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
STOP, LENGTH = generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH
PLAN = '{"calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'


async def answer(pieces: list[str], finish: generation_pb2.FinishReason.ValueType, choice: str,
                 ) -> list[ChatDelta | ChatEnd]:
    async def events() -> AsyncIterator[ChatDelta | ChatEnd]:
        for piece in pieces:
            yield ChatDelta(piece)
        yield ChatEnd(finish, generation_pb2.Usage(completion_tokens=len(pieces)))

    calling = FunctionCalling.checked([WEATHER], choice)
    return [event async for event in calls_or_text(events(), calling)]


def split(text: str, size: int = 7) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("choice, written", [("required", PLAN), ("get_weather", PLAN), ("auto", CALL_MARK + PLAN)])
async def test_a_whole_plan_is_calls_and_no_text(choice: str, written: str) -> None:
    events = await answer(split(written), STOP, choice)
    assert len(events) == 1 and isinstance(events[0], ChatEnd)
    assert events[0].finish_reason == generation_pb2.FINISH_REASON_TOOL_CALLS
    assert [(c.name, json.loads(c.arguments)) for c in events[0].function_calls] == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("choice, written", [("required", PLAN), ("get_weather", PLAN), ("auto", CALL_MARK + PLAN)])
@pytest.mark.parametrize("kept", [1, 12, 40])
async def test_a_plan_cut_by_max_tokens_ends_length_with_neither_text_nor_calls(choice: str, written: str,
                                                                                 kept: int) -> None:
    cut = written[:len(CALL_MARK) + kept] if choice == "auto" else written[:kept]
    events = await answer(split(cut), LENGTH, choice)
    assert len(events) == 1 and isinstance(events[0], ChatEnd)
    assert events[0].finish_reason == LENGTH and not events[0].function_calls


@pytest.mark.parametrize("finish", [STOP, LENGTH])
async def test_text_without_the_call_mark_stays_text_whole_or_cut(finish: generation_pb2.FinishReason.ValueType,
                                                                   ) -> None:
    events = await answer(split("It is sunny in Paris today."), finish, "auto")
    assert [type(e) for e in events] == [ChatDelta, ChatEnd]
    assert isinstance(events[0], ChatDelta) and events[0].text == "It is sunny in Paris today."
    assert isinstance(events[1], ChatEnd) and events[1].finish_reason == finish
