"""Server bootstrap shared by all five services (services/common/server.py and its options)."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import hypothesis
import hypothesis.strategies as st
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.config import ServiceConfig
from services.common.consul_agent import ConsulAgent
from services.common.discovery import SERVER_OPTIONS, Mesh
from services.common.server import ServiceParts, start_service
from tests.harness import intercepted


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


@pytest.mark.parametrize("kind", ["unary", "server stream, after a message", "bidirectional stream"])
async def test_a_bug_is_internal_with_the_calls_trace_id_and_no_traceback(kind: str) -> None:
    exporter = InMemorySpanExporter()

    def bug() -> None:
        raise KeyError("secret_internal_detail")

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        bug()
        return b""

    async def server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"first"
        bug()

    async def bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for _ in requests:
            bug()
        yield b""

    methods = {"Unary": grpc.unary_unary_rpc_method_handler(unary),
               "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
               "Bidi": grpc.stream_stream_rpc_method_handler(bidi)}
    async with intercepted(methods, [exporter]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if kind == "unary":
                await channel.unary_unary("/lmesh.test.v1.Test/Unary")(b"x")
            elif kind.startswith("server stream"):
                _ = [m async for m in channel.unary_stream("/lmesh.test.v1.Test/ServerStream")(b"x")]
            else:
                call = channel.stream_stream("/lmesh.test.v1.Test/Bidi")()
                await call.write(b"x")
                await call.read()
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    match = re.fullmatch(r"internal error \(trace_id=([0-9a-f]{32})\)", error.details() or "")
    assert match, error.details()  # generic: no exception text, no traceback
    assert [format(s.context.trace_id, "032x") for s in exporter.get_finished_spans()] == [match.group(1)]


def test_a_write_to_a_stream_its_peer_ended_is_one_info_line_not_a_traceback(caplog: pytest.LogCaptureFixture
                                                                             ) -> None:
    import logging

    from grpc._cython import cygrpc

    from services.common.server import LateWriteFilter

    logger = logging.getLogger("grpc._cython.cygrpc")
    logger.addFilter(LateWriteFilter())
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            try:
                raise cygrpc.ExecuteBatchError("Failed \"execute_batch\": (SendMessageOperation,)")
            except cygrpc.ExecuteBatchError:
                logger.exception("ExecuteBatchError raised in core by servicer method [%s]", "/a.B/C")
            try:
                raise KeyError("a real bug")
            except KeyError:
                logger.exception("Unexpected error")
    finally:
        logger.filters.clear()
    late, bug = caplog.records
    assert late.levelname == "INFO" and late.exc_info is None and "/a.B/C" in late.getMessage()
    assert bug.levelname == "ERROR" and bug.exc_info is not None  # anything else stays an error


async def test_a_service_registers_again_when_consul_forgets_it(tmp_path: Path) -> None:
    """A dev agent restarted (or any agent that lost its state) no longer lists a running service; the service
    notices through its blocking query and registers again, so callers find it without a restart."""
    agent = ConsulAgent.start(log_path=tmp_path / "consul.log")
    config = ServiceConfig(mtls=False, service="tokenizer", consul_addr=agent.http_addr, data_dir=tmp_path, grace_s=0)
    running = await start_service(config, lambda runtime: ServiceParts(servicers=[]))
    mesh = Mesh(agent.http_addr)
    try:
        registration = running.runtime.registration
        assert registration is not None and registration.reregistrations == 0
        agent.stop()
        agent = ConsulAgent.start(http_port=agent.http_port, log_path=tmp_path / "consul.log")  # no state
        endpoint = await mesh.resolver("lmesh-tokenizer").wait_for(lambda e: e.port == running.port, timeout=60)
        assert endpoint.service_id == registration.service_id and registration.reregistrations == 1
        await running.stop()  # deregisters for good: the watch must not bring a drained instance back
        services = await mesh.consul.agent.services()
        assert registration.service_id not in services
    finally:
        await running.stop()
        await mesh.close()
        agent.stop()


async def test_callers_keep_using_instances_across_a_consul_agent_restart(tmp_path: Path) -> None:
    """A restarted dev agent first lists no instance at all, until the services register again and pass a
    check: callers keep the instances whose channels work instead of failing every call in that window."""
    agent = ConsulAgent.start(log_path=tmp_path / "consul.log")
    config = ServiceConfig(mtls=False, service="tokenizer", consul_addr=agent.http_addr, data_dir=tmp_path, grace_s=0)
    running = await start_service(config, lambda runtime: ServiceParts(servicers=[]))
    mesh = Mesh(agent.http_addr)
    try:
        resolver = mesh.resolver("lmesh-tokenizer")
        endpoint = await resolver.wait_for(lambda e: e.port == running.port, timeout=15)
        registration = running.runtime.registration
        assert registration is not None
        agent.stop()
        agent = ConsulAgent.start(http_port=agent.http_port, log_path=tmp_path / "consul.log")  # no state
        failures, calls = 0, 0
        deadline = asyncio.get_running_loop().time() + 20
        while registration.reregistrations == 0 or endpoint.unconfirmed_until or calls < 20:
            assert asyncio.get_running_loop().time() < deadline, "the service never registered again"
            try:
                picked = await resolver.pick()
                await health_pb2_grpc.HealthStub(picked.channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except Exception:
                failures += 1
            calls += 1
            await asyncio.sleep(0.1)
        assert failures == 0, f"{failures} of {calls} calls failed across the restart"
        assert resolver.endpoints() == [endpoint]  # the same channel all along, confirmed again
        # A deregistration the watch sees without a gap is final at once.
        await running.stop()
        async with asyncio.timeout(10):
            while resolver.endpoints():  # noqa: ASYNC110 - a bounded wait on the watch
                await asyncio.sleep(0.05)
    finally:
        await running.stop()
        await mesh.close()
        agent.stop()


async def test_a_service_on_an_ipv6_address_passes_its_check_and_is_reachable(tmp_path: Path) -> None:
    """Consul's check and peers' channels need the IPv6 literal in brackets (`[::1]:port`)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    agent = ConsulAgent.start(log_path=tmp_path / "consul.log")
    running = await start_service(ServiceConfig(mtls=False, service="tokenizer", host="::1",
                                                consul_addr=agent.http_addr, data_dir=tmp_path, grace_s=0),
                                  lambda runtime: ServiceParts(servicers=[]))
    mesh = Mesh(agent.http_addr)
    try:
        endpoint = await mesh.resolver("lmesh-tokenizer").wait_for(lambda e: e.port == running.port, timeout=15)
        assert endpoint.address == "::1" and endpoint.target == f"[::1]:{running.port}"
        reply = await health_pb2_grpc.HealthStub(endpoint.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await running.stop()
        await mesh.close()
        agent.stop()


@pytest.mark.parametrize("caller_timeout", [None, 30.0])
async def test_a_dependency_timing_out_is_unavailable_not_the_callers_deadline(caller_timeout: float | None) -> None:
    """A call's own downstream timeout (the gateway gives the tokenizer 10 s) is not the caller's deadline: the
    caller, with time left, gets UNAVAILABLE (retry), not DEADLINE_EXCEEDED ("the call's deadline passed")."""
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   "Deadline Exceeded")

    async with intercepted({"Unary": grpc.unary_unary_rpc_method_handler(unary)}) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/lmesh.test.v1.Test/Unary")(b"x", timeout=caller_timeout)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "a dependency did not answer in time (Deadline Exceeded); retry"


