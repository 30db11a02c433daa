"""`make image-check`: the mesh from the container image, end to end. A Consul dev agent on this host; registry,
policy, tokenizer, inference, gateway and embeddings each a `podman run IMAGE serve SERVICE` container, confined as
deploy/kubernetes/lmesh.yaml confines its pods (the image's non-root user, a read-only root filesystem with
writable volumes for /data and /cache, no capabilities, no privilege escalation); the model registered from this
host into the registry container, an API key made in policy, then from this host a streamed gRPC chat and an
OpenAI-compatible HTTP chat through the gateway that must bring model tokens back, and an embedding from the
model baked into the image. The containers are stopped and removed afterwards, whatever happened.

Every container shares this host's network (`--network host`): the services reach the agent at 127.0.0.1 and
advertise 127.0.0.1 as they do outside containers; each gets ports of its own. mTLS between them is on, with Connect
certificates from the agent and the intentions applied first, as in production.

  python -m bench.container_mesh [--image localhost/lmesh:VERSION] [--model-dir DIR] [--build] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from lmesh.embeddings.v1 import embeddings_pb2

from bench.chaos import auth, chat_start
from services.common.config import lmesh_cache
from services.common.connect import apply_intentions
from services.common.consul_agent import ConsulAgent, free_port
from services.common.discovery import Mesh
from services.common.peers import POLICY, REGISTRY, open_mesh, public_gateway
from services.policy.client import create_key
from services.registry.client import register_model_dir

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "deploy" / "container" / "build.sh"
RESULTS = Path(__file__).resolve().parent / "results" / "container.json"
IMAGE_NAME = "localhost/lmesh"
# The order they start in: the registry first (inference and tokenizer fetch from it), the gateway last.
SERVICES = ("registry", "policy", "tokenizer", "inference", "embeddings", "gateway")
ADMIN_TOKEN = secrets.token_urlsafe(24)
START_TIMEOUT_S = 240.0  # inference: fetch the model from the registry, verify and load it, warm up, on 2 cores
CHAT_TIMEOUT_S = 120.0
QUESTION = "What is the capital of France?"
MAX_TOKENS = 16
# Limits podman gives a rootful container unless told (nofile 1048576, nproc 4194304) are set by the OCI runtime,
# which needs CAP_SYS_RESOURCE to go above the hard limits it inherited; podman lowers its own hard limit of
# processes to 32768 before it starts the runtime (/proc/<podman>/limits here), so a container asks for no more.
PODMAN_MAX_NOFILE = 1_048_576
PODMAN_MAX_NPROC = 32_768
CAP_SYS_RESOURCE = 24


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def default_image() -> str:
    """The image build.sh commits: localhost/lmesh:<the version in pyproject.toml>."""
    return f"{IMAGE_NAME}:{project_version()}"


def has_capability(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def sandbox_flags() -> tuple[list[str], list[str]]:
    """The `podman run` flags this host needs beyond a plain run, and why, one line each. None on an ordinary host;
    on a sandbox like the development machine's: no CAP_SYS_RESOURCE (the container's limits may not exceed the hard
    limits here, which podman's defaults do), and cgroups v1 in hybrid mode, which crun refuses and runc accepts."""
    flags: list[str] = []
    reasons: list[str] = []
    if not has_capability(CAP_SYS_RESOURCE):
        for name, limit, ceiling in (("nofile", resource.RLIMIT_NOFILE, PODMAN_MAX_NOFILE),
                                     ("nproc", resource.RLIMIT_NPROC, PODMAN_MAX_NPROC)):
            hard = resource.getrlimit(limit)[1]
            value = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
            flags += ["--ulimit", f"{name}={value}:{value}"]
        reasons.append(f"{' '.join(flags)}: no CAP_SYS_RESOURCE here to raise the hard limits to podman's defaults")
    hybrid = Path("/sys/fs/cgroup/unified").is_dir() and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    if hybrid and shutil.which("runc"):
        flags += ["--runtime", "runc"]
        reasons.append("--runtime runc: cgroups v1 in hybrid mode here, which crun refuses")
    return flags, reasons


