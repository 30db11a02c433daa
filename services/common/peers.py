"""Calling the mesh's services: the one client-side runtime every call between them goes through.

A `PeerService` declares a service once, as its callers see it: its Consul name and its gRPC stub class. A
`Peer` is this process's handle on one of them (`mesh.peer(POLICY)`). Every call through it:

- goes to a passing instance the resolver picks (fewest calls in flight, then reported load), counted in
  flight while it runs, so load balancing sees this process's own calls;
- carries the caller's trace context and the tighter of its own timeout and the deadline of the call being
  served, plus the credentials the call needs (the mesh identity on the channel, the admin token where asked);
- fails over to another instance on UNAVAILABLE only when the call is safe to repeat (`retry=True`, the default
  for `call`; writes that are not idempotent pass `retry=False`).

Streams and calls that must choose their instance (a replica serving a model version) take a `lease`: an
instance and its stub for as long as the block runs. A stream's first message goes out with `write_first`, later
ones with `send`: a peer that already ended the call (it refused this caller) is then heard by reading the call,
with its own status, never as the INTERNAL that grpc-aio gives a write that lost that race.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from lmesh.embeddings.v1 import embeddings_pb2_grpc
from lmesh.gateway.v1 import gateway_pb2_grpc
from lmesh.inference.v1 import inference_pb2_grpc
from lmesh.policy.v1 import policy_pb2_grpc
from lmesh.registry.v1 import registry_pb2_grpc
from lmesh.tokenizer.v1 import tokenizer_pb2_grpc

from services.common.discovery import CHANNEL_OPTIONS, Endpoint, Mesh, ServiceResolver
from services.common.errors import Reason, Unavailable
from services.common.rpc import call_options, error_reason

S = TypeVar("S")
R = TypeVar("R")
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PeerService(Generic[S]):
    """A mesh service as its callers see it: its Consul name and its stub class."""

    name: str
    stub: Callable[[grpc.aio.Channel], S]


REGISTRY = PeerService("lmesh-registry", registry_pb2_grpc.RegistryStub)
TOKENIZER = PeerService("lmesh-tokenizer", tokenizer_pb2_grpc.TokenizerStub)
INFERENCE = PeerService("lmesh-inference", inference_pb2_grpc.InferenceStub)
POLICY = PeerService("lmesh-policy", policy_pb2_grpc.PolicyStub)
GATEWAY = PeerService("lmesh-gateway", gateway_pb2_grpc.GatewayStub)


def channel_itself(channel: grpc.aio.Channel) -> grpc.aio.Channel:
    """A tool provider's "stub": its methods are known only at run time (server reflection), so calls go on the
    channel (services/gateway/tool_catalog.py)."""
    return channel


def tool_provider(name: str) -> PeerService[grpc.aio.Channel]:
    """A service tagged `lmesh-tool` in Consul, as its callers see it."""
    return PeerService(name, channel_itself)


TOOLS = tool_provider("lmesh-tools")  # the tools lmesh ships (services/tools)
EMBEDDINGS = PeerService("lmesh-embeddings", embeddings_pb2_grpc.EmbeddingsStub)
PEER_SERVICES: tuple[PeerService[Any], ...] = (REGISTRY, TOKENIZER, INFERENCE, POLICY, GATEWAY, TOOLS, EMBEDDINGS)


def lost_send_race(exc: grpc.aio.AioRpcError) -> bool:
    """True when grpc-aio reports INTERNAL only because the server ended a streaming call (refused it, say) before
    the request was written: the call's real status comes from reading it (or asking again), not from this."""
    return exc.code() == grpc.StatusCode.INTERNAL and "SendMessage" in (exc.debug_error_string() or "")


SEND_RACE_ATTEMPTS = 3


async def past_send_race(call: Callable[[], Awaitable[R]], attempts: int = SEND_RACE_ATTEMPTS) -> R:
    """`call()`, made again (up to `attempts` times in all) while grpc-aio loses the server's status to the send
    race (`lost_send_race`): for an idempotent call that streams its request (an upload), whose refusal would
    otherwise surface as INTERNAL."""
    for attempt in range(attempts):
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if not lost_send_race(exc) or attempt + 1 == attempts:
                raise
    raise AssertionError("attempts must be at least 1")


async def send(call: grpc.aio.StreamStreamCall, message: Any) -> None:
    """Writes to a stream whose peer may already have ended it (a replica that died, a hop the mesh refused): the
    status then comes from reading the call, as an AioRpcError with the real code, not as asyncio's
    InvalidStateError or the INTERNAL of a write that lost the race here."""
    try:
        await call.write(message)
    except asyncio.InvalidStateError:
        pass
    except grpc.aio.AioRpcError as exc:
        if not lost_send_race(exc):
            raise


