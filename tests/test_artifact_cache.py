"""The local artifact cache: a cached file is hashed again before it is used, and one that rotted is fetched again."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.common.consul_agent import ConsulAgent
from services.common.errors import FailedPrecondition, NotFound
from services.registry import client
from tests.test_registry import Registry, data, files_under, sha


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def registry(consul_agent: ConsulAgent, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Registry]:
    service = Registry(consul_agent, tmp_path_factory.mktemp("registry"))
    await service.start()
    yield service
    await service.stop()
    await service.mesh.close()


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "emptied"])
async def test_a_corrupted_cached_artifact_is_fetched_again(registry: Registry, tmp_path: Path, damage: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    blob = data(300_000, seed=1900)
    await registry.upload(blob)
    cache = tmp_path / "cache"
    path = await client.fetch_to_cache(registry.peer, sha(blob), cache)
    rotten = {"flipped byte": blob[:1000] + bytes([blob[1000] ^ 1]) + blob[1001:], "truncated": blob[:-10],
              "emptied": b""}[damage]
    path.write_bytes(rotten)
    with caplog.at_level(logging.WARNING, logger="lmesh.registry.client"):
        again = await client.fetch_to_cache(registry.peer, sha(blob), cache)
    assert again == path and path.read_bytes() == blob
    assert files_under(cache) == [path]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"corrupted cached artifact {path}")
    assert "fetching it again" in warnings[0]


async def test_an_intact_cached_artifact_is_not_fetched_again(registry: Registry, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    blob = data(5000, seed=1901)
    await registry.upload(blob)
    path = await client.fetch_to_cache(registry.peer, sha(blob), tmp_path)
    registry.blobs.path(sha(blob)).unlink()  # gone from the registry: only the cache can answer now
    with caplog.at_level(logging.WARNING, logger="lmesh.registry.client"):
        assert await client.fetch_to_cache(registry.peer, sha(blob), tmp_path) == path
    assert path.read_bytes() == blob and caplog.records == []


async def test_a_corrupted_cached_artifact_the_registry_no_longer_has_is_removed_not_used(
        registry: Registry, tmp_path: Path) -> None:
    blob = data(5000, seed=1902)
    await registry.upload(blob)
    path = await client.fetch_to_cache(registry.peer, sha(blob), tmp_path)
    path.write_bytes(b"rotten" + blob[6:])
    registry.blobs.path(sha(blob)).unlink()
    with pytest.raises(NotFound):
        await client.fetch_to_cache(registry.peer, sha(blob), tmp_path)
    assert files_under(tmp_path) == []


async def test_a_corrupted_cached_artifact_the_registry_serves_corrupted_too_is_refused(
        registry: Registry, tmp_path: Path) -> None:
    blob = data(5000, seed=1903)
    await registry.upload(blob)
    path = await client.fetch_to_cache(registry.peer, sha(blob), tmp_path)
    path.write_bytes(b"rotten" + blob[6:])
    registry.blobs.path(sha(blob)).write_bytes(b"rotten" + blob[6:])
    with pytest.raises(FailedPrecondition, match="digest mismatch"):
        await client.fetch_to_cache(registry.peer, sha(blob), tmp_path)
    assert files_under(tmp_path) == []
