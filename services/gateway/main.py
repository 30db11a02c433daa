"""lmesh-gateway wiring: the public API in front of policy, registry, tokenizer and inference."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.config import (
    ON_OFF_TYPE,
    ORIGINS_TYPE,
    PORT_TYPE,
    READABLE_FILE_TYPE,
    ConfigError,
    float_type,
    int_type,
    setting,
    setting_names,
)
from services.common.server import ExtraPort, ServiceParts, ServiceRuntime
from services.gateway.admission import DEFAULT_MAX_CHATS, DEFAULT_STALLED_CLIENT_S
from services.gateway.credentials import DEFAULT_PRINCIPAL_TTL_S
from services.gateway.response_cache import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_MB,
    DEFAULT_REDIS_TIMEOUT_MS,
    DEFAULT_TTL_S,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter

    from services.gateway.response_cache import ResponseCache
    from services.gateway.tls import PublicTls

log = logging.getLogger("lmesh.gateway")
REDIS_URL_ENV = "LMESH_RESPONSE_CACHE_REDIS"

# gRPC's usual 4 MiB for the public API: a chat request is text, and a model's whole context is far smaller
# (SmolLM2's 8192 tokens are at most 0.7 MB); the mesh's internal services keep 64 MiB for artifact uploads.
MAX_CHAT_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class GatewaySettings:
    """What `lmesh serve gateway` takes beyond the common settings: the HTTP API's port, and TLS at the public door
    (both ports). Checked here
    (readable files; a certificate goes with its key; a client CA needs both); their contents are checked when the
    gateway starts (services/gateway/tls.py), and re-read when they change."""

    tls_cert: Path | None = setting(flag="--tls-cert", env="LMESH_TLS_CERT", default=None,
                                    parse=READABLE_FILE_TYPE, metavar="FILE",
                                    help="serve the public port with TLS, with this certificate chain (PEM; needs "
                                         "--tls-key; re-read when it changes)")
    tls_key: Path | None = setting(flag="--tls-key", env="LMESH_TLS_KEY", default=None, parse=READABLE_FILE_TYPE,
                                   metavar="FILE", help="the TLS certificate's private key (PEM, unencrypted)")
    tls_client_ca: Path | None = setting(
        flag="--tls-client-ca", env="LMESH_TLS_CLIENT_CA", default=None, parse=READABLE_FILE_TYPE, metavar="FILE",
        help="also serve a client-certificate port that requires a client certificate signed by this CA (PEM); a "
             "certificate bound to an API key authenticates as that key (needs --tls-cert)")
    tls_client_cert_port: int = setting(
        flag="--tls-client-cert-port", env="LMESH_TLS_CLIENT_CERT_PORT", default=0, parse=PORT_TYPE, metavar="PORT",
        default_help="0: a free one", help="the client-certificate port, 0-65535 (with --tls-client-ca; in Consul "
                                           "meta `client_cert_port`)")
    http_port: int = setting(
        flag="--http-port", env="LMESH_HTTP_PORT", default=0, parse=PORT_TYPE, metavar="PORT",
        default_help="0: a free one; `lmesh dev`: 8080",
        help="the port of the OpenAI-compatible HTTP API, 0-65535 (/v1/chat/completions, /v1/completions, /v1/models; "
             "Consul meta `http_port`; TLS with --tls-cert)")
    http_cors_origins: tuple[str, ...] = setting(
        flag="--http-cors-origins", env="LMESH_HTTP_CORS_ORIGINS", default=(), parse=ORIGINS_TYPE,
        metavar="ORIGINS", default_help="none",
        help="web origins whose pages may call the HTTP API from a browser (CORS), comma-separated, e.g. "
             "https://chat.example.com,http://localhost:3000, or * for any; other origins get no CORS headers")
    max_chats: int = setting(
        flag="--max-chats", env="LMESH_GATEWAY_MAX_CHATS", default=DEFAULT_MAX_CHATS, parse=int_type(1),
        help="chats in flight at once, gRPC and HTTP together (an HTTP request with n choices counts n), >= 1; "
             "beyond it RESOURCE_EXHAUSTED (HTTP 429) with a retry delay estimated from how fast chats end")
    stalled_client_s: float = setting(
        flag="--stalled-client-s", env="LMESH_GATEWAY_STALLED_CLIENT_S", default=DEFAULT_STALLED_CLIENT_S,
        parse=float_type(0.1), help="a streaming client that takes nothing of its stream this many seconds (it "
                                    "stopped reading) has the stream ended, >= 0.1")
    # The response cache (services/gateway/response_cache.py; README "Response cache").
    principal_ttl_s: float = setting(
        flag="--principal-ttl", env="LMESH_GATEWAY_PRINCIPAL_TTL_S", default=DEFAULT_PRINCIPAL_TTL_S,
        parse=float_type(0), help="seconds a credential that authenticated is remembered, sparing its next chats one "
                                  "call before rendering (policy's Reserve checks it again every time), >= 0; 0: off")
    overlap_admission: bool = setting(
        flag="--overlap-admission", env="LMESH_GATEWAY_OVERLAP_ADMISSION", default=True, parse=ON_OFF_TYPE,
        help="start the engine on a chat's prompt while policy's Reserve decides on it, for a credential whose last "
             "chat here was admitted (nothing is sent before the admission; a refusal cancels the prompt), on or off")
    local_render: bool = setting(
        flag="--local-render", env="LMESH_GATEWAY_LOCAL_RENDER", default=True, parse=ON_OFF_TYPE,
        help="render chat prompts of up to 8192 characters here, with the model version's own tokenizer once it "
             "renders probe conversations as lmesh-tokenizer does (larger ones, and the rest, go to lmesh-tokenizer), "
             "on or off")
    response_cache: bool = setting(
        flag="--response-cache", env="LMESH_RESPONSE_CACHE", default=True, parse=ON_OFF_TYPE,
        help="answer an identical deterministic request (greedy, or with a seed) of the same tenant from the "
             "response cache, on or off")
    response_cache_entries: int = setting(
        flag="--response-cache-entries", env="LMESH_RESPONSE_CACHE_ENTRIES", default=DEFAULT_MAX_ENTRIES,
        parse=int_type(1), help="most answers the response cache keeps in this gateway's memory")
    response_cache_mb: int = setting(
        flag="--response-cache-mb", env="LMESH_RESPONSE_CACHE_MB", default=DEFAULT_MAX_MB, parse=int_type(1),
        help="most MiB of answers the response cache keeps in this gateway's memory (one answer at most an eighth)")
    response_cache_ttl_s: float = setting(
        flag="--response-cache-ttl", env="LMESH_RESPONSE_CACHE_TTL_S", default=DEFAULT_TTL_S, parse=float_type(1),
        help="seconds a cached answer is kept (in memory and in Redis)")
    response_cache_redis: str | None = setting(
        env=REDIS_URL_ENV, secret=True, default=None,
        help="share the response cache with every gateway that names this Redis (redis://[:password@]host:port[/db], "
             "rediss:// for TLS); unset: each gateway's own memory only")
    response_cache_redis_prefix: str = setting(
        flag="--response-cache-redis-prefix", env="LMESH_RESPONSE_CACHE_REDIS_PREFIX", default="lmesh:",
        help="prefix of the response cache's Redis keys (one Redis may serve several meshes)")
    response_cache_redis_timeout_ms: int = setting(
        flag="--response-cache-redis-timeout-ms", env="LMESH_RESPONSE_CACHE_REDIS_TIMEOUT_MS",
        default=DEFAULT_REDIS_TIMEOUT_MS, parse=int_type(1),
        help="a Redis lookup or store slower than this is a miss (and Redis is skipped for a few seconds)")

    def __post_init__(self) -> None:
        def names(name: str) -> str:
            return setting_names(GatewaySettings, name)

        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            raise ConfigError(f"{names(given)} is set without {names(missing)}: a TLS certificate and its key go "
                              "together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(f"{names('tls_client_ca')} is set without {names('tls_cert')} and {names('tls_key')}: "
                              "client certificates are checked only on a TLS port")
        if self.tls_client_cert_port and self.tls_client_ca is None:
            raise ConfigError(f"{names('tls_client_cert_port')} is set without {names('tls_client_ca')}: the "
                              "client-certificate port is served only with a client CA")
        if self.http_port and self.http_port == self.tls_client_cert_port:
            raise ConfigError(f"{names('http_port')} must be another port than {names('tls_client_cert_port')} "
                              f"({self.http_port})")


SETTINGS = GatewaySettings


def build(runtime: ServiceRuntime) -> ServiceParts:
    from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    from services.gateway.chat import ChatService
    from services.gateway.http_server import HttpDoor, OpenAIApp
    from services.gateway.metrics import GatewayMetrics, meter_chats
    from services.gateway.servicer import GatewayServicer

    settings = runtime.config.settings_as(GatewaySettings)
    chat = ChatService(runtime.mesh, runtime.tracer, response_cache(settings, runtime.meter),
                       max_chats=settings.max_chats, stalled_client_s=settings.stalled_client_s,
                       principal_ttl_s=settings.principal_ttl_s, overlap_admission=settings.overlap_admission,
                       render_artifacts=runtime.config.data_dir / "artifacts" if settings.local_render else None)
    servicer = GatewayServicer(chat)
    metrics = GatewayMetrics(runtime.meter)
    metrics.observe_admission(chat.admission)
    meter_chats(servicer, metrics)
    tls = public_tls(settings)
    # The OpenAI-compatible HTTP API: the same ChatService and request path, in this process, on its own port.
    http = HttpDoor(OpenAIApp(chat, runtime.tracer, metrics, runtime.meter), runtime.config, settings.http_port,
                    setting_names(GatewaySettings, "http_port"), tls, cors_origins=settings.http_cors_origins)
    http.check()

    async def warm_up() -> None:
        await chat.guardrails.warm_up()  # rules followed from policy
        await http.start()

    async def on_stop() -> None:
        await http.stop()
        await chat.close()  # the settles of the last chats and the rules' stream, before the mesh closes

    name = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
    parts = ServiceParts(servicers=[(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, name)],
                         max_request_bytes=MAX_CHAT_REQUEST_BYTES, public=True, warm_up=warm_up, meta=http.meta,
                         on_drain=http.drain, on_stop=on_stop)
    if tls is None:
        return parts
    # gRPC's Python server can require a client certificate or not ask for one, not ask and accept either: so
    # API-key clients keep the public port (server-only TLS, which Consul's check can reach too), and clients
    # with a certificate connect to a port of their own that requires one.
    parts.public_credentials = tls.server_credentials()
    if tls.client_auth:
        parts.extra_ports = [ExtraPort("client_cert_port", settings.tls_client_cert_port,
                                       tls.server_credentials(client_auth=True),
                                       setting_names(GatewaySettings, "tls_client_cert_port"))]
    return parts


def response_cache(settings: GatewaySettings, meter: Meter) -> ResponseCache:
    """The response cache the settings describe: this gateway's memory, plus Redis when one is named."""
    from services.gateway.response_cache import CacheLimits, RedisStore, ResponseCache

    limits = CacheLimits(settings.response_cache_entries, settings.response_cache_mb << 20,
                         settings.response_cache_ttl_s)
    shared = None
    if settings.response_cache and settings.response_cache_redis:
        shared = RedisStore(settings.response_cache_redis, prefix=settings.response_cache_redis_prefix,
                            timeout_s=settings.response_cache_redis_timeout_ms / 1000, ttl_s=limits.ttl_s)
        log.info("response cache shared in Redis (prefix %r)", settings.response_cache_redis_prefix)
    return ResponseCache(limits, shared, enabled=settings.response_cache, meter=meter)


def public_tls(settings: GatewaySettings) -> PublicTls | None:
    """The public door's TLS files, checked (a bad one is a ConfigError naming its setting), or None."""
    from services.gateway.tls import PublicTls, TlsFilesError

    if settings.tls_cert is None or settings.tls_key is None:
        return None
    labels = {name: setting_names(GatewaySettings, f"tls_{name}") for name in ("cert", "key", "client_ca")}
    try:
        return PublicTls(settings.tls_cert, settings.tls_key, settings.tls_client_ca, labels=labels)
    except TlsFilesError as exc:
        raise ConfigError(str(exc)) from None
