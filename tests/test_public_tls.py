"""TLS at the public door, in process: a real registry, policy and gateway (found through a real Consul agent),
real certificates made with openssl. No model is needed: a chat that gets past authorization ends UNAVAILABLE
for want of a tokenizer, one that does not ends UNAUTHENTICATED or PERMISSION_DENIED (tests/test_e2e.py has the
real answers, the CLI and the Node.js client over TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx2
import pytest
import pytest_asyncio
from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from lmesh.policy.v1 import policy_pb2
from lmesh.registry.v1 import registry_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.config import ConfigError, ServiceConfig
from services.common.consul_agent import ConsulAgent
from services.common.discovery import Mesh
from services.common.peers import POLICY, GatewayTls, public_gateway
from services.common.server import RunningService, start_service
from services.gateway.main import GatewaySettings
from services.gateway.main import build as build_gateway
from services.policy import client as policy_client
from tests.test_tokenizer import model_version, register
from tests.tls_certs import Issued, Pki

MODEL = "tls-model"
CERT_PORT = "client_cert_port"


@dataclass
class Door:
    pki: Pki
    ca: Issued
    other_ca: Issued
    server: Issued
    alice: Issued  # bound to a key by subject
    dave: Issued  # bound to a key by fingerprint; that key may use other models only
    bob: Issued  # signed by the CA, bound to nothing
    eve: Issued  # alice's subject, signed by another CA
    carol: Issued  # bound by subject to a key revoked in a test
    gateway: RunningService
    mesh: Mesh
    keys: dict[str, policy_pb2.CreateApiKeyResponse]
    spans: InMemorySpanExporter

    @property
    def public(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def cert_port(self) -> str:
        return f"127.0.0.1:{self.gateway.extra_ports[CERT_PORT]}"


def tls_settings(cert: Path, key: Path, client_ca: Path | None = None, port: int = 0) -> GatewaySettings:
    return GatewaySettings(tls_cert=cert, tls_key=key, tls_client_ca=client_ca, tls_client_cert_port=port)


async def start_gateway(consul_agent: ConsulAgent, data_dir: Path, settings: GatewaySettings,
                        spans: InMemorySpanExporter | None = None, port: int = 0) -> RunningService:
    config = ServiceConfig(mtls=False, service="gateway", consul_addr=consul_agent.http_addr, data_dir=data_dir,
                           grace_s=0, port=port, settings=settings)
    return await start_service(config, build_gateway, extra_exporters=[spans] if spans else [])


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def door(consul_agent: ConsulAgent, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Door]:
    from services.policy.main import build as build_policy
    from services.registry.main import build as build_registry

    root = tmp_path_factory.mktemp("public-tls")
    pki = Pki(root / "pki")
    ca, other_ca = pki.ca("ca"), pki.ca("other-ca")
    certificates = {
        "server": pki.issue("server", ca, "/CN=gateway", server=True),
        "alice": pki.issue("alice", ca, "/O=acme/CN=alice"),
        "dave": pki.issue("dave", ca, "/O=acme/CN=dave"),
        "bob": pki.issue("bob", ca, "/O=acme/CN=bob"),
        "eve": pki.issue("eve", other_ca, "/O=acme/CN=alice"),
        "carol": pki.issue("carol", ca, "/O=acme/CN=carol"),
    }
    started: list[RunningService] = []
    mesh = Mesh(consul_agent.http_addr)
    try:
        for name, build in (("registry", build_registry), ("policy", build_policy)):
            config = ServiceConfig(mtls=False, service=name, consul_addr=consul_agent.http_addr,
                                   data_dir=root / name, grace_s=0)
            started.append(await start_service(config, build))
        registry, policy = started
        endpoint = await mesh.resolver("lmesh-registry").wait_for(lambda e: e.port == registry.port)
        await register(endpoint.stub(registry_pb2_grpc.RegistryStub), model_version(MODEL, "1", b"{}"), b"{}",
                       b"not really onnx")
        await mesh.resolver("lmesh-policy").wait_for(lambda e: e.port == policy.port)
        peer = mesh.peer(POLICY)
        keys = {
            "plain": await policy_client.create_key(peer, "tls"),
            "alice": await policy_client.create_key(peer, "acme", client_cert_subject="CN=alice, O=acme"),
            "dave": await policy_client.create_key(peer, "acme", ["other-*"],
                                                   client_cert_sha256=certificates["dave"].sha256.upper()),
            "carol": await policy_client.create_key(peer, "acme", client_cert_subject=certificates["carol"].subject),
        }
        spans = InMemorySpanExporter()
        server = certificates["server"]
        gateway = await start_gateway(consul_agent, root / "gateway", tls_settings(server.cert, server.key, ca.cert),
                                      spans)
        started.append(gateway)
        yield Door(pki, ca, other_ca, gateway=gateway, mesh=mesh, keys=keys, spans=spans, **certificates)
    finally:
        for running in reversed(started):
            await running.stop()
        await mesh.close()


@contextlib.asynccontextmanager
async def gateway(target: str, ca: Issued | None, client: Issued | None = None,
                  ) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    """The gateway at `target` as `lmesh chat` reaches it: TLS verified with `ca` (plaintext without), presenting
    `client`'s certificate when given."""
    cert, key = client.pair() if client else (None, None)
    tls = None if ca is None else GatewayTls(ca=ca.cert.read_bytes(), client_cert=cert, client_key=key)
    async with public_gateway(target, tls) as stub:
        yield stub