async def write_first(call: grpc.aio.StreamStreamCall, message: Any,
                      again: Callable[[], grpc.aio.StreamStreamCall]) -> grpc.aio.StreamStreamCall:
    """`call` with its first message written, or a call whose read raises why not. A peer that ended the call
    before the message was written (it refused this caller, say) leaves its status to the read; when grpc-aio lost
    that status with the write (INTERNAL), the peer never saw the request, so the call is made again (`again()`),
    SEND_RACE_ATTEMPTS times in all."""
    for attempt in range(SEND_RACE_ATTEMPTS):
        try:
            await call.write(message)
            return call
        except asyncio.InvalidStateError:
            return call
        except grpc.aio.AioRpcError as exc:
            last = attempt + 1 == SEND_RACE_ATTEMPTS
            if last or not lost_send_race(exc) or await call.code() != grpc.StatusCode.INTERNAL:
                return call
        call = again()
    raise AssertionError("SEND_RACE_ATTEMPTS must be at least 1")


def refused_hop(exc: grpc.aio.AioRpcError, service: str) -> Unavailable | None:
    """A peer that refused this process itself (no mesh certificate, or a Consul intention denies the hop), not
    its request: to our own caller that is a dependency out of reach, UNAVAILABLE, naming the hop."""
    if exc.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return None
    reason = error_reason(exc)
    if reason not in (Reason.MESH_DENIED, Reason.MESH_IDENTITY_REQUIRED):
        return None
    return Unavailable(f"the mesh refused this hop to {service}: {exc.details()}", reason=reason)


OPERATOR = "lmesh-operator"  # the mesh identity of operators' tools (the CLI, `lmesh dev`'s set-up)


async def open_mesh(consul_addr: str, identity: str = OPERATOR, *, mtls: bool | None = None,
                    admin_token: str | None = None) -> Mesh:
    """The mesh as a process outside it sees it (the CLI, `lmesh dev`, tests, benchmarks): with a mesh identity
    (`identity`, a Consul Connect leaf from the local agent) when mTLS is on (`mtls`, default LMESH_MTLS), so
    intentions decide what it may call. Raises MeshUnavailable when Connect cannot give it one."""
    from services.common.connect import MeshSecurity, mtls_enabled

    on = mtls_enabled() if mtls is None else mtls
    security = await MeshSecurity.start(consul_addr, identity) if on else None
    return Mesh(consul_addr, security=security, admin_token=admin_token)


def peer_service(service: str) -> PeerService[Any]:
    """The declaration of a service by its short name ("registry")."""
    return next(p for p in PEER_SERVICES if p.name == f"lmesh-{service}")


def admin_metadata(token: str | None) -> list[tuple[str, str]]:
    """The metadata that carries the admin token (none without one)."""
    return [("authorization", f"Bearer {token}")] if token else []


@dataclass
class Lease(Generic[S]):
    """One instance of a peer, held for a block of calls (a stream, a call that chose its instance)."""

    endpoint: Endpoint
    stub: S
    admin_token: str | None

    def options(self, timeout: float | None = None, *, admin: bool = False) -> dict[str, Any]:
        """Keyword arguments for a call on `stub`: trace context, deadline, and the admin token if `admin`."""
        options = call_options(timeout)
        if admin:
            options["metadata"] = [*options["metadata"], *admin_metadata(self.admin_token)]
        return options


