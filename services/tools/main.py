"""Wiring of lmesh-tools: one process serving every tool family, tagged `lmesh-tool` in Consul with a `tool_<name>`
meta entry per tool (services/tools/catalog.py). Stateless apart from the directory, which it builds in memory
from a fixed seed at startup: no flags of its own, nothing under --data-dir."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.server import ServiceParts, ServiceRuntime


@dataclass(frozen=True)
class ToolsSettings:
    """lmesh-tools takes only the common settings."""


SETTINGS = ToolsSettings

# CountText and ChangeCase take up to 1 MiB of text; the request's framing fits in the second.
MAX_REQUEST_BYTES = 2 * 1024 * 1024


def build(runtime: ServiceRuntime) -> ServiceParts:
    # Imported here: the CLI imports every main.py to build its parser.
    from lmesh.tools.v1 import tools_pb2, tools_pb2_grpc

    from services.tools import servicer
    from services.tools.catalog import TOOL_TAG, TOOLS, tool_meta
    from services.tools.directory import DirectoryStore

    store = DirectoryStore()
    implementations: dict[str, tuple[Any, Any]] = {
        "Calculator": (tools_pb2_grpc.add_CalculatorServicer_to_server, servicer.CalculatorServicer()),
        "UnitConverter": (tools_pb2_grpc.add_UnitConverterServicer_to_server, servicer.UnitConverterServicer()),
        "Clock": (tools_pb2_grpc.add_ClockServicer_to_server, servicer.ClockServicer()),
        "Directory": (tools_pb2_grpc.add_DirectoryServicer_to_server, servicer.DirectoryServicer(store)),
        "Geo": (tools_pb2_grpc.add_GeoServicer_to_server, servicer.GeoServicer()),
        "Text": (tools_pb2_grpc.add_TextServicer_to_server, servicer.TextServicer()),
    }
    services = tools_pb2.DESCRIPTOR.services_by_name
    # Every announced tool must be a method this process serves (a typo in the catalog fails at startup).
    for tool in TOOLS:
        service = services.get(tool.service.rsplit(".", 1)[-1])
        if service is None or service.full_name != tool.service or tool.method not in service.methods_by_name:
            raise RuntimeError(f"catalog tool {tool.name} names {tool.method_path}, which lmesh-tools does not serve")

    async def on_stop() -> None:
        store.close()

    meta = tool_meta()
    return ServiceParts(
        servicers=[(add, impl, services[name].full_name) for name, (add, impl) in implementations.items()],
        meta=lambda: dict(meta),
        tags=(TOOL_TAG,),
        on_stop=on_stop,
        max_request_bytes=MAX_REQUEST_BYTES,
        extra={"directory": store},
    )
