"""The OpenAI-compatible HTTP API end to end: a real Consul agent, the five services as separate processes, the
real model, and the official `openai` SDK (and raw HTTP) at the gateway's `http_port`.

Shows what the front door promises: models, chat (whole and streamed, with usage), completions, logprobs, the
errors (401, 404, 429 with Retry-After), one request path with gRPC (the same greedy answer either way), a client
that disconnects stopping the engine within one decode step, hostile bodies (schemathesis against the served
/openapi.json) answered 4xx in OpenAI's shape and never 5xx, and the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from lmesh.gateway.v1 import gateway_pb2
from lmesh.policy.v1 import policy_pb2

from services.common.discovery import Endpoint
from services.common.peers import POLICY
from services.policy.client import create_key
from tests.test_e2e import FRANCE, INT8, LONG_TASK, LiveMesh, collect, live, run_dev_cli, start

__all__ = ["live"]  # the module's own mesh (pytest finds the fixture by its name here)
USER = [{"role": "user", "content": FRANCE}]
MODEL = "smollm2-135m-instruct:1"


def plaintext(endpoint: Endpoint) -> bool:
    return endpoint.meta.get("tls") != "true" and "http_port" in endpoint.meta


async def http_base(live: LiveMesh, exclude: frozenset[str] = frozenset()) -> str:
    endpoint = await live.mesh.resolver("lmesh-gateway").pick(
        lambda e: plaintext(e) and e.service_id not in exclude)
    return f"http://{endpoint.address}:{endpoint.meta['http_port']}"


async def sdk(live: LiveMesh, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{await http_base(live)}/v1", api_key=key or live.api_key, max_retries=0,
                              timeout=120)


async def data_events(response: httpx2.Response) -> AsyncIterator[str]:
    """The `data:` payloads of a Server-Sent Events response, as they come."""
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


async def test_the_gateway_advertises_its_http_api_in_consul(live: LiveMesh) -> None:
    _, nodes = await live.mesh.consul.health.service("lmesh-gateway", passing=True)
    meta = nodes[0]["Service"]["Meta"]
    assert meta["http_port"].isdigit() and meta["http_port"] != str(nodes[0]["Service"]["Port"])
    async with httpx2.AsyncClient(base_url=await http_base(live), timeout=10) as client:
        document = (await client.get("/openapi.json")).json()
    assert set(document["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
                                      "/v1/models/{model}",
                                      "/openapi.json", "/health"}


async def test_the_sdk_lists_chats_streams_and_completes_with_the_answer_grpc_gives(live: LiveMesh) -> None:
    client = await sdk(live)
    assert MODEL in [m.id for m in (await client.models.list()).data]
    assert (await client.models.retrieve("default")).id == MODEL
    # One request path: the greedy answer over gRPC, over HTTP whole and streamed, and as a completion.
    grpc_answer = await collect(await live.gateway(), start(max_tokens=64), live.api_key)
    expected = "".join(r.delta for r in grpc_answer)
    assert "Paris" in expected
    whole = await client.chat.completions.create(model="default", messages=USER, temperature=0,  # type: ignore[arg-type]
                                                 max_tokens=64)
    assert whole.model == MODEL and whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "stop"
    usage = grpc_answer[-1].usage
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    chunks = [c async for c in await client.chat.completions.create(  # type: ignore[call-overload]
        model="default", messages=USER, temperature=0, max_completion_tokens=64, stream=True,
        stream_options={"include_usage": True})]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details is not None  # cached_tokens: the prefix the engine reused
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    completion = await client.completions.create(model="default", prompt=FRANCE, temperature=0, max_tokens=64)
    assert completion.choices[0].text == expected  # a prompt is one user turn
    # Several prompts in one request: each answered as alone, each prompt counted once in the usage.
    other = await client.completions.create(model="default", prompt="Say hello.", temperature=0, max_tokens=64)
    both = await client.completions.create(model="default", prompt=[FRANCE, "Say hello."], temperature=0,
                                           max_tokens=64, n=2)
    assert [c.text for c in both.choices] == [expected, expected, other.choices[0].text, other.choices[0].text]
    assert both.usage is not None and completion.usage is not None and other.usage is not None
    assert both.usage.prompt_tokens == completion.usage.prompt_tokens + other.usage.prompt_tokens
    assert both.usage.completion_tokens == 2 * (completion.usage.completion_tokens + other.usage.completion_tokens)


async def test_the_sdk_gets_each_tokens_logprob_and_alternatives(live: LiveMesh) -> None:
    client = await sdk(live)
    answer = await client.chat.completions.create(model="default", messages=USER, temperature=0,  # type: ignore[arg-type]
                                                  max_tokens=12, logprobs=True, top_logprobs=3)
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None and answer.usage is not None
    entries = choice.logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    assert b"".join(bytes(e.bytes or []) for e in entries).decode() == choice.message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        alternatives = [a.logprob for a in entry.top_logprobs]
        assert alternatives == sorted(alternatives, reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy: the most likely one was chosen
    legacy = await client.completions.create(model="default", prompt=FRANCE, temperature=0, max_tokens=12,
                                             logprobs=2)
    assert legacy.choices[0].logprobs is not None
    assert legacy.choices[0].logprobs.tokens == [e.token for e in entries]


async def test_errors_through_the_mesh_are_openais(live: LiveMesh) -> None:
    client = await sdk(live)
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        await (await sdk(live, "lmk_" + "A" * 43)).chat.completions.create(model="nope", messages=USER)  # type: ignore[arg-type]
    assert unauthenticated.value.code == "invalid_api_key"  # the key first: no probing for models
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="nope", messages=USER)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.chat.completions.create(model="default", messages=[  # type: ignore[arg-type]
            {"role": "user", "content": "lorem ipsum " * 9000}], max_tokens=4)
    assert too_long.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as wrong_type:
        await client.chat.completions.create(model="default", messages=USER, temperature="hot")  # type: ignore[arg-type]
    assert wrong_type.value.body["param"] == "temperature"  # type: ignore[index]


async def test_a_keys_rate_limits_come_back_as_openais_headers(live: LiveMesh) -> None:
    created = await create_key(live.mesh.peer(POLICY), "rates-http",
                               limits=policy_pb2.Limits(requests_per_minute=50, tokens_per_minute=100_000))
    client = await sdk(live, created.api_key)
    seen = []
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(model="default", messages=USER,  # type: ignore[arg-type]
                                                                     max_tokens=4, temperature=0)
        seen.append({name: raw.headers[f"x-ratelimit-{name}"] for name in (
            "limit-requests", "remaining-requests", "reset-requests", "limit-tokens", "remaining-tokens")})
    assert [s["remaining-requests"] for s in seen] == ["49", "48"]
    assert all(s["limit-requests"] == "50" and s["limit-tokens"] == "100000" for s in seen)
    # The first chat's reservation (its prompt + 4) was settled to its real usage before the second was admitted.
    assert 100_000 > int(seen[0]["remaining-tokens"]) > int(seen[1]["remaining-tokens"]) > 100_000 - 200
    assert seen[1]["reset-requests"].endswith("s") and not seen[1]["reset-requests"].endswith("ms")
    # Over gRPC, the same in the Chat's initial metadata.
    call = (await live.gateway()).Chat(metadata=(("authorization", f"Bearer {created.api_key}"),), timeout=60)
    await call.write(start(max_tokens=2))
    await call.done_writing()
    assert [r async for r in call][-1].finish_reason
    metadata = dict(await call.initial_metadata())
    assert (metadata["x-ratelimit-limit-requests"], metadata["x-ratelimit-remaining-requests"]) == ("50", "47")
    assert metadata["x-ratelimit-limit-tokens"] == "100000" and metadata["x-ratelimit-reset-tokens"].endswith("s")
    # A request of several choices is several admissions: the headers count them all.
    both = await client.completions.with_raw_response.create(model="default", prompt=["Hi", "Bye"], max_tokens=2)
    assert both.headers["x-ratelimit-remaining-requests"] == "45"
    plain = await (await sdk(live)).chat.completions.with_raw_response.create(model="default", messages=USER,  # type: ignore[arg-type]
                                                                              max_tokens=1)
    assert "x-ratelimit-limit-requests" not in plain.headers  # a key without rate limits


async def test_a_full_queue_is_429_with_retry_after(live: LiveMesh) -> None:
    if "inference-int8" not in live.procs.processes:
        pytest.skip("no int8 build (make model builds it)")
    client = await sdk(live)
    long = [{"role": "user", "content": LONG_TASK}]
    decoding = await client.chat.completions.create(model=INT8, messages=long, max_tokens=2000,  # type: ignore[call-overload]
                                                    stream=True)
    await anext(aiter(decoding))  # the int8 replica's one active sequence (--max-active 1 --max-queue 1)

    async def first_chunk() -> Any:
        stream = await client.chat.completions.create(model=INT8, messages=long, max_tokens=2000,  # type: ignore[call-overload]
                                                      stream=True)
        async with contextlib.aclosing(aiter(stream)) as chunks:
            return await anext(chunks)

    two = [asyncio.create_task(first_chunk()) for _ in range(2)]  # one takes the queue's place, one is refused
    try:
        done, _ = await asyncio.wait(two, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "neither request was refused"
        with pytest.raises(openai.RateLimitError) as caught:
            done.pop().result()
        error = caught.value
        assert error.code == "queue_full" and "queue is full" in error.message
        assert (error.response.headers["retry-after"], error.response.headers["retry-after-ms"]) == ("1", "1000")
    finally:
        for task in two:
            task.cancel()  # the queued one: its client leaves, the replica drops it
        await asyncio.gather(*two, return_exceptions=True)
        await decoding.close()


async def test_a_disconnecting_http_client_stops_the_engine_within_one_step(live: LiveMesh) -> None:
    def cancelled_generates() -> list:  # type: ignore[type-arg]
        return [s for s in live.otlp.spans if s.service == "lmesh-inference" and s.name == "lmesh.inference/Generate"
                and s.attributes.get("lmesh.inference.cancelled")]

    def kv_bytes(e: Endpoint) -> int:
        return int(e.meta.get("load_kv_bytes", "0")) if MODEL in e.models else 0

    before = len(cancelled_generates())
    inference = live.mesh.resolver("lmesh-inference")
    body = {"model": "default", "messages": [{"role": "user", "content": LONG_TASK}], "max_tokens": 400,
            "stream": True}
    async with httpx2.AsyncClient(base_url=await http_base(live), timeout=60) as client, client.stream(
            "POST", "/v1/chat/completions", json=body,
            headers={"authorization": f"Bearer {live.api_key}"}) as response:
        assert response.status_code == 200
        events = data_events(response)
        for _ in range(5):
            assert json.loads(await anext(events))["choices"][0]["delta"]["content"]
        # While it decodes, the replica's reported KV memory keeps growing.
        first = kv_bytes(await inference.wait_for(lambda e: kv_bytes(e) > 0, timeout=10))
        await inference.wait_for(lambda e: kv_bytes(e) > first, timeout=10)
        await events.aclose()
    # The connection is closed, as when a client goes away: no message says so, the gateway sees the disconnect.
    await live.otlp.wait_for(lambda spans: len(cancelled_generates()) > before, timeout=20)
    dropped = cancelled_generates()[-1]
    assert int(dropped.attributes["lmesh.inference.tokens_after_cancel"]) <= 1  # type: ignore[call-overload]
    assert int(dropped.attributes["gen_ai.usage.output_tokens"]) < 400  # type: ignore[call-overload]  # cut short
    await inference.wait_for(lambda e: MODEL in e.models and e.meta.get("load_active") == "0", timeout=10)


async def test_an_http_chat_is_one_trace_from_the_callers_traceparent(live: LiveMesh) -> None:
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    async with httpx2.AsyncClient(base_url=await http_base(live), timeout=60) as client:
        response = await client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4},
                                     headers={"authorization": f"Bearer {live.api_key}",
                                              "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert response.status_code == 200 and response.headers["x-lmesh-trace-id"] == trace_id

    def mine(spans: list[Any]) -> set[str]:
        return {s.service for s in spans if s.trace_id == trace_id}

    def roots(spans: list[Any]) -> list[Any]:
        return [s for s in spans if s.trace_id == trace_id and s.name == "lmesh.gateway/POST /v1/chat/completions"]

    def whole(spans: list[Any]) -> bool:  # the tokenizer is in it when it rendered the prompt (a gateway's first)
        return bool(roots(spans)) and {"lmesh-gateway", "lmesh-policy", "lmesh-inference"} <= mine(spans) and (
            roots(spans)[0].attributes["lmesh.prompt.rendered_by"] == "gateway" or "lmesh-tokenizer" in mine(spans))

    spans = await live.otlp.wait_for(whole, timeout=20)
    [root] = roots(spans)
    assert root.attributes["gen_ai.response.model"] == MODEL
    assert root.attributes["http.response.status_code"] == 200


# A body the gateway accepts is rendered into a prompt: its texts and lists are cut to these lengths, since a long
# prompt's prefill is not what this test is about (tests/test_openai_http.py fuzzes whole bodies in-process).
TEXT_CHARS = 200
LIST_ITEMS = 3
DEPTH = 5  # a tool's parameters (tools[0].function.parameters) keep their names, not what lies under them


def _bounded(body: dict[str, Any], positive: bool) -> None:
    """Keeps a body that the gateway accepts cheap to answer (the engine runs on this machine's CPUs): at most 2
    tokens and 2 choices where the body's own values are valid and larger, texts, lists and nesting cut short; the
    `default` model for valid ones."""
    def number(value: object) -> bool:  # 5.0 is an integer too, to JSON Schema
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def short(value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return value[:TEXT_CHARS]
        if isinstance(value, list):
            return [short(item, depth + 1) for item in value[:LIST_ITEMS]] if depth < DEPTH else []
        if isinstance(value, dict):
            return {name: short(item, depth + 1) for name, item in value.items()} if depth < DEPTH else {}
        return value

    for name, value in list(body.items()):
        body[name] = short(value, 1)
    for name, most in (("max_tokens", 2), ("max_completion_tokens", 2), ("n", 2)):
        if number(body.get(name)) and body[name] > most:
            body[name] = most
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2
    if positive:
        body["model"] = "default"


def _fuzz(base: str, key: str, mode: schemathesis.GenerationMode, examples: int) -> list[int]:
    """schemathesis' requests against the served /openapi.json (in a thread: its client is blocking). The bodies
    are kept cheap to answer (`_bounded`): a negative case may break the schema elsewhere than its body (its
    content type, say) and be answered."""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    statuses: list[int] = []
    positive = mode == schemathesis.GenerationMode.POSITIVE
    for path in ("/v1/chat/completions", "/v1/completions"):
        strategy = schema[path]["POST"].as_strategy(generation_mode=mode)

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  phases=[Phase.explicit, Phase.generate])  # no shrinking: each try is a request to the mesh
        @given(case=strategy)
        def run(case: schemathesis.Case) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {key}"}
            if isinstance(case.body, dict):
                _bounded(case.body, positive)
            response = case.call(base_url=base, timeout=60)
            statuses.append(response.status_code)
            assert response.status_code < 500, response.text
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

        run()
    return statuses


async def test_openais_penalties_and_logit_bias_steer_the_real_model(live: LiveMesh) -> None:
    from lmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

    client = await sdk(live)

    async def tokens(question: str = FRANCE, **fields: Any) -> list[str]:
        answer = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24,
            logprobs=True, **fields)
        content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
        assert content is not None
        return [entry.token for entry in content]

    def repeats(answer: list[str]) -> int:
        return len(answer) - len(set(answer))

    plain = await tokens()
    assert " Paris" in plain
    tokenizer = (await live.mesh.resolver("lmesh-tokenizer").pick()).stub(tokenizer_pb2_grpc.TokenizerStub)
    paris = await tokenizer.Encode(tokenizer_pb2.EncodeRequest(model=MODEL, text=" Paris"), timeout=10)
    assert len(paris.token_ids) == 1
    banned = await tokens(logit_bias={str(paris.token_ids[0]): -100})
    assert " Paris" not in banned and banned[:plain.index(" Paris")] == plain[:plain.index(" Paris")]
    # A story repeats tokens; penalized, the answer is the same until its first repeat and repeats less.
    story = await tokens(LONG_TASK)
    first_repeat = next(i for i, token in enumerate(story) if token in story[:i])
    penalized = await tokens(LONG_TASK, presence_penalty=2.0, frequency_penalty=2.0, logit_bias={})
    assert penalized[:first_repeat] == story[:first_repeat] and repeats(penalized) < repeats(story)
    assert await tokens(LONG_TASK, presence_penalty=0, frequency_penalty=0) == story
    with pytest.raises(openai.BadRequestError) as caught:
        await tokens(logit_bias={"1000000": 1})
    assert caught.value.body["param"] == "logit_bias"  # type: ignore[index]


async def test_hostile_bodies_get_a_4xx_in_openais_shape_and_valid_ones_an_answer_never_a_5xx(
        live: LiveMesh) -> None:
    base = await http_base(live)
    # Through the whole mesh, so few; tests/test_openai_http.py fuzzes the same document in-process at length.
    negative = await asyncio.to_thread(_fuzz, base, live.api_key, schemathesis.GenerationMode.NEGATIVE, 30)
    # A negative case may break the schema outside its body (its content type, say) and still be answered, so
    # how many are refused varies from run to run; that some are, and none is a 5xx, does not.
    assert any(400 <= s < 500 for s in negative) and all(s < 500 for s in negative)
    positive = await asyncio.to_thread(_fuzz, base, live.api_key, schemathesis.GenerationMode.POSITIVE, 6)
    assert 200 in positive and all(s < 500 for s in positive)


async def test_a_stream_outliving_the_gateways_drain_ends_with_a_draining_error_event(live: LiveMesh) -> None:
    known = frozenset(e.service_id for e in live.mesh.resolver("lmesh-gateway").endpoints())
    live.procs.start("gateway", "--grace", "2", name="gateway-http-grace")
    await live.procs.wait_passing(live.mesh, "gateway", name="gateway-http-grace", exclude=known)
    base = await http_base(live, exclude=known)
    body = {"model": "default", "messages": [{"role": "user", "content": LONG_TASK}], "max_tokens": 2000,
            "stream": True}
    async with httpx2.AsyncClient(base_url=base, timeout=60) as client, client.stream(
            "POST", "/v1/chat/completions", json=body,
            headers={"authorization": f"Bearer {live.api_key}"}) as response:
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: {")
        live.procs.terminate("gateway-http-grace")
        rest = [line async for line in lines]
    event = "\n".join(rest).strip().split("\n\n")[-1]
    assert event.startswith("event: error\ndata: "), rest[-4:]
    assert json.loads(event.split("data: ", 1)[1])["error"] == {
        "message": "lmesh-gateway shut down before this stream finished (its --grace of 2 s was running out); retry",
        "type": "server_error", "param": None, "code": "draining"}
    assert await live.procs.wait_exit("gateway-http-grace") == 0


def test_dev_mesh_says_when_the_http_port_is_taken(built_model: Path, tmp_path: Path) -> None:
    from services.common.consul_agent import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_dev_cli(built_model, tmp_path, free_port(), http_port=port)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"lmesh: port {port} is in use; stop what listens there or set LMESH_HTTP_PORT"


async def test_grpc_still_answers_beside_http(live: LiveMesh) -> None:
    answer = await collect(await live.gateway(), start(max_tokens=8), live.api_key)
    assert answer[-1].finish_reason and answer[-1].usage.completion_tokens <= 8
    assert isinstance(answer[0], gateway_pb2.ChatResponse)


async def test_no_service_logged_a_traceback(live: LiveMesh) -> None:
    """Runs last: after everything above (hostile bodies, disconnects, a drain), no service logged a bug."""
    for name in live.procs.processes:
        log = live.procs.log(name)
        assert "Traceback" not in log and " ERROR " not in log, f"{name}:\n{log[-3000:]}"
