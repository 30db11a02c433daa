"""The benchmark's own arithmetic: a wrong draft replay would misstate what speculation could win."""

from __future__ import annotations

from bench.ceiling import lookup_draft, tokens_per_run


def test_a_lookup_draft_continues_the_latest_longest_match() -> None:
    # "5 6" occurs twice before the tail; the latest occurrence (followed by 9) wins over the earlier (7 8).
    assert lookup_draft([5, 6, 7, 8, 5, 6, 9, 1, 5, 6], 2) == [9, 1]
    # A 3-gram match beats a later 1-gram one.
    assert lookup_draft([1, 2, 3, 4, 7, 3, 0, 1, 2, 3], 1) == [4]
    assert lookup_draft([1, 2, 3], 4) == []  # nothing earlier to copy
    assert lookup_draft([4, 4], 3) == [4]  # the draft stops where the context does


def test_tokens_per_run_counts_agreed_drafts_plus_the_models_own_token() -> None:
    prompt = [10, 11, 12, 13, 14, 15, 16, 17]
    # The answer copies the prompt: the first run has nothing to draft from, then drafts of 3 agree whole
    # (runs make 1, 4 and 3 tokens: the last draft reaches the answer's end).
    assert tokens_per_run([prompt], [list(prompt)], 3) == 8 / 3
    # An answer of fresh tokens never matches a draft: one token per run.
    assert tokens_per_run([prompt], [[90, 91, 92, 93]], 3) == 1.0
    # A wrong draft (11 after 10, where the answer says 20) still leaves the run the model's own token.
    assert tokens_per_run([[10, 11, 12]], [[10, 20]], 1) == 1.0
