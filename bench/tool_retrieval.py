"""How well the gateway picks a chat's tools: recall@1/3/5 and MRR of the gateway's own `ToolIndex` over a realistic
catalogue (the 15 tools lmesh-tools ships and 31 of a company's, bench/tool_catalog_extra.py) for 275 hand-labelled
requests (bench/tool_requests.py), and the latency of one ranking.

The production path, not a copy: a real Consul agent; every tool announced in Consul by the `lmesh-tool` contract
(services/tools/catalog.py); the list read back through the gateway's `ToolCatalog`; each request ranked by the
gateway's `ToolIndex` with embeddings from lmesh-embeddings found through Consul (all-minilm-l6-v2-tools, the
gateway's choice, and the untuned all-MiniLM-L6-v2 beside it, on ONNX Runtime; started in this process with
`start_service`, mTLS off: this measures retrieval, not the mesh's TLS). The tuned model never saw these tools or
requests (services/embeddings/retrieval_data.py).

The providers are description-only: Consul services tagged `lmesh-tool` whose meta carries the `tool_*` entries,
registered WITHOUT a health check, so Consul reports them passing with no server behind them (retrieval reads
descriptions only; calling one of these tools would fail). The shipped tools are registered the same way, from
`format_tool_meta(TOOLS)`.

Latency: one `rank()` call with the description vectors already cached, i.e. one Embed call over gRPC for the
request plus the scoring; the first ranking (which embeds the 46 descriptions) is a warm-up and not counted.

  python -m bench.tool_retrieval [--k 3] [--model-dir DIR] [--tools-model-dir DIR]
                                 [--json bench/results/tool_retrieval.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import consul.aio

from bench.stats import machine, percentile
from bench.tool_catalog_extra import EXTRA_TOOLS
from bench.tool_requests import REQUESTS
from services.common.config import ServiceConfig
from services.common.consul_agent import ConsulAgent
from services.common.discovery import Mesh, consul_client
from services.common.peers import EMBEDDINGS
from services.common.server import start_service
from services.embeddings.main import EmbeddingsSettings, build
from services.embeddings.manifest import MODEL_NAME, default_model_dir, default_tools_model_dir
from services.gateway.tool_catalog import Tool, ToolCatalog
from services.gateway.tool_retrieval import TOOLS_MODEL, ToolIndex, embeddings_of
from services.tools.catalog import TOOL_TAG, TOOLS, ToolEntry, format_tool_meta

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "tool_retrieval.json"
RECALL_AT = (1, 3, 5)


def providers(prefix: str = "") -> dict[str, tuple[ToolEntry, ...]]:
    """The catalogue as Consul services: lmesh-tools' own tools, and the company's by area (`acme.hr.v1...` is
    offered by `acme-hr`), as each team would run its own service (and Consul allows 64 meta keys per instance).
    `prefix` goes before every service name (tests sharing a Consul agent keep theirs apart)."""
    by_area: dict[str, list[ToolEntry]] = collections.defaultdict(list)
    for entry in EXTRA_TOOLS:
        by_area["acme-" + entry.method_path.split(".")[1]].append(entry)
    named = {"lmesh-tools": TOOLS, **{name: tuple(entries) for name, entries in sorted(by_area.items())}}
    return {prefix + name: entries for name, entries in named.items()}


def catalogue_names() -> set[str]:
    return {entry.name for entry in (*TOOLS, *EXTRA_TOOLS)}


async def register_description_providers(client: consul.aio.Consul,
                                         catalogue: Mapping[str, Sequence[ToolEntry]]) -> list[str]:
    """Registers each provider in Consul with its tools' meta and no check (passing at once); its service ids."""
    ids = []
    for port, (name, entries) in enumerate(sorted(catalogue.items()), start=20000):
        service_id = f"{name}-descriptions"
        await client.agent.service.register(name, service_id=service_id, address="127.0.0.1", port=port,
                                            tags=["lmesh", TOOL_TAG], meta=format_tool_meta(entries))
        ids.append(service_id)
    return ids


@dataclass(frozen=True)
class Ranked:
    request: str
    right: str
    ranking: list[str]  # every tool's name, best first
    latency_ms: float

    @property
    def position(self) -> int:
        """1 for the best; len(ranking) + 1 when the right tool was not listed at all."""
        return self.ranking.index(self.right) + 1 if self.right in self.ranking else len(self.ranking) + 1


async def rank_all(index: ToolIndex, tools: Mapping[str, Tool], requests: Sequence[tuple[str, str]]
                   ) -> list[Ranked]:
    """Every request ranked over every tool (the whole order, for MRR), one after another, each timed."""
    listed = list(tools.values())
    await index.rank("warm up: embeds and keeps the descriptions", listed, 1)
    ranked = []
    for request, right in requests:
        started = time.perf_counter()
        candidates = await index.rank(request, listed, len(listed))
        latency_ms = (time.perf_counter() - started) * 1000
        ranked.append(Ranked(request, right, [c.tool.name for c in candidates], latency_ms))
    return ranked


