"""The model follower: a replica serves what its references mean, swapping versions without failing a request.

Driven by scripted WatchModels messages and a stub loader (a real ONNX load takes seconds): the stub engines have
the methods the follower calls, and record when they stop accepting, are aborted and closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from lmesh.inference.v1 import inference_pb2
from lmesh.registry.v1 import registry_pb2

from services.common.config import ServiceConfig
from services.common.consul_agent import ConsulAgent
from services.common.discovery import Mesh
from services.common.errors import FailedPrecondition, InvalidArgument, LmeshError, Reason, Unavailable
from services.common.peers import INFERENCE, direct_stub
from services.common.rpc import error_reason
from services.common.server import RunningService, start_service
from services.inference.engine import EngineLimits
from services.inference.follower import ModelFollower, available_memory, is_pinned
from services.inference.loader import LOAD_MEMORY_FACTOR, kv_bytes_per_token, memory_needed
from services.inference.servicer import ServedModel

GiB = 2**30


class StubEngine:
    """What the follower calls on an engine; `active` streams end when the test says so."""

    def __init__(self, model_id: str, events: list[str]) -> None:
        self.model_id = model_id
        self.events = events
        self.active = 0
        self.accepting = True
        self.closed = False
        self.aborted: LmeshError | None = None
        self.on_load_change: Callable[[], None] = lambda: None

    def load(self) -> dict[str, int]:
        return {"active": self.active, "queued": 0, "kv_bytes": 0, "prefix_cache_bytes": 0}

    def stop_accepting(self) -> None:
        self.accepting = False

    def abort(self, error: LmeshError) -> None:
        self.aborted, self.accepting = error, False
        self.end_streams()

    def end_streams(self) -> None:
        self.active = 0
        self.on_load_change()

    async def close(self) -> None:
        self.closed, self.accepting = True, False
        self.events.append(f"close {self.model_id}")


class StubLoader:
    """The follower's `load`: records each load, fails the versions in `fail`, holds those in `held` until released."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.fail: set[str] = set()
        self.held: dict[str, asyncio.Event] = {}
        self.engines: dict[str, StubEngine] = {}

    def hold(self, model_id: str) -> asyncio.Event:
        self.held[model_id] = asyncio.Event()
        return self.held[model_id]

    @property
    def loads(self) -> list[str]:
        return [e.removeprefix("load ") for e in self.events if e.startswith("load ")]

    async def __call__(self, version: registry_pb2.ModelVersion) -> ServedModel:
        model_id = f"{version.name}:{version.version}"
        self.events.append(f"load {model_id}")
        if model_id in self.held:
            await self.held.pop(model_id).wait()
        if model_id in self.fail:
            raise FailedPrecondition(f"{model_id} cannot be served: its model file is not a decoder")
        engine = StubEngine(model_id, self.events)
        self.engines[model_id] = engine
        return ServedModel(version.name, version.version, engine, 100, 64)  # type: ignore[arg-type]


