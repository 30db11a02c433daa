"""The benchmark's own arithmetic: a wrong draft replay would misstate what speculation could win."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench.ceiling import lookup_draft, tokens_per_run
from bench.mesh_tax import (
    DIRECT,
    GRPC,
    HTTP,
    LITELLM,
    Results,
    Stream,
    input_only_rules,
    render,
    results_from_json,
    summarize,
)
from bench.prefill_bound import shared_prefix
from bench.relay_floor import WAYS, Timings
from bench.relay_floor import render as render_floor
from bench.relay_floor import summarize as summarize_floor
from services.common.guardrails import Stage
from services.policy.rules import DEFAULT_RULES_PATH, load_rules


def test_a_lookup_draft_continues_the_latest_longest_match() -> None:
    # "5 6" occurs twice before the tail; the latest occurrence (followed by 9) wins over the earlier (7 8).
    assert lookup_draft([5, 6, 7, 8, 5, 6, 9, 1, 5, 6], 2) == [9, 1]
    # A 3-gram match beats a later 1-gram one.
    assert lookup_draft([1, 2, 3, 4, 7, 3, 0, 1, 2, 3], 1) == [4]
    assert lookup_draft([1, 2, 3], 4) == []  # nothing earlier to copy
    assert lookup_draft([4, 4], 3) == [4]  # the draft stops where the context does


def test_the_shared_prefix_leaves_every_prompt_a_token_of_its_own() -> None:
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 3, 7]]) == 2
    assert shared_prefix([[9, 1], [8, 1]]) == 0
    # Identical prompts: the prefix stops one short, so each one's rest has a token to run.
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2


def test_tokens_per_run_counts_agreed_drafts_plus_the_models_own_token() -> None:
    prompt = [10, 11, 12, 13, 14, 15, 16, 17]
    # The answer copies the prompt: the first run has nothing to draft from, then drafts of 3 agree whole
    # (runs make 1, 4 and 3 tokens: the last draft reaches the answer's end).
    assert tokens_per_run([prompt], [list(prompt)], 3) == 8 / 3
    # An answer of fresh tokens never matches a draft: one token per run.
    assert tokens_per_run([prompt], [[90, 91, 92, 93]], 3) == 1.0
    # A wrong draft (11 after 10, where the answer says 20) still leaves the run the model's own token.
    assert tokens_per_run([[10, 11, 12]], [[10, 20]], 1) == 1.0


def test_the_mesh_tax_bench_screens_the_input_only_with_the_default_rules(tmp_path: Path) -> None:
    default = load_rules(DEFAULT_RULES_PATH)
    only_input = load_rules(input_only_rules(tmp_path / "rules.yaml"))
    assert {s.id for s in only_input.specs} == {s.id for s in default.specs if Stage.INPUT in s.stages}
    assert all(s.stages == frozenset({Stage.INPUT}) for s in only_input.specs) and only_input.specs


def test_the_mesh_tax_checks_compare_the_ways_side_by_side() -> None:
    results = Results(ceiling_step_ms=[100.0, 80.0])  # the fastest bare step makes the ceiling
    rates = {DIRECT: 200.0, GRPC: 190.0, HTTP: 170.0, LITELLM: 120.0}
    ttft_ms = {DIRECT: 50.0, GRPC: 53.0, HTTP: 54.0, LITELLM: 74.0}
    mesh_cpu = {DIRECT: 0.1, GRPC: 0.6, HTTP: 0.5, LITELLM: 1.5}
    for way, rate in rates.items():
        cpu = {"inference": 9.0, "gateway": mesh_cpu[way], "bench client": 0.2}
        results.batches[way] = [{"tokens_per_s": rate, "wall_s": 1.0, "cpu_s_per_1000_tokens": cpu}]
        results.singles[way] = [Stream(32, ttft_ms[way] / 1e3, 32 / (rate / 10))]
    summary = summarize(results, streams=16, max_tokens=64)
    assert summary["ceiling_tokens_per_s"] == 16 * 64 / (63 * 0.080)
    checks = {c["name"]: c for c in summary["checks"]}
    assert checks["gateway gRPC / direct, 16 streams (tok/s)"]["value"] == 0.95
    assert checks["gateway HTTP / direct, 16 streams (tok/s)"]["passed"] is False  # 0.85
    assert checks["TTFT added by the whole mesh, grpc, one stream, p50 (ms)"]["passed"] is True  # 3 ms
    # HTTP adds 4 ms to the first token where LiteLLM adds 20 on top of it: 0.2 of it, within a third.
    litellm_ttft = next(c for name, c in checks.items()
                        if name.startswith("lmesh's mesh adds / LiteLLM adds: TTFT p50"))
    assert litellm_ttft["value"] == pytest.approx(0.2) and litellm_ttft["passed"] is True
    assert "| gateway gRPC Chat | 190.0 (190) | 0.950x |" in render(summary, 16, 64, 32)
    # 0.5 s of the gateway's CPU per 1000 tokens beyond direct, taken from an engine that needs 9.
    grpc_cpu = checks["gateway grpc / direct, 16 streams, from CPU per token (with every core busy)"]
    assert grpc_cpu["value"] == pytest.approx(9.0 / 9.5) and grpc_cpu["passed"] is True
    saved = json.loads(json.dumps({"raw": dataclasses.asdict(results)}))
    assert summarize(results_from_json(saved["raw"]), streams=16, max_tokens=64) == summary


def test_the_constrained_bench_compares_each_round_with_its_own_free_arm() -> None:
    from bench.constrained import FREE, MIXED, MIXED_INLINE, summarize

    runs = {FREE: [{"tokens_per_s": 100.0}, {"tokens_per_s": 50.0}, {"tokens_per_s": 80.0}],
            MIXED: [{"tokens_per_s": 90.0}, {"tokens_per_s": 50.0}, {"tokens_per_s": 76.0}],
            MIXED_INLINE: [{"tokens_per_s": 80.0}, {"tokens_per_s": 60.0}, {"tokens_per_s": 40.0}]}
    summary = summarize(runs)
    assert summary["tokens_per_s"] == {FREE: 80.0, MIXED: 76.0, MIXED_INLINE: 60.0}
    # Per-round ratios 0.9, 1.0, 0.95 and 0.8, 1.2, 0.5: the median of each, not a ratio of medians.
    assert summary["ratio_to_free"] == {MIXED: pytest.approx(0.95), MIXED_INLINE: pytest.approx(0.8)}


def test_the_constrained_bench_schema_outlasts_the_tokens_generated(built_model: Path) -> None:
    """No constrained stream may complete early, or the arms would decode different batches: even its shortest
    valid output is longer than the default 64 tokens."""
    from bench.constrained import SCHEMA, decoder_eos
    from services.inference.constrained import ConstraintSpec, Grammars

    grammars = Grammars.from_tokenizer_json((built_model / "tokenizer.json").read_text(encoding="utf-8"),
                                            decoder_eos(built_model))
    shortest = json.dumps({"calls": [{"tool": "search", "query": "", "limit": 1, "tags": []}] * 8},
                          separators=(",", ":"))
    state = grammars.compile(ConstraintSpec("json_schema", json.dumps(SCHEMA))).start()
    tokens = grammars.tokenizer.tokenize_str(shortest)
    for token in tokens:
        state.consume(token)
    assert state.stopped and not state.matcher.is_error()  # a valid, complete output...
    assert len(tokens) > 64  # ...longer than the tokens each stream generates


def test_the_relay_floor_pairs_each_ways_time_per_token_with_the_direct_chat_beside_it() -> None:
    timings = Timings()
    for n in range(3):
        for way in WAYS:
            extra = 0.0 if way == "direct" else 1.0 + n  # ms a token over the direct chat that ran beside it
            per_token_s = (20.0 + n + extra) / 1e3
            first_s = 0.030 + extra / 1e3
            timings.add(way, Stream(tokens=11, ttft_s=first_s, wall_s=first_s + 10 * per_token_s))
    for way in WAYS:  # one token: a first token, no decode step; its pair is left out of the per-token figures
        timings.add(way, Stream(tokens=1, ttft_s=0.03 if way == "direct" else 0.05, wall_s=0.05))
    assert timings.per_token_ms["direct"][-1] is None and len(timings.ttft_ms["direct"]) == 4
    rows = summarize_floor(timings)
    assert rows["direct"]["per_token_added_p50_ms"] == 0.0
    assert rows["relay"]["per_token_added_p50_ms"] == pytest.approx(2.0)  # paired: 1, 2, 3 ms
    assert rows["relay"]["per_token_p50_ms"] == pytest.approx(23.0)
    assert rows["gateway"]["added_p50_ms"] == pytest.approx(2.5)  # first tokens: 1, 2, 3 and 20 ms over direct
    assert "time per token after the first" in render_floor(rows, 3)


def test_the_step_batching_bench_reads_every_token_both_ways(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: the bench makes its TLS certificate with it")
    out = tmp_path / "step_batching.json"
    done = subprocess.run([sys.executable, "-m", "bench.step_batching", "--streams", "3", "--steps", "4",
                           "--step-ms", "1", "--rounds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    saved = json.loads(out.read_text())
    assert set(saved["medians"]) == {"per-stream", "per-step"} and saved["streams"] == 3
    assert all(value > 0 for way in saved["medians"].values() for value in way.values())
    assert "one message per step would save" in done.stdout
