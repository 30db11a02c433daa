"""A small Python client of the public gateway API, used by `lmesh chat` and `make run`."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from lmesh.common.v1 import generation_pb2
from lmesh.gateway.v1 import gateway_pb2

from services.common.admin import ADMIN_TOKEN_ENV
from services.common.config import READABLE_FILE_TYPE, EnvDefault, consul_addr, host_port, lmesh_home
from services.common.connect import MeshUnavailable
from services.common.consul_agent import consul_advice, probe_consul
from services.common.discovery import Mesh
from services.common.peers import GATEWAY, OPERATOR, GatewayTls, open_mesh, public_gateway

# The client side of TLS at the public door (`lmesh chat`'s --gateway-ca, --client-cert, --client-key).
GATEWAY_CA_ENV, CLIENT_CERT_ENV, CLIENT_KEY_ENV = "LMESH_GATEWAY_CA", "LMESH_CLIENT_CERT", "LMESH_CLIENT_KEY"


def reachable_consul() -> str:
    """CONSUL_HTTP_ADDR, once an agent with a leader answers there (OSError in one line otherwise)."""
    addr = consul_addr()
    probed = probe_consul(addr)
    if probed != "leader":
        raise OSError(f"no Consul agent answers at {addr} (CONSUL_HTTP_ADDR): {consul_advice(probed)}")
    return addr


def admin_token_file() -> Path:
    """Where `lmesh dev` keeps the admin token it generated (beside the development API key)."""
    return lmesh_home() / "admin-token"


def operator_admin_token(given: str | None = None) -> str | None:
    """The admin token an operator command sends: `given` (--admin-token), else LMESH_ADMIN_TOKEN, else the one
    `lmesh dev` saved in LMESH_HOME."""
    if given:
        return metadata_text(given, "the admin token (--admin-token)")
    if os.environ.get(ADMIN_TOKEN_ENV):
        return metadata_text(os.environ[ADMIN_TOKEN_ENV], f"the admin token ({ADMIN_TOKEN_ENV})")
    try:
        saved = admin_token_file().read_text().strip() or None
    except OSError:
        return None
    return metadata_text(saved, f"the admin token ({admin_token_file()})") if saved else None


def metadata_text(value: str, what: str) -> str:
    """`value` when gRPC metadata can carry it (printable ASCII, as in an HTTP/2 header); otherwise an OSError in one
    line naming `what`: gRPC would refuse to send the call, with an error no caller expects."""
    if all(" " <= char <= "~" for char in value):
        return value
    raise OSError(f"{what} holds a character gRPC metadata cannot carry (only printable ASCII can): pass the exact "
                  "token the services were given")


async def operator_mesh(admin_token: str | None = None) -> Mesh:
    """The mesh as an operator command sees it: the `lmesh-operator` identity when mTLS is on (LMESH_MTLS), admin
    calls carrying the operator's admin token; fails at once, in one line, when no Consul agent answers."""
    token = operator_admin_token(admin_token)  # a token that cannot be sent fails before anything is dialled
    addr = reachable_consul()
    try:
        return await open_mesh(addr, OPERATOR, admin_token=token)
    except MeshUnavailable as exc:
        raise OSError(str(exc)) from None


def env_file(name: str) -> Path | None:
    """The readable file an environment variable names, or None when it is unset (a ConfigError naming the
    variable when the file cannot be read)."""
    return READABLE_FILE_TYPE(EnvDefault(name, "")) if os.environ.get(name, "").strip() else None


def gateway_tls(ca: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None, *,
                tls: bool = False) -> GatewayTls | None:
    """How to reach the gateway over TLS, from files: the CA its certificate chains to (the system's roots
    without one) and a client certificate with its key; None (plaintext) when none is given and not `tls`."""
    if (client_cert is None) != (client_key is None):
        raise OSError("--client-cert (LMESH_CLIENT_CERT) and --client-key (LMESH_CLIENT_KEY) go together")
    if ca is None and client_cert is None and not tls:
        return None
    return GatewayTls(ca=ca.read_bytes() if ca else None, client_cert=client_cert.read_bytes() if client_cert else None,
                      client_key=client_key.read_bytes() if client_key else None)