def report(ranked: Sequence[Ranked], k: int) -> dict[str, Any]:
    """Recall@1/3/5 and @k, MRR, latency, and the requests whose right tool was not first: the confusions."""
    n = len(ranked)
    recall = {f"recall@{at}": round(sum(r.position <= at for r in ranked) / n, 4)
              for at in sorted({*RECALL_AT, k})}
    misses: list[dict[str, Any]] = [
        {"request": r.request, "right": r.right, "chosen": r.ranking[0], "top3": r.ranking[:3],
         "right_at": r.position} for r in ranked if r.position > 1]
    confusions = collections.Counter(f"{m['right']} -> {m['chosen']}" for m in misses)
    per_tool = collections.Counter(m["right"] for m in misses if m["right_at"] > k)
    latencies = [r.latency_ms for r in ranked]
    return {
        "requests": n, "tools": len(ranked[0].ranking) if ranked else 0, "k": k, **recall,
        "mrr": round(sum(1 / r.position for r in ranked) / n, 4),
        "latency_ms": {"p50": round(percentile(latencies, 50), 2), "p95": round(percentile(latencies, 95), 2)},
        f"misses_outside_top{k}_by_tool": dict(per_tool.most_common()),
        "confusions_at_1": dict(confusions.most_common()),
        "misses": sorted(misses, key=lambda m: (-m["right_at"], m["right"])),
    }


@contextlib.asynccontextmanager
async def retrieval_mesh(consul_addr: str, model_dir: Path, data_dir: Path, prefix: str = "",
                         tools_model_dir: Path | None = None
                         ) -> AsyncIterator[tuple[ToolCatalog, dict[str, ToolIndex], consul.aio.Consul]]:
    """lmesh-embeddings in this process (the default model from `model_dir`, the tool-retrieval one from
    `tools_model_dir`), the catalogue registered in Consul, and the gateway's catalog and an index per model over
    them (the gateway's own ranking is `TOOLS_MODEL`'s); the registrations are removed on the way out."""
    settings = EmbeddingsSettings(model_dir=model_dir, tools_model_dir=tools_model_dir or default_tools_model_dir())
    config = ServiceConfig(service="embeddings", mtls=False, consul_addr=consul_addr, data_dir=data_dir, grace_s=0,
                           settings=settings)
    service = await start_service(config, build)
    mesh = Mesh(consul_addr)
    client = consul_client(consul_addr)
    ids: list[str] = []
    catalog = ToolCatalog(mesh)
    try:
        ids = await register_description_providers(client, providers(prefix))
        embeddings = mesh.peer(EMBEDDINGS)
        await embeddings.wait_for(timeout=120)
        yield catalog, {name: ToolIndex(embeddings_of(embeddings, model=name)) for name in (TOOLS_MODEL, MODEL_NAME)}, \
            client
    finally:
        await catalog.close()
        for service_id in ids:
            with contextlib.suppress(Exception):
                await client.agent.service.deregister(service_id)
        await client.close()
        await mesh.close()
        await service.stop()


async def wait_for_tools(catalog: ToolCatalog, names: set[str], timeout_s: float = 30.0) -> dict[str, Tool]:
    """The catalog's tools once it lists all of `names` (Consul's answers arrive in their own time)."""
    deadline = time.monotonic() + timeout_s
    while True:
        tools = await catalog.tools()
        if names <= tools.keys() or time.monotonic() > deadline:
            return tools
        await asyncio.sleep(0.1)


async def measure(model_dir: Path, tools_model_dir: Path, k: int, requests: Sequence[tuple[str, str]] = REQUESTS
                  ) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lmesh-bench-retrieval-") as scratch:
        work = Path(scratch)
        agent = await asyncio.to_thread(ConsulAgent.start, None, work / "consul.log")
        try:
            async with retrieval_mesh(agent.http_addr, model_dir, work / "embeddings",
                                      tools_model_dir=tools_model_dir) as (catalog, indexes, _):
                expected = catalogue_names()
                tools = await wait_for_tools(catalog, expected)
                missing = expected - tools.keys()
                if missing:
                    raise RuntimeError(f"the gateway's catalog does not list {sorted(missing)}")
                ranked = await rank_all(indexes[TOOLS_MODEL], tools, requests)
                untuned = report(await rank_all(indexes[MODEL_NAME], tools, requests), k)
        finally:
            await asyncio.to_thread(agent.stop)
    return {"machine": machine(), "model": TOOLS_MODEL, **report(ranked, k),
            "untuned": {"model": MODEL_NAME, **{key: value for key, value in untuned.items()
                                                if key.startswith("recall@") or key in ("mrr", "latency_ms")}}}


def summary(result: Mapping[str, Any]) -> str:
    k = result["k"]
    lines = [f"{result['requests']} requests over {result['tools']} tools: "
             + ", ".join(f"{key} {result[key]:.3f}" for key in result if key.startswith("recall@"))
             + f", MRR {result['mrr']:.3f}; one ranking p50 {result['latency_ms']['p50']:.1f} ms, "
               f"p95 {result['latency_ms']['p95']:.1f} ms",
             f"the same ranking with the untuned {result['untuned']['model']}: "
             + ", ".join(f"{key} {value:.3f}" for key, value in result["untuned"].items()
                         if key.startswith("recall@")) + f", MRR {result['untuned']['mrr']:.3f}",
             f"outside the top {k}:"]
    lines += [f"  {m['request']!r}: right {m['right']} at {m['right_at']}, chose {m['top3']}"
              for m in result["misses"] if m["right_at"] > k] or ["  none"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tool_retrieval", description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=3, help="the cut the target is set at (recall@k >= 0.95)")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: $LMESH_CACHE/models/all-minilm-l6-v2")
    parser.add_argument("--tools-model-dir", type=Path, default=None,
                        help="default: $LMESH_CACHE/models/all-minilm-l6-v2-tools")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the results are written")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.model_dir or default_model_dir(),
                                 args.tools_model_dir or default_tools_model_dir(), args.k))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(summary(result))
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
