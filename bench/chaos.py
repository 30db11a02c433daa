"""`make chaos`: faults injected into a real mesh under a steady load of streaming chats, one table row per scenario.

The mesh: a Consul server agent that keeps its state on disk (so it can be restarted as a production agent is),
registry, policy, tokenizer, two inference replicas and two gateways, each a separate process with mTLS between
them. The load: `--streams` clients, each chatting in a loop through a gateway it picks from Consul (as a client
of the mesh would), every chat streamed with logprobs so that its tokens can be counted one by one.

Each scenario injects one fault under that load, restores the mesh, and is judged on what the clients saw:
requests sent, completed, failed (by status code), the worst time to recover (from the fault until requests
succeed again), and tokens lost or duplicated (a completed answer's usage.completion_tokens against the tokens it
streamed). Targets are printed next to the measurements, with pass or fail per row; the exit status is 1 when one
is missed.

  python -m bench.chaos --model-dir DIR [--scenarios kill-inference,freeze-inference] [--streams 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from lmesh.policy.v1 import policy_pb2

from bench.mesh import service_env
from bench.netns import Hosts, unavailable_reason
from services.common.config import lmesh_cache
from services.common.connect import apply_intentions
from services.common.consul_agent import consul_answers, find_consul, free_port, free_ports
from services.common.discovery import Endpoint, Mesh
from services.common.errors import LmeshError
from services.common.peers import POLICY, REGISTRY, open_mesh, public_gateway
from services.common.supervisor import ProcessExited, Supervisor
from services.policy.client import create_key, get_usage
from services.registry.client import register_model_dir

ADMIN_TOKEN = "bench-chaos-admin-token"
RESULTS = Path(__file__).resolve().parent / "results" / "chaos.json"
OK = "OK"
CALL_TIMEOUT_S = 30.0  # a load chat's deadline: a hang shows as DEADLINE_EXCEEDED, never as a stuck client
RETRY_PAUSE_S = 0.1  # a load client's pause after a failed chat (a real client backs off too)
WARM_S = 2.0  # load before each fault, so the fault meets streams in flight
OBSERVE_S = 4.0  # load after a fault before the mesh is restored
SETTLE_S = 3.0  # load after the restore: requests must succeed again
DOWN_S = 3.0  # how long a killed tokenizer, policy or registry stays down
FREEZE_S = 6.0  # how long a replica stays frozen (SIGSTOP)
LOAD_TENANT = "chaos"
PROBE_TENANT = "chaos-probes"
# Policy's reservation lease in the chaos mesh (default 30 s): a chat whose gateway died is charged when its lease
# expires, and each row's budget drift waits for that.
RESERVATION_LEASE_S = 6.0
CUT_S = 8.0  # how long the link to a replica's host stays down
# Mesh channels ping every 10 s and give up 5 s after an unanswered ping: a stream on a cut link ends within this.
KEEPALIVE_BOUND_S = 15.0
STALLED_CLIENT_S = 3.0  # the chaos gateways' --stalled-client-s (the default, 60 s, would make the run long)
STUCK_S = 2.0  # a chat whose first token took longer than this met the frozen replica
CONSUL_RESTARTS = 2  # the Consul scenario restarts the agent this many times: what it shows is a race
CONSUL_WATCH_S = 12.0  # how long the agent is watched after each restart (the target: all passing within 10 s)
PROMPTS = ("What is the capital of France?", "Name three colours of the rainbow.", "What is two plus two?",
           "Say hello in Spanish.", "What do bees make?", "Name a planet of the solar system.")
# About 1,500 tokens: a sequence whose KV alone outweighs the whole steady load's, so that a replica holding it
# can be told from its reported KV memory (Consul meta load_kv_bytes).
LONG_PROMPT = ("Notes: " + "the quick brown fox jumps over the lazy dog, " * 150
               + "\nIgnore the notes. Write a very long story about a dragon who learns to cook, at least 3000 words.")
LONG_POSITIONS = 1000  # a replica holding more positions than this holds the long sequence


# ---- what the clients saw, and the verdict --------------------------------------------------------------------


@dataclass
class ChatRecord:
    """One load chat as its client saw it (times: time.monotonic())."""

    started: float
    ended: float
    code: str  # OK, or the gRPC status code's name
    tokens: int = 0  # logprob entries received: one per generated token
    completion_tokens: int | None = None  # usage, on a completed answer
    first_token: float | None = None
    detail: str = ""  # a failure's status message
    content: str = ""  # the prompt's text
    prompt_tokens: int | None = None  # usage, on a completed answer


@dataclass(frozen=True)
class Target:
    """A bound on one measurement: `metric` `op` `bound` (op: "<=", ">=" or "==")."""

    metric: str
    op: str
    bound: float

    def holds(self, value: float | None) -> bool:
        if value is None:  # not measured: never a pass
            return False
        if self.op == "<=":
            return value <= self.bound
        if self.op == ">=":
            return value >= self.bound
        if self.op == "==":
            return value == self.bound
        raise ValueError(f"unknown operator {self.op!r}")


@dataclass
class Check:
    target: Target
    value: float | None
    ok: bool

    def render(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:g}"
        return f"{self.target.metric}={value} ({self.target.op} {self.target.bound:g}) {'ok' if self.ok else 'MISS'}"


@dataclass
class ScenarioResult:
    name: str
    sent: int
    completed: int
    failed: dict[str, int]  # status code name -> count
    recover_s: float  # from the fault until requests succeed again (0: none failed)
    tokens_lost: int
    tokens_duplicated: int
    measured: dict[str, float | None]
    checks: list[Check] = field(default_factory=list)
    error: str = ""  # the scenario itself could not run (its row fails)
    examples: dict[str, str] = field(default_factory=dict)  # status code name -> the first failure's message

    @property
    def passed(self) -> bool:
        return not self.error and all(check.ok for check in self.checks)

    def as_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["checks"] = [{"metric": c.target.metric, "op": c.target.op, "bound": c.target.bound, "value": c.value,
                          "ok": c.ok} for c in self.checks]
        row["passed"] = self.passed
        return row


def summarize(records: Sequence[ChatRecord], fault_at: float, restored_at: float | None = None
              ) -> dict[str, float | None]:
    """The load's measurements around one fault at `fault_at` (and the restore, when the fault needs one).

    recover_s: from the fault until the last failure ended (0 when none did). in_flight_fail_s: the slowest
    failure of a stream already open at the fault, from the fault. slowest_failure_s: the slowest failure of any
    request, from when it (or the fault) began: a failure must be quick, never a hang. after_restore_s: how long
    requests kept failing after the restored process passed in Consul."""
    failed = [r for r in records if r.code != OK]
    completed = [r for r in records if r.code == OK]
    in_flight = [r for r in failed if r.started < fault_at <= r.ended]
    lost = sum(max(0, (r.completion_tokens or 0) - r.tokens) for r in completed)
    duplicated = sum(max(0, r.tokens - (r.completion_tokens or 0)) for r in completed)
    last_failure = max((r.ended for r in failed), default=None)
    return {
        "sent": len(records),
        "completed": len(completed),
        "failed": len(failed),
        "recover_s": round(max(0.0, last_failure - fault_at), 3) if last_failure is not None else 0.0,
        "in_flight_failed": len(in_flight),
        "in_flight_fail_s": round(max(r.ended - fault_at for r in in_flight), 3) if in_flight else None,
        "failed_not_unavailable": sum(r.code != "UNAVAILABLE" for r in failed),
        "hung": sum(r.code == "DEADLINE_EXCEEDED" for r in failed),
        "slowest_failure_s": round(max(r.ended - max(r.started, fault_at) for r in failed), 3) if failed else 0.0,
        "after_restore_s": (round(max(0.0, (last_failure or 0.0) - restored_at), 3)
                            if restored_at is not None else None),
        "completed_after_fault": sum(r.started >= fault_at for r in completed),
        "tokens_lost": lost,
        "tokens_duplicated": duplicated,
    }


def budget_drift(records: Sequence[ChatRecord], charged: int, max_tokens: int) -> dict[str, float | None]:
    """Policy's charge for the load (`charged`: the tenant's spent tokens over the scenario) against what the
    clients received: budget_drift = charged - received, where received counts every completed chat's usage and,
    for a failed chat that streamed tokens, its prompt and those tokens. A failed chat may rightly be charged
    more, up to its whole reservation (prompt + max_tokens: its gateway died), or nothing (refused before its
    reservation): drift_over_bound is the drift beyond what failures allow (0 with no failures: the charge is
    exact). A negative drift means tokens were generated and never charged."""
    prompts = {r.content: r.prompt_tokens for r in records if r.prompt_tokens is not None}
    prompt_guess = max(prompts.values(), default=0)
    received, bound = 0, 0
    for record in records:
        prompt = prompts.get(record.content, prompt_guess)
        if record.code == OK:
            received += (record.prompt_tokens or 0) + (record.completion_tokens or 0)
        elif record.tokens:
            received += prompt + record.tokens
            bound += max(0, max_tokens - record.tokens)
        else:
            bound += prompt + max_tokens
    drift = charged - received
    return {"charged_tokens": charged, "budget_drift": drift, "drift_over_bound": max(0, drift - bound)}


def judge(name: str, records: Sequence[ChatRecord], measured: dict[str, float | None],
          targets: Sequence[Target]) -> ScenarioResult:
    """The scenario's row: the load's counts plus `measured` (the load's summary and the scenario's own
    measurements), checked against `targets`."""
    codes = Counter(r.code for r in records if r.code != OK)
    examples: dict[str, str] = {}
    for record in records:
        if record.code != OK:
            examples.setdefault(record.code, record.detail)
    checks = [Check(t, measured.get(t.metric), t.holds(measured.get(t.metric))) for t in targets]
    return ScenarioResult(name, sent=len(records), completed=len(records) - sum(codes.values()),
                          failed=dict(sorted(codes.items())), recover_s=float(measured.get("recover_s") or 0.0),
                          tokens_lost=int(measured.get("tokens_lost") or 0),
                          tokens_duplicated=int(measured.get("tokens_duplicated") or 0), measured=measured,
                          checks=checks, examples=examples)


def render(results: Sequence[ScenarioResult]) -> str:
    """The table: one row per scenario, its targets (value, bound, ok or MISS) at the end of the row."""
    header = (f"{'scenario':18} {'sent':>6} {'ok':>6} {'failed (by code)':28} {'recover':>8} {'lost/dup':>9} "
              f"{'verdict':7} targets")
    lines = [header, "-" * len(header)]
    for row in results:
        failed = ", ".join(f"{code} {n}" for code, n in row.failed.items()) or "-"
        targets = row.error or "; ".join(check.render() for check in row.checks)
        lines.append(f"{row.name:18} {row.sent:>6} {row.completed:>6} {failed:28} {row.recover_s:>7.2f}s "
                     f"{row.tokens_lost:>4}/{row.tokens_duplicated:<4} {'PASS' if row.passed else 'FAIL':7} "
                     f"{targets}")
    return "\n".join(lines)


# Every scenario: no hang, no token lost or duplicated, and answers completed after the fault.
COMMON_TARGETS = (Target("hung", "==", 0), Target("tokens_lost", "==", 0), Target("tokens_duplicated", "==", 0),
                  Target("completed_after_fault", ">=", 1))
# Every scenario on a real mesh: policy charged what was generated, never less, and more only for failed chats.
BUDGET_TARGETS = (Target("budget_drift", ">=", 0), Target("drift_over_bound", "==", 0))


# ---- a Consul agent that keeps its state ------------------------------------------------------------------------


class StatefulConsul:
    """A single-server Consul agent with Connect, its state in a data directory, on ports of its own: restarted,
    it comes back with its catalog, its services' registrations, its CA and intentions (a dev agent keeps none)."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.client_addresses = ["127.0.0.1"]  # where its HTTP API listens (a replica's network namespace: more)
        names = ("http", "dns", "grpc", "server", "serf-lan", "serf-wan")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_addr(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    def start(self, timeout: float = 30.0) -> None:
        args = [find_consul(), "agent", "-server", "-bootstrap-expect", "1", "-data-dir", str(self.data_dir),
                "-bind", "127.0.0.1", "-client", " ".join(self.client_addresses),
                "-node", f"lmesh-chaos-{self.ports['http']}",
                "-log-level", "warn", "-hcl", "connect { enabled = true }",
                "-hcl", "performance { raft_multiplier = 1 }",  # a single server elects itself at once
                *(arg for name, port in self.ports.items() for arg in (f"-{name}-port", str(port)))]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not consul_answers(self.http_addr):
            if self.process.poll() is not None:
                raise RuntimeError(f"the Consul agent exited with status {self.process.returncode} "
                                   f"(log: {self.log_path})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Consul agent elected no leader within {timeout:g} s (log: {self.log_path})")
            time.sleep(0.1)  # start-up readiness of a child process, bounded by the deadline

    def stop(self) -> None:
        """SIGTERM: a server does not leave the cluster on it, so its state stays as it was."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ---- the mesh ---------------------------------------------------------------------------------------------------


def service_of(name: str) -> str:
    """The service a process name runs: "inference-a" -> "inference"."""
    return name.split("-", 1)[0]


class ChaosMesh:
    """The mesh the scenarios break: processes by name ("inference-a", "gateway-b", "tokenizer", ...), each on a
    port chosen here, so that a restarted one is told apart from the one before it in Consul."""

    def __init__(self, model_dir: Path, work: Path, replicas: int = 2, gateways: int = 2,
                 behind_link: Sequence[str] = ()) -> None:
        self.model_dir = model_dir
        self.work = work
        # Processes that run in a network namespace of their own ("host1"), reached over a link that can be cut.
        self.behind_link = set(behind_link)
        self.hosts: Hosts | None = None
        self.consul = StatefulConsul(work / "consul", work / "consul.log")
        self.names = ["registry", "policy", "tokenizer", *(f"inference-{chr(97 + i)}" for i in range(replicas)),
                      *(f"gateway-{chr(97 + i)}" for i in range(gateways))]
        self.ports: dict[str, int] = {}
        self.supervisor: Supervisor | None = None
        self.mesh: Mesh | None = None
        self.key = ""
        self.probe_key = ""  # the scenarios' own clients (a vanishing, a slow one): charged apart from the load
        self.model_id = ""
        manifest = json.loads((model_dir / "lmesh_model.json").read_text())
        # As the engine counts it (float32 KV): K and V for each layer's KV heads.
        self.kv_bytes_per_token = 2 * manifest["num_layers"] * manifest["num_kv_heads"] * manifest["head_dim"] * 4

    async def start(self) -> None:
        (self.work / "consul").mkdir(parents=True, exist_ok=True)
        if self.behind_link:
            self.hosts = Hosts(1)
            self.hosts.create()
            self.consul.client_addresses.append(self.hosts.bridge_address)
        await asyncio.to_thread(self.consul.start)
        env = service_env()
        # The replicas share this machine's cores: one ONNX Runtime thread pool each would oversubscribe them.
        threads = str(max(1, (os.cpu_count() or 2) // 2))
        env.update(CONSUL_HTTP_ADDR=self.consul.http_addr, LMESH_HOME=str(self.work / "home"),
                   LMESH_ADMIN_TOKEN=ADMIN_TOKEN, LMESH_ORT_THREADS=threads,
                   LMESH_RESERVATION_LEASE_S=f"{RESERVATION_LEASE_S:g}")
        self.supervisor = Supervisor(self.work / "logs", data_root=self.work / "home", env=env, grace_s=10)
        await apply_intentions(self.consul.http_addr)
        self.mesh = await open_mesh(self.consul.http_addr, admin_token=ADMIN_TOKEN)
        for name in self.names:
            if service_of(name) != "inference":
                self.start_process(name)
        await self.wait_passing("registry")
        version = await self.supervisor.while_running(register_model_dir(self.mesh.peer(REGISTRY), self.model_dir,
                                                                         aliases=("default",)))
        self.model_id = f"{version.name}:{version.version}"
        for name in self.names:
            if service_of(name) == "inference":
                self.start_process(name)
        await self.wait_passing("policy")
        self.key = (await self.supervisor.while_running(create_key(self.mesh.peer(POLICY), LOAD_TENANT))).api_key
        self.probe_key = (await self.supervisor.while_running(create_key(self.mesh.peer(POLICY),
                                                                         PROBE_TENANT))).api_key
        for name in self.names:
            await self.wait_passing(name)

    async def close(self) -> None:
        if self.mesh is not None:
            await self.mesh.close()
        if self.supervisor is not None:
            for name in self.names:  # a frozen process would never see its SIGTERM
                with contextlib.suppress(KeyError, ProcessLookupError):
                    os.kill(self.supervisor.processes[name].pid, signal.SIGCONT)
            await asyncio.to_thread(self.supervisor.stop_all)
        await asyncio.to_thread(self.consul.stop)
        if self.hosts is not None:
            self.hosts.remove()  # after every process in it stopped

    def start_process(self, name: str) -> None:
        assert self.supervisor is not None
        service = service_of(name)
        port = self.ports[name] = free_port()
        args = ["--port", str(port), "--grace", "2"]
        if service == "gateway":
            args += ["--http-port", str(free_ports(1, taken=(port,))[0]), "--stalled-client-s", f"{STALLED_CLIENT_S:g}"]
        if name not in self.behind_link:
            if self.hosts is not None:  # reachable from the namespace too: listen on the bridge's address
                args += ["--host", self.hosts.bridge_address]
            self.supervisor.start(service, *args, name=name)
            return
        assert self.hosts is not None
        host = self.hosts["host1"]
        argv = [sys.executable, "-m", "services.cli", "serve", service, "--data-dir", str(self.work / "home" / name),
                "--host", host.address, *args]
        env = {**self.supervisor.env,
               "CONSUL_HTTP_ADDR": f"{self.hosts.bridge_address}:{self.consul.ports['http']}"}
        self.supervisor.spawn(name, self.hosts.argv_in("host1", argv), label=f"lmesh-{service} ({name}, host1)",
                              env=env)

    def pid(self, name: str) -> int:
        assert self.supervisor is not None
        return self.supervisor.processes[name].pid

    def endpoint_of(self, name: str) -> Endpoint | None:
        """The process's current instance in Consul, as this client's resolver sees it."""
        assert self.mesh is not None
        for endpoint in self.mesh.resolver(f"lmesh-{service_of(name)}").endpoints():
            if endpoint.port == self.ports[name]:
                return endpoint
        return None

    async def wait_passing(self, name: str, timeout: float = 180.0) -> float:
        """Waits until the process passes in Consul (an inference replica: with the model loaded); returns when."""
        assert self.mesh is not None and self.supervisor is not None
        port, inference = self.ports[name], service_of(name) == "inference"
        ready = self.mesh.resolver(f"lmesh-{service_of(name)}").wait_for(
            lambda e: e.port == port and (not inference or self.model_id in e.models), timeout=timeout)
        try:
            await self.supervisor.while_running(ready, [name])
        except ProcessExited as exc:
            raise RuntimeError(f"{exc}:\n{self.supervisor.log(name)[-3000:]}") from None
        except TimeoutError:
            raise RuntimeError(f"{name} did not pass in Consul within {timeout:g} s; its log ends:\n"
                               f"{self.supervisor.log(name)[-3000:]}") from None
        return time.monotonic()

    def kill(self, name: str) -> None:
        """kill -9, waited for."""
        assert self.supervisor is not None
        self.supervisor.kill(name)

    async def restart(self, name: str) -> float:
        """A fresh process under the same name (on a new port); returns when it passes in Consul."""
        self.start_process(name)
        return await self.wait_passing(name)

    def held_positions(self) -> dict[str, int]:
        """KV positions each inference replica reports holding (Consul meta, updated at most once a second)."""
        held = {}
        for name in self.names:
            if service_of(name) == "inference" and (endpoint := self.endpoint_of(name)) is not None:
                kv = endpoint.meta.get("load_kv_bytes", "0")
                held[name] = int(kv) // self.kv_bytes_per_token if kv.isdigit() else 0
        return held

    async def all_passing(self) -> bool:
        """Whether the agent itself lists every process's instance as passing (asked directly, not the cache)."""
        assert self.mesh is not None
        for service in sorted({service_of(n) for n in self.names}):
            try:
                _, nodes = await self.mesh.consul.health.service(f"lmesh-{service}", passing=True)
            except Exception:  # the agent is not answering yet
                return False
            ports = {int(node["Service"]["Port"]) for node in nodes}
            if any(self.ports[n] not in ports for n in self.names if service_of(n) == service):
                return False
        return True


# ---- the steady load --------------------------------------------------------------------------------------------


def chat_start(content: str, max_tokens: int, **fields: Any) -> gateway_pb2.ChatRequest:
    """A greedy chat the engine must answer: not from the response cache, which would answer the load's repeated
    prompts without the replicas the faults hit."""
    return gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
        model="default", max_tokens=max_tokens, messages=[gateway_pb2.Message(role="user", content=content)],
        logprobs=True, no_cache=True, **fields))


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


