"""The gateway's choice of a version per request: weighted splits, sessions kept on one version, and the fallback
to a served version while a new one loads (services/gateway/models.py)."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from lmesh.registry.v1 import registry_pb2

from services.gateway.models import Resolution, choose, model_id

V1 = registry_pb2.ModelVersion(name="m", version="1")
V2 = registry_pb2.ModelVersion(name="m", version="2")
V3 = registry_pb2.ModelVersion(name="m", version="3")
SPLIT = Resolution(((V1, 90), (V2, 10)))


def test_a_split_is_drawn_by_weight() -> None:
    random.seed(7)
    drawn = Counter(model_id(SPLIT.draw()) for _ in range(20_000))
    assert abs(drawn["m:2"] / 20_000 - 0.10) < 0.01
    assert set(drawn) == {"m:1", "m:2"}


def test_a_session_stays_on_one_version_and_sessions_split_by_weight() -> None:
    assert {model_id(SPLIT.draw("conversation-a")) for _ in range(50)} == {model_id(SPLIT.draw("conversation-a"))}
    drawn = Counter(model_id(SPLIT.draw(f"session-{i}")) for i in range(5_000))
    assert abs(drawn["m:2"] / 5_000 - 0.10) < 0.02


def test_a_single_target_is_always_drawn() -> None:
    single = Resolution(((V1, 100),))
    assert {model_id(single.draw(s)) for s in ("", "a", "b")} == {"m:1"}


def test_from_proto_takes_the_targets_or_the_one_model_of_an_older_registry() -> None:
    split = registry_pb2.ResolveModelResponse(model=V1, targets=[
        registry_pb2.ResolvedTarget(model=V1, weight=90), registry_pb2.ResolvedTarget(model=V2, weight=10)])
    assert Resolution.from_proto(split) == SPLIT
    assert Resolution.from_proto(registry_pb2.ResolveModelResponse(model=V3)) == Resolution(((V3, 100),))


def test_the_drawn_version_is_chosen_when_served() -> None:
    assert choose(V2, SPLIT, None, {"m:1", "m:2"}) == V2


def test_a_canary_not_yet_served_sends_its_share_to_a_served_target() -> None:
    assert choose(V2, SPLIT, None, {"m:1"}) == V1


def test_a_move_keeps_the_previous_version_until_the_new_one_is_served() -> None:
    moved = Resolution(((V2, 100),))
    before = Resolution(((V1, 100),))
    assert choose(V2, moved, before, {"m:1"}) == V1  # v2 still loading: v1 goes on answering
    assert choose(V2, moved, before, {"m:1", "m:2"}) == V2  # warm: the switch
    assert choose(V2, moved, before, {"m:2"}) == V2


def test_nothing_served_leaves_the_drawn_version_to_be_waited_for_or_refused() -> None:
    assert choose(V2, Resolution(((V2, 100),)), Resolution(((V1, 100),)), set()) == V2
    assert choose(V2, Resolution(((V2, 100),)), None, {"other:1"}) == V2


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.integers(1, 10_000), min_size=1, max_size=16), session=st.text(max_size=40),
       served=st.sets(st.integers(0, 15)))
def test_the_choice_is_always_a_target_or_the_previous_meaning(weights: list[int], session: str,
                                                              served: set[int]) -> None:
    versions = [registry_pb2.ModelVersion(name="m", version=str(i)) for i in range(len(weights))]
    resolution = Resolution(tuple(zip(versions, weights, strict=True)))
    previous = Resolution(((V3, 100),))
    served_ids = {f"m:{i}" for i in served} | {"m:3"}
    chosen = choose(resolution.draw(session), resolution, previous, served_ids)
    assert chosen in versions or chosen == V3
    if any(model_id(v) in served_ids for v in versions):
        assert model_id(chosen) in served_ids and chosen in versions
