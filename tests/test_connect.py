"""Consul Connect: mesh identities, mTLS between real grpc.aio servers and channels, intentions.

Every test runs against Consul dev agents of its own, never the session-wide one: a `* -> *` deny intention or
a CA rotation there would break every other test.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import consul
import consul.aio
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace

from services.common.config import ConfigError
from services.common.connect import (
    MESH_CALLS,
    MESH_DESTINATIONS,
    Intention,
    IntentionAuthorizer,
    MeshGuard,
    MeshIdentity,
    MeshUnavailable,
    apply_intentions,
    default_intentions,
    in_trust_domain,
    mtls_enabled,
    parse_spiffe_id,
    peer_spiffe_id,
    server_name,
    spiffe_id_for,
    tls_health_check,
)
from services.common.consul_agent import ConsulAgent, consul_answers, find_consul, free_port
from services.common.rpc import ServerInterceptor

ECHO = "lmesh.test.Echo"
SERVICES = ("lmesh-gateway", "lmesh-policy", "lmesh-registry", "lmesh-tokenizer", "lmesh-inference", "lmesh-operator")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


# --- helpers --------------------------------------------------------------------------------------------------


async def _who_am_i(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return (peer_spiffe_id(context) or "").encode()


async def _client_cert(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"".join(context.auth_context().get("x509_pem_cert", ()))


async def _chat(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    peer = (peer_spiffe_id(context) or "").encode()
    async for message in requests:
        yield peer + b" " + message


class EchoServer:
    """One grpc.aio server as a mesh service runs it: the API on an mTLS port, grpc.health on a TLS port."""

    def __init__(self, server: grpc.aio.Server, port: int, health_port: int) -> None:
        self.server = server
        self.port = port
        self.health_port = health_port

    @classmethod
    async def start(cls, identity: MeshIdentity, interceptors: tuple[Any, ...] = ()) -> EchoServer:
        server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO, {
            "WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i),
            "ClientCert": grpc.unary_unary_rpc_method_handler(_client_cert),
            "Chat": grpc.stream_stream_rpc_method_handler(_chat),
        }),))
        checks = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        port = server.add_secure_port("127.0.0.1:0", identity.server_credentials())
        health_port = server.add_secure_port("127.0.0.1:0", identity.health_server_credentials())
        await server.start()
        await checks.set("", health_pb2.HealthCheckResponse.SERVING)
        return cls(server, port, health_port)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(0)


async def who_am_i(channel: grpc.aio.Channel) -> str:
    answer: bytes = await channel.unary_unary(f"/{ECHO}/WhoAmI")(b"", timeout=5)
    return answer.decode()


def _answer(response: Any) -> Any:
    if response.code >= 400:
        raise consul.ConsulException(f"{response.code} {response.body}")
    return json.loads(response.body) if response.body.strip() else None


async def http(agent: ConsulAgent, method: str, path: str, body: Any = None) -> Any:
    """One call to the agent's HTTP API (the Connect endpoints py-consul speaks only in their 1.9+ forms)."""
    async with consul.aio.Consul(host="127.0.0.1", port=agent.http_port) as client:
        call = {"GET": client.http.get, "POST": client.http.post, "PUT": client.http.put,
                "DELETE": client.http.delete}[method]
        if body is None:
            return await call(_answer, path)
        return await call(_answer, path, data=json.dumps(body))


