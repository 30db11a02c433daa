"""lmesh-gateway wiring: the public API in front of policy, registry, tokenizer and inference."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from services.common.config import READABLE_FILE_TYPE, ConfigError, setting, setting_names
from services.common.server import ServiceParts, ServiceRuntime

log = logging.getLogger("lmesh.gateway")

# gRPC's usual 4 MiB for the public API: a chat request is text, and a model's whole context is far smaller
# (SmolLM2's 8192 tokens are at most 0.7 MB); the mesh's internal services keep 64 MiB for artifact uploads.
MAX_CHAT_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class GatewaySettings:
    """What `lmesh serve gateway` takes beyond the common settings. The TLS files are declared and checked here
    (readable files; a certificate goes with its key) but not yet served."""

    tls_cert: Path | None = setting(flag="--tls-cert", env="LMESH_TLS_CERT", default=None,
                                    parse=READABLE_FILE_TYPE, metavar="FILE",
                                    help="serve the public port with TLS, with this certificate chain (PEM; needs "
                                         "--tls-key)")
    tls_key: Path | None = setting(flag="--tls-key", env="LMESH_TLS_KEY", default=None, parse=READABLE_FILE_TYPE,
                                   metavar="FILE", help="the TLS certificate's private key (PEM)")
    tls_client_ca: Path | None = setting(flag="--tls-client-ca", env="LMESH_TLS_CLIENT_CA", default=None,
                                         parse=READABLE_FILE_TYPE, metavar="FILE",
                                         help="accept client certificates signed by this CA (PEM; needs --tls-cert)")

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


SETTINGS = GatewaySettings


def build(runtime: ServiceRuntime) -> ServiceParts:
    from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    from services.gateway.chat import ChatService
    from services.gateway.servicer import GatewayServicer

    settings = runtime.config.settings_as(GatewaySettings)
    if settings.tls_cert is not None:  # never let an operator believe the port is encrypted when it is not
        log.warning("%s is set, but TLS is not served yet: the public port is plaintext",
                    setting_names(GatewaySettings, "tls_cert"))
    servicer = GatewayServicer(ChatService(runtime.mesh, runtime.tracer))
    name = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
    return ServiceParts(servicers=[(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, name)],
                        max_request_bytes=MAX_CHAT_REQUEST_BYTES, public=True)