class SteadyLoad:
    """`streams` clients chatting in a loop, each chat through a gateway picked from Consul; a gateway that
    answered UNAVAILABLE is avoided for a moment, as the mesh's own clients do."""

    def __init__(self, mesh: Mesh, key: str, streams: int, max_tokens: int) -> None:
        self.resolver = mesh.resolver("lmesh-gateway")
        self.key = key
        self.streams = streams
        self.max_tokens = max_tokens
        self.records: list[ChatRecord] = []
        self._streaming: dict[int, ChatRecord] = {}  # the chats under way
        self._first_token = asyncio.Event()  # set when a chat's first token comes
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.streams)]

    async def stop(self) -> list[ChatRecord]:
        """Stops starting chats, waits for those in flight (each bounded by its deadline), returns every record."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.records

    async def _client(self, index: int) -> None:
        turn = 0
        while not self._stop.is_set():
            record = await self.one_chat(PROMPTS[(index + turn) % len(PROMPTS)])
            self.records.append(record)
            turn += 1
            if record.code != OK:
                await asyncio.sleep(RETRY_PAUSE_S)

    async def streaming(self, timeout: float = 10.0) -> None:
        """Waits until at least two chats are under way and every one of them has its first token. A chat still in
        its prefill when its replica dies is sent to another one by the gateway, so a fault timed by the clock
        alone, or by one chat's first token while the other replica's batch is still in its prefill, may meet no
        stream at all; goes on after `timeout` regardless."""
        deadline = time.monotonic() + timeout
        while not self._all_streaming():
            self._first_token.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                # A chat's first token is what makes the condition true; the short wait covers chats that end.
                await asyncio.wait_for(self._first_token.wait(), min(left, 0.05))

    def _all_streaming(self) -> bool:
        under_way = list(self._streaming.values())
        return len(under_way) >= min(2, self.streams) and all(r.first_token is not None for r in under_way)

    async def one_chat(self, content: str) -> ChatRecord:
        started = time.monotonic()
        record = ChatRecord(started, started, OK, content=content)
        self._streaming[id(record)] = record
        try:
            return await self._chat(record, content)
        finally:
            del self._streaming[id(record)]

    async def _chat(self, record: ChatRecord, content: str) -> ChatRecord:
        try:
            endpoint = await self.resolver.pick()
        except LmeshError as exc:  # no passing gateway at all
            record.code, record.ended, record.detail = exc.code.name, time.monotonic(), str(exc)
            return record
        call = endpoint.stub(gateway_pb2_grpc.GatewayStub).Chat(metadata=auth(self.key), timeout=CALL_TIMEOUT_S)
        try:
            await call.write(chat_start(content, self.max_tokens))
            await call.done_writing()
            while (response := await call.read()) is not grpc.aio.EOF:
                if response.logprobs and record.first_token is None:
                    record.first_token = time.monotonic()
                    self._first_token.set()
                record.tokens += len(response.logprobs)
                if response.finish_reason:
                    record.completion_tokens = response.usage.completion_tokens
                    record.prompt_tokens = response.usage.prompt_tokens
        except grpc.aio.AioRpcError as exc:
            record.code, record.detail = exc.code().name, exc.details() or ""
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.resolver.mark_down(endpoint)
        record.ended = time.monotonic()
        if record.code == OK and record.completion_tokens is None:
            record.code = "NO_FINISH"  # the stream ended without its last message
        return record


# ---- the scenarios ----------------------------------------------------------------------------------------------


@dataclass
class Fault:
    """What a scenario did: when the fault began, when the mesh was whole again, and its own measurements."""

    at: float
    restored_at: float | None = None
    measured: dict[str, float | None] = field(default_factory=dict)


ScenarioFn = Callable[[ChaosMesh, SteadyLoad], Awaitable[Fault]]


async def kill_and_restart(mesh: ChaosMesh, name: str, down_s: float) -> Fault:
    fault = Fault(time.monotonic())
    mesh.kill(name)
    await asyncio.sleep(down_s)
    fault.restored_at = await mesh.restart(name)
    await asyncio.sleep(SETTLE_S)
    return fault


async def kill_inference(mesh: ChaosMesh, load: SteadyLoad) -> Fault:
    """kill -9 of a replica while it streams: its streams fail at once (UNAVAILABLE), new chats go to the other
    one."""
    await load.streaming()
    return await kill_and_restart(mesh, "inference-a", OBSERVE_S)


async def kill_gateway(mesh: ChaosMesh, load: SteadyLoad) -> Fault:
    """kill -9 of a gateway: its clients' streams fail at once, the other gateway serves."""
    return await kill_and_restart(mesh, "gateway-a", OBSERVE_S)


