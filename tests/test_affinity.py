"""Session affinity's domain without a mesh: where a session's next request goes (its last replica while that one
has room or is no busier than the rest, else load balancing), a vanished replica, the table's bound, tenants kept
apart, rendezvous agreement between gateways; and the priority a chat runs at under its key's cap."""

from __future__ import annotations

import time
from typing import cast

import grpc
import pytest
from lmesh.policy.v1 import policy_pb2

from services.common.discovery import Endpoint
from services.common.errors import InvalidArgument
from services.gateway.affinity import (
    DEFAULT_CAPACITY,
    ReplicaLoad,
    SessionAffinity,
    SessionPlacement,
    rendezvous,
    replica_load,
    session_key,
)
from services.gateway.chat import ChatParams, capped_priority, validate


def replicas(*loads: int, capacity: int = 4) -> list[ReplicaLoad]:
    return [ReplicaLoad(f"inference-{i}", load, capacity) for i, load in enumerate(loads)]


def placed(affinity: SessionAffinity, session: str, pool: list[ReplicaLoad]) -> str:
    """The replica a request of `session` lands on: the preferred one, else the least loaded (as the resolver),
    recorded as the gateway does once the replica takes it."""
    chosen = affinity.preferred(session, pool) or min(pool, key=lambda r: r.load).replica
    affinity.served(session, chosen)
    return chosen


def test_a_session_keeps_its_replica_while_it_has_room_even_when_another_is_idle() -> None:
    affinity = SessionAffinity()
    session = session_key("acme", "conversation-1")
    first = placed(affinity, session, replicas(0, 0))
    busier = [ReplicaLoad(r.replica, 3 if r.replica == first else 0, 4) for r in replicas(0, 0)]
    assert affinity.preferred(session, busier) == first  # 3 of 4 places taken: no wait there


def test_an_overloaded_replica_falls_back_to_load_balancing_and_the_session_moves() -> None:
    affinity = SessionAffinity()
    session = session_key("acme", "conversation-1")
    pool = replicas(0, 0)
    first = placed(affinity, session, pool)
    other = next(r.replica for r in pool if r.replica != first)
    full = [ReplicaLoad(first, 4, 4), ReplicaLoad(other, 1, 4)]  # a request would queue there, not here
    assert affinity.preferred(session, full) is None
    assert placed(affinity, session, full) == other
    assert affinity.preferred(session, replicas(0, 0)) == other  # its next turns follow it


def test_when_every_replica_is_full_the_session_stays_only_where_the_wait_is_no_longer() -> None:
    affinity = SessionAffinity()
    session = session_key("acme", "s")
    affinity.served(session, "inference-0")
    assert affinity.preferred(session, replicas(6, 6)) == "inference-0"  # tied: no worse than balancing
    assert affinity.preferred(session, replicas(7, 5)) is None  # load balancing would queue it shorter


def test_a_vanished_replica_is_replaced_by_the_least_loaded_and_the_session_moves_there() -> None:
    affinity = SessionAffinity()
    session = session_key("acme", "s")
    affinity.served(session, "inference-gone")
    assert placed(affinity, session, replicas(2, 0, 1)) == "inference-1"
    assert affinity.preferred(session, replicas(0, 3, 0)) == "inference-1"  # remembered there now, with room
    assert affinity.preferred(session, []) is None


def test_a_new_session_goes_to_the_least_loaded_replica_and_the_hash_decides_only_among_equals() -> None:
    affinity = SessionAffinity()
    sessions = [session_key("acme", f"s{i}") for i in range(50)]
    assert {affinity.preferred(s, replicas(1, 0, 2)) for s in sessions} == {"inference-1"}
    tied = replicas(1, 0, 0)
    assert {affinity.preferred(s, tied) for s in sessions} == {"inference-1", "inference-2"}
    for s in sessions:
        assert affinity.preferred(s, tied) == rendezvous(s, tied[1:]).replica