def podman(*args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, check=False, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {args[0]} failed (status {result.returncode}): {result.stderr.strip()}")
    return result


def image_size_bytes(image: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


def image_user(image: str) -> tuple[int, int]:
    """The image's USER as uid, gid (build.sh sets numeric ones)."""
    user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    uid, _, gid = user.partition(":")
    if not uid.isdigit():
        raise RuntimeError(f"{image} runs as {user!r}, not a numeric uid:gid; rebuild it with `make image`")
    return int(uid), int(gid or uid)


def give_to(path: Path, uid: int, gid: int) -> None:
    """A volume the image's user may write: chown as root, or inside podman's user namespace when rootless."""
    if os.geteuid() == 0:
        os.chown(path, uid, gid)
    else:
        podman("unshare", "chown", f"{uid}:{gid}", str(path))


def remove_tree(path: Path) -> None:
    """Removes a work directory whose volumes the containers' user owns (through podman's namespace when rootless)."""
    if os.geteuid() != 0:
        podman("unshare", "rm", "-rf", str(path), check=False)
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Container:
    service: str
    name: str
    port: int
    extra_ports: dict[str, int]
    started_at: float = 0.0
    passing_at: float = 0.0
    exit_code: int | None = None


@dataclass
class Report:
    image: str
    image_size_mb: float
    build_s: float | None
    sandbox_flags: list[str]
    passing_s: dict[str, float] = field(default_factory=dict)  # from the first `podman run` to each passing
    register_s: float = 0.0
    first_token_s: float = 0.0  # from the first `podman run` to the gRPC chat's first token
    chat: dict[str, Any] = field(default_factory=dict)
    http_chat: dict[str, Any] = field(default_factory=dict)
    embedding: dict[str, Any] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)


class ContainerMesh:
    """The containers of one check, named lmesh-check-<run>-<service>; `close` stops and removes every one."""

    def __init__(self, image: str, consul_addr: str, work: Path, flags: Sequence[str]) -> None:
        self.image = image
        self.consul_addr = consul_addr
        self.work = work
        self.flags = list(flags)
        self.run_id = secrets.token_hex(3)
        self.uid, self.gid = image_user(image)
        self.containers: dict[str, Container] = {}
        self.first_start = 0.0

    def run(self, service: str) -> Container:
        ports = {"port": free_port(), "metrics-port": free_port()}
        ports["http-port" if service == "gateway" else "health-port"] = free_port()
        container = Container(service, f"lmesh-check-{self.run_id}-{service}", ports["port"], ports)
        volumes = []
        for mount in ("data", "cache"):
            host = self.work / service / mount
            host.mkdir(parents=True)
            give_to(host, self.uid, self.gid)
            volumes += ["-v", f"{host}:/{mount}"]
        env = {"CONSUL_HTTP_ADDR": self.consul_addr}
        if service in ("registry", "policy"):
            env["LMESH_ADMIN_TOKEN"] = ADMIN_TOKEN
        if service == "gateway":  # every chat here must run the model, not come from the response cache
            env["LMESH_RESPONSE_CACHE"] = "off"
        args = ["serve", service, "--data-dir", f"/data/{service}", "--grace", "5",
                *(arg for flag, port in ports.items() for arg in (f"--{flag}", str(port)))]
        if service == "inference":
            args += ["--model", "default"]
        command = ["run", "--detach", "--name", container.name, *self.flags, "--network", "host",
                   # As the Kubernetes manifests confine each pod (the image's own non-root user).
                   "--read-only", "--cap-drop", "all", "--security-opt", "no-new-privileges",
                   *volumes, *(arg for name, value in env.items() for arg in ("--env", f"{name}={value}")),
                   self.image, *args]
        if not self.first_start:
            self.first_start = time.monotonic()
        container.started_at = time.monotonic()
        self.containers[service] = container
        podman(*command)
        return container

    def running(self, container: Container) -> bool:
        state = podman("inspect", "--format", "{{.State.Running}}", container.name, check=False).stdout.strip()
        return state == "true"

    def logs(self, container: Container, lines: int = 40) -> str:
        result = podman("logs", "--tail", str(lines), container.name, check=False)
        return (result.stdout + result.stderr).strip()

    async def wait_passing(self, mesh: Mesh, container: Container, model: str = "") -> None:
        """Until the container's instance passes in Consul (with `model` in its meta when given); a container that
        exits first fails the check with its log."""
        waiter = asyncio.ensure_future(mesh.resolver(f"lmesh-{container.service}").wait_for(
            lambda e: e.port == container.port and (not model or model in e.models), timeout=START_TIMEOUT_S))
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=1.0)
                if not waiter.done() and not await asyncio.to_thread(self.running, container):
                    raise RuntimeError(f"{container.name} exited before passing in Consul:\n"
                                       f"{await asyncio.to_thread(self.logs, container)}")
            waiter.result()
        finally:
            waiter.cancel()
        container.passing_at = time.monotonic()

    def close(self) -> dict[str, int | None]:
        """Stops every container (SIGTERM, its grace, then SIGKILL), records its exit code and removes it."""
        codes: dict[str, int | None] = {}
        for container in reversed(list(self.containers.values())):
            podman("stop", "--time", "15", container.name, check=False, timeout=60)
            code = podman("inspect", "--format", "{{.State.ExitCode}}", container.name, check=False).stdout.strip()
            codes[container.service] = int(code) if code.lstrip("-").isdigit() else None
            podman("rm", "--force", container.name, check=False, timeout=60)
        return codes