def kill_dependency(name: str) -> ScenarioFn:
    async def scenario(mesh: ChaosMesh, load: SteadyLoad) -> Fault:
        return await kill_and_restart(mesh, name, DOWN_S)
    scenario.__doc__ = f"kill -9 of the {name}, restarted {DOWN_S:g} s later."
    return scenario


async def restart_consul(mesh: ChaosMesh, load: SteadyLoad) -> Fault:
    """The Consul agent restarted with its state, CONSUL_RESTARTS times: every instance passes again and stays
    passing, and no chat fails meanwhile. The agent is polled for CONSUL_WATCH_S after each restart: right after
    one, it may list the instances passing from its stored catalog before its restored checks (critical until
    they first run) reach that catalog, so only a last change to passing counts."""
    fault = Fault(time.monotonic())
    worst: float | None = 0.0
    for _ in range(CONSUL_RESTARTS):
        began = time.monotonic()
        await asyncio.to_thread(mesh.consul.stop)
        await asyncio.to_thread(mesh.consul.start)
        took = await watch_all_passing(mesh, began)
        worst = None if took is None or worst is None else max(worst, took)
    fault.measured["all_passing_s"] = worst
    fault.restored_at = time.monotonic()
    return fault


async def watch_all_passing(mesh: ChaosMesh, began: float) -> float | None:
    """Polls the agent for CONSUL_WATCH_S from `began`: seconds until every instance passed for good (the last
    change to all passing), or None if they never all did."""
    passing_since: float | None = None
    while time.monotonic() < began + CONSUL_WATCH_S:
        if not await mesh.all_passing():
            passing_since = None
        elif passing_since is None:
            passing_since = time.monotonic()
        await asyncio.sleep(0.2)  # polling the agent itself: the resolvers' caches would hide what it lists
    return None if passing_since is None else round(passing_since - began, 3)


