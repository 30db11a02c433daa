"""lmesh: run and operate a self-hosted LLM mesh.

  lmesh serve SERVICE      run one service (registry, tokenizer, inference, policy, gateway, tools, embeddings)
  lmesh dev                a whole mesh on this machine (what `make run` runs)
  lmesh chat [MESSAGE]     chat with the running mesh (interactive without MESSAGE; --tools auto: mesh tools)
  lmesh tools [allow S]    the mesh tools Consul lists; let the gateway call a team's tool provider S
  lmesh models ...         list, register, alias (split, promote, roll back), delete and collect model versions
  lmesh keys ...           create, list, update (limits, priority, tools) and revoke API keys
  lmesh tenants set T      a tenant's limits, shared by its keys
  lmesh usage              spent, reserved and remaining tokens per tenant (and key)
  lmesh audit ...          tail, follow and verify policy's audit log
  lmesh policy rules ...   check a guardrail rules file, show the rules in force

Peers are found through Consul at CONSUL_HTTP_ADDR (default 127.0.0.1:8500).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import importlib
import json
import logging
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# gRPC's C core writes its own INFO lines to stderr (a failed TLS handshake, a GOAWAY) before the one line in which
# the CLI says what failed and what to do. It reads this when grpc is imported; a GRPC_VERBOSITY given still wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc

from services.common.config import (
    READABLE_FILE_TYPE,
    ConfigError,
    add_serve_arguments,
    config_from_args,
    int_type,
    lmesh_cache,
)
from services.common.errors import LmeshError

if TYPE_CHECKING:
    from services.common.discovery import Mesh
    from services.common.peers import Peer

SERVICES = ("registry", "tokenizer", "inference", "policy", "gateway", "tools", "embeddings")


class CommandError(Exception):
    """A problem with how a command was run (a missing key, a bad argument): its message alone, no status."""


def _fail(message: str) -> int:
    # One line, whatever the message echoes (a path or a value with a newline): scripts read the last line.
    one_line = "".join(char if char.isprintable() else repr(char)[1:-1] for char in message)
    print(f"lmesh: {one_line}", file=sys.stderr)
    return 2


MESH_DOWN_HINT = " (is the mesh running? `make run`)"
INTERRUPTED_GRACE_S = 2.0  # how long an interrupted follow gets to end before the mesh is closed under it
# What gRPC itself says when no connection could be made at all (as opposed to a server's own UNAVAILABLE).
UNREACHABLE_MARKS = ("failed to connect", "connection refused", "dns resolution failed", "socket closed",
                     "connection reset", "name resolution")
TLS_TRUST_HINT = (" (the gateway's TLS certificate is not trusted here: pass --gateway-ca or set LMESH_GATEWAY_CA "
                  "to the CA that signed it; it must also name the address dialled)")
TLS_PORT_HINT = ("; a gateway that serves TLS needs --tls or --gateway-ca, and its client-certificate port a "
                 "certificate from its client CA)")
AUTH_HINT = "; pass --admin-token or set LMESH_ADMIN_TOKEN (the token lmesh-policy and lmesh-registry run with)"


def _unavailable(details: str) -> str:
    """An UNAVAILABLE message, with what to do added when it does not say so itself."""
    if "certificate_verify_failed" in details.lower():
        return details.removesuffix(": OK") + TLS_TRUST_HINT  # gRPC ends some handshake failures with its own "OK"
    if "socket closed" in details.lower():  # also what a TLS port does to a plaintext client, or to a missing cert
        return details + MESH_DOWN_HINT[:-1] + TLS_PORT_HINT
    if any(mark in details.lower() for mark in UNREACHABLE_MARKS):
        return details + MESH_DOWN_HINT
    if "no intention allows" in details:
        return f"{details}; make Consul hold the mesh's intentions: `lmesh intentions apply`"
    missing = details.removeprefix("no passing instance of lmesh-")
    if missing != details and missing in SERVICES:
        return f"{details}; start one with `lmesh serve {missing}` (or `make run`)"
    return details


def _call_error(exc: grpc.aio.AioRpcError | LmeshError) -> str:
    """`CODE: message` for a failed call, with what to do added to an UNAVAILABLE that does not say it."""
    code, details = (exc.code(), exc.details() or "") if isinstance(exc, grpc.aio.AioRpcError) else (exc.code,
                                                                                                       exc.message)
    return f"{code.name}: {_unavailable(details) if code == grpc.StatusCode.UNAVAILABLE else details}"


def _run_async(make: Callable[[], Awaitable[int]]) -> int:
    """Runs an operator command; expected failures become one line on stderr, never a traceback."""
    try:
        return asyncio.run(make())  # type: ignore[arg-type]
    except (grpc.aio.AioRpcError, LmeshError) as exc:
        return _fail(_call_error(exc))
    except BrokenPipeError:
        return _reader_went_away()
    except (OSError, TimeoutError, CommandError) as exc:
        return _fail(str(exc) or type(exc).__name__)
    except UnicodeEncodeError:  # an argument the shell passed as bytes that are not UTF-8: no request can carry it
        return _fail("an argument is not valid UTF-8 text")
    except KeyboardInterrupt:
        return 130


def _reader_went_away() -> int:
    """`lmesh keys list | head -3`: the reader closed the pipe. Quiet, as Unix tools are; stdout goes to
    /dev/null so the interpreter's last flush cannot complain about it either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by it


# ---- serve / dev -------------------------------------------------------------------------------------------

def _serve(args: argparse.Namespace) -> int:
    from services.common.server import serve_forever, setup_logging

    module = importlib.import_module(f"services.{args.service}.main")
    config = config_from_args(args.service, args, module.SETTINGS)
    check = getattr(module, "check_config", None)  # what a service refuses to start with, said before anything
    if check is not None:
        try:
            check(config)
        except OSError as exc:
            return _fail(str(exc))
    try:  # here, before anything starts: the services create it only after registering in Consul
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot use --data-dir {config.data_dir}: {_reason(exc)}; pass a directory this user can "
                     "create and write")
    setup_logging(args.service, config.log_level)
    try:
        asyncio.run(serve_forever(config, module.build))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # a taken port, Consul out of reach: one line that says what to do
        return _fail(str(exc) or type(exc).__name__)
    except LmeshError as exc:  # e.g. a registered model this replica cannot load
        return _fail(str(exc))
    return 0


def _reason(exc: OSError) -> str:
    """An OSError's reason without the errno and file name (the message names the path itself)."""
    return (exc.strerror or str(exc)).lower()


def _dev(args: argparse.Namespace) -> int:
    from services.devmesh import run_dev

    return run_dev(Path(args.model_dir))


# ---- chat --------------------------------------------------------------------------------------------------

def _api_key(args: argparse.Namespace, *, certificate: bool = False) -> str:
    """The API key to send: --key, LMESH_API_KEY, else the dev key; with a client certificate (which is the
    credential then) only one given explicitly, else none ("")."""
    from services.client import metadata_text
    from services.devmesh import dev_key_path

    key = args.key or os.environ.get("LMESH_API_KEY")
    if not key and certificate:
        return ""
    if not key and dev_key_path().exists():
        key = dev_key_path().read_text().strip()
    if not key:
        raise CommandError("no API key: pass --key, set LMESH_API_KEY, or run `make run` to create a dev key; or "
                           "pass --client-cert and --client-key of a certificate bound to a key")
    return metadata_text(key, "the API key (--key, LMESH_API_KEY or .lmesh/dev-api-key)")


