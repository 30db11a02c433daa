"""Stability as a number: a whole mesh (bench.full_mesh: a real Consul, the real model, each service its own
process) under `--streams` concurrent streaming chats for `--minutes`, while every service process's memory and
open file descriptors are sampled from /proc.

Each stream loops chats until the time is up: varied prompts (topics x forms, sometimes with a system message or
an earlier turn), varied `max_tokens`, greedy or seeded sampling, now and then a stop string. One stream in
four (`--http-share`) goes through the gateway's OpenAI-compatible HTTP API, the rest through its gRPC `Chat`.
Every chat is counted: sent, completed, failed by gRPC status code (or HTTP status, or the error event's code).

Every `--sample-s` seconds: VmRSS (/proc/PID/status) and the number of entries in /proc/PID/fd of each service.
The first part of the run is warm-up (its first 20 %, at least 30 s): caches, pools and arenas fill there. What
is judged is the samples from then to the end of `--minutes` (the chats still running after it finish, the load
falling, and are not judged): a service's level is the median of the first tenth of them, its end the median of
the last tenth.

Pass: no chat failed, each service's RSS grew < 10 % from its warm-up level to its end, and its open fds grew
by at most 10 % or FD_ALLOWANCE descriptors. A table per service and a summary go to stdout, everything to
bench/results/soak.json, the RSS and fds over time to docs/soak.png (when matplotlib is installed). Exit status
0 on pass, 1 on fail.

  python -m bench.soak --model-dir DIR [--minutes 10] [--streams 64] [--sample-s 5] [--http-share 0.25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx2
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from bench.full_mesh import SERVICES, RunningMesh, full_mesh
from services.common.config import lmesh_cache
from services.common.peers import public_gateway

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "soak.json"
PLOT = ROOT / "docs" / "soak.png"
WARM_UP_SHARE = 0.2
WARM_UP_MIN_S = 30.0
RSS_GROWTH_LIMIT = 0.10  # share of the warm-up level
FD_GROWTH_LIMIT = 0.10  # share of the warm-up level, or...
FD_ALLOWANCE = 10  # ...this many descriptors (a few connections opened late are not a leak)
LEVEL_SHARE = 0.1  # a level is the median of this share of the samples after warm-up (at least one)
CHAT_TIMEOUT_S = 600.0
GRPC, HTTP = "grpc", "http"

TOPICS = ("rivers", "volcanoes", "bread", "chess", "owls", "bridges", "tea", "comets", "glass", "maps", "bees",
          "sailing", "clocks", "deserts", "paper", "trains")
FORMS = ("Tell me something interesting about {}.", "Write a short poem about {}.", "Explain {} to a child.",
         "List three facts about {}.", "Write a short story that involves {}.", "What is the history of {}?")
SYSTEMS = ("You are a patient teacher who answers briefly.", "You are a cheerful assistant.",
           "Answer like an encyclopedia: plain and exact.")
MAX_TOKENS = (8, 16, 32, 64, 96)


# ---- the load -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatSpec:
    """One chat's request, the same whichever API sends it."""

    messages: tuple[tuple[str, str], ...]  # (role, content), oldest first
    max_tokens: int
    temperature: float
    seed: int
    stop: tuple[str, ...]


def draw_chat(rng: random.Random) -> ChatSpec:
    """A varied chat: its own prompt, length and decoding, so the run exercises more than one path."""
    topic = rng.choice(TOPICS)
    messages: list[tuple[str, str]] = []
    if rng.random() < 0.3:
        messages.append(("system", rng.choice(SYSTEMS)))
    if rng.random() < 0.25:  # a follow-up turn: the conversation so far comes along
        messages += [("user", FORMS[0].format(topic)), ("assistant", f"Here is something about {topic}."),
                     ("user", "Tell me more, please.")]
    else:
        messages.append(("user", rng.choice(FORMS).format(topic)))
    sampled = rng.random() < 0.5
    return ChatSpec(tuple(messages), rng.choice(MAX_TOKENS), 0.8 if sampled else 0.0,
                    rng.randrange(1, 2**31) if sampled else 0, ("\n\n",) if rng.random() < 0.2 else ())


