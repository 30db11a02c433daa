"""Accounting and limits end to end: a real Consul agent, the five services as processes, the real model, and a
real Redis for the replicated ledger.

The mesh's policy runs with a short lease (LEASE_S) and rate window (WINDOW_S), so expiry and windows show within
seconds; everything else is as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from lmesh.policy.v1 import policy_pb2

from services.common.connect import apply_intentions
from services.common.consul_agent import ConsulAgent
from services.common.discovery import Mesh
from services.common.peers import POLICY, REGISTRY, open_mesh
from services.policy.client import create_key, get_usage, set_tenant_limits, update_key
from services.registry.client import register_model_dir
from tests.cli_runner import run_cli
from tests.harness import MeshProcesses
from tests.otlp import OtlpReceiver
from tests.redis_server import RedisServer

SERVICES = ("registry", "policy", "tokenizer", "inference", "gateway")
LEASE_S = 3.0
WINDOW_S = 3.0
POLICY_FLAGS = ("--reservation-lease", str(LEASE_S), "--rate-window", str(WINDOW_S))
QUESTION = "Name a color."
LONG_TASK = "Write a very long story about a dragon who learns to cook. Make it at least 500 words."


@dataclass
class AccountingMesh:
    procs: MeshProcesses
    mesh: Mesh
    home: Path
    otlp: OtlpReceiver

    main_gateway: str = ""  # the service id of the mesh's own gateway (a test may start and kill others)

    async def gateway(self) -> gateway_pb2_grpc.GatewayStub:
        endpoint = await self.mesh.resolver("lmesh-gateway").pick(lambda e: e.service_id == self.main_gateway)
        return endpoint.stub(gateway_pb2_grpc.GatewayStub)

    @property
    def policy(self) -> Any:
        return self.mesh.peer(POLICY)

    def start_policy(self, name: str = "policy", env: dict[str, str] | None = None) -> None:
        self.procs.supervisor.start("policy", "--grace", "5", *POLICY_FLAGS, name=name,
                                    data_dir=self.home / "policy", env={**self.procs.env(), **(env or {})})

    async def key(self, tenant: str, **limits: int) -> tuple[str, str]:
        created = await create_key(self.policy, tenant, limits=policy_pb2.Limits(**limits))
        return created.key.key_id, created.api_key

    async def usage(self, tenant: str, key_id: str = "") -> policy_pb2.SubjectUsage:
        rows = (await get_usage(self.policy, tenant)).usage
        return next(r for r in rows if r.key_id == key_id)

    async def day(self, tenant: str, key_id: str = "") -> policy_pb2.PeriodUsage:
        row = await self.usage(tenant, key_id)
        return next(p for p in row.periods if p.period == policy_pb2.BUDGET_PERIOD_DAY)

    async def settled(self, tenant: str, timeout: float = 30, spent: int | None = None) -> policy_pb2.PeriodUsage:
        """The tenant's day once nothing is reserved any more (every settle and expiry done) and, with `spent`,
        once its charge is that: late settles (a gateway that retried while policy restarted) correct the full
        charge of an expired reservation a moment after it expired."""
        deadline = time.monotonic() + timeout
        day = None
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                day = await self.day(tenant)
                if day.reserved_tokens == 0 and spent in (None, day.spent_tokens):
                    return day
            assert time.monotonic() < deadline, f"{tenant} after {timeout} s: {day}"
            await asyncio.sleep(0.2)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def books(consul_agent: ConsulAgent, built_model: Path, tmp_path_factory: pytest.TempPathFactory,
                ) -> AsyncIterator[AccountingMesh]:
    otlp = OtlpReceiver()
    endpoint = await otlp.start()
    home = tmp_path_factory.mktemp("accounting-mesh")
    procs = MeshProcesses(consul_agent.http_addr, home, endpoint)
    await apply_intentions(consul_agent.http_addr)
    mesh = await open_mesh(consul_agent.http_addr, "lmesh-gateway", mtls=True)
    books = AccountingMesh(procs, mesh, home, otlp)
    try:
        for service in SERVICES:
            if service == "policy":
                books.start_policy()
            else:
                procs.start(service)
        await procs.wait_passing(mesh, "registry")
        await register_model_dir(mesh.peer(REGISTRY), built_model, aliases=("default",))
        for service in SERVICES:
            await procs.wait_passing(mesh, service, model="smollm2-135m-instruct:1" if service == "inference" else "")
        books.main_gateway = mesh.resolver("lmesh-gateway").endpoints()[0].service_id
        yield books
    finally:
        await mesh.close()
        await procs.stop_all()
        await otlp.stop()


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def start(question: str = QUESTION, max_tokens: int = 4) -> gateway_pb2.ChatRequest:
    return gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
        max_tokens=max_tokens, messages=[gateway_pb2.Message(role="user", content=question)]))


@dataclass
class Outcome:
    code: grpc.StatusCode
    usage: Any = None  # the final message's usage when the chat ended normally
    quota_id: str = ""
    retry_after_ms: int | None = None
    details: str = ""


def quota_of(error: grpc.aio.AioRpcError) -> str:
    from tests.test_e2e import typed_details

    details = typed_details(error)
    failure = details.get("QuotaFailure")
    return failure.violations[0].quota_id if failure else ""


async def chat(stub: gateway_pb2_grpc.GatewayStub, key: str, request: gateway_pb2.ChatRequest | None = None,
               timeout: float = 120, retry_unavailable_s: float = 0) -> Outcome:
    """One chat's outcome; with `retry_unavailable_s`, retried on UNAVAILABLE for that long, as a client does while
    a dependency restarts."""
    give_up = time.monotonic() + retry_unavailable_s
    while True:
        outcome = await _chat_once(stub, key, request, timeout)
        if outcome.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
            return outcome
        await asyncio.sleep(0.25)


async def _chat_once(stub: gateway_pb2_grpc.GatewayStub, key: str, request: gateway_pb2.ChatRequest | None,
                     timeout: float) -> Outcome:
    call = stub.Chat(metadata=auth(key), timeout=timeout)
    try:
        await call.write(request or start())
        await call.done_writing()
        last = None
        async for response in call:
            last = response
        assert last is not None and last.finish_reason
        return Outcome(grpc.StatusCode.OK, last.usage)
    except grpc.aio.AioRpcError as error:
        assert "Traceback" not in (error.details() or "")
        retry = dict(error.trailing_metadata() or ()).get("retry-after-ms")
        quota = quota_of(error) if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else ""
        return Outcome(error.code(), None, quota, int(retry) if retry else None, error.details() or "")


async def prompt_tokens(books: AccountingMesh) -> int:
    """The rendered prompt of QUESTION (what each crowd chat reserves, plus max_tokens)."""
    _, key = await books.key("measure")
    outcome = await chat(await books.gateway(), key, start(max_tokens=1))
    assert outcome.code == grpc.StatusCode.OK, outcome
    return int(outcome.usage.prompt_tokens)


# `make soak` raises it.
CHATS = int(os.environ.get("LMESH_ACCOUNTING_CHATS", "500"))


async def crowd(books: AccountingMesh, tenant: str, n: int = CHATS, max_tokens: int = 4,
                during: Any = None, retry_unavailable_s: float = 0) -> tuple[list[Outcome], int]:
    """`n` concurrent chats of a fresh key of `tenant`, whose daily budget is sized for about 100 of them;
    returns the outcomes and the budget. `during(budget)` runs meanwhile (a restart)."""
    per_chat = await prompt_tokens(books) + max_tokens
    budget = 100 * per_chat
    await set_tenant_limits(books.policy, tenant, policy_pb2.LimitsUpdate(
        budget_tokens=budget, budget_period=policy_pb2.BUDGET_PERIOD_DAY))
    _, key = await books.key(tenant)
    stubs = [await books.gateway() for _ in range(4)]
    chats = [asyncio.ensure_future(chat(stubs[i % len(stubs)], key, start(max_tokens=max_tokens),
                                        retry_unavailable_s=retry_unavailable_s))
             for i in range(n)]
    if during is not None:
        await during(budget)
    outcomes = await asyncio.gather(*chats)
    return list(outcomes), budget


# On this 2-core machine a burst of 500 chats beside two policy replicas can hold a service past Consul's 1 s health
# check timeout for a moment: chats then fail UNAVAILABLE before they reserve anything (never charged).
OVERLOADED = frozenset({grpc.StatusCode.UNAVAILABLE})


def check_the_books(outcomes: list[Outcome], budget: int, spent: int, *, allow: frozenset[grpc.StatusCode] =
                    frozenset()) -> Counter[str]:
    kinds = Counter(f"{o.code.name}:{o.quota_id}" if o.quota_id else o.code.name for o in outcomes)
    unexpected = [o for o in outcomes
                  if o.code not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, *allow)]
    assert kinds["OK"] >= 50, kinds  # most of the budget was used by chats that ran
    assert not unexpected, (kinds, unexpected[:3])
    used = sum(o.usage.total_tokens for o in outcomes if o.code == grpc.StatusCode.OK)
    assert kinds["RESOURCE_EXHAUSTED:policy.budget_tokens"] > 0, kinds
    assert 0 < used <= budget, (used, budget, kinds)
    assert spent == used, (spent, used, kinds)  # exact to the token: nothing lost, nothing counted twice
    return kinds


async def test_500_concurrent_chats_never_overspend_a_tenant_budget(books: AccountingMesh) -> None:
    outcomes, budget = await crowd(books, "crowd")
    day = await books.settled("crowd")
    kinds = check_the_books(outcomes, budget, day.spent_tokens)
    print(f"{len(outcomes)} chats, one policy (SQLite): {dict(kinds)}; spent {day.spent_tokens} of {budget}")


async def test_500_concurrent_chats_after_policy_is_killed_and_restarted_mid_run(books: AccountingMesh) -> None:
    async def restart(budget: int) -> None:
        # Mid-run: once about a third of the budget is reserved or spent.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                day = await books.day("crowd-restart")
                if day.spent_tokens + day.reserved_tokens >= budget // 3:
                    break
            await asyncio.sleep(0.05)
        books.procs.kill("policy")  # SIGKILL: no drain; what it committed stays in its SQLite file
        await books.procs.wait_exit("policy")
        books.start_policy()
        await books.procs.wait_passing(books.mesh, "policy")

    # The clients retry UNAVAILABLE while policy is down, so the run goes on after the restart.
    outcomes, budget = await crowd(books, "crowd-restart", during=restart, retry_unavailable_s=30)
    used = sum(o.usage.total_tokens for o in outcomes if o.code == grpc.StatusCode.OK)
    day = await books.settled("crowd-restart", timeout=60, spent=used)
    # Chats that reached a policy that was down fail UNAVAILABLE; none of them is charged.
    kinds = check_the_books(outcomes, budget, day.spent_tokens, allow=frozenset({grpc.StatusCode.UNAVAILABLE}))
    print(f"{len(outcomes)} chats, policy killed and restarted: {dict(kinds)}; spent {day.spent_tokens} of "
          f"{budget}")


async def test_500_concurrent_chats_through_two_policy_replicas_on_one_redis(books: AccountingMesh,
                                                                              redis_server: RedisServer) -> None:
    redis_env = {"LMESH_POLICY_REDIS_URL": redis_server.url, "LMESH_POLICY_REDIS_PREFIX": "e2e:"}
    books.procs.terminate("policy")
    await books.procs.wait_exit("policy")
    books.start_policy("policy", {**redis_env, "OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=policy-1"})
    books.start_policy("policy-2", {**redis_env, "OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=policy-2",
                                    "LMESH_AUDIT_DIR": str(books.home / "policy-2")})  # an audit log of its own
    for name in ("policy", "policy-2"):
        await books.procs.wait_passing(books.mesh, "policy", name=name)
    await books.policy.wait_for(lambda e: len(books.policy.endpoints()) >= 2, timeout=30)
    outcomes, budget = await crowd(books, "crowd-redis")
    day = await books.settled("crowd-redis")
    kinds = check_the_books(outcomes, budget, day.spent_tokens, allow=OVERLOADED)
    replicas = ("policy-1", "policy-2")  # their service.instance.id (others get a random one)

    def deciders(spans: list[Any]) -> Counter[str]:
        return Counter(s.instance for s in spans if s.name == "lmesh.policy/Reserve" and s.instance in replicas)

    # Both replicas admitted chats of this run, on the one ledger.
    await books.otlp.wait_for(lambda spans: len(deciders(spans)) == 2, timeout=20)
    print(f"{len(outcomes)} chats, two policy replicas on one Redis: {dict(kinds)}; spent {day.spent_tokens} "
          f"of {budget}; Reserve calls per replica {dict(deciders(books.otlp.spans))}")
    # The two replicas stay: the tests after this one run on the shared ledger.


async def test_a_gateway_killed_mid_stream_has_its_reservation_charged_in_full_after_the_lease(
        books: AccountingMesh) -> None:
    tenant = "killed"
    max_tokens = 300
    await set_tenant_limits(books.policy, tenant, policy_pb2.LimitsUpdate(budget_tokens=10_000))
    _, key = await books.key(tenant)
    resolver = books.mesh.resolver("lmesh-gateway")
    known = frozenset(e.service_id for e in resolver.endpoints())
    books.procs.start("gateway", name="gateway-doomed")
    await books.procs.wait_passing(books.mesh, "gateway", name="gateway-doomed", exclude=known)
    doomed = next(e for e in resolver.endpoints() if e.service_id not in known)
    stub = doomed.stub(gateway_pb2_grpc.GatewayStub)
    call = stub.Chat(metadata=auth(key), timeout=60)
    await call.write(start(LONG_TASK, max_tokens=max_tokens))
    received = 0
    for _ in range(5):
        response = await call.read()
        received += len(response.delta) > 0
    during = await books.day(tenant)
    assert during.reserved_tokens > max_tokens and during.spent_tokens == 0
    reserved = during.reserved_tokens
    killed_at = time.monotonic()
    books.procs.kill("gateway-doomed")
    call.cancel()
    day = await books.settled(tenant, timeout=LEASE_S * 4)
    waited = time.monotonic() - killed_at
    # Ended by its lease: charged in full (a settle would charge the few tokens generated), within a lease and its
    # sweep. Not necessarily long after the kill: a gateway starved of CPU may have renewed it late.
    assert waited < LEASE_S * 3, waited
    assert day.spent_tokens == reserved  # charged in full: never less than was generated
    assert day.spent_tokens >= received
    with contextlib.suppress(Exception):
        await books.procs.wait_exit("gateway-doomed")


async def test_rate_limits_hold_within_their_window_and_retry_after_is_honest(books: AccountingMesh) -> None:
    key_id, key = await books.key("rates", requests_per_minute=3)
    stub = await books.gateway()
    sent: list[float] = []  # when each admitted chat was sent (the server admits it a few ms later)
    refused: Outcome | None = None

    async def attempt() -> Outcome:
        at = time.monotonic()
        outcome = await chat(stub, key, start(max_tokens=1))
        if outcome.code == grpc.StatusCode.OK:
            sent.append(at)
        # What the server counts in its window never exceeds the limit.
        assert (await books.usage("rates", key_id)).requests_in_window <= 3
        return outcome

    for _ in range(4):
        outcome = await attempt()
        if outcome.code != grpc.StatusCode.OK:
            refused = outcome
    assert len(sent) == 3 and refused is not None
    assert (refused.code, refused.quota_id) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "policy.requests_per_minute")
    assert f"key {key_id} is limited to 3 requests per minute" in refused.details
    assert refused.retry_after_ms is not None and 0 < refused.retry_after_ms <= WINDOW_S * 1000
    # Honest: a retry well before the delay is still refused (with the rest of the wait), one after it passes.
    await asyncio.sleep(max(0.0, refused.retry_after_ms / 1000 - 0.5))
    early = await attempt()
    assert early.code == grpc.StatusCode.RESOURCE_EXHAUSTED and early.retry_after_ms is not None
    assert early.retry_after_ms <= 600
    await asyncio.sleep(early.retry_after_ms / 1000)
    late = await attempt()
    assert late.code == grpc.StatusCode.OK, late
    for t in sent:  # never 4 in one window, give or take the few ms between sending and admission
        assert sum(1 for u in sent if t <= u < t + WINDOW_S - 0.1) <= 3
    # A lowered limit applies to the next request; so does a revocation.
    await update_key(books.policy, key_id, policy_pb2.LimitsUpdate(requests_per_minute=1))
    lowered = await chat(stub, key, start(max_tokens=1))
    assert lowered.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limited to 1 requests" in lowered.details
    await update_key(books.policy, key_id, policy_pb2.LimitsUpdate(requests_per_minute=0))
    assert (await chat(stub, key, start(max_tokens=1))).code == grpc.StatusCode.OK
    from services.policy.client import revoke_key

    await revoke_key(books.policy, key_id)
    assert (await chat(stub, key, start(max_tokens=1))).code == grpc.StatusCode.UNAUTHENTICATED


async def test_an_overlapped_admission_that_refuses_releases_nothing_and_stops_the_engine(
        books: AccountingMesh) -> None:
    """A key's chats after an admitted one start generating while Reserve decides; the one Reserve refuses gets the
    refusal as its first and only message, its generation upstream is cut short, and the key's next chat waits for
    Reserve before anything starts."""
    key_id, key = await books.key("overlap", requests_per_minute=2)
    stub = await books.gateway()
    traces = [os.urandom(16).hex() for _ in range(5)]

    async def attempt(trace_id: str, max_tokens: int) -> tuple[list[gateway_pb2.ChatResponse], grpc.StatusCode]:
        call = stub.Chat(metadata=(*auth(key), ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")), timeout=120)
        received: list[gateway_pb2.ChatResponse] = []
        try:
            await call.write(start(LONG_TASK, max_tokens=max_tokens))
            await call.done_writing()
            async for response in call:
                received.append(response)
        except grpc.aio.AioRpcError as error:
            return received, error.code()
        return received, grpc.StatusCode.OK

    first = await attempt(traces[0], 1)  # nothing on record for the key: it waits for Reserve
    assert first[1] == grpc.StatusCode.OK
    await asyncio.sleep(WINDOW_S)  # a new window: the next four are sent inside one
    # Short chats first; the refused one would run long.
    outcomes = [first] + [await attempt(t, n) for t, n in zip(traces[1:], (1, 1, 64, 64), strict=True)]
    assert [code for _, code in outcomes] == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2, \
        outcomes
    assert outcomes[3][0] == [] and outcomes[4][0] == []  # not even the first message before the refusal

    def reserve_of(spans: list[Any], trace_id: str) -> Any:
        return next((s for s in spans if s.service == "lmesh-gateway" and s.name == "reserve"
                     and s.trace_id == trace_id), None)

    spans = await books.otlp.wait_for(lambda spans: all(reserve_of(spans, t) for t in traces), timeout=20)
    overlapped = [reserve_of(spans, t).attributes["lmesh.admission.overlapped"] for t in traces]
    assert overlapped == [False, True, True, True, False]  # the last: after a refusal
    assert [reserve_of(spans, t).status_code for t in traces] == ["UNSET"] * 3 + ["ERROR"] * 2
    # The refused overlapped chat had reached the engine, which was cut short (its client, the gateway, left).
    spans = await books.otlp.wait_for(lambda spans: any(
        s.service == "lmesh-inference" and s.name.endswith("/Generate") and s.trace_id == traces[3] for s in spans))
    [generate] = [s for s in spans if s.service == "lmesh-inference" and s.name.endswith("/Generate")
                  and s.trace_id == traces[3]]
    assert generate.attributes["lmesh.inference.cancelled"] is True, generate.attributes
    assert int(generate.attributes.get("gen_ai.usage.output_tokens", 0)) < 64, generate.attributes
    assert not any(s.service == "lmesh-inference" and s.trace_id == traces[4] for s in spans)  # never started
    assert (await books.usage("overlap", key_id)).requests_in_window == 2


async def test_a_cancelled_and_a_dropped_chat_are_settled_with_what_was_generated(books: AccountingMesh) -> None:
    tenant = "endings"
    await set_tenant_limits(books.policy, tenant, policy_pb2.LimitsUpdate(budget_tokens=100_000))
    _, key = await books.key(tenant)
    stub = await books.gateway()
    call = stub.Chat(metadata=auth(key), timeout=60)
    await call.write(start(LONG_TASK, max_tokens=300))
    responses = []
    async for response in call:
        responses.append(response)
        if len(responses) == 3:
            await call.write(gateway_pb2.ChatRequest(cancel=gateway_pb2.Cancel()))
    usage = responses[-1].usage
    assert responses[-1].finish_reason and usage.completion_tokens < 300
    day = await books.settled(tenant)
    assert day.spent_tokens == usage.total_tokens
    # Dropped without a word: charged the prompt and what the gateway had received, well below the reservation.
    dropped = stub.Chat(metadata=auth(key), timeout=60)
    await dropped.write(start(LONG_TASK, max_tokens=300))
    for _ in range(3):
        await dropped.read()
    dropped.cancel()
    after = await books.settled(tenant)
    charged = after.spent_tokens - day.spent_tokens
    assert usage.prompt_tokens < charged < usage.prompt_tokens + 300


async def test_the_operator_cli_sets_limits_and_shows_usage(books: AccountingMesh,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMESH_ADMIN_TOKEN", "")
    monkeypatch.setenv("LMESH_HOME", str(books.home))

    def lmesh(*args: str) -> subprocess.CompletedProcess[str]:
        code, out, err = run_cli(list(args))
        return subprocess.CompletedProcess(list(args), code, out, err)

    created = await asyncio.to_thread(lmesh, "keys", "create", "--tenant", "cli-acme", "--model", "smollm2-*",
                                      "--rpm", "5", "--tpm", "2000", "--budget-tokens", "9000", "--period", "day")
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    assert lines[-1].startswith("lmk_") and len(lines[-1]) == 47  # the key alone on the last line
    assert "limits: 5 requests/min, 2000 tokens/min, 9000 tokens a day" in lines[0]
    key_id = lines[0].split()[1]
    updated = await asyncio.to_thread(lmesh, "keys", "update", key_id, "--rpm", "0", "--budget-tokens", "8000")
    assert updated.returncode == 0, updated.stderr
    assert "limits: 2000 tokens/min, 8000 tokens a day" in updated.stdout
    tenant = await asyncio.to_thread(lmesh, "tenants", "set", "cli-acme", "--budget-tokens", "50000")
    assert tenant.returncode == 0 and "limits: 50000 tokens a month" in tenant.stdout, tenant
    outcome = await chat(await books.gateway(), lines[-1], start(max_tokens=2))
    assert outcome.code == grpc.StatusCode.OK
    await books.settled("cli-acme")
    usage = await asyncio.to_thread(lmesh, "usage", "--tenant", "cli-acme")
    assert usage.returncode == 0, usage.stderr
    rows = {line.split()[0]: line.split() for line in usage.stdout.splitlines()[1:]}
    total = str(outcome.usage.total_tokens)
    assert rows["tenant:cli-acme"][2:5] == [total, "0", str(50000 - outcome.usage.total_tokens)]
    assert rows[f"key:{key_id}"][2:5] == [total, "0", str(8000 - outcome.usage.total_tokens)]
    listing = await asyncio.to_thread(lmesh, "keys", "list", "--tenant", "cli-acme")
    assert "2000 tokens/min, 8000 tokens a day" in listing.stdout
    everyone = await asyncio.to_thread(lmesh, "usage")
    assert "tenant:cli-acme" in everyone.stdout


async def test_no_service_logged_a_traceback(books: AccountingMesh) -> None:
    for name in books.procs.processes:
        log = books.procs.log(name)
        assert "Traceback" not in log, f"{name}:\n{log[-3000:]}"

