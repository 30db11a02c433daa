"""A renewed channel (new credentials) takes over from the one before only once it connects: a peer that still
presents what the renewed one refuses keeps being reached over the channel that works."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import discovery
from services.common.consul_agent import free_port
from services.common.discovery import Endpoint, ServiceResolver, plaintext_channel


@pytest_asyncio.fixture
async def server_port() -> AsyncIterator[int]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(None)


@pytest_asyncio.fixture
async def resolved(server_port: int) -> AsyncIterator[tuple[ServiceResolver, Endpoint, grpc.aio.Channel]]:
    """A resolver holding one instance, reached over a channel that works."""
    resolver = ServiceResolver(None, "lmesh-test")  # type: ignore[arg-type]
    working = plaintext_channel(f"127.0.0.1:{server_port}", "")
    endpoint = Endpoint("one", "127.0.0.1", server_port, {}, working)
    resolver._endpoints = {"one": endpoint}
    yield resolver, endpoint, working
    await resolver.close()


async def _renewed_to(resolver: ServiceResolver, target: str) -> None:
    resolver._channel_factory = lambda _target, _service: plaintext_channel(target, "")
    resolver.renew_channels()


async def test_a_renewed_channel_that_cannot_connect_leaves_calls_on_the_one_before(
        server_port: int, resolved: tuple[ServiceResolver, Endpoint, grpc.aio.Channel], monkeypatch: object) -> None:
    monkeypatch.setattr(discovery, "RENEWED_CHANNEL_WAIT_S", 5.0)  # type: ignore[attr-defined]
    resolver, endpoint, working = resolved
    await _renewed_to(resolver, f"127.0.0.1:{free_port()}")  # nothing listens: it never connects
    await asyncio.sleep(1.0)
    assert endpoint.channel is working
    check = health_pb2_grpc.HealthStub(endpoint.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert (await check).status == health_pb2.HealthCheckResponse.SERVING
    # Renewed again, to a channel that connects: the newest one takes over at once, the stuck one is dropped.
    await _renewed_to(resolver, f"127.0.0.1:{server_port}")
    for _ in range(100):
        if endpoint.channel is not working:
            break
        await asyncio.sleep(0.05)
    assert endpoint.channel is not working
    assert endpoint.channel.get_state() == grpc.ChannelConnectivity.READY
    assert not resolver._renewing


async def test_a_renewed_channel_takes_over_after_the_wait_even_if_it_never_connects(
        resolved: tuple[ServiceResolver, Endpoint, grpc.aio.Channel], monkeypatch: object) -> None:
    monkeypatch.setattr(discovery, "RENEWED_CHANNEL_WAIT_S", 0.3)  # type: ignore[attr-defined]
    resolver, endpoint, working = resolved
    await _renewed_to(resolver, f"127.0.0.1:{free_port()}")
    await asyncio.sleep(1.0)
    assert endpoint.channel is not working  # its credentials are the current ones: stale ones must not linger