@dataclass
class Tally:
    """The chats of one API."""

    sent: int = 0
    completed: int = 0
    tokens: int = 0  # completion tokens of the completed chats
    failures: Counter[str] = field(default_factory=Counter)  # by gRPC status code name, HTTP status, ...


class IncompleteChat(Exception):
    """A chat that ended without a failure status but without its usage (or with an error event): `code` says."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


async def grpc_chat(stub: gateway_pb2_grpc.GatewayStub, key: str, spec: ChatSpec) -> int:
    """One chat through the gRPC API to its end; its completion tokens (AioRpcError on failure)."""
    call = stub.Chat(metadata=(("authorization", f"Bearer {key}"),), timeout=CHAT_TIMEOUT_S)
    await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
        messages=[gateway_pb2.Message(role=role, content=content) for role, content in spec.messages],
        max_tokens=spec.max_tokens, temperature=spec.temperature, seed=spec.seed, stop=list(spec.stop))))
    await call.done_writing()
    tokens = -1
    async for response in call:
        if response.HasField("usage"):
            tokens = response.usage.completion_tokens
    if tokens < 0:
        raise IncompleteChat("NO_USAGE")
    return tokens


async def http_chat(client: httpx2.AsyncClient, key: str, spec: ChatSpec) -> int:
    """One streamed chat through the OpenAI-compatible HTTP API; its completion tokens."""
    body: dict[str, Any] = {"model": "default", "messages": [{"role": r, "content": c} for r, c in spec.messages],
                            "max_tokens": spec.max_tokens, "temperature": spec.temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if spec.seed:
        body["seed"] = spec.seed
    if spec.stop:
        body["stop"] = list(spec.stop)
    usage: dict[str, Any] | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            await response.aread()
            raise IncompleteChat(f"HTTP {response.status_code}")
        error_event = False
        async for line in response.aiter_lines():
            if line.startswith("event: error"):
                error_event = True
            elif line.startswith("data: {"):
                data = json.loads(line[6:])
                if error_event:
                    raise IncompleteChat(f"HTTP error event {data.get('error', {}).get('code')}")
                usage = data.get("usage") or usage
    if usage is None:
        raise IncompleteChat("NO_USAGE")
    return int(usage["completion_tokens"])


async def chat_stream(number: int, api: str, deadline: float, tally: Tally, stub: gateway_pb2_grpc.GatewayStub,
                      client: httpx2.AsyncClient, key: str, seed: int) -> None:
    """Chats one after another until `deadline` (the chat in flight then finishes), each counted in `tally`."""
    rng = random.Random(seed * 1000 + number)
    while time.monotonic() < deadline:
        spec = draw_chat(rng)
        tally.sent += 1
        try:
            tokens = await (grpc_chat(stub, key, spec) if api == GRPC else http_chat(client, key, spec))
        except grpc.aio.AioRpcError as exc:
            tally.failures[exc.code().name] += 1
        except IncompleteChat as exc:
            tally.failures[exc.code] += 1
        except Exception as exc:  # the connection itself (refused, reset, timed out), or an answer not understood
            tally.failures[type(exc).__name__] += 1
        else:
            tally.completed += 1
            tally.tokens += tokens


# ---- the samples ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t_s: float  # since the load began
    rss_kb: int
    fds: int


def read_process(pid: int) -> tuple[int, int]:
    """(VmRSS in kB, open file descriptors) of `pid` now; OSError when it is gone."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
            break
    else:
        raise ProcessLookupError(pid)  # a zombie has no VmRSS
    return rss_kb, len(os.listdir(f"/proc/{pid}/fd"))


async def sample_processes(pids: dict[str, int], began: float, every_s: float, samples: dict[str, list[Sample]],
                           gone: dict[str, str], stop: asyncio.Event) -> None:
    """Samples each process every `every_s` until `stop` is set (and once more then, so the end is measured)."""
    while True:
        now = time.monotonic() - began
        for service, pid in pids.items():
            if service in gone:
                continue
            try:
                rss_kb, fds = read_process(pid)
            except OSError:
                gone[service] = f"pid {pid} exited after {now:.0f} s"
                continue
            samples[service].append(Sample(round(now, 2), rss_kb, fds))
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