def test_new_sessions_spread_by_rendezvous_and_two_gateways_agree_without_sharing_memory() -> None:
    pool = replicas(0, 0, 0)
    sessions = [session_key("acme", f"conversation-{i}") for i in range(300)]
    one, two = SessionAffinity(), SessionAffinity()
    first = [one.preferred(s, pool) for s in sessions]
    assert first == [two.preferred(s, pool) for s in sessions]
    counts = {r.replica: first.count(r.replica) for r in pool}
    assert min(counts.values()) > 60, counts  # about a third each
    # A replica leaving moves only its own sessions.
    without = pool[1:]
    moved = [s for s, before in zip(sessions, first, strict=True)
             if before != "inference-0" and one.preferred(s, without) != before]
    assert not moved


def test_the_table_is_bounded_and_forgets_the_least_recently_used_session_first() -> None:
    affinity = SessionAffinity(max_sessions=3)
    for name in ("a", "b", "c"):
        affinity.served(session_key("acme", name), "inference-1")
    affinity.served(session_key("acme", "a"), "inference-1")  # used again: now the newest
    affinity.served(session_key("acme", "d"), "inference-1")
    assert len(affinity) == 3
    pool = replicas(0, 0)
    # b was forgotten: it is placed like a new session; a, c and d are remembered.
    assert affinity.preferred(session_key("acme", "b"), pool) == rendezvous(session_key("acme", "b"), pool).replica
    for name in ("a", "c", "d"):
        assert affinity.preferred(session_key("acme", name), pool) == "inference-1"


def test_a_session_name_never_steers_another_tenant_and_is_kept_only_as_a_hash() -> None:
    affinity = SessionAffinity()
    ours, theirs = session_key("acme", "alice"), session_key("globex", "alice")
    assert ours != theirs and "alice" not in ours and len(ours) == 32
    pool = replicas(0, 0)
    # Steer acme's alice to whichever replica globex's alice would not choose on its own.
    not_theirs = next(r.replica for r in pool if r.replica != rendezvous(theirs, pool).replica)
    affinity.served(ours, not_theirs)
    assert affinity.preferred(ours, pool) == not_theirs
    assert affinity.preferred(theirs, pool) == rendezvous(theirs, pool).replica != not_theirs


def endpoint(service_id: str, outstanding: int = 0, **meta: str) -> Endpoint:
    return Endpoint(service_id, "127.0.0.1", 1, meta, cast(grpc.aio.Channel, None), outstanding=outstanding)


def test_load_is_the_larger_of_the_gateways_calls_and_the_replicas_report() -> None:
    assert replica_load(endpoint("a", 2, load_active="5", load_queued="1", max_active="8")) == ReplicaLoad("a", 6, 8)
    assert replica_load(endpoint("a", 7, load_active="5", max_active="8")) == ReplicaLoad("a", 7, 8)
    assert replica_load(endpoint("a")) == ReplicaLoad("a", 0, DEFAULT_CAPACITY)  # no meta yet


def test_a_replica_marked_down_is_not_preferred() -> None:
    affinity = SessionAffinity()
    session = session_key("acme", "s")
    affinity.served(session, "a")
    down = endpoint("a", max_active="4")
    down.down_until = time.monotonic() + 60
    assert SessionPlacement(affinity, session).choose([down, endpoint("b", max_active="4")]) == "b"


def principal(max_priority: int) -> policy_pb2.Principal:
    return policy_pb2.Principal(key_id="key_00000001", tenant="acme", max_priority=max_priority)


@pytest.mark.parametrize(("requested", "cap", "runs_at"), [
    (None, 0, 0), (None, 6, 6), (3, 6, 3), (9, 6, 6), (9, 0, 0), (0, 9, 0)])
def test_a_chat_runs_at_its_priority_clipped_to_its_keys_cap_or_at_the_cap_when_it_names_none(
        requested: int | None, cap: int, runs_at: int) -> None:
    assert capped_priority(requested, principal(cap)) == runs_at


@pytest.mark.parametrize("priority", [-1, 10])
def test_a_priority_outside_0_to_9_is_invalid_and_named(priority: int) -> None:
    params = ChatParams(model="default", messages=[("user", "hi")], max_tokens=4, temperature=0, top_p=0, top_k=0,
                        seed=0, repetition_penalty=0, stop=[], priority=priority)
    with pytest.raises(InvalidArgument) as caught:
        validate(params)
    assert caught.value.field == "priority"
