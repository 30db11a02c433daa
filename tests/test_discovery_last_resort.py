"""An instance whose health check fails while it stays registered and connected (a check answered late by a busy
process) remains a last resort for a few seconds: calls that no passing instance can take go to it rather than
fail. One that deregistered, died, failed a call, or fell longer ago than LAST_RESORT_S is not used."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import discovery
from services.common.consul_agent import ConsulAgent
from services.common.discovery import Mesh, ServiceResolver
from services.common.errors import Unavailable
from services.common.supervisor import Supervisor
from tests.harness import ROOT


def node(service_id: str, port: int, models: str = "") -> dict[str, Any]:
    return {"Node": {"Address": "127.0.0.1"},
            "Service": {"ID": service_id, "Port": port, "Meta": {"models": models} if models else {}}}


@pytest_asyncio.fixture
async def resolver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ServiceResolver]:
    monkeypatch.setattr(discovery, "_channel_connected", lambda channel: True)  # no server behind these
    resolver = ServiceResolver(None, "lmesh-test")  # type: ignore[arg-type]
    await resolver._update([node("a", 1)])
    yield resolver
    await resolver.close()


async def test_the_only_instance_whose_check_failed_still_takes_calls_but_is_not_reported_passing(
        resolver: ServiceResolver) -> None:
    endpoint = resolver.endpoints()[0]
    await resolver._update([], registered={"a"})
    assert await resolver.passing() == []  # what callers list (models, tools) stays what Consul says
    assert await resolver.pick() is endpoint
    await resolver._update([node("a", 1)])  # passing again: the same endpoint and channel
    assert resolver.endpoints() == [endpoint]


async def test_recently_passing_lists_a_fallen_instance_after_the_passing_ones(resolver: ServiceResolver) -> None:
    """What a caller asks about a replica that is loading a version: a failed check does not end the load."""
    await resolver._update([node("a", 1), node("b", 2)])
    await resolver._update([node("b", 2)], registered={"a"})
    assert [e.service_id for e in resolver.recently_passing()] == ["b", "a"]
    resolver.mark_down(resolver.recently_passing()[1])
    assert [e.service_id for e in resolver.recently_passing()] == ["b"]


async def test_a_fallen_instance_gets_the_renewed_credentials_too(resolver: ServiceResolver,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Renewed while it is fallen, it keeps the renewed channel when it passes again (not one with old credentials)."""
    monkeypatch.setattr(discovery, "RENEWED_CHANNEL_WAIT_S", 0.01)  # no server to connect to: take over at once
    endpoint = resolver.endpoints()[0]
    old = endpoint.channel
    await resolver._update([], registered={"a"})
    resolver.renew_channels()
    await asyncio.gather(*resolver._renewing.values())
    assert endpoint.channel is not old
    await resolver._update([node("a", 1)])
    assert resolver.endpoints() == [endpoint] and endpoint.channel is not old


async def test_a_passing_instance_is_always_preferred(resolver: ServiceResolver) -> None:
    await resolver._update([node("a", 1), node("b", 2)])
    await resolver._update([node("b", 2)], registered={"a"})
    assert {(await resolver.pick()).service_id for _ in range(8)} == {"b"}


async def test_a_fallen_instance_serves_a_predicate_no_passing_instance_matches(resolver: ServiceResolver) -> None:
    await resolver._update([node("a", 1, "m:1"), node("b", 2, "m:2")])
    await resolver._update([node("b", 2, "m:2")], registered={"a"})
    assert (await resolver.pick(lambda e: "m:1" in e.models)).service_id == "a"
    with pytest.raises(Unavailable, match="nobody serves m:3"):
        await resolver.pick(lambda e: "m:3" in e.models, none_match="nobody serves m:3")


async def test_a_deregistered_instance_is_no_last_resort(resolver: ServiceResolver) -> None:
    await resolver._update([], registered={"a"})
    await resolver._update([])  # then it drained and deregistered
    with pytest.raises(Unavailable, match="no passing instance of lmesh-test"):
        await resolver.pick()


async def test_a_fallen_instance_that_fails_a_call_is_used_no_more(resolver: ServiceResolver) -> None:
    await resolver._update([], registered={"a"})
    resolver.mark_down(await resolver.pick())
    with pytest.raises(Unavailable, match="no passing instance"):
        await resolver.pick()


async def test_the_last_resort_ends_after_its_window(resolver: ServiceResolver,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "LAST_RESORT_S", 0.05)
    await resolver._update([], registered={"a"})
    await asyncio.sleep(0.1)
    with pytest.raises(Unavailable, match="no passing instance"):
        await resolver.pick()
    assert not resolver._fallen  # its channel retired


async def test_an_instance_that_is_not_connected_is_no_last_resort(resolver: ServiceResolver,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "_channel_connected", lambda channel: False)  # a killed process
    await resolver._update([], registered={"a"})
    with pytest.raises(Unavailable, match="no passing instance"):
        await resolver.pick()


async def test_a_frozen_only_instance_takes_calls_until_it_answers_and_a_killed_one_fails_fast(
        tmp_path: Path) -> None:
    """A real tokenizer process and a real Consul: while SIGSTOP holds it, its check times out and Consul lists it
    critical; a call made then waits for it instead of failing, and succeeds once it runs again. Killed, it is not
    used: the call fails at once."""
    agent = ConsulAgent.start(log_path=tmp_path / "consul.log")
    env = {**os.environ, "CONSUL_HTTP_ADDR": agent.http_addr, "LMESH_MTLS": "off", "LMESH_HOME": str(tmp_path)}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    supervisor = Supervisor(tmp_path / "logs", data_root=tmp_path, env=env, cwd=ROOT, grace_s=5,
                            own_sessions=False)
    mesh = Mesh(agent.http_addr)
    process = supervisor.start("tokenizer", "--grace", "0")
    try:
        resolver = mesh.resolver("lmesh-tokenizer")
        endpoint = await resolver.wait_for(timeout=60)
        check = health_pb2_grpc.HealthStub(endpoint.channel).Check
        await check(health_pb2.HealthCheckRequest(), timeout=10)  # connected
        os.kill(process.pid, signal.SIGSTOP)
        async with asyncio.timeout(15):
            while await resolver.passing():  # noqa: ASYNC110 - a bounded wait on the watch
                await asyncio.sleep(0.05)
        picked = await resolver.pick()
        assert picked is endpoint
        call = asyncio.ensure_future(check(health_pb2.HealthCheckRequest(), timeout=10))
        await asyncio.sleep(0.3)
        os.kill(process.pid, signal.SIGCONT)
        assert (await call).status == health_pb2.HealthCheckResponse.SERVING
        await resolver.wait_for(timeout=15)  # passing again

        supervisor.kill("tokenizer")
        async with asyncio.timeout(15):
            while await resolver.passing():  # noqa: ASYNC110 - a bounded wait on the watch
                await asyncio.sleep(0.05)
        with pytest.raises(Unavailable, match="no passing instance of lmesh-tokenizer"):
            await resolver.pick()  # its channel lost the connection when the process died
    finally:
        if not process.exited():
            os.kill(process.pid, signal.SIGCONT)
        await asyncio.to_thread(supervisor.stop_all)
        await mesh.close()
        agent.stop()
