"""The gateway's side of accounting without the mesh: a settle on every ending, out of the chat's cancellation's
reach, retried while policy is unreachable; renewals while streaming; a Reserve whose caller went away."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from lmesh.common.v1 import generation_pb2
from lmesh.policy.v1 import policy_pb2

from services.common.errors import NotFound, Unavailable
from services.gateway.accounting import Accounts, Meter, decided


class FakePolicy:
    """Stands in for `mesh.peer(POLICY)`: records calls; `failures` makes the next calls of a method fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.failures: dict[str, list[Exception]] = {}
        self.reserve_delay = 0.0
        self.lease_ms = 300

    async def call(self, method: Callable[[Any], Any], request: Any, **_: Any) -> Any:
        return await method(self)(request)

    def _record(self, name: str, request: Any) -> None:
        self.calls.append((name, request))
        if self.failures.get(name):
            raise self.failures[name].pop(0)

    async def Reserve(self, request: policy_pb2.ReserveRequest) -> policy_pb2.ReserveResponse:
        await asyncio.sleep(self.reserve_delay)
        self._record("Reserve", request)
        return policy_pb2.ReserveResponse(reservation_id=request.reservation_id, reserved_tokens=30,
                                          lease_ms=self.lease_ms, metered=True)

    async def RenewReservation(self, request: Any) -> policy_pb2.RenewReservationResponse:
        self._record("RenewReservation", request)
        return policy_pb2.RenewReservationResponse(state=policy_pb2.RESERVATION_STATE_OPEN, lease_ms=self.lease_ms)

    async def Settle(self, request: policy_pb2.SettleRequest) -> policy_pb2.SettleResponse:
        self._record("Settle", request)
        return policy_pb2.SettleResponse()

    def settles(self) -> list[policy_pb2.SettleRequest]:
        return [r for name, r in self.calls if name == "Settle"]


RESERVATION = policy_pb2.ReserveResponse(reservation_id="chatcmpl-0123456789", reserved_tokens=30, lease_ms=300,
                                         metered=True)


def accounts(policy: FakePolicy) -> Accounts:
    return Accounts(policy, settle_patience_s=5)  # type: ignore[arg-type]


async def test_a_finished_chat_is_settled_with_inferences_usage() -> None:
    policy = FakePolicy()
    books = accounts(policy)
    async with books.held(decided(RESERVATION)) as meter:
        meter.started(10)
        meter.received(3)
        meter.finished(generation_pb2.Usage(prompt_tokens=10, completion_tokens=4, total_tokens=14), cancelled=False)
    await books.drain()
    [settle] = policy.settles()
    assert (settle.reservation_id, settle.prompt_tokens, settle.completion_tokens, settle.ending) == (
        "chatcmpl-0123456789", 10, 4, policy_pb2.ENDING_FINISHED)


@pytest.mark.parametrize(("ending", "expected"), [
    ("error", policy_pb2.ENDING_ERROR), ("cancelled", policy_pb2.ENDING_CLIENT_GONE),
    ("deadline", policy_pb2.ENDING_DEADLINE)])
async def test_every_other_ending_is_settled_with_what_was_received(ending: str, expected: int) -> None:
    policy = FakePolicy()
    books = accounts(policy)

    async def chat() -> None:
        async with books.held(decided(RESERVATION), lambda: ending == "deadline") as meter:
            meter.started(10)
            meter.received(2)  # a replica died after two tokens, or the client left
            if ending == "error":
                raise Unavailable("inference replica became unavailable")
            await asyncio.sleep(10)

    task = asyncio.create_task(chat())
    await asyncio.sleep(0.05)
    if ending != "error":
        task.cancel()  # grpc cancels the handler when the client goes away or the deadline passes
    with pytest.raises((Unavailable, asyncio.CancelledError)):
        await task
    await books.drain()
    [settle] = policy.settles()
    assert (settle.prompt_tokens, settle.completion_tokens, settle.ending) == (10, 2, expected)


async def test_a_request_no_replica_took_is_settled_at_zero() -> None:
    policy = FakePolicy()
    books = accounts(policy)
    with pytest.raises(grpc.aio.AioRpcError):
        async with books.held(decided(RESERVATION)):
            raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), "queue full")
    await books.drain()
    assert [(s.prompt_tokens, s.completion_tokens) for s in policy.settles()] == [(0, 0)]


async def test_a_settle_retries_while_policy_is_unreachable() -> None:
    policy = FakePolicy()
    policy.failures["Settle"] = [Unavailable("no passing instance of lmesh-policy")] * 3
    books = accounts(policy)
    async with books.held(decided(RESERVATION)) as meter:
        meter.started(5)
    assert books.pending == 1
    await books.drain(timeout_s=10)
    assert len(policy.settles()) == 4 and books.pending == 0


async def test_the_lease_is_renewed_while_the_chat_streams() -> None:
    policy = FakePolicy()
    books = accounts(policy)
    async with books.held(decided(RESERVATION)):
        await asyncio.sleep(0.45)  # a lease of 300 ms is renewed every 100 ms
    await books.drain()
    renewals = sum(1 for name, _ in policy.calls if name == "RenewReservation")
    assert 3 <= renewals <= 5, renewals
    await asyncio.sleep(0.25)
    assert sum(1 for name, _ in policy.calls if name == "RenewReservation") == renewals  # stopped with the chat


async def test_a_reserve_whose_caller_went_away_is_settled_at_zero_once_answered() -> None:
    policy = FakePolicy()
    policy.reserve_delay = 0.1
    books = accounts(policy)
    request = policy_pb2.ReserveRequest(reservation_id="chatcmpl-gone-away-1", prompt_tokens=10, max_tokens=20)
    task = asyncio.create_task(books.reserve(request))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    await books.drain()
    [settle] = policy.settles()
    assert (settle.reservation_id, settle.prompt_tokens, settle.completion_tokens) == ("chatcmpl-gone-away-1", 0, 0)


async def test_a_reserve_whose_answer_was_lost_is_settled_at_zero_if_it_was_made() -> None:
    policy = FakePolicy()
    books = accounts(policy)
    policy.failures["Reserve"] = [Unavailable("lmesh-policy is unavailable: socket closed")]
    policy.failures["Settle"] = [NotFound("no reservation chatcmpl-lost-answer")]
    request = policy_pb2.ReserveRequest(reservation_id="chatcmpl-lost-answer", prompt_tokens=1, max_tokens=1)
    with pytest.raises(Unavailable):
        await books.reserve(request)
    await books.drain()
    assert [s.reservation_id for s in policy.settles()] == ["chatcmpl-lost-answer"]  # NOT_FOUND ends it quietly


def test_meter_takes_inferences_usage_at_the_finish() -> None:
    meter = Meter()
    meter.started(7)
    meter.received(3)
    meter.finished(generation_pb2.Usage(prompt_tokens=7, completion_tokens=5), cancelled=True)
    assert (meter.prompt_tokens, meter.completion_tokens, meter.ending) == (7, 5, policy_pb2.ENDING_CANCELLED)
