"""What mTLS between the services costs: 16 concurrent chats through the whole mesh (gateway, policy, registry,
tokenizer, inference as separate processes), with mTLS on and off, side by side in one run.

The two meshes take turns (on, off, on, off, ...) on one Consul agent, each started fresh, so background load
on a shared machine hits both alike; the ratio is of the medians.

  python -m bench.mesh_tls --model-dir DIR [--rounds N] [--streams 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lmesh.gateway.v1 import gateway_pb2

from bench.mesh import service_env
from services.common.config import lmesh_cache
from services.common.connect import apply_intentions
from services.common.consul_agent import ConsulAgent, free_port
from services.common.peers import POLICY, REGISTRY, open_mesh, peer_service, public_gateway
from services.common.supervisor import Supervisor
from services.policy.client import create_key
from services.registry.client import register_model_dir

SERVICES = ("registry", "policy", "tokenizer", "inference", "gateway")
TARGET = 0.95  # mTLS on keeps at least this share of the tokens/s with it off
QUESTION = "Write a short story about a lighthouse keeper."


async def chat(gateway: str, key: str, max_tokens: int) -> int:
    """One chat to the end; its completion tokens."""
    async with public_gateway(gateway) as stub:
        call = stub.Chat(metadata=(("authorization", f"Bearer {key}"),), timeout=600)
        await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
            max_tokens=max_tokens, messages=[gateway_pb2.Message(role="user", content=QUESTION)])))
        await call.done_writing()
        tokens = 0
        async for response in call:
            if response.HasField("usage"):
                tokens = response.usage.completion_tokens
        return tokens


async def one_mesh(agent: ConsulAgent, model_dir: Path, work: Path, mtls: bool, streams: int,
                   max_tokens: int) -> float:
    """Starts a fresh mesh (mTLS `mtls`), warms it, runs `streams` chats at once; their tokens/s."""
    env = service_env()
    env.update(CONSUL_HTTP_ADDR=agent.http_addr, LMESH_HOME=str(work), LMESH_MTLS="on" if mtls else "off",
               LMESH_ADMIN_TOKEN="bench-admin-token")
    supervisor = Supervisor(work / "logs", data_root=work, env=env, grace_s=12)
    gateway_port = free_port()
    mesh = await open_mesh(agent.http_addr, mtls=mtls, admin_token="bench-admin-token")
    try:
        for service in SERVICES:
            supervisor.start(service, *(["--port", str(gateway_port)] if service == "gateway" else []), "--grace", "2")
        await supervisor.while_running(mesh.peer(REGISTRY).wait_for(timeout=120))
        await supervisor.while_running(register_model_dir(mesh.peer(REGISTRY), model_dir, aliases=("default",)))
        await supervisor.while_running(mesh.peer(POLICY).wait_for(timeout=120))
        key = (await create_key(mesh.peer(POLICY), "bench")).api_key
        for service in SERVICES:
            await supervisor.while_running(mesh.peer(peer_service(service)).wait_for(timeout=300))
        gateway = f"127.0.0.1:{gateway_port}"
        await asyncio.gather(*(chat(gateway, key, 8) for _ in range(streams)))  # warm: caches, connections
        began = time.perf_counter()
        tokens = await asyncio.gather(*(chat(gateway, key, max_tokens) for _ in range(streams)))
        return sum(tokens) / (time.perf_counter() - began)
    finally:
        await mesh.close()
        await asyncio.to_thread(supervisor.stop_all)


async def measure(model_dir: Path, rounds: int, streams: int, max_tokens: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="lmesh-bench-tls-") as scratch:
        agent = await asyncio.to_thread(ConsulAgent.start, None, Path(scratch) / "consul.log")
        try:
            await apply_intentions(agent.http_addr)
            for round_ in range(rounds):
                for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                    work = Path(scratch) / f"mesh-{round_}-{mode}"
                    rate = await one_mesh(agent, model_dir, work, mode == "on", streams, max_tokens)
                    results[mode].append(rate)
                    print(f"  round {round_ + 1}, mTLS {mode}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
        finally:
            agent.stop()
    return results


def render(results: dict[str, list[float]], streams: int) -> tuple[str, float]:
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    ratio = on / off
    lines = [
        f"| mesh (5 services, {streams} streams through the gateway) | tok/s, median | runs |",
        "| --- | --: | --- |",
        f"| mTLS off | {off:.1f} | {', '.join(f'{r:.1f}' for r in results['off'])} |",
        f"| mTLS on | {on:.1f} | {', '.join(f'{r:.1f}' for r in results['on'])} |",
        "",
        f"mTLS on / off: **{ratio:.3f}x** (target ≥ {TARGET}) — {'met' if ratio >= TARGET else 'MISSED'}",
    ]
    return "\n".join(lines), ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mesh_tls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2, help="meshes of each kind, alternating (default 2)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    print(f"mTLS cost: {args.rounds} rounds of a fresh mesh each way, {args.streams} streams x {args.max_tokens} "
          "tokens", file=sys.stderr, flush=True)
    results = asyncio.run(measure(args.model_dir, args.rounds, args.streams, args.max_tokens))
    table, ratio = render(results, args.streams)
    print(table)
    return 1 if args.strict and ratio < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