async def restart_consul_fresh(mesh: ChaosMesh, load: SteadyLoad) -> Fault:
    """The Consul agent restarted without its state (its data directory lost): a new catalog and a new Connect CA,
    so every service registers again and renews its certificate, and the intentions are applied again, as the
    operator's configuration does (`lmesh intentions apply`). Chats must not fail meanwhile."""
    fault = Fault(time.monotonic())
    await asyncio.to_thread(mesh.consul.stop)
    await asyncio.to_thread(shutil.rmtree, mesh.consul.data_dir)
    mesh.consul.data_dir.mkdir(parents=True)
    await asyncio.to_thread(mesh.consul.start)
    await apply_intentions(mesh.consul.http_addr)
    fault.measured["all_passing_s"] = await watch_all_passing(mesh, fault.at)
    fault.restored_at = time.monotonic()
    await asyncio.sleep(SETTLE_S)
    return fault


async def freeze_inference(mesh: ChaosMesh, load: SteadyLoad) -> Fault:
    """SIGSTOP of a replica for FREEZE_S, then SIGCONT: chats are routed around it once its health check fails;
    chats it held resume."""
    pid = mesh.pid("inference-a")
    fault = Fault(time.monotonic())
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(FREEZE_S)
    finally:
        os.kill(pid, signal.SIGCONT)
    thawed = time.monotonic()
    fault.restored_at = await mesh.wait_passing("inference-a", timeout=30)
    await asyncio.sleep(SETTLE_S)
    # Chats that started while it was frozen and met it: their first token waited (or they failed).
    stuck = [r for r in load.records if fault.at <= r.started < thawed
             and (r.code != OK or (r.first_token or r.ended) - r.started > STUCK_S)]
    fault.measured["routed_around_s"] = round(max((r.started - fault.at for r in stuck), default=0.0), 3)
    # Streams open on the frozen replica waited for the thaw: proof that the freeze met some (and let them finish).
    fault.measured["held_by_freeze"] = sum(r.started < fault.at and r.ended >= thawed for r in load.records)
    return fault