def _chat(args: argparse.Namespace) -> int:
    from services.client import (
        CLIENT_CERT_ENV,
        CLIENT_KEY_ENV,
        GATEWAY_CA_ENV,
        env_file,
        find_gateway,
        gateway_tls,
        stream_chat_to_terminal,
        tool_use,
    )

    # The files first, outside the event loop: a bad variable is a ConfigError naming it.
    files = (args.gateway_ca or env_file(GATEWAY_CA_ENV), args.client_cert or env_file(CLIENT_CERT_ENV),
             args.client_key or env_file(CLIENT_KEY_ENV))

    async def go() -> int:
        tls = gateway_tls(*files, tls=args.tls)
        key = _api_key(args, certificate=tls is not None and tls.client_cert is not None)
        tools = tool_use(args.tools)
        gateway, tls = await find_gateway(args.gateway, tls)
        history: list[tuple[str, str]] = [("system", args.system)] if args.system else []
        sampling: dict[str, Any] = {"top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
                                    "repetition_penalty": args.repetition_penalty,
                                    "presence_penalty": args.presence_penalty,
                                    "frequency_penalty": args.frequency_penalty, "stop": args.stop or []}
        if args.priority is not None:
            sampling["priority"] = args.priority
        if args.message:
            history.append(("user", " ".join(args.message)))
            await stream_chat_to_terminal(gateway, key, history, model=args.model, max_tokens=args.max_tokens,
                                          temperature=args.temperature, logprobs=args.logprobs, sampling=sampling,
                                          tls=tls, tools=tools)
            return 0
        print(f"Chatting with {args.model or 'default'} through {gateway}{' (TLS)' if tls else ''}. Empty line or "
              "Ctrl-D ends.")
        sampling["session"] = f"lmesh-chat-{uuid.uuid4().hex}"  # the turns meet their cached prefix on one replica
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                print()  # end the prompt's line
                return 0
            if not line.strip():
                return 0
            history.append(("user", line))
            try:
                answer = await stream_chat_to_terminal(gateway, key, history, model=args.model,
                                                       max_tokens=args.max_tokens, temperature=args.temperature,
                                                       logprobs=args.logprobs, sampling=sampling, tls=tls, tools=tools)
            except (grpc.aio.AioRpcError, LmeshError) as exc:
                # One failed turn (too long, a replica restarting) must not end the conversation: say why, and
                # leave it out of the history so the next turn is sent without it.
                print(f"\nlmesh: {_call_error(exc)}", file=sys.stderr, flush=True)
                history.pop()
                continue
            history.append(("assistant", answer))

    return _run_async(go)


# ---- models ------------------------------------------------------------------------------------------------

def _admin_refusal(exc: grpc.aio.AioRpcError) -> Exception:
    """What to raise for a failed management call: an admin-token refusal says how to pass the token."""
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return CommandError(f"UNAUTHENTICATED: {exc.details()}{AUTH_HINT}")
    return exc


async def _with_registry(action: Callable[[Peer[Any], Mesh], Awaitable[int]], admin_token: str | None) -> int:
    """Runs action(registry peer, mesh) against the mesh Consul knows."""
    from services.client import operator_mesh
    from services.common.peers import REGISTRY

    mesh = await operator_mesh(admin_token)
    try:
        return await action(mesh.peer(REGISTRY), mesh)
    except grpc.aio.AioRpcError as exc:
        raise _admin_refusal(exc) from None
    finally:
        await mesh.close()


MiB = 1024 * 1024
# The inference replica states `lmesh models list` shows, with the Consul meta key that lists each.
REPLICA_STATES = (("warm", "models"), ("loading", "loading"), ("draining", "draining"))


def _operator_login() -> str:
    """Who an alias move is recorded for: the operator's login (informational; the admin token authorizes)."""
    try:
        return getpass.getuser() or "unknown"
    except Exception:  # no login name in the environment nor the password database
        return "unknown"


def _model_id(text: str, what: str = "the target") -> tuple[str, str]:
    name, _, version = text.partition(":")
    if not name or not version:
        raise CommandError(f"{what} {text!r} must be NAME:VERSION")
    return name, version


def alias_targets(texts: list[str]) -> list[tuple[str, str, int]]:
    """`models alias` TARGETs: NAME:VERSION, or NAME:VERSION=WEIGHT (required on each of several). A single
    target without a weight has weight 0 (the registry's "all of them")."""
    targets: list[tuple[str, str, int]] = []
    for text in texts:
        ref, sep, weight_text = text.partition("=")
        name, version = _model_id(ref)
        if not sep and len(texts) > 1:
            raise CommandError(f"the target {text!r} needs a weight (NAME:VERSION=WEIGHT) when the alias is split "
                               "across several")
        if sep and not weight_text.isdigit():
            raise CommandError(f"the weight of {text!r} must be a whole number from 1 to 10000")
        targets.append((name, version, int(weight_text) if sep else 0))
    return targets


def targets_text(targets: Any) -> str:
    """`name:version` for one target, `a:1=90 a:2=10` for a split, `-` for none (AliasTarget protos)."""
    if not targets:
        return "-"
    if len(targets) == 1:
        return f"{targets[0].name}:{targets[0].version}"
    return " ".join(f"{t.name}:{t.version}={t.weight}" for t in targets)


def replica_state(endpoints: Any, model_id: str) -> str:
    """What the passing inference replicas do with a version: `warm`, `loading`, `draining`, combined with
    commas, each with its count (`warm:2,loading:1`) when more than one replica is involved; `-` for none."""
    from services.common.discovery import meta_models

    counts: Counter[str] = Counter()
    involved = 0
    for endpoint in endpoints:
        states = [state for state, key in REPLICA_STATES if model_id in meta_models(endpoint.meta, key)]
        counts.update(states)
        involved += bool(states)
    if not counts:
        return "-"
    named = [state for state, _ in REPLICA_STATES if counts[state]]
    return ",".join(f"{state}:{counts[state]}" if involved > 1 else state for state in named)


