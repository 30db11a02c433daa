"""A mesh across three hosts (Linux network namespaces on one bridge, bench/netns.py), each with its own Consul agent.

host1 runs the Consul server and registry, policy, tokenizer and gateway; host2 and host3 a Consul client and one
inference replica each. Everything talks mTLS with Connect certificates its own host's agent issued, and intentions
decide every hop, as in production. The test process (root namespace) is an operator and a client reaching host1
over the bridge.

What it shows: chats are answered by replicas on other hosts; when a replica's host drops off the network (its link
cut: a black hole, not a refusal) chats route around it within a bounded time; when the link comes back the
replica passes in Consul again and serves again. Each phase's time is printed (pytest -s), see docs/multihost.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import pytest_asyncio
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from bench.netns import Hosts, ip, unavailable_reason
from services.common.connect import apply_intentions
from services.common.consul_agent import find_consul, probe_consul
from services.common.discovery import Mesh
from services.common.peers import POLICY, REGISTRY, open_mesh
from services.common.supervisor import ProcessExited, Supervisor
from services.policy.client import create_key
from services.registry.client import register_model_dir
from tests.harness import ROOT
from tests.test_metrics import scrape, value
from tests.tiny_model import TINY_NAME

CONSUL_HTTP_PORT = 8500
SERVICES_ON = {"host1": ("registry", "policy", "tokenizer", "gateway"), "host2": ("inference",),
               "host3": ("inference",)}
REPLICA_HOSTS = ("host2", "host3")
MODEL = f"{TINY_NAME}:1"
# Every chat sent this long after a replica's host is cut must succeed. What routes around it: Consul's gossip
# marking the node failed (about 2 s here), and for a chat the gateway already sent there, the gateway's channel
# keepalive (a 5 s ping timeout), after which it sends the unstarted chat to another replica; the rest is slack
# for a shared, loaded machine.
ROUTE_AROUND_BOUND_S = 30.0
# A restored host's replica passes in Consul again within this: gossip still addressed to the failed node, or its
# own agent's reconnect attempts (every 30 s), find it again; the rest is slack.
COME_BACK_BOUND_S = 45.0
CHAT_EVERY_S = 1.0
# Further cuts after the first, the hosts in turn: 0 in `make test`, more in `make chaos` (LMESH_MULTIHOST_CUTS).
LONG_CUTS = int(os.environ.get("LMESH_MULTIHOST_CUTS", "0"))
CHAT_TIMEOUT_S = 20.0
# Chats in a row, each sent after the last one that failed, that must succeed before a phase ends.
STREAK = 6
REQUEST_DURATION_COUNT = "gen_ai_server_request_duration_seconds_count"
T = TypeVar("T")


def consul_addr(hosts: Hosts, host: str) -> str:
    return f"{hosts[host].address}:{CONSUL_HTTP_PORT}"


@dataclass
class MultiHostMesh:
    hosts: Hosts
    supervisor: Supervisor
    mesh: Mesh
    api_key: str

    async def gateway(self) -> gateway_pb2_grpc.GatewayStub:
        endpoint = await self.mesh.resolver("lmesh-gateway").pick()
        return endpoint.stub(gateway_pb2_grpc.GatewayStub)

    async def passing_replica_hosts(self) -> set[str]:
        """The hosts whose inference replica Consul (asked on host1) reports passing now."""
        _, nodes = await self.mesh.consul.health.service("lmesh-inference", passing=True)
        by_address = {self.hosts[name].address: name for name in REPLICA_HOSTS}
        return {by_address.get(node["Service"]["Address"], "?") for node in nodes}

    async def served(self) -> dict[str, float]:
        """Generations each reachable replica has run so far (its Prometheus endpoint, over the bridge)."""
        _, nodes = await self.mesh.consul.health.service("lmesh-inference")
        counts: dict[str, float] = {}
        for node in nodes:
            address, meta = node["Service"]["Address"], node["Service"]["Meta"]
            name = next(n for n in REPLICA_HOSTS if self.hosts[n].address == address)
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                families = await asyncio.wait_for(scrape(int(meta["metrics_port"]), address), 3)
                counts[name] = value(families, REQUEST_DURATION_COUNT)
        return counts


def skip_reason() -> str | None:
    reason = unavailable_reason()
    if reason is not None:
        return reason
    try:
        find_consul()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def connects(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        socket.create_connection((host, port), timeout).close()
    except OSError:
        return False
    return True


def test_a_cut_host_is_a_black_hole_until_restored_and_nothing_outlives_the_hosts() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"no network namespaces here: {reason}")
    with Hosts(2) as hosts:
        names = {host.netns for host in hosts.hosts.values()} | {host.port for host in hosts.hosts.values()}
        assert all(str(os.getpid()) in name for name in names | {hosts.bridge})
        listener = hosts.run_in("host2", [sys.executable, "-c", LISTENER, hosts["host2"].address],
                                stdout=subprocess.PIPE)
        try:
            assert listener.stdout is not None
            port = int(listener.stdout.readline())
            assert connects(hosts["host2"].address, port)  # from the root namespace, over the bridge
            from_host1 = [sys.executable, "-c", CONNECT, hosts["host2"].address, str(port)]
            assert subprocess.run(hosts.argv_in("host1", from_host1), timeout=20).returncode == 0
            hosts.cut("host2")
            started = time.monotonic()
            assert not connects(hosts["host2"].address, port)
            assert time.monotonic() - started >= 0.9  # dropped, not refused: the caller learns it by timing out
            failed = subprocess.run(hosts.argv_in("host1", from_host1), timeout=20, stderr=subprocess.DEVNULL)
            assert failed.returncode != 0
            hosts.restore("host2")
            assert subprocess.run(hosts.argv_in("host1", from_host1), timeout=20).returncode == 0
        finally:
            listener.kill()
            listener.wait()
    left = ip("netns", "list").stdout + ip("-o", "link", "show").stdout
    assert not [name for name in names | {hosts.bridge} if name in left], left


LISTENER = """
import socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
while True:
    server.accept()[0].close()