class ScriptedSource:
    """ModelSource whose streams the test writes to: a message, an error that breaks the stream, or None (ends)."""

    def __init__(self) -> None:
        self.streams: list[asyncio.Queue[registry_pb2.WatchModelsResponse | BaseException | None]] = []
        self.asked: list[list[str]] = []
        self.revision = 0

    async def watch(self, references: Sequence[str]) -> AsyncGenerator[registry_pb2.WatchModelsResponse, None]:
        queue: asyncio.Queue[registry_pb2.WatchModelsResponse | BaseException | None] = asyncio.Queue()
        self.streams.append(queue)
        self.asked.append(list(references))
        while (item := await queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def send(self, resolutions: dict[str, list[str | tuple[str, int]]]) -> None:
        """The whole state to the newest stream: each reference's targets, `name:version` or (it, weight)."""
        self.revision += 1
        response = registry_pb2.WatchModelsResponse(revision=self.revision)
        for reference, targets in resolutions.items():
            resolution = response.resolutions.add(reference=reference)
            for target in targets:
                model_id, weight = target if isinstance(target, tuple) else (target, 100)
                resolution.targets.add(model=version(model_id), weight=weight)
        self.streams[-1].put_nowait(response)

    def break_stream(self, error: BaseException | None) -> None:
        self.streams[-1].put_nowait(error)


def version(model_id: str) -> registry_pb2.ModelVersion:
    name, _, ver = model_id.partition(":")
    return registry_pb2.ModelVersion(
        name=name, version=ver, context_length=64,
        artifacts=[registry_pb2.Artifact(kind=registry_pb2.ARTIFACT_KIND_MODEL, sha256="a" * 64, size_bytes=GiB)],
        architecture=registry_pb2.ModelArchitecture(num_layers=2, num_kv_heads=1, head_dim=8, vocab_size=100,
                                                    dtype="float16"))


async def until(predicate: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Waits (bounded) for a state the stubs cannot signal: the follower's own tasks move it."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


class Replica:
    """A follower with its stubs, and the Consul meta it published at each state change."""

    def __init__(self, references: Sequence[str], **options: Any) -> None:
        self.source = ScriptedSource()
        self.loader = StubLoader()
        self.published: list[dict[str, str]] = []
        options = {"grace_s": 0.05, "drain_timeout_s": 2.0, "retry_s": (0.01, 0.02), **options}
        self.follower = ModelFollower(self.source, references, self.loader,
                                      on_state_change=lambda: self.published.append(self.follower.meta()), **options)
        self.starting: asyncio.Task[None] | None = None

    async def start(self, resolutions: dict[str, list[str | tuple[str, int]]]) -> None:
        self.starting = asyncio.create_task(self.follower.start())
        await until(lambda: len(self.source.streams) == 1)
        self.source.send(resolutions)
        await self.starting

    def engine(self, model_id: str) -> StubEngine:
        return self.loader.engines[model_id]

    def states(self) -> list[tuple[str, str, str]]:
        """The published (models, loading, draining), consecutive repeats dropped."""
        seen: list[tuple[str, str, str]] = []
        for meta in self.published:
            state = (meta["models"], meta["loading"], meta["draining"])
            if not seen or seen[-1] != state:
                seen.append(state)
        return seen


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for replica in made:
        await replica.follower.stop()


@pytest.fixture
def replica(replicas: list[Replica]) -> Callable[..., Replica]:
    def make(references: Sequence[str] = ("default",), **options: Any) -> Replica:
        made = Replica(references, **options)
        replicas.append(made)
        return made
    return make


# ---- start-up --------------------------------------------------------------------------------------------------------

async def test_start_waits_for_every_reference_then_serves_them_warm(replica: Callable[..., Replica]) -> None:
    r = replica(["default", "base:1", "default"])
    starting = asyncio.create_task(r.follower.start())
    await until(lambda: len(r.source.streams) == 1)
    assert r.source.asked == [["default", "base:1"]]  # a reference named twice is followed once
    r.source.send({"default": [], "base:1": ["base:1"]})  # `default` not registered yet
    await until(lambda: "base:1" in r.follower.models)
    await asyncio.sleep(0.05)
    assert not starting.done()
    r.source.send({"default": ["m:1"], "base:1": ["base:1"]})
    await asyncio.wait_for(starting, 3)
    assert sorted(r.follower.models) == ["base:1", "m:1"]
    assert r.follower.meta() == {"models": "base:1,m:1", "loading": "", "draining": "", "follows": "default,base:1"}
    assert r.loader.loads == ["base:1", "m:1"]
    assert all(r.engine(i).accepting for i in ("base:1", "m:1"))


async def test_a_first_load_that_fails_fails_the_start(replica: Callable[..., Replica]) -> None:
    r = replica()
    r.loader.fail.add("m:1")
    with pytest.raises(FailedPrecondition, match="m:1 cannot be served"):
        await r.start({"default": ["m:1"]})
    assert r.follower.models == {} and r.follower.states == {}


async def test_a_malformed_reference_fails_the_start_instead_of_retrying(replica: Callable[..., Replica]) -> None:
    r = replica(["bad ref!"])
    starting = asyncio.create_task(r.follower.start())
    await until(lambda: len(r.source.streams) == 1)
    r.source.break_stream(InvalidArgument("references[0]", "'bad ref!' is not `name:version`, an alias or a name"))
    with pytest.raises(InvalidArgument, match="bad ref!"):
        await asyncio.wait_for(starting, 3)
    assert len(r.source.streams) == 1


# ---- moves -----------------------------------------------------------------------------------------------------------

async def test_a_move_loads_beside_then_drains_the_old_version_after_its_streams(
        replica: Callable[..., Replica]) -> None:
    r = replica(grace_s=0.3)
    await r.start({"default": ["m:1"]})
    old = r.engine("m:1")
    old.active = 1  # a stream in flight on v1
    release = r.loader.hold("m:2")
    r.source.send({"default": ["m:2"]})
    await until(lambda: r.follower.meta()["loading"] == "m:2")
    assert r.follower.meta()["models"] == "m:1" and old.accepting  # v1 serves while v2 loads

    release.set()
    await until(lambda: r.follower.meta()["models"] == "m:2")
    assert r.follower.meta() == {"models": "m:2", "loading": "", "draining": "m:1", "follows": "default"}
    # Unadvertised but, for the grace, still accepting: a gateway whose view lags is not refused.
    assert "m:1" in r.follower.models and old.accepting
    await until(lambda: not old.accepting, timeout_s=2)
    await asyncio.sleep(0.1)
    assert not old.closed and "m:1" in r.follower.models  # its stream still runs
    old.end_streams()
    await until(lambda: old.closed)
    await until(lambda: "m:1" not in r.follower.models)
    assert old.aborted is None and r.engine("m:2").accepting
    assert r.states() == [("", "m:1", ""), ("m:1", "", ""), ("m:1", "m:2", ""), ("m:2", "", "m:1"), ("m:2", "", "")]


async def test_streams_outliving_the_drain_bound_end_unavailable_draining(replica: Callable[..., Replica]) -> None:
    r = replica(drain_timeout_s=0.1)
    await r.start({"default": ["m:1"]})
    r.engine("m:1").active = 3
    r.source.send({"default": ["m:2"]})
    await until(lambda: r.engine("m:1").closed)
    error = r.engine("m:1").aborted
    assert isinstance(error, Unavailable) and error.reason == Reason.DRAINING and "m:1" in str(error)
    await until(lambda: sorted(r.follower.models) == ["m:2"])


async def test_a_split_alias_loads_every_target(replica: Callable[..., Replica]) -> None:
    r = replica()
    await r.start({"default": ["m:1"]})
    r.source.send({"default": [("m:2", 90), ("m:3", 10)]})
    await until(lambda: sorted(r.follower.models) == ["m:2", "m:3"])
    assert r.follower.meta()["models"] == "m:2,m:3" and r.engine("m:1").closed
    # Back to one of them: nothing loads, the other drains.
    r.source.send({"default": ["m:3"]})
    await until(lambda: sorted(r.follower.models) == ["m:3"])
    assert r.loader.loads == ["m:1", "m:2", "m:3"]


async def test_a_split_with_a_target_that_fails_keeps_the_old_version_whole(
        replica: Callable[..., Replica]) -> None:
    r = replica()
    await r.start({"default": ["m:1"]})
    r.loader.fail.add("m:3")
    r.source.send({"default": [("m:2", 50), ("m:3", 50)]})
    await until(lambda: r.loader.loads == ["m:1", "m:2", "m:3"])
    await until(lambda: "m:2" in r.loader.engines and r.engine("m:2").closed)
    assert sorted(r.follower.models) == ["m:1"] and r.follower.meta()["loading"] == ""


async def test_a_version_shared_by_two_references_stays_while_one_of_them_uses_it(
        replica: Callable[..., Replica]) -> None:
    r = replica(["default", "m"])
    await r.start({"default": ["m:1"], "m": ["m:1"]})
    assert r.loader.loads == ["m:1"]
    r.source.send({"default": ["m:2"], "m": ["m:1"]})
    await until(lambda: sorted(r.follower.models) == ["m:1", "m:2"])
    await asyncio.sleep(0.15)
    assert r.follower.meta()["draining"] == "" and r.engine("m:1").accepting


async def test_a_pinned_reference_never_moves(replica: Callable[..., Replica]) -> None:
    assert is_pinned("m:1") and not is_pinned("default") and not is_pinned("m")
    r = replica(["m:1"])
    await r.start({"m:1": ["m:1"]})
    r.source.send({"m:1": ["m:2"]})  # cannot happen with a sane registry; followed nonetheless it must not be
    r.source.send({"m:1": []})
    await asyncio.sleep(0.1)
    assert r.loader.loads == ["m:1"] and sorted(r.follower.models) == ["m:1"]


async def test_a_failed_load_keeps_the_old_version_and_the_next_change_retries(
        replica: Callable[..., Replica], caplog: pytest.LogCaptureFixture) -> None:
    r = replica()
    await r.start({"default": ["m:1"]})
    r.loader.fail.add("m:2")
    with caplog.at_level(logging.WARNING, logger="lmesh.inference.follower"):
        r.source.send({"default": ["m:2"]})
        await until(lambda: r.loader.loads == ["m:1", "m:2"])
        await until(lambda: r.follower.meta()["loading"] == "")
    assert r.follower.meta()["models"] == "m:1" and r.engine("m:1").accepting and "m:2" not in r.follower.states
    failed = [rec.getMessage() for rec in caplog.records if "could not load" in rec.getMessage()]
    assert len(failed) == 1 and "could not load m:2, still serving m:1: m:2 cannot be served" in failed[0]
    r.loader.fail.clear()
    r.source.send({"default": ["m:2"]})  # any later revision
    await until(lambda: r.follower.meta()["models"] == "m:2")


async def test_a_reference_that_resolves_to_nothing_keeps_serving(replica: Callable[..., Replica],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    r = replica()
    await r.start({"default": ["m:1"]})
    with caplog.at_level(logging.WARNING, logger="lmesh.inference.follower"):
        r.source.send({"default": []})
        r.source.send({"default": []})
        await asyncio.sleep(0.1)
    assert sorted(r.follower.models) == ["m:1"] and r.engine("m:1").accepting
    assert [rec.getMessage() for rec in caplog.records] == [
        "'default' resolves to nothing in the registry now (deleted?); still serving m:1"]
    r.source.send({"default": ["m:2"]})  # registered again, elsewhere
    await until(lambda: r.follower.meta()["models"] == "m:2")


async def test_changes_arriving_during_a_load_are_coalesced_into_the_newest(replica: Callable[..., Replica]) -> None:
    r = replica()
    await r.start({"default": ["m:1"]})
    release = r.loader.hold("m:2")
    r.source.send({"default": ["m:2"]})
    await until(lambda: r.follower.meta()["loading"] == "m:2")
    r.source.send({"default": ["m:3"]})
    r.source.send({"default": ["m:4"]})
    release.set()
    await until(lambda: sorted(r.follower.models) == ["m:4"])
    assert r.loader.loads == ["m:1", "m:2", "m:4"]


async def test_a_version_moved_back_to_within_its_grace_serves_again_without_a_load(
        replica: Callable[..., Replica]) -> None:
    r = replica(grace_s=5.0)
    await r.start({"default": ["m:1"]})
    r.source.send({"default": ["m:2"]})
    await until(lambda: r.follower.meta()["draining"] == "m:1")
    r.source.send({"default": ["m:1"]})  # rolled back
    await until(lambda: r.follower.meta()["models"] == "m:1")
    assert r.follower.meta()["draining"] == "m:2" and r.engine("m:1").accepting
    await asyncio.sleep(0.1)
    assert r.loader.loads == ["m:1", "m:2"] and not r.engine("m:1").closed


async def test_a_version_moved_back_to_after_its_grace_loads_again_once_it_is_gone(
        replica: Callable[..., Replica]) -> None:
    r = replica(grace_s=0.05)
    await r.start({"default": ["m:1"]})
    first = r.engine("m:1")
    first.active = 1  # keeps it draining past its grace
    r.source.send({"default": ["m:2"]})
    await until(lambda: not first.accepting)
    r.source.send({"default": ["m:1"]})
    await asyncio.sleep(0.1)
    assert r.follower.meta()["draining"] == "m:1" and r.loader.loads == ["m:1", "m:2"]
    first.end_streams()
    await until(lambda: r.follower.meta()["models"] == "m:1" and r.loader.loads == ["m:1", "m:2", "m:1"])
    assert first.closed and r.engine("m:1") is not first and r.engine("m:1").accepting
    await until(lambda: r.follower.meta()["draining"] == "" and r.engine("m:2").closed)


# ---- memory: beside or drain -----------------------------------------------------------------------------------------

async def test_short_memory_swaps_with_a_drain_old_freed_before_new_loaded(
        replica: Callable[..., Replica], caplog: pytest.LogCaptureFixture) -> None:
    r = replica(memory_needed=lambda v: 2 * GiB, memory_available=lambda: GiB)
    await r.start({"default": ["m:1"]})  # nothing to replace: loads whatever memory says
    r.engine("m:1").active = 1
    with caplog.at_level(logging.WARNING, logger="lmesh.inference.follower"):
        r.source.send({"default": ["m:2"]})
        await until(lambda: r.follower.meta()["draining"] == "m:1")
        assert r.follower.meta()["models"] == "" and r.loader.loads == ["m:1"]
        r.engine("m:1").end_streams()
        await until(lambda: r.follower.meta()["models"] == "m:2")
    assert r.loader.events == ["load m:1", "close m:1", "load m:2"]
    assert [rec.getMessage() for rec in caplog.records] == [
        "cannot hold m:2 beside m:1 (needs ~2.0 GiB, 1.0 GiB available): swapping with a short drain"]
    assert r.states() == [("", "m:1", ""), ("m:1", "", ""), ("", "", "m:1"), ("", "", ""), ("", "m:2", ""),
                          ("m:2", "", "")]


async def test_a_drain_swap_whose_new_version_fails_loads_the_old_one_again(replica: Callable[..., Replica]) -> None:
    r = replica(swap="drain")
    await r.start({"default": ["m:1"]})
    r.loader.fail.add("m:2")
    r.source.send({"default": ["m:2"]})
    await until(lambda: r.loader.loads == ["m:1", "m:2", "m:1"])
    await until(lambda: r.follower.meta()["models"] == "m:1")
    assert r.loader.events[:3] == ["load m:1", "close m:1", "load m:2"]
    assert r.engine("m:1").accepting


@pytest.mark.parametrize(("swap", "available", "order"), [
    ("beside", GiB, ["load m:1", "load m:2", "close m:1"]),  # forced beside though memory is short
    ("drain", 100 * GiB, ["load m:1", "close m:1", "load m:2"]),  # forced drain though memory is plenty
    ("auto", 100 * GiB, ["load m:1", "load m:2", "close m:1"]),
    ("auto", None, ["load m:1", "load m:2", "close m:1"]),  # memory unknown: beside
])
async def test_the_swap_setting_picks_the_order(replica: Callable[..., Replica], swap: str, available: int | None,
                                                order: list[str]) -> None:
    r = replica(swap=swap, memory_needed=lambda v: 2 * GiB, memory_available=lambda: available)
    await r.start({"default": ["m:1"]})
    r.source.send({"default": ["m:2"]})
    await until(lambda: r.engine("m:1").closed and r.follower.meta()["models"] == "m:2")
    assert r.loader.events == order


def test_an_unknown_swap_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="swap must be one of auto, beside, drain, got 'sometimes'"):
        ModelFollower(ScriptedSource(), ["default"], StubLoader(), swap="sometimes")


def test_the_memory_estimate_counts_weights_kv_cache_and_prefix_cache() -> None:
    v = version("m:1")
    per_token = 2 * 2 * 1 * 8 * 2  # k and v, 2 layers, 1 head of 8, float16
    assert kv_bytes_per_token(v.architecture) == per_token
    limits = EngineLimits(max_active=4, prefix_cache_bytes=1000)
    assert memory_needed(v, limits) == int(GiB * LOAD_MEMORY_FACTOR) + 4 * 64 * per_token + 1000
    v.architecture.dtype = "bfloat16"
    assert kv_bytes_per_token(v.architecture) == per_token
    v.architecture.dtype = "int8"  # weights only: its KV cache is float32
    assert kv_bytes_per_token(v.architecture) == 2 * per_token
    available = available_memory()
    assert available is None or available > 0


# ---- the stream ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", [Unavailable("lmesh-registry is unavailable"), None,
                                  grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                                       grpc.aio.Metadata(), "connection reset")])