def _utc(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _models(args: argparse.Namespace) -> int:
    from lmesh.registry.v1 import registry_pb2

    from services.common.peers import INFERENCE

    async def list_models(registry: Peer[Any], mesh: Mesh) -> int:
        response = await registry.call(lambda r: r.ListModels, registry_pb2.ListModelsRequest())
        endpoints = await mesh.peer(INFERENCE).passing()
        # Passing inference replicas per version (Consul meta `models`): 0 means a chat with it is UNAVAILABLE.
        replicas = Counter(model for endpoint in endpoints for model in endpoint.models)
        # A split alias shows its weight (`default=90`); a registry without `aliases` in its answer: the versions'.
        shown: dict[str, list[str]] = {}
        for alias in response.aliases:
            for target in alias.targets:
                entry = alias.alias if len(alias.targets) == 1 else f"{alias.alias}={target.weight}"
                shown.setdefault(f"{target.name}:{target.version}", []).append(entry)
        print(f"{'MODEL':40} {'ALIASES':20} {'CONTEXT':>8} {'FORMAT':8} {'STATE':16} {'REPLICAS':>8}")
        for m in response.models:
            fmt = registry_pb2.ModelFormat.Name(m.format).removeprefix("MODEL_FORMAT_").lower()
            model_id = f"{m.name}:{m.version}"
            aliases = shown.get(model_id, []) if response.aliases else list(m.aliases)
            print(f"{model_id:40} {','.join(aliases) or '-':20} {m.context_length:>8} {fmt:8} "
                  f"{replica_state(endpoints, model_id):16} {replicas[model_id]:>8}")
        return 0

    async def register(registry: Peer[Any], mesh: Mesh) -> int:
        from services.registry.client import register_model_dir

        version = await register_model_dir(registry, Path(args.dir), aliases=tuple(args.alias or ()),
                                           manifest_name=args.manifest, move_aliases=bool(args.alias))
        aliases = f" (aliases: {', '.join(version.aliases)})" if version.aliases else ""
        print(f"registered {version.name}:{version.version}{aliases}")
        return 0

    async def point(registry: Peer[Any], alias: str, targets: list[tuple[str, str, int]]) -> None:
        if len(targets) == 1:
            name, version, _ = targets[0]
            request = registry_pb2.SetAliasRequest(alias=alias, name=name, version=version, actor=_operator_login())
        else:
            request = registry_pb2.SetAliasRequest(
                alias=alias, actor=_operator_login(),
                targets=[registry_pb2.AliasTarget(name=n, version=v, weight=w) for n, v, w in targets])
        response = await registry.call(lambda r: r.SetAlias, request, admin=True, retry=False)
        print(f"{alias} -> {targets_text(response.alias.targets)}")

    async def alias(registry: Peer[Any], mesh: Mesh) -> int:
        await point(registry, args.alias, alias_targets(args.targets))
        return 0

    async def rollback(registry: Peer[Any], mesh: Mesh) -> int:
        response = await registry.call(
            lambda r: r.RollbackAlias, registry_pb2.RollbackAliasRequest(alias=args.alias, actor=_operator_login()),
            admin=True, retry=False)  # a rollback repeated would undo itself
        print(f"{args.alias} -> {targets_text(response.alias.targets)}")
        return 0

    async def promote(registry: Peer[Any], mesh: Mesh) -> int:
        if args.target:
            name, version = _model_id(args.target)
        else:
            listed = await registry.call(lambda r: r.ListAliases, registry_pb2.ListAliasesRequest())
            found = next((a for a in listed.aliases if a.alias == args.alias), None)
            if found is None:
                raise CommandError(f"no alias {args.alias!r}")
            if len(found.targets) < 2:
                raise CommandError(f"{args.alias} is not split (it points at {targets_text(found.targets)}); name the "
                                   f"version: lmesh models promote {args.alias} NAME:VERSION")
            lightest = min(t.weight for t in found.targets)
            canaries = [t for t in found.targets if t.weight == lightest]
            if len(canaries) > 1:
                tied = ", ".join(f"{t.name}:{t.version}" for t in canaries)
                raise CommandError(f"{args.alias}'s lightest weight {lightest} is tied between {tied}; name the "
                                   f"version: lmesh models promote {args.alias} NAME:VERSION")
            name, version = canaries[0].name, canaries[0].version
        await point(registry, args.alias, [(name, version, 0)])
        return 0

    async def history(registry: Peer[Any], mesh: Mesh) -> int:
        response = await registry.call(
            lambda r: r.GetAliasHistory, registry_pb2.GetAliasHistoryRequest(alias=args.alias, limit=args.limit))
        print(f"{'TIME':20} {'ACTION':8} {'ACTOR':20} {'FROM':30} TO")
        for move in response.moves:
            print(f"{_utc(move.time_unix_ms):20} {move.action:8} {move.actor:20} "
                  f"{targets_text(getattr(move, 'from')):30} {targets_text(move.to)}")
        return 0

    async def delete(registry: Peer[Any], mesh: Mesh) -> int:
        name, version = _model_id(args.model, "the model")
        response = await registry.call(
            lambda r: r.DeleteModel, registry_pb2.DeleteModelRequest(name=name, version=version), admin=True,
            retry=False)
        print(f"deleted {name}:{version} (freed {response.freed_bytes / MiB:.1f} MiB)")
        return 0

    async def gc(registry: Peer[Any], mesh: Mesh) -> int:
        request = registry_pb2.CollectGarbageRequest(min_age_seconds=args.min_age or 0, dry_run=args.dry_run)
        response = await registry.call(lambda r: r.CollectGarbage, request, admin=True, timeout=120, retry=False)
        for blob in response.removed_blobs:
            print(f"{blob.sha256[:16]}  {blob.size_bytes / MiB:10.1f} MiB")
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(response.removed_blobs)} blob(s), {response.freed_bytes / MiB:.1f} MiB")
        return 0

    if args.models_command == "register":
        problem = _model_dir_problem(Path(args.dir), args.manifest)
        if problem:
            return _fail(problem)
    async def stats(registry: Peer[Any], mesh: Mesh) -> int:
        from services.common.peers import GATEWAY
        from services.model_stats import collect, gateway_expositions, table

        gateways = await mesh.peer(GATEWAY).passing()
        if not gateways:
            return _fail("no passing lmesh-gateway in Consul: nothing to read")
        texts, problems = await gateway_expositions(gateways)
        for problem in problems:
            print(f"lmesh: {problem}", file=sys.stderr)
        if not texts:
            return _fail("no gateway's /metrics could be read")
        print(table(collect(texts)))
        return 0

    actions = {"list": list_models, "register": register, "alias": alias, "rollback": rollback, "promote": promote,
               "history": history, "delete": delete, "gc": gc, "stats": stats}
    return _run_async(lambda: _with_registry(actions[args.models_command], args.admin_token))


def _model_dir_problem(model_dir: Path, manifest: str) -> str | None:
    """What is wrong with `models register DIR --manifest NAME` before anything is uploaded, or None."""
    if model_dir.is_file():
        return (f"{model_dir} is a file; pass the folder that holds it: lmesh models register {model_dir.parent}"
                + ("" if model_dir.name == "lmesh_model.json" else f" --manifest {model_dir.name}"))
    if not model_dir.is_dir():
        return f"no folder {model_dir}; pass a built model's folder (`make model` builds one under $LMESH_CACHE)"
    if (model_dir / manifest).is_dir():
        where = "" if Path(manifest).is_absolute() else f" in {model_dir}"
        return (f"--manifest {manifest} is a folder{where}; pass the manifest file's name in the model folder "
                "(lmesh_model.json, or a variant's such as lmesh_model.int8.json)")
    return None


# ---- keys --------------------------------------------------------------------------------------------------