def start_agent(log_path: Path, *extra: str) -> ConsulAgent:
    """A dev agent like ConsulAgent.start, with extra command-line arguments."""
    http_port = free_port()
    data_dir = tempfile.mkdtemp(prefix="lmesh-consul-")
    args = [find_consul(), "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1", "-http-port", str(http_port),
            "-dns-port", str(free_port()), "-grpc-port", str(free_port()), "-server-port", str(free_port()),
            "-serf-lan-port", str(free_port()), "-serf-wan-port", str(free_port()), "-log-level", "warn", *extra]
    with open(log_path, "ab") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=data_dir, start_new_session=True)
    agent = ConsulAgent(http_port=http_port, process=process, data_dir=data_dir)
    deadline = time.monotonic() + 20
    while not consul_answers(agent.http_addr):
        if process.poll() is not None or time.monotonic() > deadline:
            agent.stop()
            raise RuntimeError(f"consul did not start; see {log_path}")
        time.sleep(0.1)  # start-up readiness of a child process, bounded by the deadline
    return agent


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def self_signed(folder: Path, cn: str, uri: str, ca: bool = False) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a fresh self-signed EC P-256 certificate with a URI SAN."""
    key, cert = folder / f"{cn}.key", folder / f"{cn}.pem"
    openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(key))
    extensions = ["-addext", f"subjectAltName=URI:{uri}"]
    if ca:
        extensions += ["-addext", "basicConstraints=critical,CA:TRUE",
                       "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"]
    openssl("req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}",
            *extensions)
    return key.read_bytes(), cert.read_bytes()


def first_certificate(pem: bytes) -> bytes:
    end = b"-----END CERTIFICATE-----"
    return pem[: pem.index(end) + len(end)].strip()


async def assert_handshake_refused(target: str, credentials: grpc.ChannelCredentials, name: str) -> None:
    async with grpc.aio.secure_channel(target, credentials,
                                       options=[("grpc.ssl_target_name_override", name)]) as channel:
        code = None
        try:
            await who_am_i(channel)
        except grpc.aio.AioRpcError as exc:
            # Only the code is kept: a kept error holds its call, and the call keeps the closed channel's
            # connection retrying in the background.
            code = exc.code()
    assert code == grpc.StatusCode.UNAVAILABLE


# --- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    agent = ConsulAgent.start(log_path=tmp_path_factory.mktemp("connect") / "consul.log")
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
async def ids(mesh_agent: ConsulAgent) -> AsyncIterator[dict[str, MeshIdentity]]:
    identities = {name: await MeshIdentity.start(mesh_agent.http_addr, name) for name in SERVICES}
    yield identities
    for identity in identities.values():
        await identity.close()


@pytest.fixture(scope="module")
async def defaults(mesh_agent: ConsulAgent) -> Any:
    return await apply_intentions(mesh_agent.http_addr)


@pytest.fixture(scope="module")
async def inference(mesh_agent: ConsulAgent, ids: dict[str, MeshIdentity], defaults: Any) -> AsyncIterator[EchoServer]:
    """lmesh-inference's server, guarded by intentions (the gateway may call it, nothing else may)."""
    identity = ids["lmesh-inference"]
    authorizer = IntentionAuthorizer(mesh_agent.http_addr, "lmesh-inference", lambda: identity.trust_domain).start()
    guarded = ServerInterceptor("inference", trace.get_tracer("test"), MeshGuard(authorizer))
    server = await EchoServer.start(identity, (guarded,))
    yield server
    await server.stop()
    await authorizer.close()


@pytest.fixture(scope="module")
async def foreign_leaf(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, bytes]:
    """(key, cert, roots) of lmesh-gateway as issued by another Consul's CA (another trust domain)."""
    agent = ConsulAgent.start(log_path=tmp_path_factory.mktemp("other") / "consul.log")
    try:
        identity = await MeshIdentity.start(agent.http_addr, "lmesh-gateway")
        material = identity.material
        await identity.close()
    finally:
        agent.stop()
    return material.key_pem, material.cert_pem, material.roots_pem


# --- identity and mTLS ----------------------------------------------------------------------------------------


async def test_identity_names_the_service_in_the_agents_trust_domain(ids: dict[str, MeshIdentity]) -> None:
    gateway = ids["lmesh-gateway"]
    parsed = parse_spiffe_id(gateway.spiffe_id)
    assert parsed is not None and parsed.service == "lmesh-gateway"
    assert gateway.trust_domain.endswith(".consul") and in_trust_domain(gateway.spiffe_id, gateway.trust_domain)
    assert gateway.spiffe_id == spiffe_id_for(gateway.trust_domain, "lmesh-gateway")
    assert gateway.material.roots_pem.count(b"BEGIN CERTIFICATE") == 1
    assert gateway.server_name_for("lmesh-inference") == f"lmeshinference.svc.default.{gateway.trust_domain[:8]}.consul"
    # Consul's rule (seen on 1.8.7): lower case, letters and digits only, cut to a 64-character CN.
    long = server_name("A_very-Long.Service_name-that-goes-on-and-on-and-on-forever", "157a63e0-76e2.consul")
    assert long == "averylongservicenamethatgoesonandona.svc.default.157a63e0.consul"


