"""Server bootstrap shared by all five services (services/common/server.py and its options)."""

from __future__ import annotations

import grpc
import pytest

from services.common.discovery import SERVER_OPTIONS


async def test_a_second_grpc_server_cannot_share_a_port() -> None:
    # gRPC sets SO_REUSEPORT by default: two servers would then split one port's connections between them.
    first = grpc.aio.server(options=SERVER_OPTIONS)
    port = first.add_insecure_port("127.0.0.1:0")
    await first.start()
    try:
        second = grpc.aio.server(options=SERVER_OPTIONS)
        with pytest.raises(RuntimeError, match="Failed to bind"):
            second.add_insecure_port(f"127.0.0.1:{port}")
    finally:
        await first.stop(None)