def _keys(args: argparse.Namespace) -> int:
    from services.policy.client import create_key, list_keys, revoke_key, update_key

    async def action(policy: Peer[Any]) -> int:
        if args.keys_command == "create":
            limits = _creation_limits(args)
            created = await create_key(policy, args.tenant, args.model or [], args.name, timeout_s=15,
                                       client_cert_subject=args.client_cert_subject or "",
                                       client_cert_sha256=args.client_cert_sha256 or "", limits=limits,
                                       max_priority=args.max_priority, allowed_tools=_tool_list(args.tools or []))
            bound = _cert_binding(created.key)
            priority = created.key.max_priority
            tools = created.key.allowed_tools  # shown when granted, as the priority is: the line stays as it was
            print(f"created {created.key.key_id} for tenant {created.key.tenant} "
                  f"(models: {', '.join(created.key.allowed_models) or 'all'}; "
                  f"limits: {describe_limits(created.key.limits)}"
                  f"{f'; max priority {priority}' if priority else ''}"
                  f"{'; tools: ' + ', '.join(tools) if tools else ''}"
                  f"{'; client certificate ' + bound if bound else ''}); the key is shown once:")
            print(created.api_key)
        elif args.keys_command == "list":
            listed = await list_keys(policy, args.tenant or "", timeout_s=15)  # a refusal prints no header
            # The client certificate stays last: it is the one column of unbounded width.
            print(f"{'KEY ID':14} {'TENANT':20} {'MODELS':30} {'STATUS':8} {'LIMITS':40} {'MAX PRIORITY':12} "
                  f"{'TOOLS':30} CLIENT CERTIFICATE")
            for k in listed.keys:
                status = "revoked" if k.revoked else "active"
                print(f"{k.key_id:14} {k.tenant:20} {','.join(k.allowed_models) or 'all':30} {status:8} "
                      f"{describe_limits(k.limits):40} {k.max_priority:<12} {','.join(k.allowed_tools) or 'none':30} "
                      f"{_cert_binding(k) or '-'}")
        elif args.keys_command == "update":
            update = _limits_update(args)
            # None: the grant stays; [] (--no-tools): cleared; otherwise replaced whole.
            tools = [] if args.no_tools else None if args.tools is None else _tool_list(args.tools)
            if not update.ListFields() and args.max_priority is None and tools is None:
                raise CommandError("nothing to change: give --rpm, --tpm, --budget-tokens, --period, "
                                   "--max-priority, --tools or --no-tools")
            updated = await update_key(policy, args.key_id, update, timeout_s=15, max_priority=args.max_priority,
                                       allowed_tools=tools)
            granted = ", ".join(updated.key.allowed_tools) or "none"
            print(f"updated {updated.key.key_id} (tenant {updated.key.tenant}): limits: "
                  f"{describe_limits(updated.key.limits)}; max priority {updated.key.max_priority}"
                  f"{'; tools: ' + granted if tools is not None else ''}")
        else:
            revoked = await revoke_key(policy, args.key_id, timeout_s=15)
            print(f"revoked {revoked.key.key_id}")
        return 0

    async def flagged(policy: Peer[Any]) -> int:
        try:
            return await action(policy)
        except grpc.aio.AioRpcError as exc:
            raise _as_flag(exc, args) from None

    return _run_async(lambda: _with_policy(flagged, args.admin_token))


# Policy's names for the fields of a key, and the flags (or argument) `lmesh keys` sets them with.
KEY_FLAGS = {"tenant": "--tenant", "allowed_models": "--model", "allowed_tools": "--tools",
             "tools.allowed_tools": "--tools", "display_name": "--name", "max_priority": "--max-priority",
             "client_cert_subject": "--client-cert-subject", "client_cert_sha256": "--client-cert-sha256",
             "key_id": "KEY_ID"}


def _as_flag(exc: grpc.aio.AioRpcError, args: argparse.Namespace) -> Exception:
    """A field policy refused, under the flag the operator typed and with the value given there."""
    field, said, problem = (exc.details() or "").partition(": ")
    name, _, index = field.partition("[")
    flag = KEY_FLAGS.get(name)
    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or not said or flag is None:
        return _admin_refusal(exc)
    typed = vars(args)
    given: Any = {"--model": typed.get("model") or [], "--tools": _tool_list(typed.get("tools") or []),
                  "--tenant": typed.get("tenant"), "--name": typed.get("name"), "KEY_ID": typed.get("key_id")}.get(flag)
    position = index.rstrip("]")
    if isinstance(given, list):
        given = given[int(position)] if position.isdigit() and int(position) < len(given) else None
    shown = f" {given!r}" if isinstance(given, str) else ""
    return CommandError(f"INVALID_ARGUMENT: {flag}{shown}: {problem}")


async def _with_policy(action: Callable[[Peer[Any]], Awaitable[int]], admin_token: str | None) -> int:
    """Runs action(policy peer) against the mesh Consul knows, as the operator."""
    from services.client import operator_mesh
    from services.common.peers import POLICY

    mesh = await operator_mesh(admin_token)
    try:
        return await action(mesh.peer(POLICY))
    except grpc.aio.AioRpcError as exc:
        raise _admin_refusal(exc) from None
    finally:
        await mesh.close()


# ---- limits and usage ----------------------------------------------------------------------------------------

MAX_LIMIT_FLAG = {"--rpm": 2**31 - 1, "--tpm": 10**15, "--budget-tokens": 10**15}
PERIODS = ("day", "month", "none")


def _limit_value(flag: str, text: str) -> int:
    """A limit flag's value: an integer from 0 (no limit) to its maximum; a CommandError (one line) otherwise."""
    maximum = MAX_LIMIT_FLAG[flag]
    try:
        value = int(text.strip())
    except ValueError:
        value = -1
    if not 0 <= value <= maximum:
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise CommandError(f"{flag} must be an integer from 0 (no limit) to {maximum}, got {shown!r}")
    return value


def _period_value(text: str) -> int:
    from lmesh.policy.v1 import policy_pb2

    period = text.strip().lower()
    if period not in PERIODS:
        shown = text if len(text) <= 40 else text[:40] + "…"
        raise CommandError(f"--period must be day, month or none, got {shown!r}")
    return {"day": policy_pb2.BUDGET_PERIOD_DAY, "month": policy_pb2.BUDGET_PERIOD_MONTH,
            "none": policy_pb2.BUDGET_PERIOD_NONE}[period]


def _limits_update(args: argparse.Namespace) -> Any:
    """The limit flags given (--rpm, --tpm, --budget-tokens, --period) as a policy LimitsUpdate."""
    from lmesh.policy.v1 import policy_pb2

    update = policy_pb2.LimitsUpdate()
    if args.rpm is not None:
        update.requests_per_minute = _limit_value("--rpm", args.rpm)
    if args.tpm is not None:
        update.tokens_per_minute = _limit_value("--tpm", args.tpm)
    if args.budget_tokens is not None:
        update.budget_tokens = _limit_value("--budget-tokens", args.budget_tokens)
    if args.period is not None:
        update.budget_period = _period_value(args.period)
    return update


def _tool_list(values: list[str]) -> list[str]:
    """The --tools values (each comma-separated, repeatable) as one list of tool names or patterns; policy
    checks each entry (and names the one it refuses)."""
    tools = [item.strip() for value in values for item in value.split(",")]
    if any(not tool for tool in tools):
        raise CommandError("--tools takes tool names or patterns separated by commas, e.g. "
                           "--tools calculator,convert_units or --tools '*'; an entry is empty")
    return tools