async def cut_inference(mesh: ChaosMesh, load: SteadyLoad) -> Fault:
    """The link to the host of replica inference-b taken down for CUT_S (a black hole, not a refusal), then up:
    chats are routed around it once its health check fails; streams it held end UNAVAILABLE when the gateway's
    keepalive gives up on the link, never hang; once the link is back it passes in Consul again (and so takes
    chats again: the gateways' resolvers follow Consul)."""
    assert mesh.hosts is not None
    fault = Fault(time.monotonic())
    mesh.hosts.cut("host1")
    try:
        await asyncio.sleep(CUT_S)
    finally:
        mesh.hosts.restore("host1")
    linked = time.monotonic()
    fault.restored_at = await mesh.wait_passing("inference-b", timeout=60)
    fault.measured["passing_again_s"] = round(fault.restored_at - linked, 3)
    await asyncio.sleep(SETTLE_S)
    stuck = [r for r in load.records if fault.at <= r.started < linked
             and (r.code != OK or (r.first_token or r.ended) - r.started > STUCK_S)]
    fault.measured["routed_around_s"] = round(max((r.started - fault.at for r in stuck), default=0.0), 3)
    # Streams open at the cut that failed: how long after the cut they ended (the keepalive bounds it).
    cut_off = [r for r in load.records if r.started < fault.at and r.ended >= fault.at and r.code != OK]
    fault.measured["cut_streams_failed"] = len(cut_off)
    fault.measured["cut_streams_end_s"] = round(max((r.ended - fault.at for r in cut_off), default=0.0), 3)
    return fault


