"""Writing to a stream the server may already have ended: the call's real status must come from reading it."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.peers import lost_send_race
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