def _creation_limits(args: argparse.Namespace) -> Any:
    """A new key's limits from its flags (a budget without --period is monthly)."""
    from lmesh.policy.v1 import policy_pb2

    update = _limits_update(args)
    if not update.HasField("budget_tokens") and update.budget_period not in (0, policy_pb2.BUDGET_PERIOD_NONE):
        raise CommandError("--period needs --budget-tokens")
    return policy_pb2.Limits(requests_per_minute=update.requests_per_minute,
                             tokens_per_minute=update.tokens_per_minute, budget_tokens=update.budget_tokens,
                             budget_period=update.budget_period)


def describe_limits(limits: Any) -> str:
    """`10 requests/min, 5000 tokens/min, 100000 tokens a month`, or `none`."""
    from lmesh.policy.v1 import policy_pb2

    parts = []
    if limits.requests_per_minute:
        parts.append(f"{limits.requests_per_minute} requests/min")
    if limits.tokens_per_minute:
        parts.append(f"{limits.tokens_per_minute} tokens/min")
    if limits.budget_tokens:
        per = {policy_pb2.BUDGET_PERIOD_DAY: "a day", policy_pb2.BUDGET_PERIOD_MONTH: "a month"}.get(
            limits.budget_period, "in all")
        parts.append(f"{limits.budget_tokens} tokens {per}")
    return ", ".join(parts) or "none"


def _tenants(args: argparse.Namespace) -> int:
    from services.policy.client import set_tenant_limits

    async def action(policy: Peer[Any]) -> int:
        answer = await set_tenant_limits(policy, args.tenant, _limits_update(args), timeout_s=15)
        print(f"tenant {answer.tenant}: limits: {describe_limits(answer.limits)}")
        return 0

    return _run_async(lambda: _with_policy(action, args.admin_token))


def _usage(args: argparse.Namespace) -> int:
    from lmesh.policy.v1 import policy_pb2

    from services.policy.client import get_usage

    async def action(policy: Peer[Any]) -> int:
        usage = await get_usage(policy, args.tenant or "", timeout_s=15)
        print(f"{'SUBJECT':32} {'PERIOD':10} {'SPENT':>12} {'RESERVED':>10} {'REMAINING':>12} {'LAST 60 S':>16} LIMITS")
        for row in usage.usage:
            # The budget's period, else the month (usage is counted per day, month and in all, whatever the limits).
            wanted = row.limits.budget_period if row.limits.budget_tokens else policy_pb2.BUDGET_PERIOD_MONTH
            period = next((p for p in row.periods if p.period == wanted), policy_pb2.PeriodUsage())
            remaining = str(period.remaining_tokens) if period.HasField("remaining_tokens") else "-"
            window = f"{row.requests_in_window} req/{row.tokens_in_window} tok"
            print(f"{row.subject:32} {period.label:10} {period.spent_tokens:>12} {period.reserved_tokens:>10} "
                  f"{remaining:>12} {window:>16} {describe_limits(row.limits)}")
        return 0

    return _run_async(lambda: _with_policy(action, args.admin_token))


# ---- audit -------------------------------------------------------------------------------------------------

def _audit(args: argparse.Namespace) -> int:
    from lmesh.policy.v1 import policy_pb2

    from services.client import operator_mesh
    from services.common.peers import POLICY
    from services.policy.client import follow_audit, tail_audit, verify_audit

    if args.audit_command == "verify" and args.file is not None:
        from services.policy.audit import verify_path

        try:
            result = verify_path(Path(args.file))
        except OSError as exc:
            return _fail(_printable(str(exc)))  # a file name may hold bytes that are not UTF-8
        except KeyboardInterrupt:  # a long log, and the operator stopped waiting
            return 130
        return _verified(result.ok, result.summary())

    async def go() -> int:
        mesh = await operator_mesh(args.admin_token)
        policy = mesh.peer(POLICY)
        try:
            if args.audit_command == "verify":
                verified = await verify_audit(policy)
                if verified.ok:
                    note = f" ({verified.note})" if verified.note else ""
                    summary = (f"ok: {verified.records} records, #{verified.first_seq} to #{verified.last_seq}, head "
                               f"sha256 {verified.head_hash}{note}" if verified.records else
                               "ok: the audit log is empty")
                    return _verified(True, summary)
                return _verified(False, verified.problem.message)
            selection = policy_pb2.AuditFilter(action=args.action, principal=args.principal, tenant=args.tenant)
            if not args.follow:
                if args.n:
                    for record in (await tail_audit(policy, args.n, selection, timeout_s=60)).records:
                        _print_record(record, args.json)
                return 0
            async def print_followed() -> None:
                first = True
                async for response in follow_audit(policy, args.n, selection):
                    for record in response.records:
                        _print_record(record, args.json)
                    if first:
                        first = False
                        print(f"lmesh: following the audit log from #{response.head_seq} (Ctrl-C ends)",
                              file=sys.stderr, flush=True)

            return await _until_interrupted(print_followed())
        except grpc.aio.AioRpcError as exc:
            raise _admin_refusal(exc) from None
        finally:
            await mesh.close()

    return _run_async(go)


async def _until_interrupted(work: Awaitable[None]) -> int:
    """Runs `work` until it ends (0) or Ctrl-C (130). The interrupt cancels its task; should a gRPC read not give
    way to that within INTERRUPTED_GRACE_S, the caller's closing of the mesh cancels the calls themselves: a follow
    must end at Ctrl-C whatever it was waiting for."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()

    def on_interrupt() -> None:
        interrupted.set()
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C interrupts whatever the ending waits for

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    task = asyncio.ensure_future(work)
    stop = asyncio.create_task(interrupted.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
            return 0
        task.cancel()
        await asyncio.wait({task}, timeout=INTERRUPTED_GRACE_S)
        return 130
    finally:
        stop.cancel()
        loop.remove_signal_handler(signal.SIGINT)


def _verified(ok: bool, summary: str) -> int:
    """`lmesh audit verify`'s answer: exit 0 with the summary, or 1 naming the first bad record, in one line."""
    if ok:
        print(_printable(summary))
        return 0
    print(f"lmesh: the audit log does not verify: {_printable(summary)}", file=sys.stderr)
    return 1


def _printable(text: str) -> str:
    return text if text.isprintable() else "".join(c if c.isprintable() else "\ufffd" for c in text)


def _print_record(record: Any, as_json: bool) -> None:
    """One audit record, one line: readable, or a JSON object (`--json`)."""
    if as_json:
        print(json.dumps({"seq": record.seq, "time_unix_ms": record.time_unix_ms, "action": record.action,
                          "outcome": record.outcome, "principal": record.principal, "tenant": record.tenant,
                          "model": record.model, "rule_id": record.rule_id, "tokens": dict(record.tokens),
                          "trace_id": record.trace_id, "detail": record.detail, "prev_hash": record.prev_hash,
                          "hash": record.hash}, ensure_ascii=False), flush=True)
        return
    try:
        when = datetime.datetime.fromtimestamp(record.time_unix_ms // 1000, datetime.UTC).strftime(
            f"%Y-%m-%dT%H:%M:%S.{record.time_unix_ms % 1000:03d}Z")
    except (OverflowError, OSError, ValueError):
        when = f"{record.time_unix_ms}ms"
    parts = [f"#{record.seq}", when, record.action or "-", record.outcome or "-"]
    parts += [f"{label}={value}" for label, value in (("principal", record.principal), ("tenant", record.tenant),
                                                      ("model", record.model), ("rule", record.rule_id)) if value]
    if record.tokens:
        parts.append("tokens=" + ",".join(f"{kind}:{count}" for kind, count in sorted(record.tokens.items())))
    if record.trace_id:
        parts.append(f"trace={record.trace_id}")
    line = " ".join(parts) + (f" — {record.detail}" if record.detail else "")
    print(_printable(line), flush=True)