async def wait_positions(mesh: ChaosMesh, holding: bool, timeout: float) -> float | None:
    """Waits until some replica holds (`holding`) or none holds more than LONG_POSITIONS; returns when, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p > LONG_POSITIONS for p in mesh.held_positions().values()) == holding:
            return time.monotonic()
        await asyncio.sleep(0.05)
    return None


VANISHING_CLIENT = """
import sys, grpc
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
target, key, content, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(model="default", max_tokens=max_tokens,
    messages=[gateway_pb2.Message(role="user", content=content)]))
with grpc.insecure_channel(target) as channel:
    call = gateway_pb2_grpc.GatewayStub(channel).Chat(iter([start]), metadata=(("authorization", "Bearer " + key),))
    for response in call:
        print(len(response.delta), flush=True)
"""


async def vanished_client(mesh: ChaosMesh, load: SteadyLoad) -> Fault:
    """A client process killed mid-stream (its connection closes under the gateway): the replica must free the
    sequence's slot. Seen in the replica's reported KV memory: the long prompt alone outweighs the whole load."""
    gateway = mesh.endpoint_of("gateway-a")
    assert gateway is not None
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", VANISHING_CLIENT, gateway.target, mesh.probe_key, LONG_PROMPT, "4000",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        held = await wait_positions(mesh, True, timeout=60)
        fault = Fault(time.monotonic())
        client.kill()
        await client.wait()
        freed = await wait_positions(mesh, False, timeout=30) if held is not None else None
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    fault.measured["long_stream_held"] = 1 if held is not None else 0
    fault.measured["slot_freed_s"] = round(freed - fault.at, 3) if freed is not None else None
    await asyncio.sleep(SETTLE_S)
    return fault


async def slow_client(mesh: ChaosMesh, load: SteadyLoad) -> Fault:
    """A client that reads slowly gets its whole answer; one that stops reading has its stream ended by the
    gateway's stalled-client bound (RESOURCE_EXHAUSTED), and the replica frees the slot."""
    assert mesh.mesh is not None
    fault = Fault(time.monotonic())
    gateway = await mesh.mesh.resolver("lmesh-gateway").pick()
    stub = gateway.stub(gateway_pb2_grpc.GatewayStub)
    slow = stub.Chat(metadata=auth(mesh.probe_key), timeout=120)
    await slow.write(chat_start(PROMPTS[0], 48))
    await slow.done_writing()
    tokens, usage, code = 0, None, OK
    try:
        while (response := await slow.read()) is not grpc.aio.EOF:
            tokens += len(response.logprobs)
            if response.finish_reason:
                usage = response.usage.completion_tokens
            await asyncio.sleep(0.3)  # a client that reads one message every 0.3 s
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    fault.measured["slow_reader_completed"] = 1 if code == OK and usage == tokens else 0
    # Many alternatives per token, and a small flow-control window that never grows (no BDP probing): the answer
    # soon outgrows what HTTP/2 lets the gateway send to a client that reads nothing, and its writes block.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]
    async with public_gateway(gateway.target, options=options) as stub:
        stalled = stub.Chat(metadata=auth(mesh.probe_key), timeout=120)
        await stalled.write(chat_start(LONG_PROMPT, 4000, top_logprobs=20))
        await stalled.done_writing()
        await stalled.read()
        stalled_at = time.monotonic()
        held = await wait_positions(mesh, True, timeout=60)
        freed = await wait_positions(mesh, False, timeout=STALLED_CLIENT_S + 60) if held is not None else None
        fault.measured["stalled_freed_s"] = round(freed - stalled_at, 3) if freed is not None else None
        try:
            while await stalled.read() is not grpc.aio.EOF:
                pass
            fault.measured["stalled_cut"] = 0
        except grpc.aio.AioRpcError as exc:
            fault.measured["stalled_cut"] = 1 if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else 0
    await asyncio.sleep(1.0)
    return fault