async def test_a_lost_stream_is_opened_again_and_its_first_message_is_the_whole_state(
        replica: Callable[..., Replica], loss: BaseException | None) -> None:
    r = replica()
    await r.start({"default": ["m:1"]})
    r.source.break_stream(loss)
    await until(lambda: len(r.source.streams) == 2)
    assert r.source.asked[1] == ["default"]
    r.source.send({"default": ["m:2"]})
    await until(lambda: sorted(r.follower.models) == ["m:2"])
    # Unchanged state after a reconnect loads nothing.
    r.source.break_stream(None)
    await until(lambda: len(r.source.streams) == 3)
    r.source.send({"default": ["m:2"]})
    await asyncio.sleep(0.05)
    assert r.loader.loads == ["m:1", "m:2"]


async def test_stop_cancels_following_and_leaves_the_engines_for_the_services_drain(
        replica: Callable[..., Replica]) -> None:
    r = replica(grace_s=5.0)
    await r.start({"default": ["m:1"]})
    r.source.send({"default": ["m:2"]})
    await until(lambda: r.follower.meta()["draining"] == "m:1")
    await r.follower.stop()
    assert sorted(r.follower.models) == ["m:1", "m:2"]  # on_drain / on_stop handle every served engine
    assert not r.engine("m:1").closed and not r.engine("m:2").closed
    r.source.send({"default": ["m:3"]})
    await asyncio.sleep(0.05)
    assert r.loader.loads == ["m:1", "m:2"]