async def test_mesh_leaf_reaches_the_mtls_port_and_the_server_sees_its_spiffe_id(
        ids: dict[str, MeshIdentity], inference: EchoServer) -> None:
    gateway = ids["lmesh-gateway"]
    async with gateway.secure_channel(inference.target, "lmesh-inference") as channel:
        assert await who_am_i(channel) == gateway.spiffe_id


async def test_handshake_refused_without_a_client_certificate(
        ids: dict[str, MeshIdentity], inference: EchoServer) -> None:
    gateway = ids["lmesh-gateway"]
    await assert_handshake_refused(inference.target, grpc.ssl_channel_credentials(gateway.material.roots_pem),
                                   gateway.server_name_for("lmesh-inference"))


@needs_openssl
async def test_handshake_refused_for_a_self_signed_certificate_claiming_a_mesh_identity(
        ids: dict[str, MeshIdentity], inference: EchoServer, tmp_path: Path) -> None:
    gateway = ids["lmesh-gateway"]
    key, cert = self_signed(tmp_path, gateway.server_name_for("lmesh-gateway"), gateway.spiffe_id)
    credentials = grpc.ssl_channel_credentials(gateway.material.roots_pem, key, cert)
    await assert_handshake_refused(inference.target, credentials, gateway.server_name_for("lmesh-inference"))


async def test_handshake_refused_for_a_leaf_from_another_consul_ca(
        ids: dict[str, MeshIdentity], inference: EchoServer, foreign_leaf: tuple[bytes, bytes, bytes]) -> None:
    gateway = ids["lmesh-gateway"]
    key, cert, _ = foreign_leaf
    # It trusts our roots (it could verify the server), but the server does not trust its CA.
    credentials = grpc.ssl_channel_credentials(gateway.material.roots_pem, key, cert)
    await assert_handshake_refused(inference.target, credentials, gateway.server_name_for("lmesh-inference"))


async def test_handshake_refused_for_a_wrong_server_name(ids: dict[str, MeshIdentity], inference: EchoServer) -> None:
    gateway = ids["lmesh-gateway"]
    await assert_handshake_refused(inference.target, gateway.channel_credentials(),
                                   gateway.server_name_for("lmesh-policy"))


async def test_client_refuses_a_server_of_another_ca(
        ids: dict[str, MeshIdentity], foreign_leaf: tuple[bytes, bytes, bytes]) -> None:
    _, _, foreign_roots = foreign_leaf
    gateway, inference = ids["lmesh-gateway"], ids["lmesh-inference"]
    server = await EchoServer.start(inference)
    try:
        credentials = grpc.ssl_channel_credentials(foreign_roots, gateway.material.key_pem, gateway.material.cert_pem)
        await assert_handshake_refused(server.target, credentials, gateway.server_name_for("lmesh-inference"))
    finally:
        await server.stop()


# --- health port ----------------------------------------------------------------------------------------------


async def test_health_port_passes_consuls_grpc_check(mesh_agent: ConsulAgent, inference: EchoServer) -> None:
    service_id = f"lmesh-inference-connect-test-{inference.port}"
    async with consul.aio.Consul(host="127.0.0.1", port=mesh_agent.http_port) as client:
        await client.agent.service.register("lmesh-inference", service_id=service_id, address="127.0.0.1",
                                            port=inference.port, check=tls_health_check(inference.health_port),
                                            connect={"Native": True})
        try:
            index = None
            async with asyncio.timeout(10):
                while True:
                    index, nodes = await client.health.service("lmesh-inference", passing=True, index=index, wait="5s")
                    if any(node["Service"]["ID"] == service_id for node in nodes):
                        break
        finally:
            await client.agent.service.deregister(service_id)


