"""`make bench`: one table, measured in one run on this machine, of the real model under greedy decoding.

Rows: the in-process ONNX Runtime loop (the reference), onnxruntime-genai (one stream and a static batch)
and the lmesh inference service over gRPC at 1, 4 and 16 concurrent streams; then the target checks and a
cancel test. Every system gets the same prompts and generates the same number of tokens (prompts whose greedy
answer runs past it: see bench.prompts). Single-stream runs of the three systems alternate prompt by prompt,
and lmesh@16 alternates with genai's batch, so background load on a shared machine hits them alike.

  python -m bench.run --model-dir DIR [--quick] [--profile] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmesh.inference.v1 import inference_pb2

from bench.genai_build import GenAIUnavailable, ensure_genai_model
from bench.mesh import BenchMesh
from bench.profile import recording, summarize
from bench.prompts import prompt_ids, warm_up_ids
from bench.stats import Check, Row, StreamResult, machine, markdown
from bench.worker import WorkerProcess
from services.common.config import lmesh_cache

INPROC = "in-process ORT loop"
GENAI = "onnxruntime-genai"
LMESH = "lmesh gRPC"


@dataclass(frozen=True)
class Plan:
    max_tokens: int  # generated per stream
    single_prompts: int  # prompts in the single-stream comparison
    levels: tuple[int, ...]  # lmesh concurrencies
    rounds: int  # measured runs per concurrency level above 1
    cancel_trials: int
    warm_up_tokens: int = 8
    # Requests of the mixed-length workload (answers of different lengths, as chat traffic has).
    mixed_requests: int = 48


FULL = Plan(max_tokens=64, single_prompts=16, levels=(1, 4, 16), rounds=3, cancel_trials=5)
QUICK = Plan(max_tokens=16, single_prompts=2, levels=(1, 4, 16), rounds=1, cancel_trials=2, warm_up_tokens=4,
             mixed_requests=16)
# Lengths of the mixed workload, cycled and scaled to the plan's max_tokens (mean = max_tokens): a static batch
# runs until its longest request ends, continuous batching refills a slot as soon as a request ends.
MIXED_LENGTHS = (16, 128, 32, 96, 48, 64)
# The sampled row's settings: a common chat configuration. Sampling every row between two model runs must not
# cost the batch much (before a whole-vocabulary sort was avoided, top-p halved lmesh@16's throughput).
SAMPLED = inference_pb2.SamplingParams(temperature=0.8, top_p=0.9)
# The same with a seed, shown without a target: the prefix cache serves a seeded prompt only whole pieces that
# seeded requests computed (so that it repeats bit for bit), and the bench's prompts are shorter than a piece.
SEEDED = inference_pb2.SamplingParams(temperature=0.8, top_p=0.9, seed=1)


def _results(reply: dict[str, Any], indices: list[int]) -> list[StreamResult]:
    return [StreamResult(i, tokens, ttft, itl)
            for i, tokens, ttft, itl in zip(indices, reply["tokens"], reply["ttft_s"], reply["itl_s"], strict=True)]


@contextlib.asynccontextmanager
async def profiling(pid: int, name: str, out_dir: Path, summaries: list[str]) -> AsyncIterator[None]:
    raw = out_dir / f"profile-{name}.txt"
    async with recording(pid, raw, out_dir / "logs" / f"py-spy-{name}.log"):
        yield
    summaries.append(summarize(raw) if raw.exists() else f"{raw}: py-spy wrote nothing")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def bench(model_dir: Path, plan: Plan, profile: bool) -> dict[str, Any]:
    out_dir = lmesh_cache() / "bench"
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    prompts = prompt_ids(model_dir)
    warm = warm_up_ids(model_dir)
    n = plan.max_tokens
    notes: list[str] = []
    profiles: list[str] = []

    genai_dir: Path | None = None
    try:
        log("onnxruntime-genai model: building or reusing the cached one")
        genai_dir, built = await asyncio.to_thread(ensure_genai_model, model_dir, out_dir, logs / "genai-build.log")
        log(f"onnxruntime-genai model {'built' if built else 'cached'} at {genai_dir}")
    except GenAIUnavailable as exc:
        notes.append(f"onnxruntime-genai rows skipped: {exc}")
        log(notes[-1])

    ref = Row(INPROC, 1)
    genai1 = Row(GENAI, 1)
    lmesh = {c: Row(LMESH, c) for c in plan.levels}
    top = max(plan.levels)
    genai_batch = Row(f"{GENAI} (static batch)", top)
    lmesh_mixed = Row(f"{LMESH}, mixed lengths (continuous)", top)
    lmesh_sampled = Row(f"{LMESH}, sampled (temperature 0.8, top-p 0.9)", top)
    lmesh_seeded = Row(f"{LMESH}, sampled with a seed", top)
    genai_mixed = Row(f"{GENAI}, mixed lengths (static batches)", top)
    cancel: list[dict[str, Any]] = []
    workers: list[WorkerProcess] = []

    with tempfile.TemporaryDirectory(prefix="lmesh-bench-") as tmp:
        mesh = BenchMesh(model_dir, Path(tmp), logs)
        try:
            log("starting Consul and lmesh-registry; registering the model")
            await mesh.start()
            log(f"registered {mesh.model_id}; starting lmesh-inference")
            inference = await mesh.start_inference("1")
            inproc = await WorkerProcess.start("inproc", model_dir, logs / "worker-inproc.log")
            workers.append(inproc)
            genai = await WorkerProcess.start("genai", genai_dir, logs / "worker-genai-1.log") if genai_dir else None
            if genai:
                workers.append(genai)
            log("warm-up, then single-stream runs (in-process, lmesh, genai alternating per prompt)")
            await inproc.generate([warm], plan.warm_up_tokens)
            await mesh.generate(-1, warm, plan.warm_up_tokens)
            if genai:
                await genai.generate([warm], plan.warm_up_tokens)
            for i in range(plan.single_prompts):
                reply = await inproc.generate([prompts[i]], n)
                ref.add_run(_results(reply, [i]), reply["wall_s"])
                result, wall = await mesh.generate_many([(i, prompts[i])], n)
                lmesh[1].add_run(result, wall)
                if genai:
                    reply = await genai.generate([prompts[i]], n)
                    genai1.add_run(_results(reply, [i]), reply["wall_s"])
            if profile:  # an extra, unmeasured run: sampling costs the sampled process some time
                async with profiling(inference.pid, "lmesh-1", out_dir, profiles):
                    for i in range(min(4, len(prompts))):
                        await mesh.generate(i, prompts[i], n)
            ref.peak_rss_mb = inproc.peak_rss_mb()
            genai1.peak_rss_mb = genai.peak_rss_mb() if genai else None
            for worker in workers:
                await worker.close()
            workers.clear()
            log(f"cancel test ({plan.cancel_trials} trials)")
            for _ in range(plan.cancel_trials):
                cancel.append(await mesh.cancel_after(warm, after=5))
            lmesh[1].peak_rss_mb = inference.peak_rss_mb()

            for c in plan.levels:
                if c == 1:
                    continue
                log(f"lmesh at {c} concurrent streams (fresh replica)")
                inference = await mesh.start_inference(str(c))
                await mesh.generate_many([(-1, warm)] * c, plan.warm_up_tokens)
                batch_worker: WorkerProcess | None = None
                if c == top and genai_dir:
                    batch_worker = await WorkerProcess.start("genai", genai_dir, logs / f"worker-genai-{c}.log")
                    workers.append(batch_worker)
                    await batch_worker.generate([warm] * c, plan.warm_up_tokens)
                for r in range(plan.rounds):
                    indices = [(r * c + j) % len(prompts) for j in range(c)]
                    results, wall = await mesh.generate_many([(i, prompts[i]) for i in indices], n)
                    lmesh[c].add_run(results, wall)
                    if batch_worker:
                        reply = await batch_worker.generate([prompts[i] for i in indices], n)
                        genai_batch.add_run(_results(reply, indices), reply["wall_s"])
                    if c == top:  # prompt index -1: sampled tokens are not compared with the greedy reference
                        for row, sampling in ((lmesh_sampled, SAMPLED), (lmesh_seeded, SEEDED)):
                            results, wall = await mesh.generate_many([(-1, prompts[i]) for i in indices], n, sampling)
                            row.add_run(results, wall)
                if c == top and plan.mixed_requests:
                    log(f"mixed-length workload: {plan.mixed_requests} requests, {c} at a time")
                    await mixed_workload(mesh, batch_worker, prompts, plan, c, lmesh_mixed, genai_mixed)
                lmesh[c].peak_rss_mb = inference.peak_rss_mb()
                if profile and c == top:
                    async with profiling(inference.pid, f"lmesh-{c}", out_dir, profiles):
                        await mesh.generate_many([(j % len(prompts), prompts[j % len(prompts)]) for j in range(c)], n)
                if batch_worker:
                    genai_batch.peak_rss_mb = batch_worker.peak_rss_mb()
                    await batch_worker.close()
                    workers.remove(batch_worker)
        finally:
            for worker in workers:
                await worker.close()
            await mesh.close()

    reference = {r.prompt_index: r.tokens for r in ref.results}
    for row in (*lmesh.values(), genai_batch):
        if row.streams > 1:
            row.note = (f"{plan.rounds} run(s) of {row.streams} streams at once, each stream its own prompt; "
                        "= ref compares the streams whose prompt the in-process loop also ran")
    lmesh_mixed.note = (f"{plan.mixed_requests} requests of {sorted(set(mixed_lengths(plan)))} tokens; lmesh keeps "
                        f"{top} in flight (a slot is refilled when a request ends), genai runs them in arrival "
                        f"order in static batches of {top}, each until its longest request ends; only each "
                        "request's own tokens count")
    rows = [r for r in (ref, genai1, genai_batch, *lmesh.values(), lmesh_sampled, lmesh_seeded, genai_mixed,
                        lmesh_mixed) if r.results]
    checks = make_checks(ref, lmesh[1] if 1 in lmesh else None, lmesh[top], genai_batch, cancel, top)
    if checks[2].passed is False:
        notes.append(f"{LMESH}@{top} is below 1.5x {GENAI}'s static batch: `python -m bench.ceiling` measures the "
                     "most tokens/s any server could make from this graph on this machine at equal lengths, and "
                     "what prompt-lookup speculation would add")
    if lmesh_mixed.results and genai_mixed.results:
        value = lmesh_mixed.tokens_per_s / genai_mixed.tokens_per_s
        checks.insert(3, Check(f"{LMESH} / {GENAI}, mixed lengths, {top} at a time (tok/s)", value, "≥ 1.5",
                               value >= 1.5))
    if lmesh_sampled.results and lmesh[top].results:
        value = lmesh_sampled.tokens_per_s / lmesh[top].tokens_per_s
        checks.insert(4, Check(f"{LMESH}@{top} sampled / greedy (tok/s; lmesh's own target)", value, "≥ 0.9",
                               value >= 0.9))
    header = {
        "model": f"{mesh.model_id} (fp32 ONNX, {model_dir})",
        "max_tokens": n,
        "machine": machine(),
        "prompt_tokens": sorted({len(p) for p in prompts}),
        "load_before": " ".join(f"{x:.2f}" for x in load_before),
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "plan": plan.__dict__,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]]),
    }
    return {"header": header, "rows": [r.to_json(reference) for r in rows], "checks": [c.to_json() for c in checks],
            "cancel": cancel, "notes": notes, "profiles": profiles}


def mixed_lengths(plan: Plan) -> list[int]:
    return [max(1, MIXED_LENGTHS[j % len(MIXED_LENGTHS)] * plan.max_tokens // 64) for j in range(plan.mixed_requests)]


async def mixed_workload(mesh: BenchMesh, genai: WorkerProcess | None, prompts: list[list[int]], plan: Plan,
                         slots: int, lmesh_row: Row, genai_row: Row) -> None:
    """The same requests, of different lengths, through lmesh (continuous) and genai (static batches)."""
    requests = [(j % len(prompts), prompts[j % len(prompts)], length)
                for j, length in enumerate(mixed_lengths(plan))]
    gate = asyncio.Semaphore(slots)

    async def one(index: int, prompt: list[int], length: int) -> StreamResult:
        async with gate:
            return await mesh.generate(index, prompt, length)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(*request) for request in requests))
    lmesh_row.add_run(list(results), time.perf_counter() - started)
    if genai is None:
        return
    for k in range(0, len(requests), slots):
        batch = requests[k:k + slots]
        reply = await genai.generate([p for _, p, _ in batch], max(length for _, _, length in batch))
        genai_row.add_run([StreamResult(i, tokens[:length], ttft, itl[: max(0, length - 1)])
                           for (i, _, length), tokens, ttft, itl
                           in zip(batch, reply["tokens"], reply["ttft_s"], reply["itl_s"], strict=True)],
                          reply["wall_s"])


def make_checks(ref: Row, one: Row | None, top_row: Row, genai_batch: Row, cancel: list[dict[str, Any]],
                top: int) -> list[Check]:
    def ratio(a: Row | None, b: Row) -> float | None:
        if a is None or not a.results or not b.results or b.tokens_per_s == 0:
            return None
        return a.tokens_per_s / b.tokens_per_s

    def check(name: str, value: float | None, target: float) -> Check:
        return Check(name, value, f"≥ {target}", None if value is None else value >= target)

    after = max((c["tokens_after_cancel"] for c in cancel), default=None)
    return [
        check(f"{LMESH}@1 / {INPROC} (tok/s)", ratio(one, ref), 0.95),
        check(f"{LMESH}@{top} / {LMESH}@1 (tok/s)", ratio(top_row, one) if one else None, 3.0),
        check(f"{LMESH}@{top} / {GENAI} batch {top} (tok/s)", ratio(top_row, genai_batch), 1.5),
        Check("tokens after cancel (finish completion_tokens - tokens received when cancel was sent; max of "
              f"{len(cancel)})", None if after is None else float(after), "≤ 1",
              None if after is None else after <= 1),
    ]


def render(report: dict[str, Any]) -> str:
    checks = [Check(**{k: c[k] for k in ("name", "value", "target", "passed")}) for c in report["checks"]]
    text = markdown(report["rows"], checks, report["header"])
    cancel = report["cancel"]
    if cancel:
        text += "\n\ncancel trials (received at cancel → completion_tokens, reason): " + "; ".join(
            f"{c['received_at_cancel']} → {c['completion_tokens']} ({c['reason'].removeprefix('FINISH_REASON_')}, "
            f"{c['received_after_cancel']} received after)" for c in cancel)
    for note in report["notes"]:
        text += f"\n\nnote: {note}"
    for profile in report["profiles"]:
        text += f"\n\n```\n{profile}\n```"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true", help="fewer tokens, prompts and rounds (smoke run, < 2 min)")
    parser.add_argument("--profile", action="store_true",
                        help="after measuring, py-spy the inference process over extra runs (1 and most streams)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target check is missed")
    args = parser.parse_args(argv)
    model_dir = args.model_dir.resolve()
    if not (model_dir / "lmesh_model.json").is_file():
        print(f"bench: no model build in {model_dir}: run `make model`", file=sys.stderr)
        return 2
    started = time.monotonic()
    report = asyncio.run(bench(model_dir, QUICK if args.quick else FULL, args.profile))
    report["header"]["duration_s"] = round(time.monotonic() - started, 1)
    out = lmesh_cache() / "bench" / "latest.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"\n(JSON: {out}; run took {report['header']['duration_s']} s)")
    missed = any(c["passed"] is False for c in report["checks"])
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