async def grpc_chat(gateway: str, key: str) -> tuple[dict[str, Any], float]:
    """One streamed chat through the gateway's gRPC port; its answer, and when its first token came."""
    first_token = 0.0
    answer: list[str] = []
    tokens = 0
    completion_tokens, model = -1, ""
    async with public_gateway(gateway) as stub:
        call = stub.Chat(metadata=auth(key), timeout=CHAT_TIMEOUT_S)
        await call.write(chat_start(QUESTION, MAX_TOKENS))
        await call.done_writing()
        while (response := await call.read()) is not grpc.aio.EOF:
            if response.logprobs and not first_token:
                first_token = time.monotonic()
            tokens += len(response.logprobs)
            answer.append(response.delta)
            if response.finish_reason:
                completion_tokens = response.usage.completion_tokens
                model = response.model
    if not tokens or completion_tokens != tokens:
        raise RuntimeError(f"the chat streamed {tokens} tokens, its usage says {completion_tokens}")
    return {"answer": "".join(answer), "completion_tokens": completion_tokens, "model": model}, first_token


def http_chat(http_port: int, key: str) -> dict[str, Any]:
    """One chat through the gateway's OpenAI-compatible HTTP API."""
    body = json.dumps({"model": "default", "max_tokens": MAX_TOKENS, "temperature": 0,
                       "messages": [{"role": "user", "content": QUESTION}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/chat/completions", data=body,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=CHAT_TIMEOUT_S) as response:
        reply = json.loads(response.read())
    content = reply["choices"][0]["message"]["content"]
    if not content or reply["usage"]["completion_tokens"] < 1:
        raise RuntimeError(f"the HTTP chat brought no tokens back: {reply}")
    return {"answer": content, "completion_tokens": reply["usage"]["completion_tokens"], "model": reply["model"]}


async def embed(gateway: str, key: str) -> dict[str, Any]:
    async with public_gateway(gateway) as stub:
        response = await stub.Embed(embeddings_pb2.EmbedRequest(inputs=[QUESTION]), metadata=auth(key), timeout=30)
    (vector,) = response.embeddings
    norm = sum(v * v for v in vector.values) ** 0.5
    if response.dimensions != len(vector.values) or abs(norm - 1.0) > 1e-3:
        raise RuntimeError(f"an embedding of {len(vector.values)} values, norm {norm:.4f}, from {response.model}")
    return {"model": response.model, "dimensions": response.dimensions}


@contextlib.asynccontextmanager
async def consul_on_host(work: Path) -> AsyncIterator[ConsulAgent]:
    agent = await asyncio.to_thread(ConsulAgent.start, None, work / "consul.log")
    try:
        yield agent
    finally:
        await asyncio.to_thread(agent.stop)


async def check(image: str, model_dir: Path, flags: Sequence[str], report: Report,
                progress: Any = print) -> None:
    work = Path(tempfile.mkdtemp(prefix="lmesh-container-"))
    try:
        async with consul_on_host(work) as agent:
            await apply_intentions(agent.http_addr)
            mesh = await open_mesh(agent.http_addr, admin_token=ADMIN_TOKEN)
            containers = ContainerMesh(image, agent.http_addr, work, flags)
            try:
                await run_mesh(containers, mesh, model_dir, report, progress)
            except BaseException:
                for container in containers.containers.values():
                    progress(f"--- {container.name} (last lines)\n{containers.logs(container, 20)}")
                raise
            finally:
                await mesh.close()
                report.exit_codes = await asyncio.to_thread(containers.close)
                progress(f"containers stopped and removed (exit codes {report.exit_codes})")
    finally:
        remove_tree(work)


async def run_mesh(containers: ContainerMesh, mesh: Mesh, model_dir: Path, report: Report, progress: Any) -> None:
    waits: dict[str, asyncio.Task[None]] = {}
    model_id = ""
    try:
        for service in SERVICES:
            if service == "inference":  # it serves `default`, which must be registered first
                await waits["registry"]
                began = time.monotonic()
                version = await register_model_dir(mesh.peer(REGISTRY), model_dir, aliases=("default",))
                report.register_s = round(time.monotonic() - began, 2)
                model_id = f"{version.name}:{version.version}"
                progress(f"registered {model_id} from {model_dir} into the registry container in {report.register_s} s")
            container = await asyncio.to_thread(containers.run, service)
            progress(f"started {container.name}: {' '.join(f'{k} {v}' for k, v in container.extra_ports.items())}")
            # Each watched from its start, so that its time to passing is its own.
            waits[service] = asyncio.create_task(
                containers.wait_passing(mesh, container, model_id if service == "inference" else ""))
        await asyncio.gather(*waits.values())
    finally:
        for wait in waits.values():
            wait.cancel()
    for service in SERVICES:
        report.passing_s[service] = round(containers.containers[service].passing_at - containers.first_start, 2)
    progress("passing in Consul after the first start: "
             + ", ".join(f"{service} {seconds} s" for service, seconds in report.passing_s.items()))
    key = (await create_key(mesh.peer(POLICY), "container-check")).api_key
    gateway = containers.containers["gateway"]
    report.chat, first_token = await grpc_chat(f"127.0.0.1:{gateway.port}", key)
    report.first_token_s = round(first_token - containers.first_start, 2)
    progress(f"gRPC chat: {report.chat['answer']!r} ({report.chat['completion_tokens']} tokens from "
             f"{report.chat['model']}), first token {report.first_token_s} s after the first start")
    report.http_chat = await asyncio.to_thread(http_chat, gateway.extra_ports["http-port"], key)
    progress(f"HTTP chat: {report.http_chat['answer']!r} ({report.http_chat['completion_tokens']} tokens)")
    report.embedding = await embed(f"127.0.0.1:{gateway.port}", key)
    progress(f"embedding: {report.embedding['dimensions']} dimensions from {report.embedding['model']}, "
             "the model baked into the image")


def build(progress: Any) -> float:
    """Runs deploy/container/build.sh with this interpreter (its pip makes the wheels); its duration."""
    began = time.monotonic()
    result = subprocess.run(["bash", str(BUILD_SCRIPT), sys.executable], check=False)
    if result.returncode != 0:
        raise SystemExit(f"the image build failed (status {result.returncode}); its output is above")
    seconds = round(time.monotonic() - began, 1)
    progress(f"image built in {seconds} s")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.container_mesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=default_image(), help="the image to run (default: %(default)s)")
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct",
                        help="the built model to register (`make model`)")
    parser.add_argument("--build", action="store_true", help="build the image first (deploy/container/build.sh)")
    parser.add_argument("--json", action="store_true", help=f"also write the results to {RESULTS}")
    args = parser.parse_args(argv)
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if shutil.which("podman") is None:
        parser.error("podman is not installed; run deploy/scripts/install_container_tools.sh")
    if not (args.model_dir / "lmesh_model.json").exists():
        parser.error(f"no model build at {args.model_dir}; run `make model`")
    build_s = build(progress) if args.build else None
    if podman("image", "exists", args.image, check=False).returncode != 0:
        parser.error(f"no image {args.image}; build it with `make image`")
    flags, reasons = sandbox_flags()
    for reason in reasons:
        progress(f"sandbox flag {reason}")
    report = Report(args.image, round(image_size_bytes(args.image) / 1e6, 1), build_s, flags)
    began = time.monotonic()
    asyncio.run(check(args.image, args.model_dir, flags, report, progress))
    print(f"Container check: {report.image} ({report.image_size_mb:.0f} MB"
          + (f", built in {report.build_s:.0f} s" if report.build_s is not None else "") + f"), {os.cpu_count()} CPUs")
    print("passing in Consul after the first `podman run`: "
          + ", ".join(f"{service} {seconds:.1f} s" for service, seconds in report.passing_s.items()))
    print(f"model registered from the host in {report.register_s:.1f} s; first answer token "
          f"{report.first_token_s:.1f} s after the first `podman run`; whole check {time.monotonic() - began:.0f} s")
    print(f"answer: {report.chat['answer']!r}")
    if args.json:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"bench": "container_mesh",
                                       "date": datetime.now(UTC).isoformat(timespec="seconds"),
                                       "cpus": os.cpu_count(), **report.__dict__}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