async def test_health_port_serves_health_but_refuses_the_api(
        ids: dict[str, MeshIdentity], inference: EchoServer) -> None:
    gateway = ids["lmesh-gateway"]
    # What Consul's checker does: TLS without a client certificate.
    credentials = grpc.ssl_channel_credentials(gateway.material.roots_pem)
    options = gateway.channel_options("lmesh-inference")
    async with grpc.aio.secure_channel(f"127.0.0.1:{inference.health_port}", credentials, options=options) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await who_am_i(channel)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            call = channel.stream_stream(f"/{ECHO}/Chat")(iter([b"hello"]), timeout=5)
            await call.read()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- intentions -----------------------------------------------------------------------------------------------


def test_default_intentions_are_the_request_path() -> None:
    intentions = default_intentions()
    # Deny by default for lmesh's own services only: others sharing the cluster keep their intentions.
    assert intentions[-6:] == [Intention("*", destination, "deny") for destination in
                               ("lmesh-embeddings", "lmesh-inference", "lmesh-policy", "lmesh-registry",
                                "lmesh-tokenizer", "lmesh-tools")]
    allows = {(i.source, i.destination) for i in intentions if i.action == "allow"}
    assert allows == {
        ("lmesh-gateway", "lmesh-policy"), ("lmesh-gateway", "lmesh-registry"), ("lmesh-gateway", "lmesh-tokenizer"),
        ("lmesh-gateway", "lmesh-inference"), ("lmesh-gateway", "lmesh-tools"), ("lmesh-gateway", "lmesh-embeddings"),
        ("lmesh-inference", "lmesh-registry"), ("lmesh-tokenizer", "lmesh-registry"),
        ("lmesh-operator", "lmesh-policy"), ("lmesh-operator", "lmesh-registry"),
    }


async def test_apply_intentions_is_idempotent(mesh_agent: ConsulAgent, defaults: Any) -> None:
    assert len(defaults.created) == len(default_intentions())
    again = await apply_intentions(mesh_agent.http_addr)
    assert (again.created, again.updated, len(again.unchanged)) == ([], [], len(default_intentions()))
    # Some already there, one with another action: created and updated, nothing refused as a duplicate.
    listed = await http(mesh_agent, "GET", "/v1/connect/intentions")
    by_pair = {(i["SourceName"], i["DestinationName"]): i for i in listed}
    removed = by_pair["lmesh-operator", "lmesh-policy"]
    await http(mesh_agent, "DELETE", f"/v1/connect/intentions/{removed['ID']}")
    flipped = by_pair["lmesh-tokenizer", "lmesh-registry"]
    await http(mesh_agent, "PUT", f"/v1/connect/intentions/{flipped['ID']}",
               {"SourceName": "lmesh-tokenizer", "DestinationName": "lmesh-registry", "Action": "deny"})
    repaired = await apply_intentions(mesh_agent.http_addr)
    assert repaired.created == [Intention("lmesh-operator", "lmesh-policy", "allow")]
    assert repaired.updated == [Intention("lmesh-tokenizer", "lmesh-registry", "allow")]
    listed = await http(mesh_agent, "GET", "/v1/connect/intentions")
    held = sorted((i["SourceName"], i["DestinationName"], i["Action"]) for i in listed
                  if i["DestinationName"] != "lmesh-scratch")  # another test's own
    assert held == sorted(default_intentions())


async def test_authorizer_allows_exactly_the_request_path(
        mesh_agent: ConsulAgent, ids: dict[str, MeshIdentity], defaults: Any) -> None:
    trust_domain = ids["lmesh-gateway"].trust_domain
    for target in MESH_DESTINATIONS:  # the gateway takes no mesh calls: its port is public
        authorizer = IntentionAuthorizer(mesh_agent.http_addr, target, trust_domain)
        try:
            for caller in SERVICES:
                decision = await authorizer.authorize(spiffe_id_for(trust_domain, caller))
                assert decision.allowed == (target in MESH_CALLS.get(caller, ())), (caller, target, decision)
        finally:
            await authorizer.close()


