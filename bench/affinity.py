"""What session affinity wins: the share of follow-up turns' prompt tokens that an inference replica's prefix cache
already held, with affinity (each conversation names its session) and without (no session: load balancing
alone), side by side in one run on one mesh: two inference replicas behind one gateway (separate processes, a
real Consul).

Each arm runs `--conversations` conversations of `--turns` turns at once; a conversation's turns run one after
another, each follow-up extending the previous messages with the assistant's answer and a new user message. Each
conversation opens with a system message of its own (its arm and number first), so no prompt prefix is shared
between conversations or arms: what a follow-up finds cached, its own conversation put there. Greedy answers of
at most `--max-tokens` tokens. Before each follow-up the user "reads" for a random while (uniform in 0 to twice
`--think-s`, the same draws in both arms): without it, conversations in lock step make load balancing send each
follow-up back to the replica its previous turn just left (the one with a free place), an affinity by accident
that real traffic does not have (`--think-s 0` shows it).

For each arm: the hit share of follow-up turns (sum of `usage.cached_prompt_tokens` / sum of
`usage.prompt_tokens`), the same for first turns (about 0 by construction), and the median time to the first
delta of follow-up turns. The table goes to stdout, the numbers to bench/results/affinity.json.

  python -m bench.affinity --model-dir DIR [--conversations 24] [--turns 4] [--max-tokens 32] [--think-s 1]
                           [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from bench.mesh import service_env
from services.common.config import lmesh_cache
from services.common.connect import apply_intentions
from services.common.consul_agent import ConsulAgent, free_port
from services.common.peers import INFERENCE, POLICY, REGISTRY, open_mesh, peer_service, public_gateway
from services.common.supervisor import Supervisor
from services.policy.client import create_key
from services.registry.client import register_model_dir

ADMIN_TOKEN = "bench-admin-token"
REPLICAS = ("inference", "inference-b")
ARMS = ("affinity", "no session")
RESULTS = Path(__file__).resolve().parent / "results" / "affinity.json"
TOPICS = ("rivers", "volcanoes", "bread", "chess", "owls", "bridges", "tea", "comets", "glass", "maps", "bees",
          "sailing")
FOLLOW_UPS = ("Tell me one more fact about that.", "Why does that matter?", "Summarise all of it in one sentence.",
              "Give an example.", "What is a common mistake about it?")


@dataclass
class TurnResult:
    turn: int  # 0: the first
    prompt_tokens: int
    cached_prompt_tokens: int
    first_delta_s: float


@dataclass
class Arm:
    name: str
    turns: list[TurnResult] = field(default_factory=list)
    wall_s: float = 0.0

    def share(self, follow_ups: bool) -> float:
        chosen = [t for t in self.turns if (t.turn > 0) == follow_ups]
        prompt = sum(t.prompt_tokens for t in chosen)
        return sum(t.cached_prompt_tokens for t in chosen) / prompt if prompt else 0.0

    def summary(self) -> dict[str, float | int | str]:
        follow = [t for t in self.turns if t.turn > 0]
        return {"arm": self.name, "follow_up_hit_share": round(self.share(True), 4),
                "first_turn_hit_share": round(self.share(False), 4),
                "follow_up_prompt_tokens": sum(t.prompt_tokens for t in follow),
                "follow_up_cached_prompt_tokens": sum(t.cached_prompt_tokens for t in follow),
                "follow_up_first_delta_p50_ms": round(statistics.median(t.first_delta_s for t in follow) * 1000, 1),
                "turns": len(self.turns), "wall_s": round(self.wall_s, 2)}


async def conversation(stub: gateway_pb2_grpc.GatewayStub, key: str, arm: str, number: int, turns: int,
                       max_tokens: int, session: str, think_s: float) -> list[TurnResult]:
    topic = TOPICS[number % len(TOPICS)]
    reader = random.Random(number)  # the same pauses in both arms
    messages = [gateway_pb2.Message(role="system", content=f"Conversation {arm} #{number}. You are a patient "
                                                           f"teacher who answers briefly and plainly."),
                gateway_pb2.Message(role="user", content=f"Tell me something interesting about {topic}.")]
    results = []
    for index in range(turns):
        if index:
            await asyncio.sleep(reader.uniform(0, 2 * think_s))
        began = time.perf_counter()
        call = stub.Chat(metadata=(("authorization", f"Bearer {key}"),), timeout=600)
        await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
            messages=messages, max_tokens=max_tokens, session=session)))
        await call.done_writing()
        answer, first, usage = [], 0.0, None
        async for response in call:
            if response.delta and not first:
                first = time.perf_counter() - began
            answer.append(response.delta)
            if response.HasField("usage"):
                usage = response.usage
        assert usage is not None
        results.append(TurnResult(index, usage.prompt_tokens, usage.cached_prompt_tokens,
                                  first or time.perf_counter() - began))
        messages += [gateway_pb2.Message(role="assistant", content="".join(answer)),
                     gateway_pb2.Message(role="user", content=FOLLOW_UPS[(number + index) % len(FOLLOW_UPS)])]
    return results


async def run_arm(stub: gateway_pb2_grpc.GatewayStub, key: str, arm: Arm, tag: str, conversations: int, turns: int,
                  max_tokens: int, think_s: float = 0.0) -> None:
    began = time.perf_counter()
    done = await asyncio.gather(*(
        conversation(stub, key, tag, number, turns, max_tokens,
                     session=f"{tag}-{number}" if arm.name == "affinity" else "", think_s=think_s)
        for number in range(conversations)))
    arm.wall_s += time.perf_counter() - began
    arm.turns += [t for results in done for t in results]


async def measure(model_dir: Path, conversations: int, turns: int, max_tokens: int, think_s: float,
                  rounds: int) -> list[Arm]:
    arms = {name: Arm(name) for name in ARMS}
    with tempfile.TemporaryDirectory(prefix="lmesh-bench-affinity-") as scratch:
        work = Path(scratch)
        agent = await asyncio.to_thread(ConsulAgent.start, None, work / "consul.log")
        env = service_env()
        # The two replicas share this machine's cores: one ONNX Runtime thread pool each would oversubscribe them.
        threads = str(max(1, (os.cpu_count() or 2) // 2))
        env.update(CONSUL_HTTP_ADDR=agent.http_addr, LMESH_HOME=str(work / "home"), LMESH_ADMIN_TOKEN=ADMIN_TOKEN,
                   LMESH_ORT_THREADS=threads)
        supervisor = Supervisor(work / "logs", data_root=work / "home", env=env, grace_s=12)
        gateway_port = free_port()
        mesh = None
        try:
            await apply_intentions(agent.http_addr)
            mesh = await open_mesh(agent.http_addr, admin_token=ADMIN_TOKEN)
            for service in ("registry", "policy", "tokenizer", "gateway"):
                supervisor.start(service, *(["--port", str(gateway_port)] if service == "gateway" else []),
                                 "--grace", "2")
            await supervisor.while_running(mesh.peer(REGISTRY).wait_for(timeout=120))
            await supervisor.while_running(register_model_dir(mesh.peer(REGISTRY), model_dir, aliases=("default",)))
            for name in REPLICAS:
                supervisor.start("inference", "--grace", "2", name=name)
            await supervisor.while_running(mesh.peer(POLICY).wait_for(timeout=120))
            key = (await create_key(mesh.peer(POLICY), "bench")).api_key
            for service in ("tokenizer", "gateway"):
                await supervisor.while_running(mesh.peer(peer_service(service)).wait_for(timeout=300))
            inference = mesh.resolver(INFERENCE.name)
            await supervisor.while_running(inference.wait_for(timeout=300))
            while len([e for e in await inference.passing() if e.models]) < len(REPLICAS):
                await supervisor.while_running(asyncio.sleep(0.2))
            async with public_gateway(f"127.0.0.1:{gateway_port}") as stub:
                # Warm both replicas and the gateway's caches, on prompts no arm shares.
                await run_arm(stub, key, Arm("warm-up"), "warm-up", 4, 1, 4)
                for round_ in range(rounds):
                    order = ARMS if round_ % 2 == 0 else ARMS[::-1]
                    for name in order:
                        await run_arm(stub, key, arms[name], f"{name}/{round_}", conversations, turns, max_tokens,
                                      think_s)
                        print(f"  round {round_ + 1}, {name}: follow-up hit share {arms[name].share(True):.3f}",
                              file=sys.stderr, flush=True)
        finally:
            if mesh is not None:
                await mesh.close()
            await asyncio.to_thread(supervisor.stop_all)
            agent.stop()
    return [arms[name] for name in ARMS]


def render(arms: list[Arm], conversations: int, turns: int, max_tokens: int, think_s: float) -> str:
    lines = [f"Session affinity: {conversations} conversations x {turns} turns, 2 inference replicas, one gateway "
             f"(max_tokens {max_tokens}, greedy, think time {think_s:g} s mean)",
             f"{'arm':12} {'follow-up hit share':>20} {'first-turn share':>17} {'follow-up TTFT p50':>19} {'wall':>8}"]
    for arm in arms:
        row = arm.summary()
        lines.append(f"{arm.name:12} {row['follow_up_hit_share']:>20.3f} {row['first_turn_hit_share']:>17.3f} "
                     f"{row['follow_up_first_delta_p50_ms']:>16.1f} ms {row['wall_s']:>7.1f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.affinity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--think-s", type=float, default=1.0, help="mean pause before a follow-up (default 1)")
    parser.add_argument("--rounds", type=int, default=1, help="each arm this many times, in alternating order")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    arms = asyncio.run(measure(args.model_dir, args.conversations, args.turns, args.max_tokens, args.think_s,
                               args.rounds))
    print(render(arms, args.conversations, args.turns, args.max_tokens, args.think_s))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "bench": "affinity", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {"conversations": args.conversations, "turns": args.turns, "max_tokens": args.max_tokens,
                   "think_s": args.think_s,
                   "rounds": args.rounds, "replicas": len(REPLICAS), "cpus": os.cpu_count()},
        "arms": [arm.summary() for arm in arms],
        "turns": {arm.name: [asdict(t) for t in arm.turns] for arm in arms},
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