class _Payload:
    """A request message the test can hold weakly (protobuf messages cannot be)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


@pytest.mark.parametrize("kind", ["unary", "bidirectional stream"])
async def test_a_refused_call_lets_go_of_its_request_at_once(kind: str) -> None:
    """Without waiting for a garbage collection: a rejected 4 MB prompt held until the next full collection made
    a gateway grow by about 50 MB per refused request."""
    import gc
    import weakref

    from services.common.errors import InvalidArgument

    held: list[weakref.ref[_Payload]] = []

    def refuse(request: _Payload) -> None:
        working_copy = _Payload(request.data * 2)  # the servicer's own data, in its frame
        held.extend([weakref.ref(request), weakref.ref(working_copy)])
        raise InvalidArgument("messages", "too long")

    async def unary(request: _Payload, context: grpc.aio.ServicerContext) -> bytes:
        refuse(request)
        return b""

    async def bidi(requests: AsyncIterator[_Payload], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            refuse(request)
        yield b""

    methods = {"Unary": grpc.unary_unary_rpc_method_handler(unary, request_deserializer=_Payload),
               "Bidi": grpc.stream_stream_rpc_method_handler(bidi, request_deserializer=_Payload)}
    gc.disable()
    try:
        async with intercepted(methods) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                if kind == "unary":
                    await channel.unary_unary("/lmesh.test.v1.Test/Unary")(b"x" * 1000)
                else:
                    call = channel.stream_stream("/lmesh.test.v1.Test/Bidi")()
                    await call.write(b"x" * 1000)
                    await call.read()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await asyncio.sleep(0.2)  # the server finishes the call
        assert len(held) == 2 and [ref() for ref in held] == [None, None]
    finally:
        gc.enable()


async def test_a_status_message_echoing_a_huge_field_is_cut() -> None:
    """An error naming what the caller sent (a 64 KB model name or role) would exceed HTTP/2 header limits: grpc-js
    drops the whole connection, and a gateway's channel refuses a peer's answer."""
    from services.common.errors import InvalidArgument

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise InvalidArgument("messages[0].role", f"{request.decode()!r} is not one of system, user, assistant")

    async with intercepted({"Unary": grpc.unary_unary_rpc_method_handler(unary)}) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/lmesh.test.v1.Test/Unary")(b"x" * 65536)
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("messages[0].role: 'xxx") and details.endswith(" more characters)")
    assert len(details) < 2100


@pytest.mark.parametrize("echoed", ["😀" * 2000, "\x00" * 5000, "%" * 9000, "é" * 3000])
async def test_a_status_message_echoing_multibyte_text_stays_under_the_clients_trailer_limit(echoed: str) -> None:
    """gRPC percent-encodes a status message (an emoji takes 12 bytes): bounded by characters, 2,000 emojis made a
    trailer over the 8 KiB that C-core clients accept, and the caller saw RESOURCE_EXHAUSTED instead."""
    from services.common.errors import InvalidArgument
    from services.common.rpc import MAX_STATUS_MESSAGE_BYTES, encoded_message_size

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise InvalidArgument("model", f"'{request.decode()}' is not `name:version`, an alias or a name")

    async with intercepted({"Unary": grpc.unary_unary_rpc_method_handler(unary)}) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/lmesh.test.v1.Test/Unary")(echoed.encode())
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details[:200]
    assert details.startswith(f"model: '{echoed[:3]}") and details.endswith(" more characters)")
    assert encoded_message_size(details) <= MAX_STATUS_MESSAGE_BYTES


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.text(max_size=3000))
def test_a_bounded_message_is_a_prefix_within_the_encoded_limit(message: str) -> None:
    from services.common.rpc import MAX_STATUS_MESSAGE_BYTES, bounded, encoded_message_size

    cut = bounded(message)
    assert encoded_message_size(cut) <= MAX_STATUS_MESSAGE_BYTES
    if cut != message:
        kept = cut.rsplit("… (", 1)[0]
        assert message.startswith(kept) and cut.endswith(f"({len(message) - len(kept)} more characters)")
    else:
        assert encoded_message_size(message) <= MAX_STATUS_MESSAGE_BYTES
