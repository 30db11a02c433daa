"""Guardrails across services, without the model: policy serving its rules file (WatchRules) and recording what
the gateway did (RecordScreening), the gateway's follower of those rules, and an edit of the rules file while
streams are open."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from lmesh.common.v1 import generation_pb2
from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc
from lmesh.registry.v1 import registry_pb2

from services.common.config import ServiceConfig
from services.common.consul_agent import ConsulAgent
from services.common.discovery import Mesh
from services.common.errors import PermissionDenied, Reason
from services.common.guardrails import Stage
from services.common.peers import POLICY
from services.common.rpc import call_options
from services.common.server import RunningService, start_service
from services.gateway.chat import ChatDelta, ChatEnd, ChatParams
from services.gateway.logprobs import VocabularyCache
from services.gateway.screen import Guardrails, OutputGate, Screening
from services.policy.audit import AuditLog, AuditRecord
from services.policy.main import PolicySettings, build
from services.policy.rules import parse_rules

RULES_V1 = """\
rules:
  - id: codename
    detect: deny
    action: block
    phrases: ["project nightingale"]
  - id: email
    detect: email
    action: redact
"""
RULES_V2 = RULES_V1 + """\
  - id: no-paris
    detect: deny
    action: block
    phrases: [paris]
    tenants: [acme]
"""
PARAMS = ChatParams(model="default", messages=[("user", "hi")], max_tokens=8, temperature=0.0, top_p=0.0,
                    top_k=0, seed=0, repetition_penalty=0.0, stop=[])
VERSION = registry_pb2.ModelVersion(name="m", version="1", aliases=["default"])


def write_rules(path: Path, text: str) -> None:
    """As an editor or a config management tool does it: a new file renamed into place."""
    fresh = path.with_suffix(".tmp")
    fresh.write_text(text)
    os.replace(fresh, path)


class PolicyWithRules:
    def __init__(self, running: RunningService, mesh: Mesh, stub: policy_pb2_grpc.PolicyStub, path: Path) -> None:
        self.running, self.mesh, self.stub, self.path = running, mesh, stub, path

    @property
    def audit(self) -> ScreeningRecords:
        log = self.running.parts.servicers[0][1]._audit_log
        assert isinstance(log, AuditLog)
        return ScreeningRecords(log)


class ScreeningRecords:
    """The guardrails' records in policy's durable audit log, oldest first."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log

    @property
    def events(self) -> list[AuditRecord]:
        records, _ = self._log.tail(10_000, lambda r: r.action in ("block", "redact", "flag"))
        return records


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def policy(consul_agent: ConsulAgent, tmp_path_factory: pytest.TempPathFactory,
                 ) -> AsyncIterator[PolicyWithRules]:
    folder = tmp_path_factory.mktemp("policy-rules")
    path = folder / "rules.yaml"
    write_rules(path, RULES_V1)
    config = ServiceConfig(mtls=False, service="policy", consul_addr=consul_agent.http_addr, data_dir=folder / "data",
                           settings=PolicySettings(rules=path))
    running = await start_service(config, build)
    mesh = Mesh(consul_agent.http_addr)
    endpoint = await mesh.peer(POLICY).wait_for(lambda e: e.port == running.port, timeout=15)
    yield PolicyWithRules(running, mesh, endpoint.stub(policy_pb2_grpc.PolicyStub), path)
    await running.stop()
    await mesh.close()


async def set_rules(policy: PolicyWithRules, text: str) -> str:
    """Writes the rules file and waits until policy enforces it; its version."""
    write_rules(policy.path, text)
    version = parse_rules(text.encode()).version
    for _ in range(100):
        call = policy.stub.WatchRules(policy_pb2.WatchRulesRequest())
        current = await next_version(call)
        call.cancel()
        if current.version == version:
            return version
        await asyncio.sleep(0.1)
    raise AssertionError("policy did not take the rules file up")


async def next_version(call: Any, timeout: float = 10.0) -> policy_pb2.RuleSet:
    message = await asyncio.wait_for(call.read(), timeout)
    assert message is not grpc.aio.EOF
    return message


async def test_watch_rules_gives_the_rules_then_every_new_version_of_the_file(policy: PolicyWithRules) -> None:
    call = policy.stub.WatchRules(policy_pb2.WatchRulesRequest())
    try:
        first = await next_version(call)
        assert [r.id for r in first.rules] == ["codename", "email"] and first.source == str(policy.path)
        assert first.rules[0].detect == policy_pb2.DETECTOR_DENY and list(first.rules[0].phrases) == [
            "project nightingale"]
        write_rules(policy.path, RULES_V1 + "  - id: broken\n    detect: nothing\n")  # does not check out
        await asyncio.sleep(2.5)
        write_rules(policy.path, RULES_V2)
        second = await next_version(call)  # the broken edit was never sent
        assert [r.id for r in second.rules] == ["codename", "email", "no-paris"] and second.version != first.version
    finally:
        call.cancel()
        await set_rules(policy, RULES_V1)


