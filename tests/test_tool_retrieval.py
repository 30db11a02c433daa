"""Tool retrieval: the ranking's parts (views, lexical terms, BM25, the hybrid score), the index's caching, and the
benchmark's measurement on the real path (Consul, the gateway's ToolCatalog and ToolIndex, lmesh-embeddings)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import consul.aio
import grpc
import numpy as np
import pytest
import pytest_asyncio
from lmesh.embeddings.v1 import embeddings_pb2
from opentelemetry import trace

from bench.tool_retrieval import catalogue_names, providers, rank_all, report, retrieval_mesh, wait_for_tools
from services.common.consul_agent import ConsulAgent
from services.common.errors import Unavailable
from services.embeddings.finetune import current
from services.embeddings.manifest import ManifestError, default_model_dir, default_tools_model_dir, load_manifest
from services.gateway.mesh_tools import MeshTools, ToolRequest
from services.gateway.tool_catalog import Tool, ToolCatalog
from services.gateway.tool_retrieval import (
    LEXICAL_WEIGHT,
    TOOLS_MODEL,
    TOOLS_MODEL_RETRY_S,
    Bm25,
    ToolIndex,
    description_views,
    embeddings_of,
    hybrid_scores,
    lexical_terms,
    sentences_of,
)
from services.tools.catalog import TOOLS

# The target on the 275 requests (bench/tool_retrieval.py): the gateway's ranking with the tool-retrieval
# model reached 0.960 (the untuned model 0.913, its plain cosine 0.862). A change that loses recall fails here.
RECALL_AT_3_FLOOR = 0.95


def tool(name: str, description: str) -> Tool:
    return Tool(name, "p", f"x.v1.S/{name.title().replace('_', '')}", description)


# ------------------------------------------------------------------------------------------------ ranking parts


def test_views_are_the_whole_description_and_each_sentence() -> None:
    views = description_views(tool("send_email", "Send an email. Use it to write to someone; e.g. a colleague."))
    assert views == ["send email: Send an email. Use it to write to someone; e.g. a colleague.",
                     "send email: Send an email.", "send email: Use it to write to someone;",
                     "send email: e.g. a colleague."]
    assert description_views(tool("one", "A single sentence.")) == ["one: A single sentence."]
    assert sentences_of("Ends here, i.e. not. Then: this! And that?") == ["Ends here, i.e. not.", "Then:", "this!",
                                                                         "And that?"]


def test_lexical_terms_drop_stop_words_and_cut_suffixes() -> None:
    assert lexical_terms("What are my remaining Vacation DAYS?") == ["remain", "vacation", "day"]
    assert lexical_terms("emails emailed emailing email") == ["email"] * 4
    assert lexical_terms("is it 42 km") == ["42", "km"]  # short words keep their ending
    assert lexical_terms("") == []


def test_bm25_scores_rare_shared_words_above_common_ones() -> None:
    bm25 = Bm25(["check the invoice status", "check the ticket status", "check the order status"])
    scores = bm25.scores("status of invoice 42")
    assert scores[0] > scores[1] == scores[2] > 0  # "invoice" is in one document, "status" in all
    assert np.all(bm25.scores("weather tomorrow") == 0)
    assert Bm25([]).scores("anything").shape == (0,)


def test_hybrid_scores_add_the_relative_lexical_match_to_the_mean_cosine() -> None:
    whole, sentence = np.array([0.5, 0.6]), np.array([0.7, 0.6])
    scores = hybrid_scores(whole, sentence, np.array([4.0, 2.0]))
    np.testing.assert_allclose(scores, [0.6 + LEXICAL_WEIGHT, 0.6 + LEXICAL_WEIGHT / 2])
    np.testing.assert_allclose(hybrid_scores(whole, sentence, np.zeros(2)), [0.6, 0.6])  # no shared word


class CountingEmbed:
    """Bag-of-words vectors over a fixed vocabulary (deterministic, unit length), counting calls and texts."""

    VOCABULARY = ("invoice", "email", "weather", "rain", "send", "money", "bill")

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.model = "bag-of-words"

    async def __call__(self, texts: list[str]) -> tuple[str, np.ndarray]:
        self.calls.append(list(texts))
        rows = np.array([[text.lower().count(word) for word in self.VOCABULARY] + [0.1] for text in texts],
                        dtype=np.float32)
        return self.model, rows / np.linalg.norm(rows, axis=1, keepdims=True)


async def test_the_index_embeds_descriptions_once_and_a_request_once() -> None:
    tools = [tool("get_invoice", "Look up an invoice. The bill a customer owes."),
             tool("send_email", "Send an email to someone."),
             tool("weather_forecast", "Weather forecast: will it rain.")]
    embed = CountingEmbed()
    index = ToolIndex(embed)
    ranked = await index.rank("will it rain tomorrow", tools, 2)
    assert [c.tool.name for c in ranked] == ["weather_forecast", "get_invoice"]  # ties below by name
    assert ranked[0].score > ranked[1].score
    assert embed.calls[0] == ["will it rain tomorrow"]
    assert sorted(embed.calls[1]) == sorted({v for t in tools for v in description_views(t)})
    embed.calls.clear()
    ranked = await index.rank("email the bill", list(reversed(tools)), 3)
    assert embed.calls == [["email the bill"]]  # descriptions are kept, whatever the order they come in
    assert ranked[0].tool.name in {"send_email", "get_invoice"}
    assert await index.rank("x", tools, 0) == [] and await index.rank("x", [], 3) == []


async def test_descriptions_are_embedded_again_by_the_model_that_embeds_the_request() -> None:
    tools = [tool("get_invoice", "Look up an invoice."), tool("weather_forecast", "Will it rain.")]
    embed = CountingEmbed()
    index = ToolIndex(embed)
    await index.rank("rain", tools, 1)
    embed.model = "another"  # e.g. an instance without the tool-retrieval model answered
    embed.calls.clear()
    assert (await index.rank("rain", tools, 1))[0].tool.name == "weather_forecast"
    assert embed.calls[0] == ["rain"] and sorted(embed.calls[1]) == sorted(
        {v for t in tools for v in description_views(t)})


class FakeEmbeddingsPeer:
    """lmesh-embeddings as `embeddings_of` calls it: serves `models` (the first the default)."""

    def __init__(self, models: list[str]) -> None:
        self.models = models
        self.asked: list[str] = []

    async def call(self, method: object, request: Any, timeout: float) -> Any:
        self.asked.append(request.model)
        if request.model and request.model not in self.models:
            raise grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details=f"model '{request.model}' is not served here")
        served = request.model or self.models[0]
        return embeddings_pb2.EmbedResponse(model=served, embeddings=[
            embeddings_pb2.Embedding(index=i, values=[1.0, 0.0]) for i in range(len(request.inputs))])


async def test_tools_are_ranked_with_the_tool_retrieval_model_or_the_default_one_where_it_is_missing() -> None:
    peer = FakeEmbeddingsPeer(["all-minilm-l6-v2", TOOLS_MODEL])
    model, vectors = await embeddings_of(peer)(["a", "b"])  # type: ignore[arg-type]
    assert model == TOOLS_MODEL and vectors.shape == (2, 2) and peer.asked == [TOOLS_MODEL]

    now = [0.0]
    older = FakeEmbeddingsPeer(["all-minilm-l6-v2"])
    embed = embeddings_of(older, clock=lambda: now[0])  # type: ignore[arg-type]
    assert (await embed(["a"]))[0] == "all-minilm-l6-v2" and older.asked == [TOOLS_MODEL, ""]
    assert (await embed(["a"]))[0] == "all-minilm-l6-v2" and older.asked[2:] == [""]  # not asked again at once
    older.models.append(TOOLS_MODEL)  # the instance is upgraded
    now[0] += TOOLS_MODEL_RETRY_S
    assert (await embed(["a"]))[0] == TOOLS_MODEL


class FixedCatalog:
    def __init__(self, tools: list[Tool]) -> None:
        self._tools = {t.name: t for t in tools}

    async def tools(self) -> dict[str, Tool]:
        return dict(self._tools)


async def failing_embed(texts: list[str]) -> tuple[str, np.ndarray]:
    raise Unavailable("lmesh-embeddings is unavailable")


async def test_candidates_come_best_first_even_when_every_granted_tool_fits() -> None:
    """The model is shown the best match first (a small one leans to the first tool it is shown); with embeddings
    down, tools that all fit anyway keep their names' order, and a choice among more fails the chat."""
    tools = [tool("alpha_weather", "Weather forecast: will it rain."), tool("beta_invoice", "Look up an invoice.")]
    tracer = trace.get_tracer("test")
    ranked = await MeshTools(FixedCatalog(tools), ToolIndex(CountingEmbed()), tracer).candidates(  # type: ignore[arg-type]
        ToolRequest(auto=True), lambda name: True, "where is the invoice for that bill")
    assert [t.name for t in ranked] == ["beta_invoice", "alpha_weather"]
    blind = MeshTools(FixedCatalog(tools), ToolIndex(failing_embed), tracer)  # type: ignore[arg-type]
    unranked = await blind.candidates(ToolRequest(auto=True), lambda name: True, "the invoice")
    assert [t.name for t in unranked] == ["alpha_weather", "beta_invoice"]
    with pytest.raises(Unavailable):
        await blind.candidates(ToolRequest(auto=True, candidates=1), lambda name: True, "the invoice")
    only = await blind.candidates(ToolRequest(auto=True), lambda name: name == "alpha_weather", "the invoice")
    assert [t.name for t in only] == ["alpha_weather"]  # one granted tool: nothing to rank