class Peer(Generic[S]):
    """Calls to one mesh service (see the module's docstring)."""

    def __init__(self, resolver: ServiceResolver, service: PeerService[S], admin_token: str | None = None) -> None:
        self.resolver = resolver
        self.service = service
        self._admin_token = admin_token

    @property
    def name(self) -> str:
        return self.service.name

    def with_admin_token(self, token: str | None) -> Peer[S]:
        """The same peer, its admin calls carrying `token` instead."""
        return Peer(self.resolver, self.service, token)

    @contextlib.asynccontextmanager
    async def lease(self, predicate: Callable[[Endpoint], bool] | None = None, *,
                    none_match: str = "") -> AsyncIterator[Lease[S]]:
        """An instance (matching `predicate`) for the block's calls, counted in flight until the block ends.

        `none_match` is the UNAVAILABLE message when instances pass but none matches."""
        endpoint = await self.resolver.pick(predicate, none_match=none_match)
        with self.resolver.in_flight(endpoint) as channel:
            yield Lease(endpoint, endpoint.stub_on(channel, self.service.stub), self._admin_token)

    async def call(self, method: Callable[[S], Callable[..., Awaitable[R]]], request: Any, *,
                   timeout: float | None = DEFAULT_TIMEOUT_S, retry: bool = True, admin: bool = False,
                   attempts: int = 2) -> R:
        """A unary call: `await peer.call(lambda s: s.ResolveModel, request)`. With `retry`, an instance that
        answers UNAVAILABLE is marked down and the call goes to another (only for calls safe to repeat)."""
        return await self.with_lease(lambda lease: method(lease.stub)(request, **lease.options(timeout, admin=admin)),
                                     attempts=attempts if retry else 1)

    async def with_lease(self, work: Callable[[Lease[S]], Awaitable[R]], *, attempts: int = 2,
                         predicate: Callable[[Endpoint], bool] | None = None) -> R:
        """`work` on a leased instance; one that fails with UNAVAILABLE is marked down and the next one tried, up
        to `attempts` in all (1: no failover, for work that is not safe to repeat)."""
        for attempt in range(attempts):
            async with self.lease(predicate) as lease:
                try:
                    return await work(lease)
                except grpc.aio.AioRpcError as exc:
                    if (refused := refused_hop(exc, self.name)) is not None:
                        raise refused from None
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    self.resolver.mark_down(lease.endpoint)
                    if attempt == attempts - 1:
                        raise Unavailable(f"{self.name} is unavailable: {exc.details()}") from exc
        raise AssertionError("unreachable")

    async def passing(self) -> list[Endpoint]:
        """The instances Consul reports passing now (possibly none)."""
        return await self.resolver.passing()

    def endpoints(self) -> list[Endpoint]:
        return self.resolver.endpoints()

    def recently_passing(self) -> list[Endpoint]:
        """The passing instances and those whose check failed a moment ago (see discovery.LAST_RESORT_S)."""
        return self.resolver.recently_passing()

    async def wait_for(self, predicate: Callable[[Endpoint], bool] | None = None,
                       timeout: float = 30.0) -> Endpoint:
        """Waits until an instance matching `predicate` passes (start-up ordering)."""
        return await self.resolver.wait_for(predicate, timeout)

    def mark_down(self, endpoint: Endpoint) -> None:
        self.resolver.mark_down(endpoint)


@dataclass(frozen=True)
class GatewayTls:
    """How a client reaches a gateway whose public port serves TLS: the roots its certificate must chain to
    (`ca`; None: the system's), and optionally a client certificate to present (`client_cert`, `client_key`; the
    gateway asks for one only on its client-certificate port)."""

    ca: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.client_key, self.client_cert)


@contextlib.asynccontextmanager
async def public_gateway(target: str, tls: GatewayTls | None = None, *,
                         options: Sequence[tuple[str, Any]] = ()) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    """The public API of the gateway at `target` (`lmesh chat --gateway`, `make run`'s sample answer): a client
    of the mesh, not a member, so no mesh credentials; over TLS with `tls` (the gateway's certificate must name
    the host in `target`), plaintext without. `options`: the channel's, as a client may tune them (make chaos
    plays one with a small HTTP/2 window)."""
    if tls is None:
        channel = grpc.aio.insecure_channel(target, options=list(options))
    else:
        channel = grpc.aio.secure_channel(target, tls.channel_credentials(), options=list(options))
    async with channel:
        yield GATEWAY.stub(channel)


@contextlib.asynccontextmanager
async def direct_stub(service: PeerService[S], target: str,
                      credentials: grpc.ChannelCredentials | None = None) -> AsyncIterator[S]:
    """A stub of `service` on a channel to `target`, without Consul or mesh identity: for a server a benchmark or a
    test started itself. Plaintext, or TLS with `credentials`."""
    channel = (grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) if credentials is None
               else grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS))
    async with channel:
        yield service.stub(channel)


async def probe_health(target: str, mesh_service: str | None = None, *, consul_addr: str = "",
                       timeout_s: float = 5.0) -> str:
    """grpc.health.v1's status at `target` (`lmesh health`, Kubernetes probes): "SERVING", "NOT_SERVING", ...
    With `mesh_service`, the port serves TLS with that service's mesh certificate (a health port): it is verified
    against the CA roots of the Consul agent at `consul_addr`. UNAVAILABLE and the like raise AioRpcError."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.connect import fetch_roots, server_name

    if mesh_service is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        trust_domain, roots = await fetch_roots(consul_addr)
        channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(roots), options=[
            ("grpc.ssl_target_name_override", server_name(mesh_service, trust_domain))])
    async with channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def stub_classes() -> Sequence[Callable[[grpc.aio.Channel], Any]]:
    """Every stub class the runtime constructs (what a check for stubs made elsewhere looks for)."""
    return [service.stub for service in PEER_SERVICES]