@dataclass(frozen=True)
class Scenario:
    name: str
    run: ScenarioFn
    targets: tuple[Target, ...]
    needs: tuple[str, ...] = ()  # processes it needs besides one replica and one gateway
    netns: bool = False  # inference-b runs behind a link it cuts (network namespaces: root only)


SCENARIOS = (
    Scenario("kill-inference", kill_inference, (Target("in_flight_failed", ">=", 1),
                                                Target("in_flight_fail_s", "<=", 2.0),
                                                Target("failed_not_unavailable", "==", 0),
                                                Target("recover_s", "<=", 2.0)), ("inference-b",)),
    Scenario("kill-gateway", kill_gateway, (Target("in_flight_failed", ">=", 1), Target("in_flight_fail_s", "<=", 2.0),
                                            Target("failed_not_unavailable", "==", 0),
                                            Target("recover_s", "<=", 2.0)), ("gateway-b",)),
    Scenario("kill-tokenizer", kill_dependency("tokenizer"), (Target("failed_not_unavailable", "==", 0),
                                                              Target("slowest_failure_s", "<=", 2.0),
                                                              Target("after_restore_s", "<=", 2.0))),
    Scenario("kill-policy", kill_dependency("policy"), (Target("failed_not_unavailable", "==", 0),
                                                        Target("slowest_failure_s", "<=", 2.0),
                                                        Target("after_restore_s", "<=", 2.0))),
    Scenario("kill-registry", kill_dependency("registry"), (Target("failed", "==", 0),)),
    Scenario("restart-consul", restart_consul, (Target("failed", "==", 0), Target("all_passing_s", "<=", 10.0))),
    Scenario("restart-consul-fresh", restart_consul_fresh, (Target("failed", "==", 0),
                                                            Target("all_passing_s", "<=", 10.0))),
    # The health check: every second, a timeout of 1 s; then a moment for the gateways' watch to see it.
    Scenario("freeze-inference", freeze_inference, (Target("held_by_freeze", ">=", 1),
                                                    Target("routed_around_s", "<=", 3.0),
                                                    Target("failed", "==", 0)), ("inference-b",)),
    # Routed around like a frozen replica; the chats it held end when a keepalive goes unanswered.
    Scenario("cut-inference", cut_inference, (Target("routed_around_s", "<=", 3.0),
                                              Target("failed_not_unavailable", "==", 0),
                                              Target("cut_streams_end_s", "<=", KEEPALIVE_BOUND_S + 2.0),
                                              Target("passing_again_s", "<=", 10.0)),
             ("inference-b",), netns=True),
    Scenario("vanished-client", vanished_client, (Target("long_stream_held", "==", 1),
                                                  Target("slot_freed_s", "<=", 3.0),
                                                  Target("failed", "==", 0))),
    Scenario("slow-client", slow_client, (Target("slow_reader_completed", "==", 1), Target("stalled_cut", "==", 1),
                                          Target("stalled_freed_s", "<=", STALLED_CLIENT_S + 5.0),
                                          Target("failed", "==", 0))),
)


def select(names: str) -> list[Scenario]:
    """The scenarios named (comma-separated, in the order given); every one for an empty string."""
    if not names.strip():
        return list(SCENARIOS)
    by_name = {s.name: s for s in SCENARIOS}
    unknown = [n for n in names.split(",") if n.strip() not in by_name]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n.strip()] for n in names.split(",")]


