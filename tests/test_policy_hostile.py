"""Hostile input to every policy RPC of keys, limits and accounting, and to the operator commands that call them:
Hypothesis-generated tenants, patterns, ids, limits and token counts. Always a proper status code (never INTERNAL
or UNKNOWN) or, from the CLI, one `lmesh: ...` line; never a traceback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.config import ServiceConfig
from services.common.consul_agent import ConsulAgent
from services.common.discovery import Mesh
from services.common.peers import POLICY
from services.common.rpc import call_options
from services.common.server import RunningService, start_service
from services.policy.keys import TENANT_PATTERN
from services.policy.main import PolicySettings, build
from tests.cli_runner import run_cli

BAD_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


@dataclass
class Target:
    running: RunningService
    mesh: Mesh
    stub: policy_pb2_grpc.PolicyStub
    api_key: str
    key_id: str


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def target(consul_agent: ConsulAgent, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    config = ServiceConfig(mtls=False, service="policy", consul_addr=consul_agent.http_addr,
                           data_dir=tmp_path_factory.mktemp("hostile-policy"), settings=PolicySettings())
    running = await start_service(config, build)
    mesh = Mesh(consul_agent.http_addr)
    endpoint = await mesh.peer(POLICY).wait_for(lambda e: e.port == running.port, timeout=15)
    stub = endpoint.stub(policy_pb2_grpc.PolicyStub)
    created = await stub.CreateApiKey(policy_pb2.CreateApiKeyRequest(tenant="hostile"), **call_options(5))
    yield Target(running, mesh, stub, created.api_key, created.key.key_id)
    await running.stop()
    await mesh.close()


# ---- strategies ---------------------------------------------------------------------------------------------------

# Any text a client can send (protobuf strings are UTF-8: no lone surrogates), and text that looks almost right.
anything = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80)
tenants = st.one_of(anything, st.from_regex(TENANT_PATTERN, fullmatch=True), st.just("hostile"))
ids = st.one_of(anything, st.from_regex(r"key_[0-9a-f]{8}", fullmatch=True),
                st.from_regex(r"[A-Za-z0-9_-]{8,64}", fullmatch=True))
models = st.one_of(anything, st.sampled_from(["smollm2-*", "*", "m:1", "default", "a b", "x" * 300]))
tools = st.one_of(anything, st.sampled_from(["calculator", "calc*", "*", "a?c", "Calc", "9x", "[ab]", "", "x" * 49]))
tool_grants = st.builds(policy_pb2.ToolGrant, allowed_tools=st.lists(tools, max_size=4))
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
small = st.integers(-5, 10**6)
periods = st.integers(-3, 7)
limits = st.builds(policy_pb2.Limits, requests_per_minute=st.one_of(int32, small),
                   tokens_per_minute=st.one_of(int64, small), budget_tokens=st.one_of(int64, small),
                   budget_period=periods)
updates = st.builds(lambda fields, period: policy_pb2.LimitsUpdate(**fields, budget_period=period),
                    st.fixed_dictionaries({}, optional={"requests_per_minute": st.one_of(int32, small),
                                                        "tokens_per_minute": st.one_of(int64, small),
                                                        "budget_tokens": st.one_of(int64, small)}), periods)


def requests(api_key: str, key_id: str) -> st.SearchStrategy[tuple[str, Any]]:
    keys = st.one_of(anything, st.just(api_key), st.just(""))
    key_ids = st.one_of(ids, st.just(key_id))
    return st.one_of(
        st.tuples(st.just("Authenticate"), st.builds(policy_pb2.AuthenticateRequest, api_key=keys)),
        st.tuples(st.just("Authorize"), st.builds(
            policy_pb2.AuthorizeRequest, api_key=keys, model=models, input_tokens=int32, max_tokens=int32,
            resolved_model=models, resolved_aliases=st.lists(models, max_size=4))),
        st.tuples(st.just("Reserve"), st.builds(
            policy_pb2.ReserveRequest, api_key=keys, model=models, resolved_model=models,
            resolved_aliases=st.lists(models, max_size=4), prompt_tokens=st.one_of(int32, small),
            max_tokens=st.one_of(int32, small), reservation_id=ids)),
        st.tuples(st.just("RevokeApiKey"), st.builds(policy_pb2.RevokeApiKeyRequest, key_id=ids)),
        st.tuples(st.just("RenewReservation"), st.builds(policy_pb2.RenewReservationRequest, reservation_id=ids)),
        st.tuples(st.just("Settle"), st.builds(
            policy_pb2.SettleRequest, reservation_id=ids, prompt_tokens=int32, completion_tokens=int32,
            ending=periods)),
        st.tuples(st.just("CreateApiKey"), st.builds(
            policy_pb2.CreateApiKeyRequest, tenant=tenants, allowed_models=st.lists(models, max_size=4),
            display_name=anything, limits=limits, allowed_tools=st.lists(tools, max_size=4))),
        st.tuples(st.just("ListApiKeys"), st.builds(policy_pb2.ListApiKeysRequest, tenant=tenants, page_size=int32,
                                                    page_token=anything)),
        st.tuples(st.just("UpdateApiKey"), st.builds(policy_pb2.UpdateApiKeyRequest, key_id=key_ids,
                                                     limits=updates, tools=st.one_of(st.none(), tool_grants))),
        st.tuples(st.just("SetTenantLimits"), st.builds(policy_pb2.SetTenantLimitsRequest, tenant=tenants,
                                                        limits=updates)),
        st.tuples(st.just("GetUsage"), st.builds(policy_pb2.GetUsageRequest, tenant=tenants, page_size=int32,
                                                 page_token=anything)),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
async def test_every_policy_rpc_answers_hostile_input_with_a_proper_code(target: Target, data: st.DataObject) -> None:
    method, request = data.draw(requests(target.api_key, target.key_id), label="call")
    try:
        await getattr(target.stub, method)(request, **call_options(5))
    except grpc.aio.AioRpcError as error:
        assert error.code() not in BAD_CODES, (method, request, error.details())
        assert "Traceback" not in (error.details() or "")


async def test_the_revoke_rpc_answers_hostile_ids_with_a_proper_code(target: Target) -> None:
    for key_id in ["", "key_", "key_zzzzzzzz", "key_00000000", "x" * 10_000, "key_\u0000\u0000\u0000\u0000aaaa"]:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await target.stub.RevokeApiKey(policy_pb2.RevokeApiKeyRequest(key_id=key_id), **call_options(5))
        assert failed.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


# ---- the operator's commands --------------------------------------------------------------------------------------

flag_values = st.one_of(anything, st.integers(-(2**70), 2**70).map(str), st.sampled_from(
    ["0", "1", "-1", " 7 ", "1e3", "0x10", "day", "MONTH", "none", "week", "", "\uff11\uff12"]))


@st.composite
def commands(draw: Callable[..., Any], key_id: str) -> list[str]:
    limit_flags = draw(st.lists(st.sampled_from(["--rpm", "--tpm", "--budget-tokens", "--period"]), unique=True,
                                max_size=4))
    flags = [f"{flag}={draw(flag_values)}" for flag in limit_flags]
    kind = draw(st.sampled_from(["create", "update", "tenants", "usage", "list", "revoke"]))
    grant = [f"--tools={t}" for t in draw(st.lists(st.one_of(tools, st.sampled_from(["a,b", "calc*,", ",x"])),
                                                  max_size=2))]
    if kind == "create":
        patterns = [f"--model={p}" for p in draw(st.lists(models, max_size=3))]
        return ["keys", "create", f"--tenant={draw(tenants)}", *patterns, *flags, *grant]
    if kind == "update":
        grant = grant or draw(st.sampled_from([[], ["--no-tools"]]))
        return ["keys", "update", *flags, *grant, "--", draw(st.one_of(ids, st.just(key_id)))]
    if kind == "tenants":
        return ["tenants", "set", *flags, "--", draw(tenants)]
    if kind == "usage":
        return ["usage", f"--tenant={draw(tenants)}"]
    if kind == "list":
        return ["keys", "list", f"--tenant={draw(tenants)}"]
    return ["keys", "revoke", "--", draw(ids)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_every_operator_command_answers_hostile_input_in_one_line(target: Target, data: st.DataObject,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    argv = data.draw(commands(target.key_id), label="argv")
    monkeypatch.setenv("LMESH_MTLS", "off")  # this policy serves plaintext
    monkeypatch.setenv("LMESH_ADMIN_TOKEN", "")
    code, out, err = await asyncio.to_thread(run_cli, argv)
    assert "Traceback" not in out + err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lmesh: "), (argv, err)
        assert not lines[0].startswith(("lmesh: INTERNAL", "lmesh: UNKNOWN")), (argv, err)
    elif argv[:2] == ["keys", "create"]:
        assert out.strip().splitlines()[-1].startswith("lmk_")

