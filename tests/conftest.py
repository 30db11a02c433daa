"""Shared fixtures: a real Consul agent on free ports, and in-process services on port 0."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # pytest 9 keeps a node's id here; pytest 8 in `_nodeid`
    from _pytest.nodes import coerce_node_id
except ImportError:  # pragma: no cover
    coerce_node_id = None

from services.common.config import lmesh_cache
from services.common.consul_agent import ConsulAgent
from tests.prometheus_server import prometheus_binary as find_prometheus
from tests.redis_server import RedisServer, redis_binary

ROOT = Path(__file__).resolve().parent.parent


def model_dir() -> Path:
    return Path(os.environ.get("LMESH_MODEL_DIR", lmesh_cache() / "models" / "smollm2-135m-instruct"))


@pytest.fixture(scope="session", autouse=True)
def one_onnx_runtime_thread_per_session_under_workers(worker_id: str) -> None:
    """Under `make test` two workers share two cores, each running engines and meshes of its own: with a thread per
    core, each ONNX Runtime session's idle threads spin against the other sessions' work. `LMESH_ORT_THREADS` set by
    the caller wins; a single process keeps the default."""
    if worker_id != "master":
        os.environ.setdefault("LMESH_ORT_THREADS", "1")


@pytest.fixture(scope="session")
def consul_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    """One real Consul dev agent for the whole session, reached through CONSUL_HTTP_ADDR."""
    log = tmp_path_factory.mktemp("consul") / "consul.log"
    agent = ConsulAgent.start(log_path=log)
    previous = os.environ.get("CONSUL_HTTP_ADDR")
    os.environ["CONSUL_HTTP_ADDR"] = agent.http_addr
    yield agent
    agent.stop()
    if previous is None:
        os.environ.pop("CONSUL_HTTP_ADDR", None)
    else:
        os.environ["CONSUL_HTTP_ADDR"] = previous


@pytest.fixture(scope="session")
def built_model() -> Path:
    """The cached real model build (`make model`); tests that need it skip only when it is absent."""
    path = model_dir()
    if not (path / "lmesh_model.json").exists():
        pytest.skip(f"no model build at {path}: run `make model`")
    return path


@pytest.fixture(scope="session")
def tiny_model(built_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer decoder with random weights in the real graph layout, beside the real tokenizer
    (tests/tiny_model.py): for tests of what holds whatever the weights, which do not need what the real model
    says."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(built_model, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def prometheus_binary() -> Path:
    """A real Prometheus (skipped only when no binary can be had here: deploy/scripts/install_prometheus.sh)."""
    binary = find_prometheus()
    if binary is None:
        pytest.skip("no prometheus here and deploy/scripts/install_prometheus.sh could not fetch one")
    return binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session, on a free port (skipped only when no binary can be had here)."""
    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis-server here and deploy/scripts/install_redis.sh could not fetch one")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis") / "redis.log").start()
    yield server
    server.stop()


# The modules that take longest on 2 cores, longest first (`make test PYTEST_ARGS=--durations=0` measures them).
# `make test` hands whole modules to its workers in collection order (`--dist loadfile --no-loadscope-reorder`):
# starting with these leaves the short modules to even out the workers' ends, instead of a mesh-starting module
# beginning on one worker while the other has nothing left.
SLOWEST_MODULES = (
    "test_e2e", "test_engine", "test_mesh_tools_e2e", "test_constrained", "test_accounting_e2e", "test_chaos",
    "test_openai_e2e", "test_multihost", "test_soak", "test_hostile", "test_route", "test_connect",
    "test_response_cache_mesh", "test_retrieval_finetune", "test_server", "test_tokenizer", "test_policy_hostile",
    "test_openai_http", "test_model_build", "test_public_tls", "test_kubernetes", "test_embeddings",
)


def module_rank(item: pytest.Item) -> int:
    name = item.path.stem
    return SLOWEST_MODULES.index(name) if name in SLOWEST_MODULES else len(SLOWEST_MODULES)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Runs the slowest modules first (a stable sort: each module's own order is kept), and gives each operation of
    a schemathesis-parametrized test its own node id (`test[POST /v1/...]`): under pytest 9 they all get the
    function's, and pytest-xdist, which sends tests to workers by node id, would run one operation of the five."""
    items.sort(key=module_rank)
    for item in items:
        label = getattr(item, "operation_label", None)
        if label and label not in item.nodeid:
            nodeid = f"{item.nodeid}[{label}]"
            if coerce_node_id is not None:
                item._id = coerce_node_id(nodeid)
            else:  # pragma: no cover
                item._nodeid = nodeid
