"""What a benchmark row measures, and how rows, checks and the table are rendered."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class StreamResult:
    """One generation as its client saw it."""

    prompt_index: int
    tokens: list[int]
    ttft_s: float
    # One gap per token after the first; tokens that arrived in one message share its gap evenly.
    itl_s: list[float]
    cached_prompt_tokens: int = 0
    prompt_tokens: int = 0


@dataclass
class Row:
    """One system at one concurrency: every stream of every measured run, and the runs' wall time."""

    system: str
    streams: int
    results: list[StreamResult] = field(default_factory=list)
    wall_s: float = 0.0
    peak_rss_mb: float | None = None
    note: str = ""

    def add_run(self, results: list[StreamResult], wall_s: float) -> None:
        self.results.extend(results)
        self.wall_s += wall_s

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens) for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def ttft_ms(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.results], q) * 1000

    def itl_ms(self, q: float) -> float:
        return percentile([gap for r in self.results for gap in r.itl_s], q) * 1000

    def greedy_match(self, reference: dict[int, list[int]]) -> tuple[int, int]:
        """(streams whose tokens equal the in-process loop's for the same prompt, streams compared)."""
        compared = [r for r in self.results if r.prompt_index in reference]
        # Over the shorter of the two: runs of different lengths share their common beginning.
        same = sum(1 for r in compared
                   if r.tokens[: len(reference[r.prompt_index])] == reference[r.prompt_index][: len(r.tokens)])
        return same, len(compared)

    def to_json(self, reference: dict[int, list[int]]) -> dict[str, Any]:
        same, compared = self.greedy_match(reference)
        lengths = [len(r.tokens) for r in self.results]
        prompt = sum(r.prompt_tokens for r in self.results)
        return {
            "system": self.system,
            "streams": self.streams,
            "generations": len(self.results),
            "tokens": self.tokens,
            "tokens_per_generation": [min(lengths, default=0), max(lengths, default=0)],
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "ttft_ms": {"p50": round(self.ttft_ms(50), 1), "p99": round(self.ttft_ms(99), 1)},
            "itl_ms": {"p50": round(self.itl_ms(50), 1), "p99": round(self.itl_ms(99), 1)},
            "peak_rss_mb": None if self.peak_rss_mb is None else round(self.peak_rss_mb, 1),
            "greedy_match": [same, compared],
            "prefix_cached_prompt_tokens": [sum(r.cached_prompt_tokens for r in self.results), prompt],
            "note": self.note,
        }


@dataclass
class Check:
    name: str
    value: float | None
    target: str
    passed: bool | None  # None: not measured

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": None if self.value is None else round(self.value, 3),
                "target": self.target, "passed": self.passed}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def spread_gaps(arrivals: list[tuple[float, int]], start: float) -> tuple[float, list[float]]:
    """(TTFT, per-token gaps) from (arrival time, tokens in the message) pairs of one stream.

    A message carrying k tokens spreads its gap since the previous message over its k tokens; the tokens
    that came with the first one have gap 0 (they arrived with it).
    """
    if not arrivals:
        return float("nan"), []
    first_time, first_count = arrivals[0]
    gaps = [0.0] * (first_count - 1)
    previous = first_time
    for time_s, count in arrivals[1:]:
        gaps.extend([(time_s - previous) / count] * count)
        previous = time_s
    return first_time - start, gaps


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], checks: list[Check], header: dict[str, Any]) -> str:
    lines = [
        f"## lmesh benchmark — {header['model']}, greedy, {header['max_tokens']} tokens per generation",
        "",
        f"{header['machine']}; prompts of {header['prompt_tokens']} tokens; "
        f"load average {header['load_before']} before, {header['load_after']} after.",
        "",
        "| system | streams | gens | tok/gen | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
        "| peak RSS MB | = ref | prefix-cached |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        low, high = r["tokens_per_generation"]
        cached, prompt = r["prefix_cached_prompt_tokens"]
        same, compared = r["greedy_match"]
        lines.append(
            f"| {r['system']} | {r['streams']} | {r['generations']} | {low if low == high else f'{low}-{high}'} "
            f"| {_fmt(r['tokens_per_s'])} | {_fmt(r['ttft_ms']['p50'])} | {_fmt(r['ttft_ms']['p99'])} "
            f"| {_fmt(r['itl_ms']['p50'])} | {_fmt(r['itl_ms']['p99'])} | {_fmt(r['peak_rss_mb'], 0)} "
            f"| {f'{same}/{compared}' if compared else '-'} | {f'{cached}/{prompt}' if cached else '-'} |"
        )
    notes = [f"- {r['system']}@{r['streams']}: {r['note']}" for r in rows if r["note"]]
    lines += ["", "| check | value | target | result |", "|---|--:|---|---|"]
    for c in checks:
        result = "not measured" if c.passed is None else ("PASS" if c.passed else "MISS")
        lines.append(f"| {c.name} | {_fmt(c.value, 2)} | {c.target} | {result} |")
    lines += [
        "",
        "tok/s: all generated tokens / wall time of the whole run (runs of one stream: summed over prompts). "
        "TTFT/ITL: per stream, from the client's side. peak RSS: VmHWM of the process that runs the model. "
        "= ref: generations whose tokens equal the in-process loop's for the same prompt. "
        "prefix-cached: prompt tokens lmesh reused from its prefix cache / prompt tokens sent.",
        *notes,
    ]
    return "\n".join(lines)


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({model})"