async def find_gateway(explicit: str | None = None, tls: GatewayTls | None = None,
                       ) -> tuple[str, GatewayTls | None]:
    """The gateway to call and how: the explicit address or LMESH_GATEWAY_ADDR, dialled as told (TLS with
    `tls`); else a passing one from Consul, dialled over TLS when its meta says it serves TLS (the system's roots
    unless `tls` has a CA), and at its client-certificate port when `tls` has a client certificate."""
    address = explicit or os.environ.get("LMESH_GATEWAY_ADDR")
    if address:
        return address, tls
    if tls is None:
        wanted, none_match = None, ""
    elif tls.client_cert is None:
        wanted, none_match = (lambda e: e.meta.get("tls") == "true"), (
            "no passing lmesh-gateway serves TLS (they run without --tls-cert): leave out --gateway-ca and --tls")
    else:
        wanted, none_match = (lambda e: e.meta.get("client_cert_port", "").isdigit()), (
            "no passing lmesh-gateway takes client certificates (they run without --tls-client-ca)")
    mesh = Mesh(reachable_consul())  # reads Consul only: the gateway's port is public, no mesh identity needed
    try:
        endpoint = await mesh.peer(GATEWAY).resolver.pick(wanted, none_match=none_match)
    finally:
        await mesh.close()
    if endpoint.meta.get("tls") != "true":
        return endpoint.target, None
    tls = tls or GatewayTls()  # it serves TLS: verified with the system's roots
    if tls.client_cert is None:
        return endpoint.target, tls
    return host_port(endpoint.address, int(endpoint.meta["client_cert_port"])), tls


async def chat(gateway: str, api_key: str, start: gateway_pb2.ChatStart, timeout: float | None = 300, *,
               tls: GatewayTls | None = None) -> AsyncIterator[gateway_pb2.ChatResponse]:
    """One chat; `api_key` empty sends none (a client certificate in `tls` is the credential then)."""
    async with public_gateway(gateway, tls) as stub:
        call = stub.Chat(
            metadata=(("authorization", f"Bearer {api_key}"),) if api_key else (), timeout=timeout)
        await call.write(gateway_pb2.ChatRequest(start=start))
        await call.done_writing()
        async for response in call:
            yield response


def tool_step_line(step: gateway_pb2.ToolStep) -> str:
    """One step of a chat's tool plan, for a terminal: `→` a call sent, `←` its result, `✗` its failure."""
    head = f"  [{step.call}] {step.tool}"
    if step.state == gateway_pb2.ToolStep.STATE_STARTED:
        return f"→{head} {step.arguments_json}"
    if step.state == gateway_pb2.ToolStep.STATE_SUCCEEDED:
        return f"←{head} {step.latency_ms} ms: {step.result_json}"
    return f"✗{head} {step.latency_ms} ms: {step.error_code}: {step.error_message}"


def tool_use(spec: str) -> gateway_pb2.ToolUse | None:
    """`--tools`: `auto`, or tool names separated by commas; empty: none."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        return None
    return gateway_pb2.ToolUse(auto=True) if names == ["auto"] else gateway_pb2.ToolUse(names=names)


async def stream_chat_to_terminal(gateway: str, api_key: str, messages: list[tuple[str, str]], *,
                                  model: str = "", max_tokens: int = 256, temperature: float = 0.0,
                                  logprobs: int | None = None, sampling: Mapping[str, Any] | None = None,
                                  tls: GatewayTls | None = None, tools: gateway_pb2.ToolUse | None = None) -> str:
    """Prints the answer as it streams; returns it.

    With `logprobs` (the number of alternatives, 0 to 20) a table follows: one line per token, its logprob
    and the most likely alternatives. With `tools`, each step of the tool plan is shown on stderr as it happens
    (stdout holds the answer alone).
    """
    start = gateway_pb2.ChatStart(model=model, max_tokens=max_tokens, temperature=temperature,
                                  messages=[gateway_pb2.Message(role=r, content=c) for r, c in messages],
                                  logprobs=logprobs is not None, top_logprobs=logprobs or 0, tools=tools,
                                  **(sampling or {}))
    pieces: list[str] = []
    entries: list[generation_pb2.TokenLogprob] = []
    async for response in chat(gateway, api_key, start, tls=tls):
        if response.HasField("tool_step"):
            sys.stderr.write(tool_step_line(response.tool_step) + "\n")
            sys.stderr.flush()
        entries.extend(response.logprobs)
        if response.delta:
            pieces.append(response.delta)
            sys.stdout.write(response.delta)
            sys.stdout.flush()
        if response.finish_reason:
            usage = response.usage
            reason = generation_pb2.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()
            sys.stdout.write(f"\n[{response.model} · {reason} · {usage.prompt_tokens} prompt + "
                             f"{usage.completion_tokens} completion tokens]\n")
    for entry in entries:
        alternatives = "  ".join(f"{a.token!r} {a.logprob:.3f}" for a in entry.top_logprobs)
        sys.stdout.write(f"{entry.token!r:>20} {entry.logprob:8.3f}  {alternatives}".rstrip() + "\n")
    return "".join(pieces)


