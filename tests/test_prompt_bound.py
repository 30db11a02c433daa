"""The gateway's cheap refusal of messages whose size alone shows their prompt cannot fit the context."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.gateway.chat import NORMALIZED_SHRINK_BOUND, refuse_what_cannot_fit
from services.gateway.logprobs import Vocabulary

VOCABULARY = Vocabulary(token_bytes=[b"a", b"0123456789", b"<|im_start|>"[:5]], special_token_ids=frozenset())


def test_the_longest_entry_bounds_what_a_token_stands_for() -> None:
    assert VOCABULARY.longest_token_bytes == 10
    assert Vocabulary(token_bytes=[], special_token_ids=frozenset()).longest_token_bytes == 1


def test_messages_too_large_for_any_tokenization_are_refused_naming_messages() -> None:
    per_token = 10 * NORMALIZED_SHRINK_BOUND
    refuse_what_cannot_fit([("user", "x" * per_token * 100)], VOCABULARY, 100)  # might still fit: left to render
    with pytest.raises(InvalidArgument) as caught:
        refuse_what_cannot_fit([("system", "x" * per_token * 60), ("user", "😀" * (per_token * 41 // 4))],
                               VOCABULARY, 100)
    assert caught.value.field == "messages"
    assert "at least 101 tokens; at most 100 fit" in caught.value.message


@given(st.lists(st.tuples(st.sampled_from(["user", "assistant"]), st.text(max_size=400)), max_size=4),
       st.integers(min_value=1, max_value=200))
def test_a_refusal_only_when_even_the_densest_tokenization_cannot_fit(messages: list[tuple[str, str]],
                                                                      most: int) -> None:
    size = sum(len(content.encode("utf-8", "surrogatepass")) for _, content in messages)
    fits_densest = size <= VOCABULARY.longest_token_bytes * NORMALIZED_SHRINK_BOUND * (most + 1) - 1
    try:
        refuse_what_cannot_fit(messages, VOCABULARY, most)
    except InvalidArgument:
        assert not fits_densest
    else:
        assert size // (VOCABULARY.longest_token_bytes * NORMALIZED_SHRINK_BOUND) <= most