# ---- the verdict ----------------------------------------------------------------------------------------------


def warm_up_cut(duration_s: float, share: float = WARM_UP_SHARE, minimum_s: float = WARM_UP_MIN_S) -> float:
    """Seconds from the start that are warm-up: `share` of the run, but at least `minimum_s`."""
    return max(duration_s * share, minimum_s)


@dataclass
class ServiceVerdict:
    service: str
    samples: int
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth: float = 0.0  # share of the warm-up level
    fds_warm: float = 0.0
    fds_end: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def judge_service(service: str, samples: list[Sample], warm_up_s: float, load_end_s: float = math.inf,
                  gone: str = "") -> ServiceVerdict:
    """The growth of one service from the end of warm-up to the end of the full load (`load_end_s`: after it the
    last chats finish and the load falls, which would hide growth), and what is wrong with it."""
    verdict = ServiceVerdict(service, len(samples))
    if gone:
        verdict.problems.append(f"exited during the run ({gone})")
    measured = [s for s in samples if warm_up_s <= s.t_s <= load_end_s]
    if len(measured) < 2:
        verdict.problems.append(f"{len(measured)} samples between the end of warm-up ({warm_up_s:g} s) and of the "
                                f"load ({load_end_s:g} s); at least 2 needed")
        return verdict
    width = max(1, min(int(len(measured) * LEVEL_SHARE), len(measured) // 2))
    first, last = measured[:width], measured[-width:]
    rss_warm = statistics.median(s.rss_kb for s in first)
    rss_end = statistics.median(s.rss_kb for s in last)
    verdict.rss_warm_mb, verdict.rss_end_mb = rss_warm / 1024, rss_end / 1024
    verdict.rss_growth = rss_end / rss_warm - 1 if rss_warm else float("inf")
    verdict.fds_warm = statistics.median(s.fds for s in first)
    verdict.fds_end = statistics.median(s.fds for s in last)
    if verdict.rss_growth >= RSS_GROWTH_LIMIT:
        verdict.problems.append(f"RSS grew {verdict.rss_growth:+.1%} after warm-up (limit {RSS_GROWTH_LIMIT:.0%})")
    fd_growth = verdict.fds_end - verdict.fds_warm
    if fd_growth > max(FD_ALLOWANCE, verdict.fds_warm * FD_GROWTH_LIMIT):
        verdict.problems.append(f"open fds grew by {fd_growth:g} after warm-up ({verdict.fds_warm:g} -> "
                                f"{verdict.fds_end:g}; allowed: {FD_GROWTH_LIMIT:.0%} or {FD_ALLOWANCE})")
    return verdict


def judge(samples: dict[str, list[Sample]], gone: dict[str, str], warm_up_s: float, load_end_s: float,
          failures: Counter[str]) -> tuple[list[ServiceVerdict], list[str]]:
    """Each service's verdict, and every reason the soak fails (none: it passes)."""
    verdicts = [judge_service(service, series, warm_up_s, load_end_s, gone.get(service, ""))
                for service, series in samples.items()]
    reasons = [f"{service.service}: {problem}" for service in verdicts for problem in service.problems]
    if failures:
        reasons.insert(0, f"{sum(failures.values())} chats failed: " +
                       ", ".join(f"{code} {count}" for code, count in failures.most_common()))
    return verdicts, reasons


# ---- the run --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 600.0
    streams: int = 64
    sample_s: float = 5.0
    http_share: float = 0.25  # of the streams
    warm_up_share: float = WARM_UP_SHARE
    warm_up_min_s: float = WARM_UP_MIN_S
    seed: int = 1

    def api_of(self, stream: int) -> str:
        """Spreads the HTTP streams evenly among the gRPC ones (every fourth, for a quarter)."""
        http_before = int(stream * self.http_share)
        return HTTP if int((stream + 1) * self.http_share) > http_before else GRPC


@dataclass
class SoakRun:
    config: SoakConfig
    duration_s: float = 0.0  # from the first chat sent to the last one finished (past config.duration_s)
    tallies: dict[str, Tally] = field(default_factory=lambda: {GRPC: Tally(), HTTP: Tally()})
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    gone: dict[str, str] = field(default_factory=dict)  # service -> how it went away during the run

    @property
    def warm_up_s(self) -> float:
        return warm_up_cut(self.config.duration_s, self.config.warm_up_share, self.config.warm_up_min_s)

    @property
    def failures(self) -> Counter[str]:
        return sum((t.failures for t in self.tallies.values()), Counter())

    def total(self, attribute: str) -> int:
        return sum(int(getattr(t, attribute)) for t in self.tallies.values())

    def judge(self) -> tuple[list[ServiceVerdict], list[str]]:
        return judge(self.samples, self.gone, self.warm_up_s, self.config.duration_s, self.failures)


async def soak(mesh: RunningMesh, config: SoakConfig, services: tuple[str, ...] = SERVICES) -> SoakRun:
    """Runs the load on a running mesh while sampling its `services`' processes."""
    run = SoakRun(config, samples={service: [] for service in services})
    pids = {service: mesh.pid(service) for service in services}
    stop = asyncio.Event()
    async with public_gateway(mesh.grpc_target) as stub, httpx2.AsyncClient(
            base_url=mesh.http_base, timeout=CHAT_TIMEOUT_S,
            limits=httpx2.Limits(max_connections=config.streams, max_keepalive_connections=config.streams)
    ) as client:
        began = time.monotonic()
        sampler = asyncio.create_task(sample_processes(pids, began, config.sample_s, run.samples, run.gone, stop))
        streams = [chat_stream(number, config.api_of(number), began + config.duration_s,
                               run.tallies[config.api_of(number)], stub, client, mesh.key, config.seed)
                   for number in range(config.streams)]
        progress = asyncio.create_task(print_progress(run, began, stop))
        try:
            await asyncio.gather(*streams)
        finally:
            run.duration_s = time.monotonic() - began
            stop.set()
            await asyncio.gather(sampler, progress)
    return run


async def print_progress(run: SoakRun, began: float, stop: asyncio.Event, every_s: float = 60.0) -> None:
    """A line to stderr every `every_s` while the load runs, so a long soak shows it is alive (and how)."""
    while True:
        try:
            await asyncio.wait_for(stop.wait(), every_s)
            return
        except TimeoutError:
            rss_mb = sum(series[-1].rss_kb for series in run.samples.values() if series) / 1024
            print(f"  {time.monotonic() - began:.0f} s: {run.total('completed')}/{run.total('sent')} chats, "
                  f"{sum(run.failures.values())} failed, services' RSS {rss_mb:.0f} MB in all", file=sys.stderr,
                  flush=True)


# ---- the report -----------------------------------------------------------------------------------------------


def render(run: SoakRun, verdicts: list[ServiceVerdict], reasons: list[str]) -> str:
    http_streams = sum(run.config.api_of(stream) == HTTP for stream in range(run.config.streams))
    lines = [f"Soak: {run.config.streams} streams ({http_streams} over HTTP) for {run.config.duration_s:g} s (the "
             f"last chats done at {run.duration_s:.0f} s), judged from {run.warm_up_s:g} s (after warm-up) to "
             f"{run.config.duration_s:g} s, a sample every {run.config.sample_s:g} s",
             f"{'service':11} {'RSS warm-up':>12} {'RSS end':>9} {'growth':>8} {'fds warm-up':>12} {'fds end':>8} "
             f"{'samples':>8}  verdict"]
    for v in verdicts:
        lines.append(f"{v.service:11} {v.rss_warm_mb:>9.1f} MB {v.rss_end_mb:>6.1f} MB {v.rss_growth:>+8.1%} "
                     f"{v.fds_warm:>12g} {v.fds_end:>8g} {v.samples:>8}  {'ok' if v.passed else 'FAIL'}")
    failures = run.failures
    errors = ", ".join(f"{code} {count}" for code, count in failures.most_common()) or "none"
    chats = " + ".join(f"{api} {t.completed}/{t.sent}" for api, t in run.tallies.items())
    tokens = run.total("tokens")
    lines.append(f"chats completed/sent: {run.total('completed')}/{run.total('sent')} ({chats}), {tokens} tokens "
                 f"({tokens / run.duration_s if run.duration_s else 0:.1f} tok/s), errors: {errors}; "
                 f"{'PASS' if not reasons else 'FAIL'}")
    lines += [f"  - {reason}" for reason in reasons]
    return "\n".join(lines)


def report(run: SoakRun, verdicts: list[ServiceVerdict], reasons: list[str]) -> dict[str, Any]:
    return {
        "bench": "soak", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {**asdict(run.config), "cpus": os.cpu_count(), "rss_growth_limit": RSS_GROWTH_LIMIT,
                   "fd_growth_limit": FD_GROWTH_LIMIT, "fd_allowance": FD_ALLOWANCE},
        "duration_s": round(run.duration_s, 1), "warm_up_s": round(run.warm_up_s, 1),
        "passed": not reasons, "reasons": reasons,
        "chats": {api: {"sent": t.sent, "completed": t.completed, "tokens": t.tokens, "failures": dict(t.failures)}
                  for api, t in run.tallies.items()},
        "services": [{**asdict(v), "passed": v.passed} for v in verdicts],
        "gone": run.gone,
        "samples": {service: [[s.t_s, s.rss_kb, s.fds] for s in series] for service, series in run.samples.items()},
    }


def plot(run: SoakRun, path: Path) -> bool:
    """RSS and open fds of each service over the run; False (nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rss_axis, fd_axis) = plt.subplots(2, 1, figsize=(8, 6.4), sharex=True,
                                               gridspec_kw={"height_ratios": [2, 1]})
    for service, series in run.samples.items():
        times = [s.t_s for s in series]
        rss_axis.plot(times, [s.rss_kb / 1024 for s in series], label=service)
        fd_axis.plot(times, [s.fds for s in series], label=service)
    for axis in (rss_axis, fd_axis):
        axis.axvspan(run.warm_up_s, run.config.duration_s, color="grey", alpha=0.12, linewidth=0)
        axis.grid(alpha=0.3)
    rss_axis.set_yscale("log")
    rss_axis.set_ylabel("RSS (MB, log scale)")
    rss_axis.set_title(f"lmesh soak: {run.config.streams} streaming chats, {run.total('completed')} completed, "
                       f"{sum(run.failures.values())} failed (shaded: the part judged)", fontsize=10)
    rss_axis.legend(fontsize=8, ncol=4)
    fd_axis.set_ylabel("open fds")
    fd_axis.set_xlabel("seconds")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


async def measure(model_dir: Path, config: SoakConfig) -> SoakRun:
    with tempfile.TemporaryDirectory(prefix="lmesh-bench-soak-") as scratch:
        async with full_mesh(model_dir, Path(scratch)) as mesh:
            print(f"mesh up; {config.streams} streams for {config.duration_s:g} s", file=sys.stderr, flush=True)
            return await soak(mesh, config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--http-share", type=float, default=0.25, help="share of the streams over HTTP (0 to 1)")
    parser.add_argument("--seed", type=int, default=1, help="seeds the chats each stream draws")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.streams < 1 or args.sample_s <= 0 or not 0 <= args.http_share <= 1:
        parser.error("--minutes and --sample-s must be > 0, --streams >= 1, --http-share in [0, 1]")
    config = SoakConfig(duration_s=args.minutes * 60, streams=args.streams, sample_s=args.sample_s,
                        http_share=args.http_share, seed=args.seed)
    run = asyncio.run(measure(args.model_dir, config))
    verdicts, reasons = run.judge()
    print(render(run, verdicts, reasons))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report(run, verdicts, reasons), indent=1) + "\n")
    plotted = plot(run, args.plot)
    print(f"wrote {args.output}" + (f" and {args.plot}" if plotted else " (no matplotlib: no plot)"), file=sys.stderr)
    return 0 if not reasons else 1


if __name__ == "__main__":
    sys.exit(main())
