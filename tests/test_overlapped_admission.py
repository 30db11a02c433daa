"""Overlapped admission without the mesh: which chats may start generating while policy's Reserve decides, and
that nothing of such a chat is released before the admission (a refusal cancels what started)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from lmesh.policy.v1 import policy_pb2
from lmesh.registry.v1 import registry_pb2

from services.common.errors import ResourceExhausted, Unavailable
from services.gateway.accounting import OverlappedAdmission, decided
from services.gateway.chat import Prepared
from services.gateway.request_path import started_while_admitting

ALICE, BOB = b"alice-digest", b"bob-digest"


def test_a_credential_overlaps_only_after_an_admission_and_one_chat_at_a_time() -> None:
    overlapping = OverlappedAdmission()
    assert not overlapping.begin(ALICE)  # nothing on record: its first chat waits for Reserve
    overlapping.admitted(ALICE)
    assert overlapping.begin(ALICE)
    assert not overlapping.begin(ALICE)  # one overlapping at a time: the others wait for their Reserve
    assert not overlapping.begin(BOB)  # another credential's admission says nothing of this one
    overlapping.ended(ALICE, overlapped=True)
    assert overlapping.begin(ALICE)
    overlapping.ended(ALICE, overlapped=True)
    overlapping.refused(ALICE)  # over a limit, revoked: waits for Reserve until admitted again
    assert not overlapping.begin(ALICE)
    overlapping.admitted(ALICE)
    assert overlapping.begin(ALICE)


def test_off_means_no_chat_overlaps_and_the_memory_is_bounded() -> None:
    off = OverlappedAdmission(enabled=False)
    off.admitted(ALICE)
    assert not off.begin(ALICE)
    small = OverlappedAdmission(max_credentials=2)
    for digest in (ALICE, BOB, b"carol"):
        small.admitted(digest)
    assert not small.begin(ALICE)  # the least recently admitted was forgotten
    assert small.begin(BOB) and small.begin(b"carol")


class Answer:
    """A generation upstream: records whether it started (the engine took the prompt) and whether it was closed."""

    def __init__(self, words: tuple[str, ...] = ("Paris", ".")) -> None:
        self.words = words
        self.started_at: list[int] = []  # the priority of each start
        self.closed = 0

    def start(self, priority: int) -> AsyncIterator[str]:
        self.started_at.append(priority)
        return self._events()

    async def _events(self) -> AsyncIterator[str]:
        try:
            for word in self.words:
                await asyncio.sleep(0)
                yield word
        finally:
            self.closed += 1


def prepared(admission: asyncio.Future[policy_pb2.ReserveResponse], *, priority: int = 5,
             requested: int | None = None) -> Prepared:
    no_tokenizer: Any = None  # the answer is made here, not detokenized
    return Prepared(registry_pb2.ModelVersion(name="tiny", version="1"), [1, 2, 3], 8, no_tokenizer, admission,
                    priority, None, "acme", requested_priority=requested)


def reservation(tenant: str = "acme", max_priority: int = 5) -> policy_pb2.ReserveResponse:
    return policy_pb2.ReserveResponse(reservation_id="chatcmpl-1", principal=policy_pb2.Principal(
        key_id="key_1", tenant=tenant, max_priority=max_priority))


async def test_an_overlapped_answer_starts_at_once_and_is_released_only_after_the_admission() -> None:
    admission: asyncio.Future[policy_pb2.ReserveResponse] = asyncio.get_running_loop().create_future()
    answer = Answer()
    released: list[str] = []

    async def chat() -> None:
        async with started_while_admitting(prepared(admission), answer.start) as events:
            released.extend([event async for event in events])

    task = asyncio.create_task(chat())
    for _ in range(5):
        await asyncio.sleep(0)
    assert answer.started_at == [5] and released == []  # generating upstream; nothing out while policy decides
    admission.set_result(reservation())
    await task
    assert released == ["Paris", "."] and answer.started_at == [5] and answer.closed == 1


async def test_a_refused_admission_cancels_the_started_answer_and_releases_nothing() -> None:
    admission: asyncio.Future[policy_pb2.ReserveResponse] = asyncio.get_running_loop().create_future()
    answer = Answer(("one",) * 1000)
    released: list[str] = []

    async def chat() -> None:
        async with started_while_admitting(prepared(admission), answer.start) as events:
            released.extend([event async for event in events])

    task = asyncio.create_task(chat())
    await asyncio.sleep(0)
    admission.set_exception(ResourceExhausted("key key_1 is over its tokens per minute", 12.0))
    with pytest.raises(ResourceExhausted):
        await task
    assert released == [] and answer.started_at == [5] and answer.closed == 1


async def test_an_answer_that_failed_upstream_meanwhile_yields_to_the_refusal() -> None:
    admission: asyncio.Future[policy_pb2.ReserveResponse] = asyncio.get_running_loop().create_future()

    async def failing(priority: int) -> AsyncIterator[str]:
        raise Unavailable("no inference replica serves tiny:1")
        yield ""  # pragma: no cover

    async def chat() -> None:
        async with started_while_admitting(prepared(admission), failing) as events:
            [event async for event in events]

    task = asyncio.create_task(chat())
    for _ in range(5):
        await asyncio.sleep(0)
    admission.set_exception(grpc.aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(),
                                                 grpc.aio.Metadata(), "unknown API key"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await task
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_lowered_priority_cap_starts_the_answer_again_at_the_allowed_priority() -> None:
    admission: asyncio.Future[policy_pb2.ReserveResponse] = asyncio.get_running_loop().create_future()
    answer = Answer()

    async def chat() -> list[str]:
        async with started_while_admitting(prepared(admission, priority=5, requested=None), answer.start) as events:
            return [event async for event in events]

    task = asyncio.create_task(chat())
    await asyncio.sleep(0)
    admission.set_result(reservation(max_priority=2))  # the operator lowered the key's cap a moment ago
    assert await task == ["Paris", "."]
    assert answer.started_at == [5, 2] and answer.closed == 2


async def test_a_credential_moved_to_another_tenant_is_refused_before_anything_is_released() -> None:
    admission: asyncio.Future[policy_pb2.ReserveResponse] = asyncio.get_running_loop().create_future()
    answer = Answer()

    async def chat() -> None:
        async with started_while_admitting(prepared(admission), answer.start) as events:
            [event async for event in events]

    task = asyncio.create_task(chat())
    await asyncio.sleep(0)
    admission.set_result(reservation(tenant="globex"))
    with pytest.raises(Unavailable, match="another tenant"):
        await task
    assert answer.closed == 1


async def test_a_decided_admission_starts_the_answer_only_then() -> None:
    answer = Answer()
    async with started_while_admitting(prepared(decided(reservation())), answer.start) as events:
        assert [event async for event in events] == ["Paris", "."]
    assert answer.started_at == [5] and answer.closed == 1
    refused: asyncio.Future[policy_pb2.ReserveResponse] = asyncio.get_running_loop().create_future()
    refused.set_exception(ResourceExhausted("over budget", 60.0))
    with pytest.raises(ResourceExhausted):
        async with started_while_admitting(prepared(refused), answer.start):
            pass
    assert answer.started_at == [5]  # a refusal known before: nothing started


async def test_a_client_gone_while_policy_decides_closes_the_started_answer() -> None:
    admission: asyncio.Future[policy_pb2.ReserveResponse] = asyncio.get_running_loop().create_future()
    answer = Answer(("one",) * 1000)

    async def chat() -> None:
        async with started_while_admitting(prepared(admission), answer.start) as events:
            [event async for event in events]

    task = asyncio.create_task(chat())
    for _ in range(3):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert answer.closed == 1