def _utf8_text(value: str) -> str:
    """An argparse type: text a request can carry (the shell may pass bytes that are not UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"must be UTF-8 text, got {value!r}") from None
    return value


# ---- policy rules ------------------------------------------------------------------------------------------

def _policy(args: argparse.Namespace) -> int:
    from services.policy.rules import RulesError, load_rules

    if args.rules_command == "check":
        path = Path(args.file)
        try:
            checked = load_rules(path)
        except RulesError as exc:
            return _fail(exc.located(args.file))
        except OSError as exc:
            return _fail(f"cannot read {args.file}: {_reason(exc)}")
        print(f"{args.file}: ok, {len(checked.specs)} rules, version {checked.version}; streams are held back at "
              f"most {checked.hold_width()} characters")
        return 0
    return _run_async(lambda: _show_rules(args))


async def _show_rules(args: argparse.Namespace) -> int:
    """The rules policy enforces now (the first message of WatchRules)."""
    from lmesh.policy.v1 import policy_pb2

    from services.client import operator_mesh
    from services.common.peers import POLICY

    mesh = await operator_mesh(args.admin_token)
    try:
        async with mesh.peer(POLICY).lease() as lease:
            call = lease.stub.WatchRules(policy_pb2.WatchRulesRequest(), **lease.options(timeout=15))
            try:
                rules = await call.read()
            finally:
                call.cancel()
        if rules is grpc.aio.EOF:
            raise CommandError("lmesh-policy ended the stream without rules (it is shutting down); retry")
        print(f"version {rules.version} from {rules.source}: {len(rules.rules)} rules")
        print(f"{'ID':24} {'DETECT':8} {'ACTION':7} {'APPLIES TO':14} {'TENANTS':20} MODELS")
        for rule in rules.rules:
            stages = ",".join(policy_pb2.ScreeningStage.Name(s).removeprefix("SCREENING_STAGE_").lower()
                              for s in rule.stages)
            print(f"{rule.id:24} {policy_pb2.Detector.Name(rule.detect).removeprefix('DETECTOR_').lower():8} "
                  f"{policy_pb2.RuleAction.Name(rule.action).removeprefix('RULE_ACTION_').lower():7} {stages:14} "
                  f"{','.join(rule.tenants) or 'all':20} {','.join(rule.models) or 'all'}")
        return 0
    finally:
        await mesh.close()


# ---- intentions --------------------------------------------------------------------------------------------

def _intentions(args: argparse.Namespace) -> int:
    from services.client import reachable_consul
    from services.common.connect import MeshUnavailable, apply_intentions, default_intentions, held_intentions

    async def go() -> int:
        addr = reachable_consul()
        try:
            if args.action == "apply":
                changes = await apply_intentions(addr)
                done = {**{i: "created" for i in changes.created}, **{i: "updated" for i in changes.updated}}
            held = await held_intentions(addr)
        except MeshUnavailable as exc:
            raise CommandError(str(exc)) from None
        print(f"{'SOURCE':18} {'DESTINATION':18} {'WANTED':7} HELD")
        missing = 0
        for wanted in default_intentions():
            action = held.get((wanted.source, wanted.destination), "-")
            missing += action != wanted.action
            note = f" ({done[wanted]})" if args.action == "apply" and wanted in done else ""
            print(f"{wanted.source:18} {wanted.destination:18} {wanted.action:7} {action}{note}")
        if missing:
            print(f"{missing} missing or different: `lmesh intentions apply` makes Consul hold them", file=sys.stderr)
        return 1 if missing else 0

    return _run_async(go)


# ---- tools -------------------------------------------------------------------------------------------------

def _tools(args: argparse.Namespace) -> int:
    from services.client import operator_mesh, reachable_consul
    from services.common.connect import Intention, MeshUnavailable, apply_intentions
    from services.gateway.tool_catalog import ToolCatalog

    async def go() -> int:
        if args.action == "allow":
            if not args.provider:
                raise CommandError("name the tool provider's Consul service: lmesh tools allow SERVICE")
            try:
                changes = await apply_intentions(reachable_consul(),
                                                 [Intention("lmesh-gateway", args.provider, "allow")])
            except MeshUnavailable as exc:
                raise CommandError(str(exc)) from None
            what = "created" if changes.created else "updated" if changes.updated else "already held"
            print(f"intention lmesh-gateway -> {args.provider} allow: {what}")
            return 0
        mesh = await operator_mesh()
        catalog = ToolCatalog(mesh)
        try:
            tools = await catalog.tools()
        finally:
            await catalog.close()
            await mesh.close()
        print(f"{'NAME':22} {'PROVIDER':20} {'METHOD':40} DESCRIPTION")
        for name in sorted(tools):
            tool = tools[name]
            description = tool.description if len(tool.description) <= 70 else tool.description[:69] + "…"
            print(f"{name:22} {tool.provider:20} {tool.method_path:40} {description}")
        if not tools:
            print("no tools: no passing service in Consul carries the tag lmesh-tool", file=sys.stderr)
        return 0

    return _run_async(go)


# ---- health ------------------------------------------------------------------------------------------------

def _health(args: argparse.Namespace) -> int:
    from services.common.config import consul_addr
    from services.common.connect import MeshUnavailable
    from services.common.peers import probe_health

    async def go() -> int:
        try:
            status = await probe_health(args.target, args.mesh, consul_addr=consul_addr() if args.mesh else "",
                                        timeout_s=args.timeout)
        except MeshUnavailable as exc:
            raise CommandError(str(exc)) from None
        print(status)
        return 0 if status == "SERVING" else 1

    return _run_async(go)


def _cert_binding(key: Any) -> str:
    """How `keys create` and `keys list` show a key's client certificate binding ("" when unbound)."""
    if key.client_cert_subject:
        return f"subject {key.client_cert_subject}"
    return f"sha256 {key.client_cert_sha256}" if key.client_cert_sha256 else ""


# ---- parser ------------------------------------------------------------------------------------------------