async def test_a_changed_tool_set_gets_its_own_lexical_index() -> None:
    index = ToolIndex(CountingEmbed())
    first = [tool("alpha", "zebra crossing"), tool("beta", "lion den")]
    assert (await index.rank("zebra", first, 1))[0].tool.name == "alpha"
    second = [tool("gamma", "zebra stripes"), tool("beta", "lion den")]
    assert (await index.rank("zebra", second, 1))[0].tool.name == "gamma"


# ------------------------------------------------------------------------------------------------ the benchmark


@pytest.fixture(scope="module")
def embeddings_model_dir() -> Path:
    path = default_model_dir()
    try:
        load_manifest(path)
        current(default_tools_model_dir())
    except ManifestError as exc:
        pytest.skip(f"no embeddings model build (`make embeddings-model`): {exc}")
    return path


@dataclass
class RetrievalMesh:
    catalog: ToolCatalog
    index: ToolIndex
    client: consul.aio.Consul
    prefix: str


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def retrieval(consul_agent: ConsulAgent, embeddings_model_dir: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RetrievalMesh]:
    prefix = f"retrieval-{uuid.uuid4().hex[:6]}-"
    async with retrieval_mesh(consul_agent.http_addr, embeddings_model_dir, tmp_path_factory.mktemp("embeddings"),
                              prefix) as (catalog, indexes, client):
        yield RetrievalMesh(catalog, indexes[TOOLS_MODEL], client, prefix)


