"""What prompts that cannot fit cost the mesh: bursts of 1, 4 and 8 chats whose user message is 1,040,000 emoji
(4.16 MB, under the gateway's 4 MiB request limit), sent while small chats go on, against a whole mesh started
here. Prints the tokenizer's peak and final memory, how the burst was answered, whether its Consul check ever
stopped passing, and how the small chats fared.

  python -m bench.prompt_burst --model-dir DIR
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
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
ADMIN_TOKEN = "bench-admin-token"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


async def chat(gateway: str, key: str, text: str) -> grpc.StatusCode:
    async with public_gateway(gateway) as stub:
        call = stub.Chat(metadata=(("authorization", f"Bearer {key}"),), timeout=120)
        await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
            max_tokens=2, messages=[gateway_pb2.Message(role="user", content=text)])))
        await call.done_writing()
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def measure(model_dir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="lmesh-bench-burst-") as scratch:
        work = Path(scratch)
        agent = await asyncio.to_thread(ConsulAgent.start, None, work / "consul.log")
        await apply_intentions(agent.http_addr)
        env = service_env(CONSUL_HTTP_ADDR=agent.http_addr, LMESH_HOME=str(work), LMESH_ADMIN_TOKEN=ADMIN_TOKEN)
        supervisor = Supervisor(work / "logs", data_root=work, env=env)
        gateway_port = free_port()
        mesh = await open_mesh(agent.http_addr, admin_token=ADMIN_TOKEN)
        try:
            for service in SERVICES:
                supervisor.start(service, *(["--port", str(gateway_port)] if service == "gateway" else []))
            await supervisor.while_running(mesh.peer(REGISTRY).wait_for(timeout=120))
            await register_model_dir(mesh.peer(REGISTRY), model_dir, aliases=("default",))
            await supervisor.while_running(mesh.peer(POLICY).wait_for(timeout=120))
            key = (await create_key(mesh.peer(POLICY), "bench")).api_key
            for service in SERVICES:
                await supervisor.while_running(mesh.peer(peer_service(service)).wait_for(timeout=300))
            gateway = f"127.0.0.1:{gateway_port}"
            await chat(gateway, key, "hi")
            pid = supervisor.processes["tokenizer"].pid
            print(f"tokenizer before: {rss_mb(pid):.0f} MB")
            peak, not_passing, sampling = 0.0, 0, True

            async def sample() -> None:
                nonlocal peak, not_passing
                while sampling:
                    peak = max(peak, rss_mb(pid))
                    _, nodes = await mesh.consul.health.service("lmesh-tokenizer", passing=True)
                    not_passing += not nodes
                    await asyncio.sleep(0.1)

            sampler = asyncio.create_task(sample())
            emoji = "\U0001f600" * 1_040_000
            for size in (1, 4, 8):
                began = time.monotonic()
                burst = [asyncio.create_task(chat(gateway, key, emoji)) for _ in range(size)]
                small: list[grpc.StatusCode] = []
                while not all(task.done() for task in burst):
                    small.append(await chat(gateway, key, "What is 2+2?"))
                    await asyncio.sleep(0.3)
                codes = sorted({code.name for code in await asyncio.gather(*burst)})
                failed = sum(code != grpc.StatusCode.OK for code in small)
                print(f"burst of {size}: answered {'/'.join(codes)} in {time.monotonic() - began:.2f} s; "
                      f"{len(small)} small chats meanwhile, {failed} failed; tokenizer {rss_mb(pid):.0f} MB")
            sampling = False
            await sampler
            print(f"tokenizer peak {peak:.0f} MB, after {rss_mb(pid):.0f} MB; health samples not passing: "
                  f"{not_passing}")
        finally:
            await mesh.close()
            await asyncio.to_thread(supervisor.stop_all)
            agent.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prompt_burst", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    args = parser.parse_args(argv)
    asyncio.run(measure(args.model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
