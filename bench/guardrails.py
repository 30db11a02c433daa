"""What the guardrails cost: 16 concurrent chats through the whole mesh (gateway, policy, registry, tokenizer,
inference as separate processes) with policy's default rules on and with no rules, side by side in one run.

With rules on, the gateway screens every delta of every answer (the default rules: e-mail, phone, card, IBAN,
secret and IPv4 detectors, with the hold-back window) and each request's messages. One mesh runs both: policy's
rules file is switched between the default rules and none (`rules: []`) between batches, which policy and the
gateway follow without a restart, in turns (on, off, off, on, ...), so the same processes and caches and the
background load of a shared machine serve both alike; the ratio is of the medians. It also times the screen alone,
in process, per delta.

  python -m bench.guardrails --model-dir DIR [--rounds N] [--streams 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.mesh import service_env
from bench.mesh_tls import chat
from services.common.config import lmesh_cache
from services.common.connect import apply_intentions
from services.common.consul_agent import ConsulAgent, free_port
from services.common.discovery import Mesh
from services.common.guardrails import CompiledRules, Screen, Stage
from services.common.peers import POLICY, REGISTRY, open_mesh, peer_service
from services.common.supervisor import Supervisor
from services.policy.client import create_key
from services.policy.rules import load_rules
from services.registry.client import register_model_dir

SERVICES = ("registry", "policy", "tokenizer", "inference", "gateway")
TARGET = 0.9  # rules on keep at least this share of the tokens/s with no rules
ADMIN_TOKEN = "bench-admin-token"


def write_rules(path: Path, on: bool) -> str:
    """Policy's rules file: the default rules (`on`) or none; renamed into place. The version policy will send."""
    from services.policy.rules import DEFAULT_RULES_PATH, parse_rules

    text = DEFAULT_RULES_PATH.read_text() if on else "rules: []\n"
    fresh = path.with_suffix(".tmp")
    fresh.write_text(text)
    os.replace(fresh, path)
    return parse_rules(text.encode()).version


async def rules_in_force(mesh: Mesh, version: str) -> None:
    """Waits until policy enforces `version` (the gateway gets it pushed at once), then a moment more."""
    from lmesh.policy.v1 import policy_pb2

    for _ in range(100):
        async with mesh.peer(POLICY).lease() as lease:
            call = lease.stub.WatchRules(policy_pb2.WatchRulesRequest(), **lease.options(timeout=10))
            current = await call.read()
            call.cancel()
        if getattr(current, "version", None) == version:
            await asyncio.sleep(0.5)
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("policy did not take the rules file up")


async def measure(model_dir: Path, rounds: int, streams: int, max_tokens: int) -> dict[str, list[float]]:
    """One mesh; its rules switched between the default ones and none by editing policy's rules file (no restart),
    `rounds` times each way, alternating (on, off, off, on, ...): both see the same processes, caches and
    background load, a few seconds apart."""
    results: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="lmesh-bench-guardrails-") as scratch:
        work = Path(scratch)
        rules = work / "rules.yaml"
        agent = await asyncio.to_thread(ConsulAgent.start, None, work / "consul.log")
        env = service_env()
        env.update(CONSUL_HTTP_ADDR=agent.http_addr, LMESH_HOME=str(work / "home"), LMESH_ADMIN_TOKEN=ADMIN_TOKEN,
                   LMESH_POLICY_RULES=str(rules))
        await asyncio.to_thread(write_rules, rules, True)
        supervisor = Supervisor(work / "logs", data_root=work / "home", env=env, grace_s=12)
        gateway_port = free_port()
        mesh: Mesh | None = None
        try:
            await apply_intentions(agent.http_addr)
            mesh = await open_mesh(agent.http_addr, admin_token=ADMIN_TOKEN)
            for service in SERVICES:
                supervisor.start(service, *(["--port", str(gateway_port)] if service == "gateway" else []),
                                 "--grace", "2")
            await supervisor.while_running(mesh.peer(REGISTRY).wait_for(timeout=120))
            await supervisor.while_running(register_model_dir(mesh.peer(REGISTRY), model_dir, aliases=("default",)))
            await supervisor.while_running(mesh.peer(POLICY).wait_for(timeout=120))
            key = (await create_key(mesh.peer(POLICY), "bench")).api_key
            for service in SERVICES:
                await supervisor.while_running(mesh.peer(peer_service(service)).wait_for(timeout=300))
            gateway = f"127.0.0.1:{gateway_port}"
            await asyncio.gather(*(chat(gateway, key, 8) for _ in range(streams)))  # warm: caches, connections
            for round_ in range(rounds):
                for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                    await rules_in_force(mesh, await asyncio.to_thread(write_rules, rules, mode == "on"))
                    began = time.perf_counter()
                    tokens = await asyncio.gather(*(chat(gateway, key, max_tokens) for _ in range(streams)))
                    rate = sum(tokens) / (time.perf_counter() - began)
                    results[mode].append(rate)
                    print(f"  round {round_ + 1}, rules {mode}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
        finally:
            if mesh is not None:
                await mesh.close()
            await asyncio.to_thread(supervisor.stop_all)
            agent.stop()
    return results


def screen_cost(deltas: int = 20000) -> tuple[float, int]:
    """Microseconds the default rules' screen takes per delta of prose (about one token each), in process; and
    the most characters it held back."""
    rules = load_rules(None)
    profile = CompiledRules(rules.version, rules.specs).profile(Stage.OUTPUT, "bench", "m:1")
    words = ("Once upon a time, a lighthouse keeper named Elias watched the sea from his tower on the rocks. "
             "Every night he lit the lamp at 9 o'clock and wrote 3 lines in his log. ").split(" ")
    screen = Screen(profile)
    held = 0
    pushed = 0
    began = time.perf_counter()
    for index in range(deltas):
        piece = words[index % len(words)] + " "
        pushed += len(piece)
        release = screen.push(piece)
        held = max(held, pushed - release.upto)
    screen.finish()
    return (time.perf_counter() - began) / deltas * 1e6, held


def render(results: dict[str, list[float]], streams: int, cost: tuple[float, int]) -> tuple[str, float]:
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    ratio = on / off
    pairs = [a / b for a, b in zip(results["on"], results["off"], strict=True)]
    lines = [
        f"| mesh (5 services, {streams} streams through the gateway) | tok/s, median | runs |",
        "| --- | --: | --- |",
        f"| no guardrail rules | {off:.1f} | {', '.join(f'{r:.1f}' for r in results['off'])} |",
        f"| default rules on | {on:.1f} | {', '.join(f'{r:.1f}' for r in results['on'])} |",
        "",
        f"rules on / off: **{ratio:.3f}x** (target ≥ {TARGET}) — {'met' if ratio >= TARGET else 'MISSED'}; "
        f"round by round {', '.join(f'{p:.2f}' for p in pairs)}",
        f"screen alone: {cost[0]:.1f} µs per delta of prose with the default rules; at most {cost[1]} characters "
        "held back",
    ]
    return "\n".join(lines), ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.guardrails", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=6, help="batches each way, alternating (default 6)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    print(f"guardrails cost: one mesh, {args.rounds} batches each way, {args.streams} streams x {args.max_tokens} "
          "tokens", file=sys.stderr, flush=True)
    cost = screen_cost()
    results = asyncio.run(measure(args.model_dir, args.rounds, args.streams, args.max_tokens))
    table, ratio = render(results, args.streams, cost)
    print(table)
    return 1 if args.strict and ratio < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
