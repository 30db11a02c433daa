"""A Consul agent restarted with its state lists every instance at once, then none until their checks run again:
instances whose channels work stay in use through both answers (services/common/discovery.py)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from services.common import discovery
from services.common.discovery import ServiceResolver


def node(service_id: str, port: int) -> dict[str, Any]:
    return {"Service": {"ID": service_id, "Address": "127.0.0.1", "Port": port, "Meta": {}},
            "Node": {"Address": "127.0.0.1"}}


@pytest.fixture
async def serving_port() -> Any:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(None)


async def connected_resolver(port: int) -> ServiceResolver:
    resolver = ServiceResolver(None, "lmesh-test")  # type: ignore[arg-type]  # no watch: answers fed by hand
    await resolver._update([node("a", port)])
    await resolver.endpoints()[0].channel.channel_ready()
    return resolver


async def test_an_empty_answer_soon_after_a_gap_keeps_working_instances(serving_port: int) -> None:
    resolver = await connected_resolver(serving_port)
    await resolver._update([node("a", serving_port)], after_gap=True)  # the agent's stored state
    await resolver._update([])  # its checks not yet run again
    assert [e.service_id for e in resolver.endpoints()] == ["a"]
    assert resolver.endpoints()[0].unconfirmed_until > 0
    await resolver._update([node("a", serving_port)])  # passing again: confirmed
    assert resolver.endpoints()[0].unconfirmed_until == 0.0
    await resolver.close()


async def test_without_a_recent_gap_an_instance_no_longer_listed_is_dropped(serving_port: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = await connected_resolver(serving_port)
    await resolver._update([])
    assert resolver.endpoints() == []
    await resolver.close()
    resolver = await connected_resolver(serving_port)
    monkeypatch.setattr(discovery, "AFTER_GAP_WINDOW_S", 0.0)  # the gap long past
    await resolver._update([node("a", serving_port)], after_gap=True)
    await resolver._update([])
    assert resolver.endpoints() == []
    await resolver.close()