async def test_a_pinned_version_also_named_by_an_alias_is_loaded_once(replica: Callable[..., Replica]) -> None:
    r = replica(["default", "m:1"])
    await r.start({"default": ["m:1"], "m:1": ["m:1"]})
    assert r.loader.loads == ["m:1"] and r.follower.meta()["follows"] == "default,m:1"
    r.source.send({"default": ["m:2"], "m:1": ["m:1"]})  # the alias moves on; the pin keeps its version
    await until(lambda: sorted(r.follower.models) == ["m:1", "m:2"])
    await asyncio.sleep(0.15)
    assert r.follower.meta()["draining"] == "" and not r.engine("m:1").closed


# ---- settings --------------------------------------------------------------------------------------------------------

def test_the_swap_settings_come_from_flags_and_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import build_parser, main
    from services.common.config import config_from_args
    from services.inference.main import InferenceSettings

    for name in ("LMESH_SWAP", "LMESH_SWAP_GRACE_S", "LMESH_SWAP_DRAIN_S"):
        monkeypatch.delenv(name, raising=False)
    defaults = InferenceSettings()
    assert (defaults.swap, defaults.swap_grace_s, defaults.swap_drain_s) == ("auto", 5.0, 60.0)
    monkeypatch.setenv("LMESH_SWAP", "DRAIN")
    monkeypatch.setenv("LMESH_SWAP_GRACE_S", "0.5")
    args = build_parser().parse_args(["serve", "inference", "--swap-drain", "30"])
    settings = config_from_args("inference", args, InferenceSettings).settings
    assert (settings.swap, settings.swap_grace_s, settings.swap_drain_s) == ("drain", 0.5, 30.0)
    args = build_parser().parse_args(["serve", "inference", "--swap", "beside"])
    assert config_from_args("inference", args, InferenceSettings).settings_as(InferenceSettings).swap == "beside"
    monkeypatch.setenv("LMESH_SWAP", "sometimes")
    assert main(["serve", "inference", "--data-dir", "/nonexistent/never-used"]) == 2
    assert capsys.readouterr().err == "lmesh: LMESH_SWAP must be one of auto, beside, drain, got 'sometimes'\n"
    monkeypatch.delenv("LMESH_SWAP")
    monkeypatch.setenv("LMESH_SWAP_GRACE_S", "-1")
    assert main(["serve", "inference", "--data-dir", "/nonexistent/never-used"]) == 2
    assert capsys.readouterr().err == "lmesh: LMESH_SWAP_GRACE_S must be a number ≥ 0, got '-1'\n"


