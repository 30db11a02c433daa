"""What a resolver keeps through a gap in its Consul watch (the agent restarted): instances an agent restarted
with its state lists critical until their restored checks run, and instances an agent without state does not
list until they register again, stay in use; an instance that deregistered goes at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from services.common import discovery
from services.common.discovery import ServiceResolver


def node(service_id: str, port: int) -> dict[str, Any]:
    return {"Node": {"Address": "127.0.0.1"}, "Service": {"ID": service_id, "Port": port, "Meta": {}}}


@pytest_asyncio.fixture
async def resolver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ServiceResolver]:
    monkeypatch.setattr(discovery, "_channel_works", lambda channel: True)  # no server behind these: trust them
    resolver = ServiceResolver(None, "lmesh-test")  # type: ignore[arg-type]
    await resolver._update([node("a", 1), node("b", 2)])
    yield resolver
    await resolver.close()


def ids(resolver: ServiceResolver) -> list[str]:
    return sorted(e.service_id for e in resolver.endpoints())


async def test_without_a_gap_an_instance_not_passing_goes_at_once(resolver: ServiceResolver) -> None:
    await resolver._update([node("a", 1)], registered={"b"})  # b's check failed: a frozen or cut replica
    assert ids(resolver) == ["a"]


async def test_restored_checks_still_critical_after_a_restart_keep_their_instances(
        resolver: ServiceResolver) -> None:
    await resolver._update([node("a", 1), node("b", 2)], after_gap=True)  # the stored catalog: all passing
    await resolver._update([node("a", 1)], registered={"b"})  # then b's restored check, critical until it runs
    assert ids(resolver) == ["a", "b"]
    assert resolver.endpoints()[1].unconfirmed_until > 0  # in use, but not what wait_for() reports as up
    await resolver._update([node("a", 1), node("b", 2)])  # the check ran: confirmed again
    assert ids(resolver) == ["a", "b"] and all(not e.unconfirmed_until for e in resolver.endpoints())


async def test_an_instance_that_deregisters_after_a_gap_goes_at_once(resolver: ServiceResolver) -> None:
    await resolver._update([node("a", 1), node("b", 2)], after_gap=True)
    await resolver._update([node("a", 1)], registered={"b"})
    await resolver._update([node("a", 1)])  # b drained and deregistered: kept no longer
    assert ids(resolver) == ["a"]


async def test_an_agent_without_state_lists_nothing_until_services_register_again(
        resolver: ServiceResolver) -> None:
    await resolver._update([], after_gap=True)
    await resolver._update([], registered={"a"})  # a registered again, check not yet run; b not yet
    assert ids(resolver) == ["a", "b"]
    await resolver._update([node("a", 1), node("b", 2)])
    assert all(not e.unconfirmed_until for e in resolver.endpoints())


async def test_a_critical_check_outside_the_window_after_a_gap_drops_the_instance(
        resolver: ServiceResolver, monkeypatch: pytest.MonkeyPatch) -> None:
    await resolver._update([node("a", 1), node("b", 2)], after_gap=True)
    monkeypatch.setattr(discovery, "RESTORED_CHECKS_WINDOW_S", 0.0)
    resolver._restored_checks_until = 0.0  # the window has passed
    await resolver._update([node("a", 1)], registered={"b"})
    assert ids(resolver) == ["a"]


async def test_an_instance_new_after_a_gap_waits_for_an_answer_its_check_has_spoken_in(
        resolver: ServiceResolver) -> None:
    # A replica killed before the restart: the stored catalog still says passing; its check has not run yet.
    await resolver._update([node("a", 1), node("b", 2), node("dead", 3)], after_gap=True)
    assert ids(resolver) == ["a", "b"]
    await resolver._update([node("a", 1), node("b", 2)], registered={"dead"})
    assert ids(resolver) == ["a", "b"]
    await resolver._update([node("a", 1), node("b", 2), node("new", 4)])  # one that started meanwhile
    assert ids(resolver) == ["a", "b", "new"]


async def test_after_a_gap_new_instances_are_taken_when_they_are_all_there_is() -> None:
    resolver = ServiceResolver(None, "lmesh-test")  # type: ignore[arg-type]
    try:
        await resolver._update([node("a", 1)], after_gap=True)  # the watch's first query failed: a first answer
        assert ids(resolver) == ["a"]
    finally:
        await resolver.close()
