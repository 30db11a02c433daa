"""Writing to a stream the server may already have ended: the call's real status must come from reading it."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.peers import lost_send_race, past_send_race
from services.gateway.chat import send


def failed_write(code: grpc.StatusCode, debug: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x", debug_error_string=debug)


class Call:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def write(self, message: object) -> None:
        raise self.error


LOST = failed_write(grpc.StatusCode.INTERNAL, 'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation')


async def test_a_write_that_lost_the_race_leaves_the_status_to_the_read() -> None:
    assert lost_send_race(LOST)
    await send(Call(LOST), object())  # type: ignore[arg-type]
    await send(Call(asyncio.InvalidStateError("RPC already finished")), object())  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [failed_write(grpc.StatusCode.INTERNAL, "a bug elsewhere"),
                                   failed_write(grpc.StatusCode.UNAVAILABLE, "SendMessage")])
async def test_any_other_write_failure_is_raised(error: grpc.aio.AioRpcError) -> None:
    assert not lost_send_race(error)
    with pytest.raises(grpc.aio.AioRpcError):
        await send(Call(error), object())  # type: ignore[arg-type]


async def test_an_upload_whose_refusal_was_lost_to_the_race_is_sent_again_until_the_status_shows() -> None:
    refused = failed_write(grpc.StatusCode.UNAUTHENTICATED, "admin token required")
    outcomes: list[BaseException | str] = [LOST, LOST, refused]

    async def upload() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await past_send_race(upload)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and outcomes == []
    outcomes[:] = [LOST, "stored"]
    assert await past_send_race(upload) == "stored"
    outcomes[:] = [LOST, LOST, LOST, "never asked"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await past_send_race(upload)  # three tries in all: the last loss is what the caller sees
    assert lost_send_race(caught.value) and outcomes == ["never asked"]