async def ours(retrieval: RetrievalMesh) -> dict[str, Tool]:
    """The catalogue's tools as the gateway lists them (other tests' providers may share the agent)."""
    tools = await wait_for_tools(retrieval.catalog, catalogue_names())
    assert catalogue_names() <= tools.keys()
    return {name: t for name, t in tools.items() if name in catalogue_names()}


async def test_recall_at_3_on_the_labelled_requests(retrieval: RetrievalMesh) -> None:
    started = time.monotonic()
    tools = await ours(retrieval)
    assert len(tools) == 46
    result = report(await rank_all(retrieval.index, tools, _requests()), 3)
    print(f"recall@1 {result['recall@1']} recall@3 {result['recall@3']} recall@5 {result['recall@5']} "
          f"MRR {result['mrr']} p50 {result['latency_ms']['p50']} ms in {time.monotonic() - started:.1f} s")
    assert result["requests"] >= 200
    assert result["recall@3"] >= RECALL_AT_3_FLOOR, result["misses"]
    assert result["recall@1"] <= result["recall@3"] <= result["recall@5"]


def _requests() -> tuple[tuple[str, str], ...]:
    from bench.tool_requests import REQUESTS

    return REQUESTS


async def test_a_deregistered_tool_is_no_longer_returned(retrieval: RetrievalMesh) -> None:
    tools = await ours(retrieval)
    request = "will it rain in Paris tomorrow"
    assert (await retrieval.index.rank(request, list(tools.values()), 3))[0].tool.name == "weather_forecast"
    provider = retrieval.prefix + "acme-weather"
    assert tools["weather_forecast"].provider == provider
    await retrieval.client.agent.service.deregister(f"{provider}-descriptions")
    for _ in range(150):  # Consul's answer arrives within a blocking query's round trip
        listed = await retrieval.catalog.tools()
        if "weather_forecast" not in listed:
            break
        await asyncio.sleep(0.1)
    assert "weather_forecast" not in listed
    remaining = [t for name, t in listed.items() if name in catalogue_names()]
    assert len(remaining) == 45
    ranked = await retrieval.index.rank(request, remaining, len(remaining))
    assert "weather_forecast" not in [c.tool.name for c in ranked]


def test_the_shipped_tools_are_part_of_the_catalogue() -> None:
    assert {t.name for t in TOOLS} <= catalogue_names()
    assert sum(len(entries) for entries in providers().values()) == len(catalogue_names()) == 46