async def test_a_rules_edit_takes_effect_for_new_requests_and_breaks_no_open_stream(policy: PolicyWithRules) -> None:
    await set_rules(policy, RULES_V1)
    guardrails = Guardrails(policy.mesh.peer(POLICY), VocabularyCache(None))  # type: ignore[arg-type]
    try:
        old_rules = await guardrails.rules()
        principal = policy_pb2.Principal(key_id="key_0000abcd", tenant="acme")
        open_streams = []
        for _ in range(3):  # open, part-way through an answer that mentions Paris
            screening = Screening(request_id="chatcmpl-open")
            await guardrails.screen_input(screening, principal, VERSION, PARAMS)
            gate = OutputGate(screening.profile(Stage.OUTPUT))
            assert gate.feed("The capital of France is ")[0]
            open_streams.append(gate)
        write_rules(policy.path, RULES_V2)
        for _ in range(100):
            if (await guardrails.rules()).version != old_rules.version:
                break
            await asyncio.sleep(0.1)
        new = Screening(request_id="chatcmpl-new")
        await guardrails.screen_input(new, principal, VERSION, PARAMS)
        assert new.rules is not None and new.rules.version != old_rules.version
        fresh = OutputGate(new.profile(Stage.OUTPUT))
        text = fresh.feed("The capital of France is Paris.")[0] + fresh.finish()[0]
        assert fresh.blocked is not None and "Paris" not in text  # the new rule, for the new request
        for gate in open_streams:  # the open ones keep the version they started with, and finish
            rest = gate.feed("Paris.")[0] + gate.finish()[0]
            assert gate.blocked is None and rest.endswith("Paris.")
        other = Screening()
        await guardrails.screen_input(other, policy_pb2.Principal(tenant="beta"), VERSION, PARAMS)
        assert not [r for r in other.profile(Stage.OUTPUT).rules if r.spec.id == "no-paris"]  # scoped to acme
    finally:
        await guardrails.close()
        await set_rules(policy, RULES_V1)


async def events(*items: ChatDelta | ChatEnd) -> AsyncIterator[ChatDelta | ChatEnd]:
    for item in items:
        yield item


async def test_input_and_output_screening_reach_the_audit_log_with_rule_ids_and_positions_only(
        policy: PolicyWithRules) -> None:
    guardrails = Guardrails(policy.mesh.peer(POLICY), VocabularyCache(None))  # type: ignore[arg-type]
    principal = policy_pb2.Principal(key_id="key_0000abcd", tenant="acme")
    before = len(policy.audit.events)
    try:
        screening = Screening(request_id="chatcmpl-1")
        params = await guardrails.screen_input(screening, principal, VERSION, ChatParams(
            **{**PARAMS.__dict__, "messages": [("system", "be brief"), ("user", "mail me at jane@example.com")]}))
        assert params.messages[1] == ("user", "mail me at [REDACTED:email]")
        with pytest.raises(PermissionDenied) as refused:
            await guardrails.screen_input(Screening(request_id="chatcmpl-2"), principal, VERSION, ChatParams(
                **{**PARAMS.__dict__, "messages": [("user", "tell me about Project Nightingale")]}))
        assert refused.value.reason == Reason.CONTENT_BLOCKED
        assert refused.value.metadata == {"rule_id": "codename", "field": "messages[0].content"}
        assert "ightingale" not in refused.value.message
        cancel = asyncio.Event()
        usage = generation_pb2.Usage(prompt_tokens=20, completion_tokens=9, total_tokens=29)
        out = [e async for e in guardrails.screen_output(screening, events(
            ChatDelta("Our plan is Project Night"), ChatDelta("ingale, and"),
            ChatEnd(generation_pb2.FINISH_REASON_CANCELLED, usage)), cancel)]
        assert cancel.is_set()
        assert "".join(e.text for e in out if isinstance(e, ChatDelta)) == "Our plan is "
        assert isinstance(out[-1], ChatEnd) and out[-1].finish_reason == generation_pb2.FINISH_REASON_CONTENT_FILTER
    finally:
        await guardrails.close()
    recorded = policy.audit.events[before:]
    assert [(e.action, e.outcome, e.rule_id) for e in recorded] == [
        ("redact", "redacted", "email"), ("block", "blocked", "codename"), ("block", "blocked", "codename")]
    assert recorded[0].detail.startswith("input messages[1] characters 11-27") and recorded[0].principal == (
        "key_0000abcd")
    assert recorded[2].detail.startswith("output characters 12-31") and dict(recorded[2].tokens) == {
        "prompt": 20, "completion": 9}
    for event in recorded:
        assert "jane" not in repr(event) and "ightingale" not in repr(event).lower()