def bearer(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


async def models(stub: gateway_pb2_grpc.GatewayStub, key: str | None = None) -> list[str]:
    listed = await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=bearer(key), timeout=10)
    return [m.id for m in listed.models]


async def refused(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code(), caught.value.details() or ""


async def chat(stub: gateway_pb2_grpc.GatewayStub, key: str | None = None) -> tuple[grpc.StatusCode, str]:
    """How a chat with MODEL ends: past authorization, UNAVAILABLE for want of a tokenizer."""
    call = stub.Chat(metadata=bearer(key), timeout=10)
    await call.write(gateway_pb2.ChatRequest(start=gateway_pb2.ChatStart(
        model=MODEL, max_tokens=4, messages=[gateway_pb2.Message(role="user", content="hi")])))
    await call.done_writing()

    async def read() -> None:
        async for _ in call:
            pass

    return await refused(read())


AUTHORIZED = (grpc.StatusCode.UNAVAILABLE, "no passing instance of lmesh-tokenizer")


async def test_the_public_port_serves_tls_to_key_clients_and_refuses_plaintext(door: Door) -> None:
    async with gateway(door.public, door.ca) as stub:
        assert await models(stub, door.keys["plain"].api_key) == [f"{MODEL}:1"]
        assert await chat(stub, door.keys["plain"].api_key) == AUTHORIZED
        code, details = await refused(models(stub))
        assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("missing API key")
        code, _ = await chat(stub, "lmk_" + "A" * 43)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # The public port asks for no certificate: one offered is not looked at, the key decides.
    async with gateway(door.public, door.ca, door.alice) as stub:
        assert (await refused(models(stub)))[0] == grpc.StatusCode.UNAUTHENTICATED
    for ca in (None, door.other_ca):  # plaintext, or a client that does not trust the gateway's CA
        async with gateway(door.public, ca) as stub:
            code, _ = await refused(models(stub, door.keys["plain"].api_key))
            assert code == grpc.StatusCode.UNAVAILABLE


async def http_port(door: Door, gateway: RunningService | None = None) -> int:
    """The gateway's OpenAI-compatible HTTP port, as its Consul meta says."""
    port = (gateway or door.gateway).port
    _, nodes = await door.mesh.consul.health.service("lmesh-gateway", passing=True)
    return int(next(n for n in nodes if n["Service"]["Port"] == port)["Service"]["Meta"]["http_port"])


def https(port: int, ca: Issued) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(base_url=f"https://127.0.0.1:{port}", timeout=10,
                              verify=ssl.create_default_context(cafile=str(ca.cert)))


async def test_the_http_port_serves_the_openai_api_over_tls_too(door: Door) -> None:
    port = await http_port(door)
    key = {"authorization": f"Bearer {door.keys['plain'].api_key}"}
    async with https(port, door.ca) as client:
        listed = await client.get("/v1/models", headers=key)
        assert [m["id"] for m in listed.json()["data"]] == [f"{MODEL}:1"]
        chat = await client.post("/v1/chat/completions", headers=key, json={
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503 and "lmesh-tokenizer" in chat.json()["error"]["message"]  # authorized
        assert (await client.get("/v1/models")).status_code == 401
    with pytest.raises(httpx2.ConnectError):  # a client that does not trust the gateway's CA
        async with https(port, door.other_ca) as client:
            await client.get("/v1/models", headers=key)
    with pytest.raises(httpx2.TransportError):  # plaintext to a TLS port
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            await client.get("/v1/models", headers=key)


async def test_a_client_certificate_bound_to_a_key_authenticates_without_a_bearer_key(door: Door) -> None:
    async with gateway(door.cert_port, door.ca, door.alice) as stub:  # bound by subject
        assert await models(stub) == [f"{MODEL}:1"]
        assert await chat(stub) == AUTHORIZED
        # A bearer key, when sent, is the credential, as on the public port.
        assert await models(stub, door.keys["plain"].api_key) == [f"{MODEL}:1"]
        assert (await chat(stub, "lmk_" + "A" * 43))[0] == grpc.StatusCode.UNAUTHENTICATED
    async with gateway(door.cert_port, door.ca, door.dave) as stub:  # bound by fingerprint, to a narrower key
        assert await models(stub) == []
        code, details = await chat(stub)
        assert code == grpc.StatusCode.PERMISSION_DENIED and door.keys["dave"].key.key_id in details


async def test_a_certificate_bound_to_nothing_or_from_another_ca_or_none_is_refused(door: Door) -> None:
    async with gateway(door.cert_port, door.ca, door.bob) as stub:  # the right CA, bound to no key
        for code, details in (await refused(models(stub)), await chat(stub)):
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert details == "the client certificate is not bound to an active API key"
    # Alice's subject from a CA the gateway does not trust, or no certificate at all: refused at the handshake,
    # before any call (gRPC reports UNAVAILABLE: no connection could be made).
    for client in (door.eve, None):
        async with gateway(door.cert_port, door.ca, client) as stub:
            assert (await refused(models(stub, door.keys["plain"].api_key)))[0] == grpc.StatusCode.UNAVAILABLE


async def test_a_revoked_keys_certificate_is_refused(door: Door) -> None:
    async with gateway(door.cert_port, door.ca, door.carol) as stub:
        assert await models(stub) == [f"{MODEL}:1"]
        await policy_client.revoke_key(door.mesh.peer(POLICY), door.keys["carol"].key.key_id)
        for code, _ in (await refused(models(stub)), await chat(stub)):
            assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_consuls_check_passes_over_tls_and_the_instance_says_where_certificates_go(door: Door) -> None:
    _, nodes = await door.mesh.consul.health.service("lmesh-gateway", passing=True)
    node = next(n for n in nodes if n["Service"]["Port"] == door.gateway.port)
    assert node["Service"]["Meta"]["tls"] == "true"
    assert node["Service"]["Meta"][CERT_PORT] == str(door.gateway.extra_ports[CERT_PORT])
    check = next(c for c in node["Checks"] if c["ServiceID"] == node["Service"]["ID"])
    assert check["Status"] == "passing" and check["Type"] == "grpc", check


async def test_certificates_and_principals_stay_out_of_spans_and_logs(door: Door,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    door.spans.clear()
    async with gateway(door.cert_port, door.ca, door.alice) as stub:
        await models(stub)
        await chat(stub)
    spans = [s for s in door.spans.get_finished_spans() if s.name.startswith("lmesh.gateway/")]
    assert {s.attributes.get("lmesh.credential") for s in spans if s.attributes} == {"client_certificate"}
    pem_body = "".join(door.alice.cert.read_text().splitlines()[1:-1])
    texts = [str(dict(s.attributes or {})) for s in door.spans.get_finished_spans()]
    texts += [record.getMessage() for record in caplog.records]
    assert not any("BEGIN CERTIFICATE" in text or pem_body[:40] in text for text in texts)


async def test_rotated_files_are_served_to_new_connections_without_a_restart(
        door: Door, consul_agent: ConsulAgent, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "client-ca")}

    def put(name: str, source: Path) -> None:
        """Written beside, then renamed into place, as certificate tools do."""
        shutil.copyfile(source, tmp_path / "incoming")
        os.replace(tmp_path / "incoming", files[name])

    put("cert", door.server.cert)
    put("key", door.server.key)
    put("client-ca", door.ca.cert)
    rotating = await start_gateway(consul_agent, tmp_path / "gateway",
                                   tls_settings(files["cert"], files["key"], files["client-ca"]))
    public, cert_port = f"127.0.0.1:{rotating.port}", f"127.0.0.1:{rotating.extra_ports[CERT_PORT]}"
    key = door.keys["plain"].api_key
    other_server = door.pki.issue("server-2", door.other_ca, "/CN=gateway-2", server=True)

    async def works(target: str, ca: Issued, client: Issued | None = None) -> bool:
        async with gateway(target, ca, client) as stub:
            try:
                await models(stub, key)
                return True
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                return False

    async def eventually(target: str, ca: Issued, client: Issued | None = None) -> None:
        for _ in range(100):
            if await works(target, ca, client):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{target} never accepted the rotated files")

    http = await http_port(door, rotating)

    async def works_over_http(ca: Issued) -> bool:
        try:
            async with https(http, ca) as client:
                return (await client.get("/v1/models", headers={"authorization": f"Bearer {key}"})).status_code == 200
        except httpx2.ConnectError:
            return False

    try:
        assert await works(public, door.ca) and not await works(public, door.other_ca)
        assert await works_over_http(door.ca) and not await works_over_http(door.other_ca)
        assert await works(cert_port, door.ca, door.alice) and not await works(cert_port, door.ca, door.eve)
        put("cert", other_server.cert)
        put("key", other_server.key)
        await eventually(public, door.other_ca)
        assert not await works(public, door.ca)
        for _ in range(50):  # the HTTP port follows the same files (checked once a second)
            if await works_over_http(door.other_ca):
                break
            await asyncio.sleep(0.1)
        assert await works_over_http(door.other_ca) and not await works_over_http(door.ca)
        put("client-ca", door.other_ca.cert)
        await eventually(cert_port, door.other_ca, door.eve)
        assert not await works(cert_port, door.other_ca, door.alice)
        # A change that does not check out (a key that is not the certificate's) keeps the files in use.
        caplog.set_level(logging.INFO, logger="lmesh.gateway.tls")
        put("key", door.alice.key)
        await asyncio.sleep(1.5)
        assert await works(public, door.other_ca)
        assert any("keeping the TLS certificate in use" in r.getMessage() and "--tls-key" in r.getMessage()
                   for r in caplog.records)
    finally:
        await rotating.stop()


async def test_bad_tls_files_or_ports_stop_the_gateway_at_start(door: Door, consul_agent: ConsulAgent,
                                                               tmp_path: Path) -> None:
    server = door.server
    cases = [
        (tls_settings(server.cert, door.alice.key),
         f"--tls-key (LMESH_TLS_KEY): {door.alice.key} is not the private key of the certificate in {server.cert} "
         "(--tls-cert (LMESH_TLS_CERT))"),
        (tls_settings(server.key, server.key), f"--tls-cert (LMESH_TLS_CERT): {server.key} holds no PEM certificate"),
        (tls_settings(server.cert, server.key, server.key),
         f"--tls-client-ca (LMESH_TLS_CLIENT_CA): {server.key} holds no PEM CA certificate"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError) as caught:
            await start_gateway(consul_agent, tmp_path, settings)
        assert str(caught.value) == message
    with contextlib.closing(__import__("socket").socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    with pytest.raises(OSError) as failed:
        await start_gateway(consul_agent, tmp_path, tls_settings(server.cert, server.key, door.ca.cert, port=free),
                            port=free)
    assert str(failed.value) == f"--tls-client-cert-port (LMESH_TLS_CLIENT_CERT_PORT) must be another port than " \
                                f"--port ({free})"
    taken = door.gateway.extra_ports[CERT_PORT]
    with pytest.raises(OSError) as failed:
        await start_gateway(consul_agent, tmp_path, tls_settings(server.cert, server.key, door.ca.cert, port=taken))
    assert str(failed.value).startswith(f"could not listen on 127.0.0.1:{taken} (--tls-client-cert-port "
                                        "(LMESH_TLS_CLIENT_CERT_PORT)): the port is in use")
