"""The soak's verdict (warm-up cut, RSS growth, the fd rule) on synthetic samples, and a short soak of a real mesh
through the same code path `make soak` runs."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from bench.full_mesh import SERVICES, full_mesh
from bench.soak import (
    FD_ALLOWANCE,
    GRPC,
    HTTP,
    Sample,
    SoakConfig,
    SoakRun,
    draw_chat,
    judge,
    judge_service,
    plot,
    read_process,
    render,
    report,
    soak,
    warm_up_cut,
)

MB = 1024  # kB


def series(rss_mb: list[float], fds: list[int] | None = None, every_s: float = 5.0) -> list[Sample]:
    fds = fds or [40] * len(rss_mb)
    return [Sample(i * every_s, int(mb * MB), fd) for i, (mb, fd) in enumerate(zip(rss_mb, fds, strict=True))]


def test_warm_up_is_a_share_of_the_run_but_never_under_its_minimum() -> None:
    assert warm_up_cut(600) == 120  # 20 % of 10 minutes
    assert warm_up_cut(120) == 30  # 24 s would be too short
    assert warm_up_cut(40, share=0.2, minimum_s=5) == 8


def test_a_flat_service_passes() -> None:
    verdict = judge_service("gateway", series([100.0] * 40), warm_up_s=30)
    assert verdict.passed and verdict.rss_growth == 0 and verdict.rss_warm_mb == 100
    assert (verdict.fds_warm, verdict.fds_end) == (40, 40)


def test_growth_during_warm_up_is_not_counted_growth_after_it_is() -> None:
    # Doubles in the first 30 s (caches filling), then flat: passes.
    warming = [100.0 + 100 * min(1.0, i / 6) for i in range(40)]
    assert judge_service("inference", series(warming), warm_up_s=30).passed
    # The same service judged from the start instead sees the doubling.
    from_start = judge_service("inference", series(warming), warm_up_s=0)
    assert not from_start.passed and from_start.rss_growth > 0.5
    # Flat through warm-up, then a steady leak of 15 % by the end: fails, and says so.
    leaking = [100.0] * 7 + [100.0 + 15 * i / 32 for i in range(33)]
    verdict = judge_service("policy", series(leaking), warm_up_s=30)
    assert not verdict.passed and verdict.rss_growth == pytest.approx(0.14, abs=0.02)
    assert "RSS grew" in verdict.problems[0]


def test_only_the_full_load_is_judged_not_the_falling_tail_after_it() -> None:
    """After the load's end the last chats finish and memory and connections are let go: counting that tail would
    hide growth under load."""
    leak_then_tail = [100.0 + 15 * i / 39 for i in range(40)] + [90.0] * 5  # t = 0..195 s under load, then falls
    fds = [30 + i for i in range(40)] + [20] * 5
    verdict = judge_service("inference", series(leak_then_tail, fds), warm_up_s=0, load_end_s=195)
    assert verdict.samples == 45 and verdict.rss_growth == pytest.approx(0.13, abs=0.02)
    assert len(verdict.problems) == 2  # RSS and fds both
    assert judge_service("inference", series(leak_then_tail, fds), warm_up_s=0).passed  # the tail hid both
    assert not judge_service("inference", series([100.0] * 40), warm_up_s=30, load_end_s=30).passed  # too short


def test_rss_growth_just_under_the_limit_passes_and_at_it_fails() -> None:
    assert judge_service("tools", series([100.0] * 10 + [109.0] * 10), warm_up_s=0).passed
    assert not judge_service("tools", series([100.0] * 10 + [110.0] * 10), warm_up_s=0).passed


def test_one_spike_does_not_fail_a_service_but_a_high_end_does() -> None:
    """Levels are medians of a tenth of the samples, so one sample caught mid-allocation decides nothing."""
    spiky = [100.0] * 40
    spiky[-1] = 180.0
    spiky[10] = 50.0
    assert judge_service("tokenizer", series(spiky), warm_up_s=0).passed
    high_end = [100.0] * 36 + [180.0] * 4
    assert not judge_service("tokenizer", series(high_end), warm_up_s=0).passed


def test_fds_may_grow_by_the_allowance_or_ten_percent_not_more() -> None:
    flat = [100.0] * 40
    # A few connections opened late: within the allowance.
    assert judge_service("gateway", series(flat, [30] * 20 + [30 + FD_ALLOWANCE] * 20), warm_up_s=0).passed
    # One descriptor per sample, steadily: a leak.
    leaking = judge_service("gateway", series(flat, [30 + i for i in range(40)]), warm_up_s=0)
    assert not leaking.passed and "open fds grew" in leaking.problems[0]
    # Past the allowance but within 10 % of many: passes; past both: fails.
    assert judge_service("gateway", series(flat, [400] * 20 + [435] * 20), warm_up_s=0).passed
    assert not judge_service("gateway", series(flat, [400] * 20 + [445] * 20), warm_up_s=0).passed
    # Fewer fds at the end is fine.
    assert judge_service("gateway", series(flat, [60] * 20 + [30] * 20), warm_up_s=0).passed


def test_too_few_samples_after_warm_up_or_an_exited_process_fail() -> None:
    short = judge_service("registry", series([100.0] * 7), warm_up_s=30)  # one sample at 30 s
    assert not short.passed and "1 samples between the end of warm-up (30 s)" in short.problems[0]
    assert not judge_service("registry", [], warm_up_s=0).passed
    gone = judge_service("registry", series([100.0] * 40), warm_up_s=30, gone="pid 7 exited after 90 s")
    assert not gone.passed and "exited during the run" in gone.problems[0]


def test_the_soak_fails_on_any_error_and_names_every_reason() -> None:
    samples = {"gateway": series([100.0] * 40), "policy": series([100.0] * 20 + [130.0] * 20)}
    verdicts, reasons = judge(samples, {}, 30, 200, Counter({"UNAVAILABLE": 2, "HTTP 503": 1}))
    assert [v.passed for v in verdicts] == [True, False]
    assert reasons[0] == "3 chats failed: UNAVAILABLE 2, HTTP 503 1"
    assert reasons[1].startswith("policy: RSS grew +30.0%")
    _, clean = judge({"gateway": series([100.0] * 40)}, {}, 30, 200, Counter())
    assert clean == []
    _, only_errors = judge({"gateway": series([100.0] * 40)}, {}, 30, 200, Counter({"DEADLINE_EXCEEDED": 1}))
    assert only_errors == ["1 chats failed: DEADLINE_EXCEEDED 1"]


def test_the_http_share_spreads_over_the_streams() -> None:
    apis = [SoakConfig(http_share=0.25).api_of(s) for s in range(64)]
    assert apis.count(HTTP) == 16 and apis[:4] == [GRPC, GRPC, GRPC, HTTP]
    assert all(SoakConfig(http_share=0).api_of(s) == GRPC for s in range(8))
    assert all(SoakConfig(http_share=1).api_of(s) == HTTP for s in range(8))


def test_chats_vary_in_prompt_length_and_decoding() -> None:
    rng = random.Random(3)
    chats = [draw_chat(rng) for _ in range(200)]
    assert len({c.messages for c in chats}) > 50
    assert len({c.max_tokens for c in chats}) > 3
    assert {c.temperature > 0 for c in chats} == {True, False}
    assert all((c.seed != 0) == (c.temperature > 0) for c in chats)
    assert any(c.stop for c in chats) and any(c.messages[0][0] == "system" for c in chats)
    assert all(c.messages[-1][0] == "user" for c in chats)


def test_reading_a_process_that_is_gone_raises() -> None:
    rss_kb, fds = read_process(os.getpid())
    assert rss_kb >= 0 and fds >= 0
    with pytest.raises(OSError):
        read_process(2**22 + 7)  # above the kernel's pid_max: never a process


def test_the_report_carries_the_verdict_and_every_sample(tmp_path: Path) -> None:
    run = SoakRun(SoakConfig(duration_s=200, streams=4, sample_s=5), duration_s=200,
                  samples={"gateway": series([100.0] * 40), "policy": series([100.0] * 20 + [130.0] * 20)})
    run.tallies[GRPC].sent, run.tallies[GRPC].completed, run.tallies[GRPC].tokens = 10, 9, 300
    run.tallies[GRPC].failures["UNAVAILABLE"] = 1
    verdicts, reasons = run.judge()
    text = render(run, verdicts, reasons)
    assert "chats completed/sent: 9/10" in text and "errors: UNAVAILABLE 1; FAIL" in text
    assert text.count("FAIL") == 2  # policy's row and the summary
    saved = json.loads(json.dumps(report(run, verdicts, reasons)))
    assert saved["passed"] is False and len(saved["samples"]["policy"]) == 40
    assert saved["chats"]["grpc"]["failures"] == {"UNAVAILABLE": 1}
    pytest.importorskip("matplotlib")
    assert plot(run, tmp_path / "soak.png") and (tmp_path / "soak.png").stat().st_size > 0


async def test_a_short_soak_of_a_real_mesh_has_no_errors_and_samples_every_service(
        tiny_model: Path, tmp_path: Path) -> None:
    config = SoakConfig(duration_s=8, streams=8, sample_s=0.5, warm_up_share=0.2, warm_up_min_s=2)
    async with full_mesh(tiny_model, tmp_path) as mesh:
        run = await soak(mesh, config)
    verdicts, reasons = run.judge()
    # Not the growth verdict: 8 s is too short for the inference replica's prefix cache to fill, which takes
    # about a minute under 64 streams; the unit tests above judge growth, `make soak` a real run.
    print(render(run, verdicts, reasons))
    assert run.failures == Counter(), render(run, verdicts, reasons)
    assert run.tallies[GRPC].completed > 0 and run.tallies[HTTP].completed > 0
    assert run.total("sent") == run.total("completed") and run.total("tokens") > 0
    assert set(run.samples) == set(SERVICES) and not run.gone
    assert all(len(series) >= 10 for series in run.samples.values()), {s: len(v) for s, v in run.samples.items()}
    assert all(sample.rss_kb > 10 * MB and sample.fds > 0 for series in run.samples.values() for sample in series)
