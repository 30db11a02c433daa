"""The gateway's own rendering of chat prompts: only for versions whose tokenizer, loaded from the registry's
artifact, renders probe conversations to lmesh-tokenizer's ids; the service renders the rest."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lmesh.registry.v1 import registry_pb2

from services.common.errors import InvalidArgument, Unavailable
from services.gateway import render
from services.gateway.render import LOCAL_RENDER_MAX_CHARS, LocalRendering, rendered_locally
from services.tokenizer.text import ChatMessage, ModelTokenizer
from tests.test_detokenize import ServicerPeer
from tests.test_tokenizer import IM_END, SMOLLM2_TEMPLATE, train_small_tokenizer

OTHER_TEMPLATE = SMOLLM2_TEMPLATE.replace("You are a helpful AI assistant", "You are an AI assistant")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The small tokenizer's file, stored under its digest as the registry's artifact cache keeps it."""
    data = train_small_tokenizer().to_str().encode()
    digest = hashlib.sha256(data).hexdigest()
    directory = tmp_path_factory.mktemp("artifacts")
    (directory / digest).write_bytes(data)
    return directory, digest


def version_of(digest: str, template: str = SMOLLM2_TEMPLATE) -> registry_pb2.ModelVersion:
    return registry_pb2.ModelVersion(
        name="small", version="1", chat_template=template, eos_token_ids=[IM_END],
        artifacts=[registry_pb2.Artifact(kind=registry_pb2.ARTIFACT_KIND_TOKENIZER, sha256=digest)])


def service_tokenizer(artifact: tuple[Path, str], template: str = SMOLLM2_TEMPLATE) -> ModelTokenizer:
    directory, digest = artifact
    return ModelTokenizer.from_file(directory / digest, template, name="small:1", eos_token_ids=[IM_END])


class UnreachableRegistry:
    def __init__(self) -> None:
        self.calls = 0

    async def with_lease(self, use: Any) -> Any:
        self.calls += 1
        raise Unavailable("lmesh-registry is down")


async def settled(local: LocalRendering, version: registry_pb2.ModelVersion) -> ModelTokenizer | None:
    """Asks until the load that the first ask started has ended."""
    messages = [("user", "hi")]
    for _ in range(200):
        if (tokenizer := local.tokenizer(version, messages)) is not None:
            return tokenizer
        await asyncio.sleep(0.01)
    return None


async def test_a_version_is_rendered_here_once_its_probes_render_as_the_service_does(
        artifact: tuple[Path, str]) -> None:
    peer = ServicerPeer(service_tokenizer(artifact))
    local = LocalRendering(UnreachableRegistry(), peer, artifact[0])  # type: ignore[arg-type]
    version = version_of(artifact[1])
    assert local.tokenizer(version, [("user", "hi")]) is None  # the first chat goes to the service: the load starts
    tokenizer = await settled(local, version)
    assert tokenizer is not None
    assert peer.calls == ["ApplyChatTemplate"] * len(render.PROBES)
    assert local.tokenizer(version, [("user", "hi")]) is tokenizer and len(peer.calls) == len(render.PROBES)


async def test_a_version_the_service_renders_otherwise_stays_with_the_service(artifact: tuple[Path, str]) -> None:
    # The service holds another template for the same version (another lmesh, say): its ids win.
    peer = ServicerPeer(service_tokenizer(artifact, OTHER_TEMPLATE))
    local = LocalRendering(UnreachableRegistry(), peer, artifact[0])  # type: ignore[arg-type]
    assert await settled(local, version_of(artifact[1])) is None
    assert peer.calls == ["ApplyChatTemplate"]  # the first probe differed; not asked again
    await asyncio.sleep(0.05)
    assert peer.calls == ["ApplyChatTemplate"]


async def test_a_tokenizer_that_cannot_be_fetched_is_tried_again_only_after_a_while(
        tmp_path: Path, artifact: tuple[Path, str]) -> None:
    registry = UnreachableRegistry()
    peer = ServicerPeer(service_tokenizer(artifact))
    local = LocalRendering(registry, peer, tmp_path)  # type: ignore[arg-type]  # the artifact is not cached there
    version = version_of(artifact[1])
    assert await settled(local, version) is None
    assert registry.calls == 1 and peer.calls == []
    await asyncio.sleep(0.05)
    assert local.tokenizer(version, [("user", "hi")]) is None and registry.calls == 1  # not tried again so soon
    local._loads._retry_at.clear()  # RETRY_AFTER_S later
    (tmp_path / artifact[1]).write_bytes((artifact[0] / artifact[1]).read_bytes())  # the registry is back
    assert await settled(local, version) is not None


async def test_large_prompts_and_a_gateway_without_local_rendering_go_to_the_service(
        artifact: tuple[Path, str]) -> None:
    peer = ServicerPeer(service_tokenizer(artifact))
    local = LocalRendering(UnreachableRegistry(), peer, artifact[0])  # type: ignore[arg-type]
    version = version_of(artifact[1])
    assert await settled(local, version) is not None
    assert local.tokenizer(version, [("user", "x" * LOCAL_RENDER_MAX_CHARS)]) is not None
    assert local.tokenizer(version, [("system", "x"), ("user", "x" * LOCAL_RENDER_MAX_CHARS)]) is None
    off = LocalRendering(UnreachableRegistry(), peer, None)  # type: ignore[arg-type]
    assert not off.enabled and off.tokenizer(version, [("user", "hi")]) is None


MESSAGE = st.tuples(st.sampled_from(["system", "user", "assistant"]),
                    st.text(st.characters(codec="utf-8"), max_size=60)
                    | st.lists(st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "system\n", " ", "é",
                                                "\n", "hi"]), max_size=8).map("".join))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(MESSAGE, min_size=1, max_size=5), limit=st.sampled_from([0, 8, 64]))
def test_rendered_here_is_what_the_service_answers_ids_and_refusals_alike(
        artifact: tuple[Path, str], messages: list[tuple[str, str]], limit: int) -> None:
    peer = ServicerPeer(service_tokenizer(artifact))
    tokenizer = service_tokenizer(artifact)
    from lmesh.tokenizer.v1 import tokenizer_pb2

    request = tokenizer_pb2.ApplyChatTemplateRequest(
        model="small:1", add_generation_prompt=True, max_prompt_tokens=limit,
        messages=[tokenizer_pb2.ChatMessage(role=role, content=content) for role, content in messages])
    try:
        expected: list[int] | str = list(asyncio.run(peer.call(lambda s: s.ApplyChatTemplate, request)).token_ids)
    except InvalidArgument as exc:
        expected = str(exc)
    try:
        got: list[int] | str = rendered_locally(tokenizer, messages, limit)
    except InvalidArgument as exc:
        got = str(exc)
    assert got == expected
    if isinstance(got, list):  # the generation prompt is there: the model answers as the assistant
        text = tokenizer.decode(got)
        assert text.endswith("<|im_start|>assistant\n")
        assert tokenizer.render_chat([ChatMessage(r, c) for r, c in messages], True) == text