async def outcome(stub: policy_pb2_grpc.PolicyStub, method: str, request: Any) -> grpc.StatusCode:
    try:
        if method == "WatchRules":
            call = stub.WatchRules(request, **call_options(5))
            await call.read()
            call.cancel()
        else:
            await getattr(stub, method)(request, **call_options(5))
    except grpc.aio.AioRpcError as exc:
        assert "Traceback" not in (exc.details() or "")
        return exc.code()
    return grpc.StatusCode.OK


FINDINGS = st.builds(
    policy_pb2.ScreeningFinding, rule_id=st.text(max_size=70), action=st.integers(-3, 6), stage=st.integers(-2, 4),
    message_index=st.integers(-2**31, 2**31 - 1), start=st.integers(-2**63, 2**63 - 1),
    end=st.integers(-2**63, 2**63 - 1))
HOSTILE_RECORDS = st.builds(
    policy_pb2.RecordScreeningRequest, request_id=st.text(max_size=80), key_id=st.text(max_size=20),
    tenant=st.text(max_size=70), model=st.text(max_size=300), rules_version=st.text(max_size=70),
    findings=st.lists(FINDINGS, max_size=4), blocked=st.booleans(),
    usage=st.builds(generation_pb2.Usage, prompt_tokens=st.integers(-2**31, 2**31 - 1),
                    completion_tokens=st.integers(-2**31, 2**31 - 1)))


async def test_hostile_input_to_the_guardrail_rpcs_gets_a_proper_code_never_internal(policy: PolicyWithRules) -> None:
    loop = asyncio.get_running_loop()

    def call(method: str, request: Any) -> grpc.StatusCode:
        return asyncio.run_coroutine_threadsafe(outcome(policy.stub, method, request), loop).result(30)

    @given(HOSTILE_RECORDS)
    @settings(max_examples=150, deadline=None)
    def record(request: policy_pb2.RecordScreeningRequest) -> None:
        assert call("RecordScreening", request) in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)

    channel = grpc.aio.insecure_channel(policy.running.target)
    unary = ("RecordScreening", "Authenticate", "Authorize", "ListApiKeys", "RevokeApiKey", "CreateApiKey")
    raw = [channel.unary_unary(f"/lmesh.policy.v1.Policy/{name}") for name in unary]
    watch_raw = channel.unary_stream("/lmesh.policy.v1.Policy/WatchRules")
    expected = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS}

    async def raw_outcome(data: bytes) -> list[grpc.StatusCode]:
        codes = []
        for method in (*raw, None):
            try:
                if method is None:
                    stream = watch_raw(data, timeout=5)
                    await stream.read()
                    stream.cancel()
                else:
                    await method(data, timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        return codes

    @given(st.binary(max_size=200))
    @settings(max_examples=100, deadline=None)
    def garbage(data: bytes) -> None:  # every policy RPC: a proper code, never INTERNAL or UNKNOWN
        codes = asyncio.run_coroutine_threadsafe(raw_outcome(data), loop).result(60)
        assert set(codes) <= expected, codes

    try:
        await asyncio.to_thread(record)
        await asyncio.to_thread(garbage)
    finally:
        await channel.close()
    assert await outcome(policy.stub, "RecordScreening", policy_pb2.RecordScreeningRequest(
        request_id="chatcmpl-x", findings=[policy_pb2.ScreeningFinding(
            rule_id="email", action=policy_pb2.RULE_ACTION_REDACT, stage=policy_pb2.SCREENING_STAGE_OUTPUT, start=1,
            end=5)])) == grpc.StatusCode.OK


async def test_a_policy_that_drains_ends_the_watch_and_the_gateway_keeps_its_rules(consul_agent: ConsulAgent,
                                                                                  tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    write_rules(path, RULES_V1)
    config = ServiceConfig(mtls=False, service="policy", consul_addr=consul_agent.http_addr, data_dir=tmp_path / "d",
                           settings=PolicySettings(rules=path), grace_s=10)
    running = await start_service(config, build)
    mesh = Mesh(consul_agent.http_addr)
    guardrails = Guardrails(mesh.peer(POLICY), VocabularyCache(None))  # type: ignore[arg-type]
    try:
        await mesh.peer(POLICY).wait_for(lambda e: e.port == running.port, timeout=15)
        rules = await guardrails.rules()
        began = asyncio.get_running_loop().time()
        await running.stop()
        assert asyncio.get_running_loop().time() - began < 5  # the watch did not hold the drain's grace
        assert (await guardrails.rules()) is rules
    finally:
        await guardrails.close()
        await mesh.close()