def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the arguments it will parse, only the service they serve has its settings
    loaded (importing a service's wiring costs most of a second, which every other command would pay)."""
    parser = argparse.ArgumentParser(prog="lmesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run one service")
    serve_sub = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    served = SERVICES if argv is None else _served(argv)
    for name in SERVICES:
        service_parser = serve_sub.add_parser(name, help=f"run lmesh-{name}")
        if name in served:
            add_serve_arguments(service_parser, importlib.import_module(f"services.{name}.main").SETTINGS)
    serve.set_defaults(func=_serve)

    dev = sub.add_parser("dev", help="run a whole mesh here and stream a sample answer (make run)")
    dev.add_argument("--model-dir", default=str(lmesh_cache() / "models" / "smollm2-135m-instruct"))
    dev.set_defaults(func=_dev)

    chat = sub.add_parser("chat", help="chat with the running mesh")
    chat.add_argument("message", nargs="*", help="one message to answer (interactive when omitted)")
    chat.add_argument("--model", default="", help="model reference (default: the 'default' alias)")
    chat.add_argument("--system", default="", help="a system prompt")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--tools", default="", metavar="auto|NAME,...",
                      help="let the gateway call mesh tools first: `auto` (those the key may use that fit the request) "
                           "or tool names; each step is shown on stderr")
    chat.add_argument("--priority", type=int, default=None, metavar="N",
                      help="request priority 0-9, capped by the key's max priority (default: the key's)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    chat.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling, (0, 1]; 0 is off")
    chat.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest tokens; 0 is off")
    chat.add_argument("--seed", type=int, default=0, help="the same seed gives the same answer; 0 is random")
    chat.add_argument("--repetition-penalty", type=float, default=0.0, help="(0, 2]; 0 is off")
    chat.add_argument("--presence-penalty", type=float, default=0.0,
                      help="[-2, 2], OpenAI's: less likely, any token the answer already holds; 0 is off")
    chat.add_argument("--frequency-penalty", type=float, default=0.0,
                      help="[-2, 2], OpenAI's: less likely, each time the answer already holds a token; 0 is off")
    chat.add_argument("--stop", action="append", default=None, help="a stop string (repeatable, up to 4)")
    chat.add_argument("--logprobs", type=int, default=None, metavar="N",
                      help="after the answer, list each token's logprob and its N most likely alternatives (0-20)")
    chat.add_argument("--key", default=None, help="API key (default: $LMESH_API_KEY, then .lmesh/dev-api-key)")
    chat.add_argument("--gateway", default=None, help="gateway host:port (default: $LMESH_GATEWAY_ADDR, then Consul)")
    chat.add_argument("--tls", action="store_true",
                      help="TLS to a --gateway given by address, verified with the system's roots (implied by "
                           "--gateway-ca and --client-cert; a gateway found in Consul says itself whether it serves "
                           "TLS)")
    chat.add_argument("--gateway-ca", type=READABLE_FILE_TYPE, default=None, metavar="FILE",
                      help="TLS, verifying the gateway's certificate with this CA (PEM; default: $LMESH_GATEWAY_CA, "
                           "then the system's roots)")
    chat.add_argument("--client-cert", type=READABLE_FILE_TYPE, default=None, metavar="FILE",
                      help="present this client certificate (PEM; default: $LMESH_CLIENT_CERT); one bound to an API "
                           "key needs no --key. From Consul, the gateway's client-certificate port is used")
    chat.add_argument("--client-key", type=READABLE_FILE_TYPE, default=None, metavar="FILE",
                      help="the client certificate's private key (PEM; default: $LMESH_CLIENT_KEY)")
    chat.set_defaults(func=_chat)

    tools = sub.add_parser("tools", help="the mesh tools Consul lists (services tagged lmesh-tool), or let the gateway "
                                         "call a team's tool provider")
    tools.add_argument("action", nargs="?", choices=("list", "allow"), default="list",
                       help="list (default): every tool with a passing provider; allow: a Consul intention letting "
                            "lmesh-gateway call PROVIDER (lmesh denies calls to services by default)")
    tools.add_argument("provider", nargs="?", default="", help="with allow: the provider's Consul service name")
    tools.set_defaults(func=_tools)

    intentions = sub.add_parser("intentions", help="the Consul intentions the mesh needs: show them, or apply them")
    intentions.add_argument("action", nargs="?", choices=("show", "apply"), default="show",
                            help="show (default): each intention lmesh needs and what Consul holds; apply: make "
                                 "Consul hold them (idempotent)")
    intentions.set_defaults(func=_intentions)

    health = sub.add_parser("health", help="whether a service's port answers SERVING (exit 0; for probes)")
    health.add_argument("target", help="HOST:PORT of a service's port, or of its health port with --mesh")
    health.add_argument("--mesh", metavar="SERVICE", default=None,
                        help="the port serves TLS with the mesh certificate of SERVICE (e.g. lmesh-inference: "
                             "its health port); verified with the CA roots of the Consul agent at CONSUL_HTTP_ADDR")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    health.set_defaults(func=_health)

    # The admin token of lmesh-policy and lmesh-registry, also after the action (`lmesh keys list --admin-token T`);
    # SUPPRESS keeps one given before it.
    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument("--admin-token", default=argparse.SUPPRESS, help="admin token (default: $LMESH_ADMIN_TOKEN)")

    models = sub.add_parser("models", help="list, register, alias, delete and collect model versions")
    models.add_argument("--admin-token", default=None, help="admin token (default: $LMESH_ADMIN_TOKEN)")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    models_sub.add_parser("list", help="list registered model versions")
    register = models_sub.add_parser("register", parents=[admin],
                                     help="upload a built model folder and register it")
    register.add_argument("dir", help="folder holding lmesh_model.json, the ONNX file and tokenizer.json")
    register.add_argument("--alias", action="append", help="alias to point at it (repeatable)")
    register.add_argument("--manifest", default="lmesh_model.json",
                          help="manifest of the variant to register (lmesh_model.int8.json: the int8 version, "
                               "lmesh_model.fp16.json: the fp16 one for CUDA)")
    alias = models_sub.add_parser("alias", parents=[admin],
                                  help="point an alias at NAME:VERSION, or split it: NAME:VERSION=WEIGHT ...")
    alias.add_argument("alias")
    alias.add_argument("targets", nargs="+", metavar="TARGET",
                       help="NAME:VERSION, or NAME:VERSION=WEIGHT (1 to 10000, on every target of a split)")
    rollback = models_sub.add_parser("rollback", parents=[admin],
                                     help="move an alias back to where it pointed before its last move")
    rollback.add_argument("alias")
    promote = models_sub.add_parser("promote", parents=[admin],
                                    help="move a whole alias to one version (default: its split's lightest, the "
                                         "canary)")
    promote.add_argument("alias")
    promote.add_argument("target", nargs="?", default="", metavar="NAME:VERSION")
    history = models_sub.add_parser("history", help="an alias's moves, newest first")
    history.add_argument("alias")
    history.add_argument("--limit", type=int_type(1, 10000), default=0, help="at most this many (default 100)")
    delete = models_sub.add_parser("delete", parents=[admin],
                                   help="delete a version no alias or inference replica uses, and its unshared blobs")
    delete.add_argument("model", metavar="NAME:VERSION")
    gc = models_sub.add_parser("gc", parents=[admin], help="remove the blobs no model version references")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.add_argument("--min-age", type=int_type(1), default=None, metavar="SECONDS",
                    help="only blobs stored at least this long ago (default 3600: an upload's registration may "
                         "follow it later)")
    models_sub.add_parser("stats", help="per model version: chats, errors, TTFT and tokens/s, from every gateway's "
                                        "Prometheus endpoint (since each gateway started)")
    models.set_defaults(func=_models)

    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    keys.add_argument("--admin-token", default=None, help="admin token (default: $LMESH_ADMIN_TOKEN)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", parents=[admin],
                                 help="create a key; the key is printed alone on the last line")
    create.add_argument("--tenant", required=True)
    create.add_argument("--model", action="append", help="model or glob the key may use (repeatable; default all)")
    create.add_argument("--name", default="", help="display name")
    bind = create.add_mutually_exclusive_group()
    bind.add_argument("--client-cert-subject", default=None, metavar="DN",
                      help="a client certificate with this subject, verified by the gateway's --tls-client-ca, "
                           "authenticates as the key: RFC 4514 form, as `openssl x509 -noout -subject -nameopt "
                           "RFC2253` prints it, e.g. 'CN=alice,O=acme'")
    bind.add_argument("--client-cert-sha256", default=None, metavar="FINGERPRINT",
                      help="instead: only the client certificate with this SHA-256 fingerprint (as `openssl x509 "
                           "-noout -fingerprint -sha256` prints it)")
    _add_limit_flags(create)
    create.add_argument("--max-priority", type=int, default=0, metavar="N",
                        help="the highest request priority (0-9, higher served first) the key's chats may run at; "
                             "chats that name none run at it (default 0, the lowest)")
    create.add_argument("--tools", action="append", default=None, metavar="TOOLS",
                        help="mesh tools the key's chats may call: names or globs, comma-separated, e.g. "
                             "calculator,convert_units or '*' (repeatable; default none: no tool unless granted)")
    listing = keys_sub.add_parser("list", parents=[admin], help="list keys (never their secrets)")
    listing.add_argument("--tenant", default="")
    update = keys_sub.add_parser("update", parents=[admin],
                                 help="change a key's limits, max priority or tool grant (flags left out keep their "
                                      "value; 0 removes a limit)")
    update.add_argument("key_id")
    _add_limit_flags(update)
    update.add_argument("--max-priority", type=int, default=None, metavar="N",
                        help="the key's new highest request priority, 0-9")
    tool_grant = update.add_mutually_exclusive_group()
    tool_grant.add_argument("--tools", action="append", default=None, metavar="TOOLS",
                            help="replace the key's tool grant: names or globs, comma-separated (repeatable)")
    tool_grant.add_argument("--no-tools", action="store_true",
                            help="clear the key's tool grant: it may then call no tool")
    revoke = keys_sub.add_parser("revoke", parents=[admin], help="revoke a key by id")
    revoke.add_argument("key_id")
    keys.set_defaults(func=_keys)

    tenants = sub.add_parser("tenants", help="a tenant's limits, shared by all its keys")
    tenants.add_argument("--admin-token", default=None, help="admin token (default: $LMESH_ADMIN_TOKEN)")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")
    tenant_set = tenants_sub.add_parser("set", parents=[admin],
                                        help="set a tenant's limits (flags left out keep their value; 0 removes a "
                                             "limit; none given: show them)")
    tenant_set.add_argument("tenant")
    _add_limit_flags(tenant_set)
    tenants.set_defaults(func=_tenants)

    usage = sub.add_parser("usage", help="spent, reserved and remaining tokens per period, of every tenant or of "
                                         "one tenant and its keys")
    usage.add_argument("--admin-token", default=None, help="admin token (default: $LMESH_ADMIN_TOKEN)")
    usage.add_argument("--tenant", default="", help="one tenant and each of its keys")
    usage.set_defaults(func=_usage)

    audit = sub.add_parser("audit", help="tail, follow and verify policy's audit log")
    audit.add_argument("--admin-token", default=None, help="admin token (default: $LMESH_ADMIN_TOKEN)")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    tail = audit_sub.add_parser("tail", parents=[admin], help="the last records, one line each (oldest first)")
    tail.add_argument("-n", type=int_type(0, 1000), default=20, metavar="N",
                      help="how many of the last records, 0 to 1000 (default 20)")
    tail.add_argument("-f", "--follow", action="store_true",
                      help="then print each new record as policy makes it durable, until Ctrl-C")
    tail.add_argument("--json", action="store_true", help="one JSON object per record, for scripts")
    tail.add_argument("--action", type=_utf8_text, default="",
                      help="only this action, or actions under it up to a dot (key: key.create, key.revoke, ...)")
    tail.add_argument("--principal", type=_utf8_text, default="", metavar="KEY_ID", help="only this key id")
    tail.add_argument("--tenant", type=_utf8_text, default="", help="only this tenant")
    verify = audit_sub.add_parser("verify", parents=[admin],
                                  help="recompute the hash chain: exit 0 when it verifies, else 1 naming the first "
                                       "bad record")
    verify.add_argument("--file", default=None, metavar="PATH",
                        help="verify a log here instead of asking policy: its data dir, the audit dir, or one file "
                             "of it (a segment, a backup)")
    audit.set_defaults(func=_audit)

    policy = sub.add_parser("policy", help="guardrail rules: check a rules file, show the rules in force")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="WHAT")
    rules = policy_sub.add_parser("rules", help="the guardrail rules (YAML; lmesh-policy --rules)")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    check = rules_sub.add_parser("check", help="check a rules file (no mesh needed): ok, or the bad line")
    check.add_argument("file", help="the rules file (YAML)")
    show = rules_sub.add_parser("show", help="the rules lmesh-policy enforces now")
    show.add_argument("--admin-token", default=None, help=argparse.SUPPRESS)
    policy.set_defaults(func=_policy)
    return parser