async def test_authorizer_denies_identities_outside_the_mesh_without_asking_consul(
        ids: dict[str, MeshIdentity]) -> None:
    trust_domain = ids["lmesh-gateway"].trust_domain
    # Nothing answers at this address: a question to Consul would end in "could not answer".
    authorizer = IntentionAuthorizer(f"127.0.0.1:{free_port()}", "lmesh-inference", trust_domain)
    try:
        foreign = await authorizer.authorize(spiffe_id_for("0000aaaa-0000-0000-0000-000000000000.consul",
                                                           "lmesh-gateway"))
        assert not foreign.allowed and "trust domain" in foreign.reason
        for caller in (None, "", "spiffe://x/ns/default/dc/dc1/agent/client", "not a uri"):
            decision = await authorizer.authorize(caller)
            assert not decision.allowed and "Consul could not" not in decision.reason, (caller, decision)
    finally:
        await authorizer.close()


async def test_a_new_deny_takes_effect_on_the_next_authorize_and_removing_it_restores(
        mesh_agent: ConsulAgent, ids: dict[str, MeshIdentity], defaults: Any) -> None:
    trust_domain = ids["lmesh-gateway"].trust_domain
    scratch = "lmesh-scratch"  # allowed to everyone through a wildcard source
    await apply_intentions(mesh_agent.http_addr, [Intention("*", scratch, "allow")])
    authorizer = IntentionAuthorizer(mesh_agent.http_addr, scratch, trust_domain)
    gateway = spiffe_id_for(trust_domain, "lmesh-gateway")
    try:
        await authorizer.wait_watching()
        assert (await authorizer.authorize(gateway)).allowed
        generation = authorizer.generation
        started = time.monotonic()
        created = await http(mesh_agent, "POST", "/v1/connect/intentions",
                             {"SourceName": "lmesh-gateway", "DestinationName": scratch, "Action": "deny"})
        generation = await authorizer.wait_for_change(generation, timeout_s=5)
        propagation_s = time.monotonic() - started
        denied = await authorizer.authorize(gateway)
        assert not denied.allowed and "DENY" in denied.reason, denied
        assert (await authorizer.authorize(spiffe_id_for(trust_domain, "lmesh-tokenizer"))).allowed
        await http(mesh_agent, "DELETE", f"/v1/connect/intentions/{created['ID']}")
        await authorizer.wait_for_change(generation, timeout_s=5)
        assert (await authorizer.authorize(gateway)).allowed
        assert propagation_s < 1.0, f"the watch took {propagation_s:.3f}s"
    finally:
        await authorizer.close()


async def test_interceptor_refuses_a_mesh_caller_that_intentions_deny(
        ids: dict[str, MeshIdentity], inference: EchoServer) -> None:
    tokenizer = ids["lmesh-tokenizer"]
    async with tokenizer.secure_channel(inference.target, "lmesh-inference") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await who_am_i(channel)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "lmesh-tokenizer" in (refused.value.details() or "") and "DENY" in (refused.value.details() or "")


async def test_fails_closed_when_consul_is_gone(tmp_path: Path) -> None:
    agent = ConsulAgent.start(log_path=tmp_path / "consul.log")
    identity: MeshIdentity | None = None
    authorizer: IntentionAuthorizer | None = None
    try:
        await apply_intentions(agent.http_addr)
        identity = await MeshIdentity.start(agent.http_addr, "lmesh-registry")
        authorizer = IntentionAuthorizer(agent.http_addr, "lmesh-registry", identity.trust_domain)
        await authorizer.wait_watching()  # as a service does at start-up: its first answer empties the cache
        gateway = spiffe_id_for(identity.trust_domain, "lmesh-gateway")
        assert (await authorizer.authorize(gateway)).allowed
        agent.stop()
        inference = spiffe_id_for(identity.trust_domain, "lmesh-inference")  # allowed, but never asked about
        decision = await authorizer.authorize(inference)
        assert not decision.allowed and "Consul could not answer" in decision.reason, decision
        # A decision made before Consul went away stays in use (documented), and nothing crashed.
        assert (await authorizer.authorize(gateway)).allowed
        await asyncio.sleep(0.3)  # let the watches fail and back off
        assert identity.material.cert_pem and identity.server_credentials() is not None
    finally:
        agent.stop()
        if authorizer is not None:
            await authorizer.close()
        if identity is not None:
            await identity.close()


async def test_start_says_what_to_do_when_consul_is_unreachable() -> None:
    with pytest.raises(MeshUnavailable, match=r"unreachable.*start Consul with Connect enabled, or set LMESH_MTLS=off"):
        await MeshIdentity.start(f"127.0.0.1:{free_port()}", "lmesh-gateway", timeout_s=3)


