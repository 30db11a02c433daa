"""A whole lmesh mesh for a benchmark: a Consul agent with the default intentions, then registry, policy, tokenizer,
inference and gateway as separate processes (mTLS between them unless LMESH_MTLS=off), the model registered as
`default` (plus any `extra_models`, each under its own name, served by the same inference replica), and an API key.

    async with full_mesh(model_dir, work) as mesh:
        mesh.grpc_target, mesh.http_base, mesh.key, mesh.pid("gateway")
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from bench.mesh import service_env
from services.common.connect import apply_intentions
from services.common.consul_agent import ConsulAgent, free_ports
from services.common.discovery import Mesh
from services.common.peers import POLICY, REGISTRY, open_mesh, peer_service
from services.common.supervisor import Supervisor
from services.model.manifest import ModelManifest
from services.policy.client import create_key
from services.registry.client import register_model_dir

SERVICES = ("registry", "policy", "tokenizer", "inference", "gateway", "tools", "embeddings")
ADMIN_TOKEN = "bench-admin-token"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class RunningMesh:
    consul_addr: str
    supervisor: Supervisor
    operator: Mesh  # the mesh as an operator's tool sees it
    key: str
    grpc_target: str
    http_base: str
    model_id: str

    def pid(self, service: str) -> int:
        return self.supervisor.processes[service].pid


@contextlib.asynccontextmanager
async def full_mesh(model_dir: Path, work: Path, gateway_args: tuple[str, ...] = (),
                    policy_args: tuple[str, ...] = (), extra_models: tuple[Path, ...] = ()
                    ) -> AsyncIterator[RunningMesh]:
    agent = await asyncio.to_thread(ConsulAgent.start, None, work / "consul.log")
    env = service_env()
    env.update(CONSUL_HTTP_ADDR=agent.http_addr, LMESH_HOME=str(work / "home"), LMESH_ADMIN_TOKEN=ADMIN_TOKEN)
    supervisor = Supervisor(work / "logs", data_root=work / "home", env=env, grace_s=12)
    gateway_port, http_port = free_ports(2)
    mesh = None
    try:
        await apply_intentions(agent.http_addr)
        mesh = await open_mesh(agent.http_addr, admin_token=ADMIN_TOKEN)
        args = {"gateway": ("--port", str(gateway_port), "--http-port", str(http_port), *gateway_args),
                "policy": policy_args}
        if extra_models:
            # The replica serves `default` and each extra model by its manifest's name.
            refs = ["default", *(ModelManifest.load(d).name for d in extra_models)]
            args["inference"] = tuple(arg for ref in refs for arg in ("--model", ref))
        for service in SERVICES:
            supervisor.start(service, *args.get(service, ()), "--grace", "2")
        await supervisor.while_running(mesh.peer(REGISTRY).wait_for(timeout=120))
        version = await supervisor.while_running(register_model_dir(mesh.peer(REGISTRY), model_dir,
                                                                    aliases=("default",)))
        for extra in extra_models:
            await supervisor.while_running(register_model_dir(mesh.peer(REGISTRY), extra, aliases=()))
        await supervisor.while_running(mesh.peer(POLICY).wait_for(timeout=120))
        key = (await create_key(mesh.peer(POLICY), "bench", allowed_tools=["*"])).api_key
        for service in SERVICES:
            await supervisor.while_running(mesh.peer(peer_service(service)).wait_for(timeout=300))
        yield RunningMesh(agent.http_addr, supervisor, mesh, key, f"127.0.0.1:{gateway_port}",
                          f"http://127.0.0.1:{http_port}", f"{version.name}:{version.version}")
    finally:
        if mesh is not None:
            await mesh.close()
        await asyncio.to_thread(supervisor.stop_all)
        agent.stop()