def _served(argv: list[str]) -> tuple[str, ...]:
    """The service `lmesh serve NAME ...` would run, or none for any other command."""
    return tuple(argv[1:2]) if argv[:1] == ["serve"] and argv[1:2] and argv[1] in SERVICES else ()


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """--rpm, --tpm, --budget-tokens, --period: checked by the command (one line), not by argparse."""
    parser.add_argument("--rpm", default=None, metavar="N", help="requests per minute, a sliding 60 s (0: no limit)")
    parser.add_argument("--tpm", default=None, metavar="N",
                        help="tokens per minute, prompt plus completion, a sliding 60 s (0: no limit)")
    parser.add_argument("--budget-tokens", default=None, metavar="N",
                        help="a token budget per --period (0: no budget)")
    parser.add_argument("--period", default=None, metavar="day|month|none",
                        help="the budget's period in UTC: day, month (a new budget's default) or none (never "
                             "renews)")


def parsed(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The arguments; unknown ones are refused with the usage of the command they were given to (argparse would
    show the top level's)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost (sub)command's parser that `args` chose."""
    while True:
        commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, commands.dest, None) if commands is not None else None
        if commands is None or chosen not in commands.choices:
            return parser
        parser = commands.choices[chosen]


def main(argv: list[str] | None = None) -> int:
    try:  # a malformed environment default is read while parsing (only when used) or by the command itself
        argv = sys.argv[1:] if argv is None else argv
        args = parsed(build_parser(argv), argv)
        if args.func not in (_serve, _dev):
            # Operator commands end in one line saying what went wrong; the retries before it are noise here.
            logging.getLogger("lmesh").setLevel(logging.ERROR)
        return int(args.func(args) or 0)
    except ConfigError as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        return _reader_went_away()


if __name__ == "__main__":
    sys.exit(main())
