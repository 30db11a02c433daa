"""The mesh's tools, as Consul lists them: every passing instance of a service tagged `lmesh-tool` offers the tools
its meta describes (`tool_<name>` = `<package.Service>/<Method> <description>`, services/tools/catalog.py), and
calling one goes through the same peer runtime as every other hop (mesh identity, load counting, the caller's
deadline and trace).

A tool disappears as soon as no passing instance describes it (deregistered, or failing its check); a new one
is there once Consul lists it passing. Schemas are read through server reflection once per provider and method.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message
from opentelemetry import trace

from services.common.discovery import Mesh
from services.common.errors import InvalidArgument, LmeshError
from services.common.follow import cancel_task
from services.common.peers import Peer, refused_hop, tool_provider
from services.gateway.tool_schema import ToolMethod, describe_method
from services.tools.catalog import TOOL_TAG, parse_tool_meta

log = logging.getLogger("lmesh.gateway.tools")
CATALOG_WAIT_S = 10
DEFAULT_CALL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Tool:
    name: str
    provider: str  # the Consul service that offers it
    method_path: str  # `package.Service/Method`
    description: str


@dataclass(frozen=True)
class ToolFailure:
    """Why a call gave no result: a status code's name and the tool's (or the gateway's) message."""

    code: str
    message: str


def tools_of(meta_by_provider: Mapping[str, list[Mapping[str, str]]]) -> dict[str, Tool]:
    """The tools the instances' meta describe, by name. A name two providers give different methods is kept for
    the provider that sorts first (and logged): a tool's name must mean one thing mesh-wide."""
    tools: dict[str, Tool] = {}
    for provider in sorted(meta_by_provider):
        for meta in meta_by_provider[provider]:
            for entry in parse_tool_meta(meta):
                tool = Tool(entry.name, provider, entry.method_path, entry.description)
                held = tools.get(entry.name)
                if held is None:
                    tools[entry.name] = tool
                elif (held.provider, held.method_path) != (provider, entry.method_path):
                    log.warning("tool %s is offered by %s (%s) and by %s (%s); using the first", entry.name,
                                held.provider, held.method_path, provider, entry.method_path)
    return tools


class ToolCatalog:
    """The tools passing in Consul now, their schemas, and calls to them."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self._providers: dict[str, Peer[grpc.aio.Channel]] = {}
        self._methods: dict[tuple[str, str], ToolMethod] = {}
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="tool-catalog")

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_task(task)

    async def _watch(self) -> None:
        """Blocking queries on Consul's service list: a provider is followed from the moment it carries the tag."""
        index: str | None = None
        backoff = 0.2
        while True:
            try:
                async with asyncio.timeout(CATALOG_WAIT_S * 17 / 16 + 5):
                    index, services = await self._mesh.consul.catalog.services(index=index,
                                                                               wait=f"{CATALOG_WAIT_S}s")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("Consul's service list failed (%s); retrying in %.1fs", exc, backoff)
                index = None
                await asyncio.sleep(backoff)  # back off a failing Consul
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            for name, tags in services.items():
                if TOOL_TAG in (tags or []) and name not in self._providers:
                    self._providers[name] = self._mesh.peer(tool_provider(name))
            # A provider's first instances: its resolver's first answer, so `tools()` right after sees them.
            await asyncio.gather(*(peer.passing() for peer in self._providers.values()), return_exceptions=True)
            self._loaded.set()

    async def tools(self, first_load_timeout: float = 5.0) -> dict[str, Tool]:
        """The tools with a passing instance now, by name."""
        self.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._loaded.wait(), first_load_timeout)
        return tools_of({name: [e.meta for e in peer.endpoints() if not e.unconfirmed_until]
                         for name, peer in self._providers.items()})

    async def method(self, tool: Tool, timeout: float = 5.0) -> ToolMethod:
        """The tool's method, described by its provider's reflection (once per provider and method)."""
        key = (tool.provider, tool.method_path)
        described = self._methods.get(key)
        if described is None:
            peer = self._providers[tool.provider]
            described = await peer.with_lease(
                lambda lease: describe_method(lease.stub, tool.method_path, timeout,
                                              lease.options(timeout)["metadata"]), attempts=2)
            self._methods[key] = described
        return described

    async def call(self, tool: Tool, arguments: dict[str, Any], timeout: float = DEFAULT_CALL_TIMEOUT_S,
                   ) -> dict[str, Any] | ToolFailure:
        """Calls `tool` with JSON `arguments`: its result as JSON, or why there is none (never raises for the
        tool's own failure: the model is told and answers from it). A call is not repeated on another instance:
        a tool's method need not be safe to repeat."""
        started = time.monotonic()
        try:
            method = await self.method(tool, timeout)
            request = method.request_from_json(arguments)
            left = max(0.05, timeout - (time.monotonic() - started))
            peer = self._providers[tool.provider]
            call = None

            async def invoke(lease: Any) -> message.Message:
                nonlocal call
                call = lease.stub.unary_unary(method.path, request_serializer=type(request).SerializeToString,
                                              response_deserializer=method.response_class.FromString)
                return await call(request, **lease.options(left))

            result = await peer.with_lease(invoke, attempts=1)
            return method.result_to_json(result)
        except InvalidArgument as exc:
            return ToolFailure("INVALID_ARGUMENT", exc.message)
        except LmeshError as exc:
            return ToolFailure(exc.code.name, exc.message)
        except grpc.aio.AioRpcError as exc:
            refused = refused_hop(exc, tool.provider)
            if refused is not None:
                return ToolFailure("UNAVAILABLE", refused.message)
            return ToolFailure(exc.code().name, exc.details() or exc.code().name)
        except TimeoutError:
            return ToolFailure("DEADLINE_EXCEEDED", f"no answer within {timeout:g} s")
        finally:
            trace.get_current_span().set_attribute("lmesh.tool.provider", tool.provider)