async def tenant_spent(mesh: ChaosMesh, settled_within: float) -> int:
    """The load tenant's tokens charged so far, once no reservation of it is open (expired ones are charged in
    full: wait up to `settled_within` for that)."""
    assert mesh.mesh is not None
    deadline = time.monotonic() + settled_within
    while True:
        rows = (await get_usage(mesh.mesh.peer(POLICY), LOAD_TENANT, timeout_s=10)).usage
        row = next(r for r in rows if not r.key_id)
        total = next(p for p in row.periods if p.period == policy_pb2.BUDGET_PERIOD_NONE)
        if total.reserved_tokens == 0 or time.monotonic() > deadline:
            return total.spent_tokens
        await asyncio.sleep(0.25)  # reservations settle or expire on their own: bounded by the deadline


async def run_scenario(mesh: ChaosMesh, scenario: Scenario, streams: int, max_tokens: int) -> ScenarioResult:
    assert mesh.mesh is not None
    spent_before = await tenant_spent(mesh, RESERVATION_LEASE_S + 5)
    load = SteadyLoad(mesh.mesh, mesh.key, streams, max_tokens)
    load.start()
    fault: Fault | None = None
    error = ""
    try:
        await asyncio.sleep(WARM_S)
        fault = await scenario.run(mesh, load)
    except Exception as exc:  # the row says what broke; later scenarios still run on a mesh made whole again
        error = f"{type(exc).__name__}: {exc}"
    records = await load.stop()
    if fault is None:
        result = judge(scenario.name, records, {}, ())
        result.error = error
        return result
    charged = await tenant_spent(mesh, RESERVATION_LEASE_S + 5) - spent_before
    measured = {**summarize(records, fault.at, fault.restored_at), **fault.measured,
                **budget_drift(records, charged, max_tokens)}
    result = judge(scenario.name, records, measured, (*COMMON_TARGETS, *BUDGET_TARGETS, *scenario.targets))
    result.error = error
    return result


async def heal(mesh: ChaosMesh) -> None:
    """Brings back any process a failed scenario left dead or frozen."""
    assert mesh.supervisor is not None
    for name in mesh.names:
        process = mesh.supervisor.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        if process.exited():
            mesh.start_process(name)
    if not consul_answers(mesh.consul.http_addr):
        await asyncio.to_thread(mesh.consul.start)
    for name in mesh.names:
        await mesh.wait_passing(name)


@contextlib.asynccontextmanager
async def chaos_mesh(model_dir: Path, replicas: int = 2, gateways: int = 2,
                     behind_link: Sequence[str] = ()) -> AsyncIterator[ChaosMesh]:
    work = Path(tempfile.mkdtemp(prefix="lmesh-chaos-"))
    mesh = ChaosMesh(model_dir, work, replicas, gateways, behind_link)
    try:
        await mesh.start()
        yield mesh
    finally:
        await mesh.close()
        shutil.rmtree(work, ignore_errors=True)


async def run(model_dir: Path, scenarios: Sequence[Scenario], streams: int, max_tokens: int,
              progress: Callable[[str], None] = lambda _: None) -> list[ScenarioResult]:
    needed = {name for s in scenarios for name in s.needs}
    behind_link = ("inference-b",) if any(s.netns for s in scenarios) else ()
    results = []
    async with chaos_mesh(model_dir, gateways=2 if "gateway-b" in needed else 1, behind_link=behind_link) as mesh:
        progress(f"mesh up: {', '.join(mesh.names)}")
        for scenario in scenarios:
            result = await run_scenario(mesh, scenario, streams, max_tokens)
            progress(render([result]).splitlines()[-1])
            results.append(result)
            if result.error:
                await heal(mesh)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=lmesh_cache() / "models" / "smollm2-135m-instruct")
    parser.add_argument("--scenarios", default="", help=f"comma-separated, of: {', '.join(s.name for s in SCENARIOS)}"
                                                         " (default: all)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent load streams (default 8)")
    parser.add_argument("--max-tokens", type=int, default=24, help="max_tokens of each load chat (default 24)")
    parser.add_argument("--json", action="store_true", help=f"also write the results to {RESULTS}")
    args = parser.parse_args(argv)
    try:
        scenarios = select(args.scenarios)
    except ValueError as exc:
        parser.error(str(exc))
    skipped = []
    if any(s.netns for s in scenarios) and (reason := unavailable_reason()) is not None:
        skipped = [f"{s.name} ({reason})" for s in scenarios if s.netns]
        scenarios = [s for s in scenarios if not s.netns]
    began = time.monotonic()
    results = asyncio.run(run(args.model_dir, scenarios, args.streams, args.max_tokens,
                              lambda line: print(line, file=sys.stderr, flush=True)))
    print(f"Chaos: {args.streams} load streams (max_tokens {args.max_tokens}, logprobs on), 2 inference replicas, "
          f"{os.cpu_count()} CPUs, {time.monotonic() - began:.0f} s")
    print(render(results))
    for row in results:
        for code, detail in row.examples.items():
            print(f"  {row.name}: first {code}: {detail}")
    if skipped:
        print(f"skipped: {'; '.join(skipped)}")
    if args.json:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({
            "bench": "chaos", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": {"streams": args.streams, "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
                       "stalled_client_s": STALLED_CLIENT_S, "freeze_s": FREEZE_S, "down_s": DOWN_S, "cut_s": CUT_S},
            "scenarios": [r.as_json() for r in results], "skipped": skipped,
        }, indent=2) + "\n")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