"""
CONNECT = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close()
"""


@contextlib.asynccontextmanager
async def consul_agents(hosts: Hosts, logs: Path) -> AsyncIterator[dict[str, Path]]:
    """A Consul server (dev mode: in memory, Connect on) on host1 and a client on each other host, joined by LAN
    gossip; each binds its host's address and serves HTTP on it. Yields each agent's log, by host."""
    server = hosts["host1"].address
    processes: list[subprocess.Popen[bytes]] = []
    paths: dict[str, Path] = {}
    try:
        for name, host in hosts.hosts.items():
            argv = [find_consul(), "agent", "-bind", host.address, "-client", host.address,
                    "-node", f"{host.netns}-{name}", "-log-level", "info"]
            if name == "host1":
                argv += ["-dev"]
            else:
                argv += ["-data-dir", str(logs / f"consul-{name}-data"), "-retry-join", server, "-retry-interval", "1s",
                         "-hcl", "connect { enabled = true }"]
            paths[name] = logs / f"consul-{name}.log"
            with paths[name].open("ab") as out:
                processes.append(hosts.run_in(name, argv, os.environ, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        for name in hosts.hosts:
            while await asyncio.to_thread(probe_consul, consul_addr(hosts, name)) != "leader":
                for process, path in zip(processes, paths.values(), strict=True):
                    if process.poll() is not None:
                        raise RuntimeError(f"a Consul agent exited with {process.returncode}:\n"
                                           f"{path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Consul agent on {name} has no leader after 60 s:\n"
                                       f"{paths[name].read_text()[-3000:]}")
                await asyncio.sleep(0.2)  # start-up readiness probe of child processes, bounded by the deadline
        yield paths
    finally:
        await asyncio.to_thread(stop_processes, processes)


def stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def service_env(hosts: Hosts, host: str, home: Path, admin_token: str) -> dict[str, str]:
    env = {name: text for name, text in os.environ.items() if not name.startswith("OTEL_")}
    return {**env, "CONSUL_HTTP_ADDR": consul_addr(hosts, host), "LMESH_HOME": str(home / host),
            "LMESH_ADMIN_TOKEN": admin_token, "PYTHONUNBUFFERED": "1", "LMESH_RESPONSE_CACHE": "off",
            "LMESH_MTLS": "on"}


async def wait_passing(supervisor: Supervisor, mesh: Mesh, service: str, name: str, model: str = "",
                       timeout: float = 180.0) -> None:
    waiter = mesh.resolver(f"lmesh-{service}").wait_for(lambda e: not model or model in e.models, timeout=timeout)
    try:
        await supervisor.while_running(waiter, [name])
    except ProcessExited as exc:
        raise RuntimeError(f"{exc}:\n{supervisor.log(name)[-4000:]}") from None


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def multihost(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MultiHostMesh]:
    reason = skip_reason()
    if reason is not None:
        pytest.skip(f"no multi-host mesh here: {reason}")
    home = tmp_path_factory.mktemp("multihost")
    # Every service listens on its host's address, beyond localhost, so registry and policy require the admin token.
    admin_token = secrets.token_urlsafe(32)
    async with contextlib.AsyncExitStack() as stack:
        hosts = stack.enter_context(Hosts(3))  # removed last, after every process in it stopped
        await stack.enter_async_context(consul_agents(hosts, home))
        host1_consul = consul_addr(hosts, "host1")
        await apply_intentions(host1_consul)
        supervisor = Supervisor(home / "logs", data_root=home, env=os.environ, cwd=ROOT, grace_s=15,
                                own_sessions=False)
        stack.push_async_callback(asyncio.to_thread, supervisor.stop_all)
        mesh = await open_mesh(host1_consul, mtls=True, admin_token=admin_token)
        stack.push_async_callback(mesh.close)
        for host, services in SERVICES_ON.items():
            for service in services:
                argv = [sys.executable, "-m", "services.cli", "serve", service, "--grace", "5",
                        "--host", hosts[host].address, "--data-dir", str(home / host / service)]
                supervisor.spawn(f"{service}-{host}", hosts.argv_in(host, argv), label=f"lmesh-{service} ({host})",
                                 env=service_env(hosts, host, home, admin_token))
        await wait_passing(supervisor, mesh, "registry", "registry-host1")
        # What crosses hosts is the mesh, not what the model says: the tiny model keeps the replicas' work small.
        await register_model_dir(mesh.peer(REGISTRY), tiny_model, aliases=("default",))
        await wait_passing(supervisor, mesh, "policy", "policy-host1")
        created = await create_key(mesh.peer(POLICY), "multihost")
        for host, services in SERVICES_ON.items():
            for service in services:
                await wait_passing(supervisor, mesh, service, f"{service}-{host}",
                                   model=MODEL if service == "inference" else "")
        live = MultiHostMesh(hosts, supervisor, mesh, created.api_key)
        await wait_until(live.passing_replica_hosts, lambda got: got == set(REPLICA_HOSTS), 120,
                         "both inference replicas passing")
        yield live


async def wait_until(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float, what: str) -> float:
    """Polls `probe()` until `done(result)`; returns the seconds it took (AssertionError after `timeout`)."""
    started = time.monotonic()
    last: T | None = None
    while time.monotonic() - started < timeout:
        last = await probe()
        if done(last):
            return time.monotonic() - started
        await asyncio.sleep(0.25)  # polling Consul's view, bounded by `timeout`
    raise AssertionError(f"no {what} within {timeout:g} s (last seen: {last!r})")


def chat_start() -> gateway_pb2.ChatRequest:
    return gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
        model="default", max_tokens=4, messages=[gateway_pb2.Message(role="user", content="Say hello.")]))