# ---- the replica in the mesh -----------------------------------------------------------------------------------------

async def test_the_replica_publishes_each_state_to_consul_and_serves_from_the_live_set(
        consul_agent: ConsulAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lmesh serve inference` wired whole (real server, real Consul), the registry stream and the loads scripted:
    Consul meta shows loading, advertised and draining versions promptly, and the servicer reads the live set."""
    from services.inference import follower as follower_module
    from services.inference import loader as loader_module
    from services.inference.main import InferenceSettings, build

    source, loader = ScriptedSource(), StubLoader()
    monkeypatch.setattr(follower_module, "RegistrySource", lambda registry: source)
    monkeypatch.setattr(loader_module, "load_version", lambda registry, version, *args: loader(version))
    service = f"inference-{uuid.uuid4().hex[:8]}"
    config = ServiceConfig(mtls=False, service=service, consul_addr=consul_agent.http_addr, data_dir=tmp_path,
                           grace_s=1, settings=InferenceSettings(models=("default",), swap_grace_s=0.3))
    mesh = Mesh(consul_agent.http_addr)
    starting = asyncio.create_task(start_service(config, build))
    running: RunningService | None = None

    async def meta() -> dict[str, str]:
        services = await mesh.consul.agent.services()
        found = [s["Meta"] for s in services.values() if s["Service"] == f"lmesh-{service}"]
        return found[0] if found else {}

    async def consul_shows(**wanted: str) -> dict[str, str]:
        deadline = time.monotonic() + 5
        while {k: (seen := await meta()).get(k) for k in wanted} != wanted:
            assert time.monotonic() < deadline, f"Consul meta {seen} never showed {wanted}"
            await asyncio.sleep(0.02)
        return seen

    async def generate(model: str) -> grpc.aio.AioRpcError:
        assert running is not None
        async with direct_stub(INFERENCE, f"127.0.0.1:{running.port}") as stub:
            call = stub.Generate()
            await call.write(inference_pb2.GenerateRequest(start=inference_pb2.GenerateStart(
                model=model, prompt_token_ids=[1], max_tokens=1)))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            return refused.value

    try:
        await until(lambda: len(source.streams) == 1, 10)
        release = loader.hold("m:1")
        source.send({"default": ["m:1"]})
        await consul_shows(models="", loading="m:1", follows="default")
        assert not starting.done()  # not SERVING before it is warm
        release.set()
        running = await asyncio.wait_for(starting, 10)
        shown = await consul_shows(models="m:1", loading="", draining="")
        assert {"max_active", "load_active", "load_queued", "load_kv_bytes"} <= set(shown)

        release = loader.hold("m:2")
        source.send({"default": ["m:2"]})
        await consul_shows(models="m:1", loading="m:2")
        release.set()
        await consul_shows(models="m:2", loading="", draining="m:1")
        await consul_shows(models="m:2", draining="")
        assert loader.engines["m:1"].closed
        refused = await generate("m:1")  # replaced: no longer in the set the servicer reads
        assert refused.code() == grpc.StatusCode.NOT_FOUND and "serving: m:2" in (refused.details() or "")
        assert error_reason(refused) == Reason.MODEL_NOT_SERVED
    finally:
        if running is None:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        else:
            await running.stop()
        await mesh.close()
    assert running is not None and loader.engines["m:2"].closed  # the service's stop closes what the follower held
