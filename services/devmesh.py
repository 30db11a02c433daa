"""`lmesh dev` (what `make run` runs): a whole mesh on this machine, then a streamed sample answer.

Starts a Consul dev agent unless one answers at CONSUL_HTTP_ADDR, the services as child processes,
registers the built model, makes sure a development API key exists, and streams an answer. Ctrl-C (or
SIGTERM) stops every process it started, gracefully, in reverse order.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import signal
import sys
import urllib.request
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import grpc

from services.common.admin import ADMIN_TOKEN_ENV
from services.common.config import consul_addr, env_int, lmesh_home
from services.common.connect import mtls_enabled
from services.common.consul_agent import ConsulAgent, consul_answers
from services.common.discovery import Mesh
from services.common.errors import AlreadyExists
from services.common.peers import OPERATOR, POLICY, REGISTRY, GatewayTls, open_mesh, peer_service
from services.common.server import port_is_free
from services.common.supervisor import ProcessExited, Supervisor

SERVICE_ORDER = ("registry", "policy", "tokenizer", "inference", "gateway", "tools", "embeddings")
DEFAULT_GATEWAY_PORT = 50051
DEFAULT_HTTP_PORT = 8080  # the gateway's OpenAI-compatible HTTP API
SAMPLE_QUESTION = "What is the capital of France?"


def dev_key_path() -> Path:
    return lmesh_home() / "dev-api-key"


async def wait_all_passing(mesh: Mesh, supervisor: Supervisor, timeout: float) -> None:
    """Waits until every service has a passing instance in Consul; fails at once if a process of the mesh exits."""
    async def watch(service: str) -> None:
        try:
            await mesh.peer(peer_service(service)).wait_for(timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"lmesh-{service} did not pass its Consul health check within {timeout:g} s "
                               f"(log: {supervisor.processes[service].log_path})") from None

    await supervisor.while_running(asyncio.gather(*(watch(s) for s in SERVICE_ORDER)))


TOOLS_MODEL = "smollm2-135m-tools"


def tools_model_dir(model_dir: Path) -> Path | None:
    """The fine-tuned tool model (`make tools-model`) beside the base model's build, when it was built."""
    candidate = model_dir.parent / TOOLS_MODEL
    return candidate if (candidate / "lmesh_model.json").is_file() and (candidate / "model.onnx").is_file() else None


async def ensure_tools_model(mesh: Mesh, model_dir: Path) -> None:
    """Registers the tool model (no alias): a chat that uses mesh tools may ask for it by name."""
    from services.registry.client import register_model_dir

    try:
        await register_model_dir(mesh.peer(REGISTRY), model_dir, aliases=())
    except AlreadyExists:
        pass  # registered by an earlier `make run`; the build is content-addressed


async def ensure_model(mesh: Mesh, model_dir: Path) -> str:
    from services.registry.client import register_model_dir

    registry = mesh.peer(REGISTRY)
    await registry.wait_for(timeout=60)
    try:
        version = await register_model_dir(registry, model_dir, aliases=("default",))
    except AlreadyExists as exc:
        # An older build (e.g. from before a converter upgrade) holds this version in the dev registry.
        raise AlreadyExists(f"the development registry in {lmesh_home()} holds another build under the same "
                            f"name and version ({exc.message.split(';')[0]}): remove it with `make clean`, then "
                            f"`make run` again") from None
    return f"{version.name}:{version.version}"