async def test_start_says_what_to_do_when_connect_is_disabled(tmp_path: Path) -> None:
    agent = start_agent(tmp_path / "consul.log", "-hcl", "connect { enabled = false }")
    try:
        with pytest.raises(MeshUnavailable, match="Connect disabled: start Consul with Connect enabled"):
            await MeshIdentity.start(agent.http_addr, "lmesh-gateway", timeout_s=5)
    finally:
        agent.stop()


def test_mtls_switch() -> None:
    assert mtls_enabled({}) and mtls_enabled({"LMESH_MTLS": "on"})
    assert not mtls_enabled({"LMESH_MTLS": "off"}) and not mtls_enabled({"LMESH_MTLS": "0"})
    with pytest.raises(ConfigError, match="LMESH_MTLS"):
        mtls_enabled({"LMESH_MTLS": "maybe"})


# --- CA rotation ----------------------------------------------------------------------------------------------


async def _new_leaf(identity: MeshIdentity, old_cert: bytes) -> float:
    """Seconds until `identity` holds a leaf other than `old_cert` (blocking-query driven, no polling)."""
    started = time.monotonic()
    while identity.material.cert_pem == old_cert:
        await identity.wait_for_change(identity.generation)
    return time.monotonic() - started


@needs_openssl
async def test_ca_rotation_is_picked_up_without_restart(tmp_path: Path) -> None:
    """Consul 1.8.7 rotates its built-in CA when given a new root key and certificate; the agent adds the new
    root at once and re-issues each leaf at a random moment within 30 s (its rotation jitter)."""
    agent = ConsulAgent.start(log_path=tmp_path / "consul.log")
    server_id = await MeshIdentity.start(agent.http_addr, "lmesh-inference")
    client_id = await MeshIdentity.start(agent.http_addr, "lmesh-gateway")
    server = await EchoServer.start(server_id)
    changes: list[int] = []
    client_id.on_change(lambda material: changes.append(material.generation))
    name = client_id.server_name_for("lmesh-inference")
    try:
        before = client_id.channel_credentials()
        old_channel = client_id.secure_channel(server.target, "lmesh-inference")
        stream = old_channel.stream_stream(f"/{ECHO}/Chat")(timeout=120)
        await stream.write(b"before")
        assert await stream.read() == client_id.spiffe_id.encode() + b" before"

        root_key, root_cert = self_signed(tmp_path, "lmesh-test-root", f"spiffe://{server_id.trust_domain}", ca=True)

        def only_new_root() -> grpc.ChannelCredentials:
            material = client_id.material
            return grpc.ssl_channel_credentials(root_cert, material.key_pem, material.cert_pem)

        # The server's leaf does not chain to the new root yet.
        await assert_handshake_refused(server.target, only_new_root(), name)

        old_server_cert, old_client_cert = server_id.material.cert_pem, client_id.material.cert_pem
        generation = server_id.generation
        started = time.monotonic()
        await http(agent, "PUT", "/v1/connect/ca/configuration",
                   {"Provider": "consul", "Config": {"PrivateKey": root_key.decode(), "RootCert": root_cert.decode()}})
        roots = await server_id.wait_for_change(generation, timeout_s=5)
        roots_s = time.monotonic() - started
        assert roots.roots_pem.count(b"BEGIN CERTIFICATE") == 2  # the new root, and the old one still trusted
        assert root_cert.strip() in roots.roots_pem and roots.cert_pem == old_server_cert

        async with asyncio.timeout(45):
            server_s, client_s = await asyncio.gather(_new_leaf(server_id, old_server_cert),
                                                      _new_leaf(client_id, old_client_cert))
        print(f"rotation: roots after {roots_s:.3f}s, leaves after {server_s:.1f}s (server) "
              f"and {client_s:.1f}s (client)")

        # New handshakes use the new leaves: the server's chains to the new root alone...
        async with grpc.aio.secure_channel(server.target, only_new_root(),
                                           options=[("grpc.ssl_target_name_override", name)]) as channel:
            assert await who_am_i(channel) == client_id.spiffe_id
        # ...and a channel built after the change presents the client's new leaf.
        assert client_id.channel_credentials() is not before and len(changes) >= 2
        async with client_id.secure_channel(server.target, "lmesh-inference") as channel:
            seen: bytes = await channel.unary_unary(f"/{ECHO}/ClientCert")(b"", timeout=5)
        # After a rotation Consul's CertPEM is the leaf and the new root cross-signed by the old one (so peers that
        # trust only the old root still verify it); the server sees the leaf.
        new_leaf = first_certificate(client_id.material.cert_pem)
        assert seen.strip() == new_leaf != first_certificate(old_client_cert)

        # The stream opened before the rotation goes on, and so does its channel.
        await stream.write(b"after")
        assert await stream.read() == client_id.spiffe_id.encode() + b" after"
        await stream.done_writing()
        assert await who_am_i(old_channel) == client_id.spiffe_id
        await old_channel.close()
    finally:
        await server.stop()
        await server_id.close()
        await client_id.close()
        agent.stop()