async def chat(live: MultiHostMesh) -> str:
    """One short chat through host1's gateway: "" when it was answered, else what went wrong."""
    stub = await live.gateway()
    call = stub.Chat(metadata=(("authorization", f"Bearer {live.api_key}"),), timeout=CHAT_TIMEOUT_S)
    try:
        await call.write(chat_start())
        await call.done_writing()
        responses = [r async for r in call]
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    if not responses or not responses[-1].finish_reason or not "".join(r.delta for r in responses):
        return f"no answer: {responses!r}"
    return ""


@dataclass(frozen=True)
class Outcome:
    sent_s: float  # after the cut
    took_s: float
    error: str  # "" when answered

    def __str__(self) -> str:
        return f"{self.sent_s:.1f}+{self.took_s:.1f}s{' ' + self.error[:80] if self.error else ''}"


@dataclass
class RouteAround:
    """Chats sent one every CHAT_EVERY_S after a cut: `settled_s` is when the first of the final run of successes
    was sent (every chat sent from then on succeeded)."""

    settled_s: float
    outcomes: list[Outcome]

    @property
    def succeeded_after(self) -> int:
        return sum(1 for o in self.outcomes if o.sent_s >= self.settled_s and not o.error)

    def __str__(self) -> str:
        return f"settled {self.settled_s:.1f} s after the cut; chats (sent+took): {', '.join(map(str, self.outcomes))}"


async def timed_chat(live: MultiHostMesh, sent_s: float) -> Outcome:
    started = time.monotonic()
    error = await chat(live)
    return Outcome(sent_s, time.monotonic() - started, error)