async def ensure_dev_key(mesh: Mesh) -> str:
    """The development key from .lmesh/dev-api-key if it still works, else a new one saved there (granted every
    mesh tool)."""
    from lmesh.policy.v1 import policy_pb2

    from services.policy.client import create_key

    policy = mesh.peer(POLICY)
    await policy.wait_for(timeout=60)
    path = dev_key_path()
    if path.exists():
        key = path.read_text().strip()
        try:
            await policy.call(lambda p: p.Authenticate, policy_pb2.AuthenticateRequest(api_key=key))
            return key
        except Exception:  # revoked or from another data dir: make a new one
            pass
    # The development mesh's key may try every mesh tool (`lmesh chat --tools auto`); keys an operator creates get
    # none unless granted.
    created = await create_key(policy, "dev", display_name="make run development key", allowed_tools=["*"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(created.api_key + "\n")
    path.chmod(0o600)
    return str(created.api_key)


def ensure_admin_token() -> str:
    """LMESH_ADMIN_TOKEN, else the token saved in LMESH_HOME, else a new one saved there (0600): key management
    and model registration are never open to whoever reaches a port. The CLI reads the same file."""
    from services.client import admin_token_file

    given = os.environ.get(ADMIN_TOKEN_ENV, "")
    if given:
        return given
    path = admin_token_file()
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


async def secure_the_mesh(consul_http: str) -> None:
    """Deny by default between the mesh's services, allowing exactly the request path (Consul intentions)."""
    from services.common.connect import apply_intentions

    changes = await apply_intentions(consul_http)
    print(f"• mTLS between services with Consul Connect certificates; intentions allow only the request path "
          f"({len(changes.created)} created, {len(changes.updated)} updated)", flush=True)


def dev_ports() -> tuple[int, int]:
    """The gateway's gRPC and HTTP ports under `lmesh dev` (LMESH_GATEWAY_PORT, LMESH_HTTP_PORT)."""
    return (env_int("LMESH_GATEWAY_PORT", DEFAULT_GATEWAY_PORT, minimum=1, maximum=65535),
            env_int("LMESH_HTTP_PORT", DEFAULT_HTTP_PORT, minimum=1, maximum=65535))


async def bring_up(model_dir: Path, supervisor: Supervisor, consul_http: str, admin_token: str) -> tuple[str, str]:
    if mtls_enabled():
        await secure_the_mesh(consul_http)
    else:
        print("• WARNING: LMESH_MTLS=off: the services take unencrypted, unchecked calls from anyone who reaches "
              "their ports (debugging only)", flush=True)
    mesh = await open_mesh(consul_http, OPERATOR, admin_token=admin_token)
    try:
        gateway_port, http_port = dev_ports()
        tools_model = tools_model_dir(model_dir)
        arguments = {"gateway": ["--port", str(gateway_port), "--http-port", str(http_port)],
                     # One replica serves the base model and, when built, the tool model beside it.
                     "inference": ["--model", "default", "--model", TOOLS_MODEL] if tools_model else []}
        for service in SERVICE_ORDER:
            supervisor.start(service, *arguments.get(service, []))
        print(f"• services starting (logs in {supervisor.logs})", flush=True)
        model_id = await supervisor.while_running(ensure_model(mesh, model_dir))
        print(f"• model {model_id} registered (alias 'default')", flush=True)
        if tools_model is not None:
            await supervisor.while_running(ensure_tools_model(mesh, tools_model))
            print(f"• tool model {TOOLS_MODEL} registered (`make tools-model`): `lmesh chat --model {TOOLS_MODEL} "
                  "--tools auto`", flush=True)
        key = await supervisor.while_running(ensure_dev_key(mesh))
        await wait_all_passing(mesh, supervisor, timeout=300)
        print(f"• all {len(SERVICE_ORDER)} services passing in Consul", flush=True)
        return key, f"127.0.0.1:{gateway_port}"
    finally:
        await mesh.close()


def hold_home_lock(home: Path) -> TextIO | str:
    """An exclusive lock on LMESH_HOME for this process's life, or why it cannot be had.

    Two meshes on one LMESH_HOME would share its SQLite files and register twice in Consul.
    """
    handle = (home / "dev.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        return (f"a mesh using {home} is already running (pid {holder}); stop it (Ctrl-C where it runs, or "
                f"`kill {holder}`) or use another LMESH_HOME")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def registered_service(addr: str) -> str:
    """The first lmesh service with a passing instance in the agent at `addr` ("lmesh-gateway at 10.0.0.5:50051"),
    or "". A second mesh in one agent would share the first one's registry, keys and replicas with its own."""
    parts = urlsplit(addr if "//" in addr else f"//{addr}")
    base = f"{parts.scheme or 'http'}://{parts.netloc}"
    for service in SERVICE_ORDER[::-1]:
        try:
            with urllib.request.urlopen(f"{base}/v1/health/service/lmesh-{service}?passing=true", timeout=2) as resp:
                nodes = json.load(resp)
        except (OSError, ValueError):
            return ""
        if nodes:
            entry = nodes[0]["Service"]
            return f"lmesh-{service} at {entry.get('Address') or nodes[0]['Node']['Address']}:{entry['Port']}"
    return ""


def sample_chat_tls() -> GatewayTls | None:
    """How the sample answer reaches the gateway: plaintext, unless the gateway is given TLS files through the
    environment it inherits (LMESH_TLS_CERT): then TLS, verified with LMESH_GATEWAY_CA (else the system's roots)."""
    from services.client import GATEWAY_CA_ENV, env_file, gateway_tls

    if not os.environ.get("LMESH_TLS_CERT", "").strip():
        return None
    return gateway_tls(env_file(GATEWAY_CA_ENV), tls=True)


def run_dev(model_dir: Path, question: str = SAMPLE_QUESTION) -> int:
    from services.client import stream_chat_to_terminal

    if not (model_dir / "lmesh_model.json").exists():
        print(f"lmesh: no model build in {model_dir}: run `make model`", file=sys.stderr)
        return 2
    home = lmesh_home()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    lock = hold_home_lock(home)
    if isinstance(lock, str):
        print(f"lmesh: {lock}", file=sys.stderr)
        return 2
    gateway_port, http_port = dev_ports()
    for port, variable in ((gateway_port, "LMESH_GATEWAY_PORT"), (http_port, "LMESH_HTTP_PORT")):
        if not port_is_free(port):
            print(f"lmesh: port {port} is in use; stop what listens there or set {variable}", file=sys.stderr)
            return 2
    if gateway_port == http_port:
        print(f"lmesh: LMESH_GATEWAY_PORT and LMESH_HTTP_PORT are both {http_port}; give them different ports",
              file=sys.stderr)
        return 2
    addr = consul_addr()
    agent: ConsulAgent | None = None
    if consul_answers(addr):
        running = registered_service(addr)
        if running:
            print(f"lmesh: a mesh already runs in the Consul agent at {addr} ({running}); use it (`lmesh chat`), "
                  "stop it, or point CONSUL_HTTP_ADDR at another agent", file=sys.stderr)
            return 2
        print(f"• using the Consul agent at {addr}", flush=True)
    else:
        port = urlsplit(addr if "//" in addr else f"//{addr}").port or 8500
        agent = ConsulAgent.start(http_port=port, log_path=logs / "consul.log")
        print(f"• started a Consul dev agent at {agent.http_addr}", flush=True)
        addr = agent.http_addr
    admin_token = ensure_admin_token()
    env = {**os.environ, "CONSUL_HTTP_ADDR": addr, "LMESH_HOME": str(home), "PYTHONUNBUFFERED": "1",
           ADMIN_TOKEN_ENV: admin_token}
    supervisor = Supervisor(logs, data_root=home, env=env, grace_s=15)  # their drain grace (10 s) and a margin
    if agent is not None:
        supervisor.watch_consul_agent(agent)

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started in the background, where SIGINT is ignored
    try:
        tls = sample_chat_tls()
        key, gateway = asyncio.run(bring_up(model_dir, supervisor, addr, admin_token))
        print(f"\nAPI key (saved in {dev_key_path()}):\n{key}\n", flush=True)
        print(f"Gateway: {gateway}  (gRPC{' over TLS' if tls else ''}, metadata 'authorization: Bearer <key>')",
              flush=True)
        print(f"OpenAI-compatible HTTP API: {'https' if tls else 'http'}://127.0.0.1:{http_port}/v1  (header "
              f"'Authorization: Bearer <key>'; OpenAPI at /openapi.json)", flush=True)
        print(f"\n> {question}", flush=True)
        asyncio.run(stream_chat_to_terminal(gateway, key, [("user", question)], max_tokens=128, tls=tls))
        print("\nThe mesh is up. Try `.venv/bin/lmesh chat`. Ctrl-C stops it.", flush=True)
        _supervise(supervisor)
    except KeyboardInterrupt:
        print("\n• stopping", flush=True)
    except grpc.aio.AioRpcError as exc:  # its str() is a multi-line dump
        print(f"lmesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"lmesh: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop_all()
        if agent is not None:
            agent.stop()  # already stopped by the supervisor; this removes its scratch dir
        print("• stopped", flush=True)
    return 0


def _supervise(supervisor: Supervisor) -> None:
    """Blocks until Ctrl-C (KeyboardInterrupt) or until a process of the mesh exits, which is an error."""
    raise ProcessExited(supervisor.wait_any_exit())