# --- deny by default, and a dev agent that restarts without its state ---------------------------------------


async def test_a_call_no_intention_matches_is_denied_whatever_consuls_default(
        mesh_agent: ConsulAgent, ids: dict[str, MeshIdentity]) -> None:
    """With ACLs off Consul allows what no intention mentions; lmesh does not (fail closed)."""
    trust_domain = ids["lmesh-gateway"].trust_domain
    authorizer = IntentionAuthorizer(mesh_agent.http_addr, "lmesh-unmentioned", trust_domain)
    try:
        decision = await authorizer.authorize(spiffe_id_for(trust_domain, "lmesh-gateway"))
        assert not decision.allowed and "denies by default" in decision.reason, decision
    finally:
        await authorizer.close()


async def test_a_restarted_dev_agents_new_ca_is_followed_and_the_former_trusted_for_a_while(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dev agent keeps no state: restarted, it has a new CA in a new trust domain and no intentions. Identities
    move to the new CA at once (not after a blocking query's whole wait), trusting the former one for a grace
    period, and decisions made stand while intentions are applied again."""
    import services.common.connect as connect

    monkeypatch.setattr(connect, "FORMER_CA_GRACE_S", 8.0)  # long enough for a loaded machine, short for a test
    agent = ConsulAgent.start(log_path=tmp_path / "consul.log")
    await apply_intentions(agent.http_addr)
    identity = await MeshIdentity.start(agent.http_addr, "lmesh-inference")
    authorizer = IntentionAuthorizer(agent.http_addr, "lmesh-inference", identity.accepted_trust_domains)
    try:
        await authorizer.wait_watching()
        await asyncio.sleep(connect.SETTLE_S)  # decisions made once intentions settled are kept until they change
        former = identity.material
        gateway = spiffe_id_for(former.trust_domain, "lmesh-gateway")
        assert (await authorizer.authorize(gateway)).allowed
        await asyncio.to_thread(agent.restart)
        async with asyncio.timeout(15):
            while identity.trust_domain == former.trust_domain or identity.material.cert_pem == former.cert_pem:
                await identity.wait_for_change(identity.generation)
        assert identity.accepted_trust_domains() == (identity.trust_domain, former.trust_domain)
        assert former.roots_pem in identity.material.roots_pem  # peers with the former CA's leaves still pass
        assert (await authorizer.authorize(gateway)).allowed  # cached while intentions are applied again
        renewed_gateway = spiffe_id_for(identity.trust_domain, "lmesh-gateway")
        assert (await authorizer.authorize(renewed_gateway)).allowed  # its new certificate keeps its decision
        assert not (await authorizer.authorize(spiffe_id_for(identity.trust_domain, "lmesh-tokenizer"))).allowed
        await apply_intentions(agent.http_addr)
        assert (await authorizer.authorize(spiffe_id_for(identity.trust_domain, "lmesh-gateway"))).allowed
        async with asyncio.timeout(20):
            while former.roots_pem in identity.material.roots_pem:
                await identity.wait_for_change(identity.generation)
        assert identity.accepted_trust_domains() == (identity.trust_domain,)
        assert not (await authorizer.authorize(gateway)).allowed
    finally:
        await authorizer.close()
        await identity.close()
        agent.stop()
