"""lmesh-gateway wiring: the public API in front of policy, registry, tokenizer and inference."""

from __future__ import annotations

from services.common.server import ServiceParts, ServiceRuntime


def build(runtime: ServiceRuntime) -> ServiceParts:
    from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    from services.gateway.chat import ChatService
    from services.gateway.servicer import GatewayServicer

    servicer = GatewayServicer(ChatService(runtime.mesh, runtime.tracer))
    name = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
    return ServiceParts(servicers=[(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, name)])
