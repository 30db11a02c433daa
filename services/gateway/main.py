"""lmesh-gateway wiring: the public API in front of policy, registry, tokenizer and inference."""

from __future__ import annotations

from services.common.server import ServiceParts, ServiceRuntime

# gRPC's usual 4 MiB for the public API: a chat request is text, and a model's whole context is far smaller
# (SmolLM2's 8192 tokens are at most 0.7 MB); the mesh's internal services keep 64 MiB for artifact uploads.
MAX_CHAT_REQUEST_BYTES = 4 * 1024 * 1024


def build(runtime: ServiceRuntime) -> ServiceParts:
    from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    from services.gateway.chat import ChatService
    from services.gateway.servicer import GatewayServicer

    servicer = GatewayServicer(ChatService(runtime.mesh, runtime.tracer))
    name = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
    return ServiceParts(servicers=[(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, name)],
                        max_request_bytes=MAX_CHAT_REQUEST_BYTES)