async def chats_until_settled(live: MultiHostMesh, cut_at: float) -> RouteAround:
    """Sends a chat every CHAT_EVERY_S until the STREAK last ones sent all succeeded, the earlier ones still
    running being counted as not (yet) successes; fails when that takes longer than ROUTE_AROUND_BOUND_S."""
    sent: list[tuple[float, asyncio.Task[Outcome]]] = []

    def outcomes() -> list[Outcome]:
        return [task.result() if task.done() else Outcome(at, time.monotonic() - cut_at - at, "still running")
                for at, task in sent]

    try:
        while True:
            at = time.monotonic() - cut_at
            sent.append((at, asyncio.create_task(timed_chat(live, at))))
            await asyncio.sleep(CHAT_EVERY_S)
            not_ok = [i for i, (_, task) in enumerate(sent) if not task.done() or task.result().error]
            first_of_run = not_ok[-1] + 1 if not_ok else 0
            if len(sent) - first_of_run >= STREAK:
                return RouteAround(sent[first_of_run][0], outcomes())
            if sent[-1][0] > ROUTE_AROUND_BOUND_S + STREAK * CHAT_EVERY_S + CHAT_TIMEOUT_S:
                raise AssertionError(f"chats did not settle within {ROUTE_AROUND_BOUND_S:g} s of the cut: "
                                     f"{', '.join(map(str, outcomes()))}")
    finally:
        for _, task in sent:
            task.cancel()
        await asyncio.gather(*(task for _, task in sent), return_exceptions=True)


@dataclass
class Cut:
    """What a cut showed: how chats routed around it, and when Consul (asked on host1) stopped listing the cut
    host's replica as passing."""

    route: RouteAround
    failed_in_consul_s: float
    cut_at: float  # time.monotonic()


async def cut_and_route_around(live: MultiHostMesh, host: str, survivor: str) -> Cut:
    """Cuts `host`'s link and chats until every chat succeeds again; each successful chat from then on must have
    been served by `survivor`. The link stays cut (the caller restores it)."""
    before = await live.served()
    cut_at = time.monotonic()
    live.hosts.cut(host)
    failed = asyncio.create_task(wait_until(live.passing_replica_hosts, lambda got: host not in got,
                                            COME_BACK_BOUND_S, f"Consul marking {host}'s replica failed"))
    try:
        route = await chats_until_settled(live, cut_at)
        assert route.settled_s <= ROUTE_AROUND_BOUND_S, route
        after = await live.served()
        assert host not in after, after  # its metrics are unreachable too, as meant
        served_by_survivor = after[survivor] - before[survivor]
        assert served_by_survivor >= route.succeeded_after >= STREAK, (before, after, str(route))
        return Cut(route, await failed, cut_at)
    finally:
        failed.cancel()
        await asyncio.gather(failed, return_exceptions=True)


def has_host(host: str) -> Callable[[set[str]], bool]:
    return lambda hosts: host in hosts


async def test_chats_cross_hosts_route_around_a_cut_host_and_come_back(multihost: MultiHostMesh) -> None:
    live = multihost
    # (1) Answers come from the replicas on host2 and host3, over the bridge: both serve.
    before = now = await live.served()
    assert set(before) == set(REPLICA_HOSTS), before
    answered = 0
    while answered < 8 and not all(now[h] > before[h] for h in REPLICA_HOSTS):
        assert await chat(live) == ""
        answered += 1
        now = await live.served()
    assert sum(now.values()) - sum(before.values()) == answered, (before, now)
    assert all(now[h] > before[h] for h in REPLICA_HOSTS), f"one replica served all {answered} chats: {before} {now}"

    # (2) host2 drops off the network: chats settle on host3 within the bound.
    try:
        cut = await cut_and_route_around(live, "host2", survivor="host3")
    finally:
        restored_at = time.monotonic()
        live.hosts.restore("host2")
    print(f"\nhost2 cut: chats {cut.route}; Consul stopped listing its replica as passing "
          f"{cut.failed_in_consul_s:.1f} s after the cut")

    # (3) host2 comes back: its replica passes again. The long version (`make chaos`) then cuts the hosts in
    # turn, each time with the other one as the survivor, which shows the restored one serving again.
    back = await wait_until(live.passing_replica_hosts, lambda got: "host2" in got, COME_BACK_BOUND_S,
                            "host2's replica passing again")
    print(f"host2 restored after {restored_at - cut.cut_at:.1f} s: its replica passes in Consul again {back:.1f} s "
          "after the link came back")
    for turn in range(1, LONG_CUTS + 1):
        host, survivor = ("host3", "host2") if turn % 2 else ("host2", "host3")
        try:
            cut = await cut_and_route_around(live, host, survivor=survivor)
        finally:
            restored_at = time.monotonic()
            live.hosts.restore(host)
        print(f"{host} cut: chats {cut.route}; Consul stopped listing its replica as passing "
              f"{cut.failed_in_consul_s:.1f} s after the cut")
        back = await wait_until(live.passing_replica_hosts, has_host(host), COME_BACK_BOUND_S,
                                f"{host}'s replica passing again")
        print(f"{host} restored after {restored_at - cut.cut_at:.1f} s: its replica passes in Consul again "
              f"{back:.1f} s after the link came back")
