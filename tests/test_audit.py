"""Policy's audit log: the hash chain and what verification names, durability, concurrency, segments; then the
audit RPCs and `lmesh audit` against a policy service found through Consul, hostile input to every policy RPC, and
no key or admin token in the audit, the logs or the spans."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.cli import main
from services.common.config import ServiceConfig
from services.common.consul_agent import ConsulAgent
from services.common.discovery import Mesh
from services.common.errors import ResourceExhausted, Unavailable
from services.common.peers import POLICY, Peer
from services.common.rpc import call_options
from services.common.server import RunningService, start_service
from services.policy import audit as audit_module
from services.policy import client
from services.policy.audit import (
    AUDIT_DIR,
    CURRENT,
    GENESIS,
    AuditEvent,
    AuditLog,
    Source,
    Verification,
    parse_line,
    verify_path,
    verify_sources,
)
from services.policy.main import PolicySettings, build

ROOT = Path(__file__).resolve().parent.parent
LMESH = [sys.executable, "-m", "services.cli"]
ADMIN_TOKEN = "audit-admin-t0ken-s3cret"
PLAINTEXT_KEY = re.compile(r"lmk_[A-Za-z0-9_-]{43}")


def event(i: int, **fields: Any) -> AuditEvent:
    return AuditEvent(**{"action": "authorize", "outcome": "allowed", "principal": f"key_{i:08x}", "tenant": "acme",
                         "model": "smollm2:1", "tokens": {"input": i, "max": 64}, "detail": f"decision {i}",
                         **fields})


def lines_of(data_dir: Path) -> list[bytes]:
    return (data_dir / AUDIT_DIR / CURRENT).read_bytes().splitlines(keepends=True)


# -- the chain ------------------------------------------------------------------------------------------------------


def test_records_hold_the_event_and_link_into_a_chain(tmp_path: Path) -> None:
    with AuditLog(tmp_path) as log:
        log.append(event(1, rule_id="rule-7", trace_id="ab" * 16))
        log.append(event(2))
        log.append(AuditEvent("authenticate", "denied", detail="UNAUTHENTICATED: invalid API key"))
        assert log.head[0] == 3
    lines = lines_of(tmp_path)
    assert len(lines) == 3
    records = [parse_line(line.rstrip(b"\n")) for line in lines]
    assert all(hash_ok and canonical for _, hash_ok, canonical in records)
    first, second, third = (r for r, _, _ in records)
    assert (first.seq, first.action, first.outcome, first.principal, first.tenant, first.model, first.rule_id,
            dict(first.tokens), first.trace_id) == (1, "authorize", "allowed", "key_00000001", "acme", "smollm2:1",
                                                    "rule-7", {"input": 1, "max": 64}, "ab" * 16)
    assert first.prev == GENESIS and second.prev == first.hash and third.prev == second.hash
    # The hash is SHA-256 over the line without its hash (the canonical encoding, prev included).
    body = lines[0].rstrip(b"\n").rsplit(b',"hash":', 1)[0] + b"}"
    assert hashlib.sha256(body).hexdigest() == first.hash
    assert json.loads(lines[0])["v"] == 1
    result = verify_path(tmp_path)
    assert result.ok and (result.records, result.first_seq, result.last_seq, result.head_hash) == (
        3, 1, 3, third.hash)
    assert os.stat(tmp_path / AUDIT_DIR / CURRENT).st_mode & 0o777 == 0o600


def test_a_restart_continues_the_chain(tmp_path: Path) -> None:
    with AuditLog(tmp_path) as log:
        for i in range(3):
            log.append(event(i))
        head = log.head
    with AuditLog(tmp_path) as log:
        assert log.head == head
        log.append(event(3))
        log.append(event(4))
    records = [parse_line(line.rstrip(b"\n"))[0] for line in lines_of(tmp_path)]
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[3].prev == head[1]
    assert verify_path(tmp_path).ok


def test_an_unfinished_last_line_is_reported_then_cut_off_at_open(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with AuditLog(tmp_path) as log:
        log.append(event(1))
        log.append(event(2))
    current = tmp_path / AUDIT_DIR / CURRENT
    whole = current.read_bytes()
    current.write_bytes(whole + lines_of(tmp_path)[1][:40])  # a crash in the middle of writing #3
    offline = verify_path(tmp_path)
    assert offline.ok and offline.last_seq == 2 and "unfinished" in offline.note
    caplog.set_level(logging.WARNING, logger="lmesh.policy.audit")  # `lmesh` commands run in-process quieten lmesh
    with AuditLog(tmp_path) as log:
        log.append(event(3))
    assert "cut off an unfinished last line" in caplog.text
    result = verify_path(tmp_path)
    assert result.ok and result.last_seq == 3 and not result.note


# A valid log of 30 records, built once; tampering tests take a prefix of it.
_LOG: list[bytes] = []


def valid_log() -> list[bytes]:
    if not _LOG:
        import tempfile

        with tempfile.TemporaryDirectory() as folder, AuditLog(Path(folder)) as log:
            for i in range(30):
                log.append(event(i))
            _LOG.extend(lines_of(Path(folder)))
    return list(_LOG)


def verify_bytes(lines: list[bytes], *, whole: bool = True) -> Verification:
    return verify_sources([Source(CURRENT, io.BytesIO(b"".join(lines)), None, 1 if whole else None)])


def forged(line: bytes, **changes: Any) -> bytes:
    """`line` with fields changed and its hash recomputed, as someone who knows the format would forge it."""
    data = json.loads(line)
    data.update(changes)
    data.pop("hash")
    body = json.dumps(data, separators=(",", ":"))
    return f'{body[:-1]},"hash":"{hashlib.sha256(body.encode()).hexdigest()}"}}\n'.encode()


@settings(max_examples=120, deadline=None)
@given(length=st.integers(3, 30), data=st.data(),
       how=st.sampled_from(["edit", "edit-seq", "delete", "swap", "duplicate", "rewrite", "garbage"]))
def test_tampering_with_one_record_is_named(length: int, data: st.DataObject, how: str) -> None:
    lines = valid_log()[:length]
    assert verify_bytes(lines).ok
    # The last record of a log can only be checked against the head policy knows (online): keep to the others.
    k = data.draw(st.integers(1, length - 1), label="record")  # 1-based seq
    if how == "edit":
        lines[k - 1] = lines[k - 1].replace(b'"decision ', b'"DECISION ')
        expected = (k, "edited")
    elif how == "edit-seq":
        lines[k - 1] = lines[k - 1].replace(f'"seq":{k},'.encode(), f'"seq":{k + 100},'.encode())
        expected = (k, "edited")
    elif how == "delete":
        del lines[k - 1]
        expected = (k, "missing")
    elif how == "swap":
        j = data.draw(st.integers(k + 1, length), label="other")
        lines[k - 1], lines[j - 1] = lines[j - 1], lines[k - 1]
        expected = (k, "reordered")
    elif how == "duplicate":
        lines.insert(k, lines[k - 1])
        expected = (k, "reordered")
    elif how == "rewrite":
        lines[k - 1] = forged(lines[k - 1], detail="nothing to see")
        expected = (k, "rewritten")
    else:
        lines[k - 1] = b'{"not": "a record"}\n'
        expected = (k, "malformed")
    result = verify_bytes(lines)
    assert result.problem is not None, how
    assert (result.problem.seq, result.problem.kind) == expected, result.problem
    assert result.summary().startswith(f"record #{k} ") and "\n" not in result.summary()


def test_what_only_the_writer_can_tell_is_checked_against_its_head(tmp_path: Path) -> None:
    """A cut-off tail, or a last record rewritten with its hash recomputed, verifies offline (nothing follows it to
    disagree); the running policy knows the head it wrote."""
    with AuditLog(tmp_path) as log:
        for i in range(5):
            log.append(event(i))
        assert log.verify().ok
        current = tmp_path / AUDIT_DIR / CURRENT
        whole = current.read_bytes()
        lines = lines_of(tmp_path)
        current.write_bytes(b"".join(lines[:3]))
        cut = log.verify()
        assert cut.problem is not None and (cut.problem.seq, cut.problem.kind) == (4, "truncated")
        assert verify_path(tmp_path).ok  # offline, it looks whole
        current.write_bytes(b"".join([*lines[:4], forged(lines[4], outcome="denied")]))
        rewritten = log.verify()
        assert rewritten.problem is not None and (rewritten.problem.seq, rewritten.problem.kind) == (5, "rewritten")
        current.write_bytes(whole)


def test_the_first_record_cannot_be_dropped_unseen(tmp_path: Path) -> None:
    lines = valid_log()[:5]
    gone = verify_bytes(lines[1:])
    assert gone.problem is not None and (gone.problem.seq, gone.problem.kind) == (1, "missing")
    # One file given alone may be a later part of a log: its first link is taken on trust, and said so.
    alone = verify_bytes(lines[1:], whole=False)
    assert alone.ok and alone.first_seq == 2 and "taken on trust" in alone.note


def test_lmesh_audit_verify_file_names_the_first_bad_record(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with AuditLog(tmp_path / "policy") as log:
        for i in range(8):
            log.append(event(i))
    assert main(["audit", "verify", "--file", str(tmp_path / "policy")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: 8 records, #1 to #8, head sha256 ") and out.count("\n") == 1
    current = tmp_path / "policy" / AUDIT_DIR / CURRENT
    lines = lines_of(tmp_path / "policy")
    cases = {
        "edited": [*lines[:2], lines[2].replace(b'"allowed"', b'"ALLOWED"'), *lines[3:]],
        "missing": [*lines[:4], *lines[5:]],
        "reordered": [*lines[:5], lines[6], lines[5], lines[7]],
    }
    for kind, tampered in cases.items():
        current.write_bytes(b"".join(tampered))
        assert main(["audit", "verify", "--file", str(current)]) == 1, kind
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lmesh: the audit log does not verify: record #"), err
        seq = {"edited": 3, "missing": 5, "reordered": 6}[kind]
        assert err.startswith(f"lmesh: the audit log does not verify: record #{seq} "), err
        assert kind in err or (kind == "reordered" and "out of order" in err), err
    # The same through a separate process: the exit status is what a script sees.
    result = subprocess.run([*LMESH, "audit", "verify", "--file", str(tmp_path / "policy")], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.startswith("lmesh: the audit log does not verify: record #6 is out of order")


@pytest.mark.parametrize("what", ["nothing", "empty-dir", "binary", "huge-line", "not-utf8-name", "device"])
def test_lmesh_audit_verify_file_on_what_is_not_a_log_is_one_line(what: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x"
    if what == "empty-dir":
        path.mkdir()
    elif what == "binary":
        path.write_bytes(os.urandom(4096))
    elif what == "huge-line":
        path.write_bytes(b"{" * (3 * 1024 * 1024) + b"\n")
    elif what == "not-utf8-name":
        path = tmp_path / "\udcff"
    elif what == "device":
        path = Path("/dev/zero")  # endless, and no line in it
    code = main(["audit", "verify", "--file", str(path)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmesh: "), err
    if what in ("binary", "huge-line"):
        assert code == 1 and "record #1 is unreadable" in err
    else:
        assert code == 2 and ("no audit log" in err or "no file or directory" in err or "neither" in err), err


# -- durability and concurrency ------------------------------------------------------------------------------------


async def test_concurrent_decisions_and_threads_make_one_chain_with_shared_syncs(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.open()
    try:
        async def decision(i: int) -> None:
            with log.deferred() as pending:
                log.append(event(i, detail=f"task {i}"))
                seq = pending.seq
            await log.durable(seq)
            assert log.head[0] >= seq  # durable before the decision takes effect

        async def scoped(i: int) -> None:
            async with log.decisions():
                log.append(event(i, detail=f"scoped {i}"))
                await asyncio.sleep(0)
                log.append(event(i, detail=f"scoped {i} again"))

        def thread(t: int) -> None:
            for i in range(50):
                log.append(event(i, detail=f"thread {t} {i}"))  # durable on return

        threads = [threading.Thread(target=thread, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        async def background(i: int) -> None:
            await log.record(event(i, detail=f"background {i}"))

        await asyncio.gather(*(decision(i) for i in range(200)), *(scoped(i) for i in range(100)),
                             *(background(i) for i in range(50)))
        for t in threads:
            await asyncio.to_thread(t.join)
        result = await asyncio.to_thread(log.verify)
        assert result.ok and result.records == 650, result
        details = {parse_line(line.rstrip(b"\n"))[0].detail for line in lines_of(tmp_path)}
        assert len(details) == 650  # no record lost, none written twice
        assert log.syncs < 650  # concurrent decisions shared syncs
    finally:
        log.close()


async def test_a_failed_write_or_sync_refuses_every_later_decision(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path)
    log.open()
    log.append(event(0))

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(audit_module.os, "fdatasync", broken)
    with pytest.raises(Unavailable, match="cannot be written"):
        log.append(event(1))
    with pytest.raises(Unavailable, match="cannot be written"):
        async with log.decisions():
            log.append(event(2))
    monkeypatch.undo()
    with pytest.raises(Unavailable, match="policy decides nothing until it is restarted"):
        log.append(event(3))  # stays refused: after a failed sync nobody knows what reached the disk
    log.close()
    with AuditLog(tmp_path) as reopened:
        reopened.append(event(4))
        assert reopened.verify().ok


def test_one_writer_per_log(tmp_path: Path) -> None:
    with AuditLog(tmp_path):
        with pytest.raises(OSError, match=rf"in use by another lmesh-policy \(pid {os.getpid()}\); run one policy"):
            AuditLog(tmp_path).open()
    with AuditLog(tmp_path):  # free once closed
        pass


def test_appending_to_a_closed_log_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="not open"):
        AuditLog(tmp_path).append(event(0))


def test_segments_carry_the_chain_and_can_be_archived(tmp_path: Path) -> None:
    with AuditLog(tmp_path, segment_bytes=2000) as log:
        for i in range(30):
            log.append(event(i))
    with AuditLog(tmp_path, segment_bytes=2000) as log:  # reopened: the chain goes on across segments too
        for i in range(30, 40):
            log.append(event(i))
        assert log.verify().ok
    audit_dir = tmp_path / AUDIT_DIR
    segments = sorted(audit_dir.glob("segment-*.jsonl"))
    assert len(segments) >= 4
    firsts = [int(p.name[8:20]) for p in segments]
    assert firsts[0] == 1 and firsts == sorted(firsts)
    whole = verify_path(tmp_path)
    assert whole.ok and (whole.records, whole.last_seq) == (40, 40)
    middle = verify_path(segments[2])
    assert middle.ok and middle.first_seq == firsts[2] and "taken on trust" in middle.note
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.move(segments[0], archive)  # an operator archives the oldest segment
    assert verify_path(tmp_path).ok and verify_path(tmp_path).first_seq == firsts[1]
    shutil.move(segments[2], archive)  # a segment from the middle goes missing
    gap = verify_path(tmp_path)
    assert gap.problem is not None and (gap.problem.seq, gap.problem.kind) == (firsts[2], "missing")


def test_no_secret_reaches_the_file_and_fields_stay_bounded(tmp_path: Path) -> None:
    key = "lmk_" + "Zq9_" * 10 + "abc"
    with AuditLog(tmp_path, redact=[ADMIN_TOKEN, None]) as log:
        log.append(AuditEvent(action="authorize\n", outcome="denied", principal=key, tenant=f"t {ADMIN_TOKEN}",
                              model="m" * 5000, rule_id=key[:20], tokens={key: 1, "input": 2 ** 70, "x": "y"},  # type: ignore[dict-item]
                              detail=f"the caller sent {key} and {ADMIN_TOKEN}\x00\x1b[31m"))
    raw = (tmp_path / AUDIT_DIR / CURRENT).read_bytes()
    assert key.encode() not in raw and key[4:20].encode() not in raw and ADMIN_TOKEN.encode() not in raw
    record, hash_ok, _ = parse_line(raw.rstrip(b"\n"))
    assert hash_ok and record.action == "authorize\ufffd" and record.principal == "[redacted]"
    assert len(record.model) == 512 and record.tokens == {"[redacted]": 1, "input": 2 ** 63 - 1}
    assert "\x1b" not in record.detail and len(raw) < 2500
    assert verify_path(tmp_path).ok


async def test_tail_and_follow_read_what_is_durable(tmp_path: Path) -> None:
    with AuditLog(tmp_path, ring_records=8) as log:
        for i in range(10):
            log.append(event(i, action="key.create" if i % 2 else "authorize"))
        records, head = log.tail(3)
        assert head == 10 and [r.seq for r in records] == [8, 9, 10]
        keys, _ = log.tail(100, lambda r: r.action.startswith("key."))
        assert [r.seq for r in keys] == [2, 4, 6, 8, 10]
        scanned, _ = log.tail(100, lambda r: r.action == "authorize", max_scan=4)
        assert [r.seq for r in scanned] == [7, 9]
        follow = log.follow(10)
        nxt = asyncio.ensure_future(anext(follow))
        await asyncio.sleep(0.05)
        assert not nxt.done()
        async with log.decisions():
            log.append(event(11))
            log.append(event(12))
        assert [r.seq for r in await asyncio.wait_for(nxt, 5)] == [11, 12]
        behind = log.follow(0)  # older than the in-memory window
        with pytest.raises(ResourceExhausted, match="fell more than 8 records behind"):
            await anext(behind)
        log.end_follows()
        with pytest.raises(Unavailable, match="shutting down"):
            await asyncio.wait_for(anext(follow), 5)


# -- the service: audit RPCs, `lmesh audit`, hostile input ---------------------------------------------------------


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(" ".join([record.getMessage(), record.exc_text or "", str(record.args)]))


@dataclass
class Guarded:
    """One policy instance with an admin token, whose spans and logs the tests keep; every secret it was shown."""

    running: RunningService
    mesh: Mesh
    peer: Peer[policy_pb2_grpc.PolicyStub]
    stub: policy_pb2_grpc.PolicyStub
    data_dir: Path
    consul_addr: str
    spans: InMemorySpanExporter
    logs: Captured
    secrets: list[str] = field(default_factory=lambda: [ADMIN_TOKEN])
    outputs: list[str] = field(default_factory=list)
    valid_key: str = ""  # a key of tenant `hostile`, for hostile requests that get past authentication

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "CONSUL_HTTP_ADDR": self.consul_addr, "LMESH_MTLS": "off", "LMESH_ADMIN_TOKEN": "",
                "LMESH_HOME": str(self.data_dir.parent / "home"), **extra}

    async def cli(self, *args: str, token: str | None = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
        argv = [*LMESH, *args, *(["--admin-token", token] if token else [])]
        result = await asyncio.to_thread(subprocess.run, argv, env=self.env(), capture_output=True, text=True,
                                         timeout=120, cwd=ROOT)
        self.outputs += [result.stdout, result.stderr]
        return result

    async def key(self, tenant: str, models: list[str] | None = None) -> policy_pb2.CreateApiKeyResponse:
        created = await client.create_key(self.peer, tenant, models or [])
        self.secrets.append(created.api_key)
        return created


ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


async def call(stub: policy_pb2_grpc.PolicyStub, method: str, request: Any,
               metadata: tuple[tuple[str, str], ...] = ADMIN) -> Any:
    options = call_options(10.0)
    options["metadata"] = [*options["metadata"], *metadata]
    return await getattr(stub, method)(request, **options)


async def status(stub: policy_pb2_grpc.PolicyStub, method: str, request: Any,
                 metadata: tuple[tuple[str, str], ...] = ADMIN) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call(stub, method, request, metadata)
    return failed.value.code(), failed.value.details() or ""


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def guarded(consul_agent: ConsulAgent, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Guarded]:
    logs = Captured()
    logging.getLogger().addHandler(logs)
    lmesh_logger = logging.getLogger("lmesh")
    level = lmesh_logger.level
    lmesh_logger.setLevel(logging.DEBUG)  # everything policy logs is checked (`lmesh` commands run here quieten it)
    spans = InMemorySpanExporter()
    data_dir = tmp_path_factory.mktemp("audited") / "policy"
    config = ServiceConfig(mtls=False, service="policy", consul_addr=consul_agent.http_addr, data_dir=data_dir,
                           settings=PolicySettings(admin_token=ADMIN_TOKEN))
    running = await start_service(config, build, extra_exporters=[spans])
    mesh = Mesh(consul_agent.http_addr, admin_token=ADMIN_TOKEN)
    peer = mesh.peer(POLICY)
    endpoint = await peer.wait_for(lambda e: e.port == running.port, timeout=15)
    try:
        policy = Guarded(running, mesh, peer, endpoint.stub(policy_pb2_grpc.PolicyStub), data_dir,
                         consul_agent.http_addr, spans, logs)
        policy.valid_key = (await policy.key("hostile", ["smollm2-*"])).api_key
        yield policy
    finally:
        await running.stop()
        await mesh.close()
        logging.getLogger().removeHandler(logs)
        lmesh_logger.setLevel(level)


async def tail(policy: Guarded, limit: int = 20, **selection: str) -> list[policy_pb2.AuditRecord]:
    response = await client.tail_audit(policy.peer, limit, policy_pb2.AuditFilter(**selection))
    return list(response.records)


async def test_every_decision_is_recorded_with_its_fields(guarded: Guarded) -> None:
    created = await guarded.key("audited", ["smollm2-*"])
    key_id = created.key.key_id
    allowed = await call(guarded.stub, "Authorize", policy_pb2.AuthorizeRequest(
        api_key=created.api_key, model="default", resolved_model="smollm2-135m:1", input_tokens=12, max_tokens=64))
    assert allowed.principal.key_id == key_id
    assert (await status(guarded.stub, "Authorize", policy_pb2.AuthorizeRequest(
        api_key=created.api_key, model="llama3:1")))[0] == grpc.StatusCode.PERMISSION_DENIED
    await call(guarded.stub, "Authenticate", policy_pb2.AuthenticateRequest(api_key=created.api_key))
    await client.list_keys(guarded.peer, "audited")
    await client.revoke_key(guarded.peer, key_id)
    records = await tail(guarded, tenant="audited")
    assert [(r.action, r.outcome) for r in records] == [
        ("key.create", "ok"), ("authorize", "allowed"), ("authorize", "denied"), ("authenticate", "allowed"),
        ("key.list", "ok"), ("key.revoke", "ok")]
    create, authorize, denied, authenticate, listing, revoke = records
    assert create.principal == key_id and "models smollm2-*" in create.detail
    assert "caller without a mesh identity" in create.detail  # in-process, no mTLS: no identity to name
    assert (authorize.principal, authorize.model, dict(authorize.tokens)) == (key_id, "smollm2-135m:1",
                                                                             {"input": 12, "max": 64})
    assert re.fullmatch(r"[0-9a-f]{32}", authorize.trace_id)
    assert denied.principal == key_id and denied.model == "llama3:1" and "PERMISSION_DENIED" in denied.detail
    assert authenticate.principal == key_id and "API key" in authenticate.detail
    assert listing.detail.endswith("1 keys") and revoke.principal == key_id
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records) if b.seq == a.seq + 1)
    # A credential that identifies nobody is recorded too, without a principal.
    await status(guarded.stub, "Authenticate", policy_pb2.AuthenticateRequest(api_key="lmk_" + "Q" * 43))
    unknown = (await tail(guarded, 1, action="authenticate"))[0]
    assert (unknown.outcome, unknown.principal, unknown.detail) == (
        "denied", "", "API key; UNAUTHENTICATED: invalid API key")


async def test_the_audit_rpcs_need_the_admin_token_and_refusals_are_recorded(guarded: Guarded) -> None:
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        for method, request in (("TailAudit", policy_pb2.TailAuditRequest()),
                                ("VerifyAudit", policy_pb2.VerifyAuditRequest())):
            code, details = await status(guarded.stub, method, request, metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED and ADMIN_TOKEN not in details
        stream = guarded.stub.FollowAudit(policy_pb2.FollowAuditRequest(), metadata=metadata, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stream.read()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    refusals = await tail(guarded, 6, action="audit")
    assert [(r.action, r.outcome) for r in refusals] == [
        ("audit.tail", "denied"), ("audit.verify", "denied"), ("audit.follow", "denied")] * 2
    assert "admin token required" in refusals[0].detail and "invalid admin token" in refusals[3].detail


async def test_follow_streams_records_as_they_become_durable(guarded: Guarded) -> None:
    created = await guarded.key("followed")
    stream = guarded.stub.FollowAudit(policy_pb2.FollowAuditRequest(
        backlog=1, filter=policy_pb2.AuditFilter(tenant="followed")), metadata=ADMIN, timeout=30)
    first = await stream.read()
    assert [r.action for r in first.records] == ["key.create"] and first.head_seq >= first.records[0].seq
    await call(guarded.stub, "Authorize", policy_pb2.AuthorizeRequest(api_key=created.api_key, model="m"))
    nxt = await asyncio.wait_for(stream.read(), 10)
    assert [(r.action, r.outcome, r.principal) for r in nxt.records] == [
        ("authorize", "allowed", created.key.key_id)]
    stream.cancel()


async def test_verify_through_policy(guarded: Guarded) -> None:
    verified = await client.verify_audit(guarded.peer)
    assert verified.ok and verified.first_seq == 1 and verified.last_seq == verified.records > 10
    assert re.fullmatch(r"[0-9a-f]{64}", verified.head_hash) and not verified.HasField("problem")
    last = (await tail(guarded, 1))[0]
    assert (last.action, last.outcome) == ("audit.verify", "ok") and verified.head_hash in last.detail


@pytest.mark.parametrize(("method", "request_message", "field"), [
    ("TailAudit", policy_pb2.TailAuditRequest(limit=-1), "limit"),
    ("TailAudit", policy_pb2.TailAuditRequest(limit=1001), "limit"),
    ("TailAudit", policy_pb2.TailAuditRequest(filter=policy_pb2.AuditFilter(action="a\nb")), "filter.action"),
    ("TailAudit", policy_pb2.TailAuditRequest(filter=policy_pb2.AuditFilter(tenant="t" * 257)), "filter.tenant"),
])
async def test_malformed_audit_requests_are_invalid_argument(guarded: Guarded, method: str,
                                                             request_message: Any, field: str) -> None:
    code, details = await status(guarded.stub, method, request_message)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}: ")


def _strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Any message of a request type: strings of any text (and a few shaped like what the fields expect),
    integers of the field's whole range, nested messages, repeated fields."""
    texts = st.one_of(st.text(max_size=300), st.sampled_from(
        ["", "acme", "smollm2-135m", "smollm2-135m:1", "key_00000000", "CN=alice,O=acme", "ab" * 32, "*", "key",
         "x" * 2000]))
    scalars: dict[int, st.SearchStrategy[Any]] = {
        FieldDescriptor.TYPE_STRING: texts, FieldDescriptor.TYPE_BOOL: st.booleans(),
        FieldDescriptor.TYPE_INT32: st.one_of(st.integers(-(2 ** 31), 2 ** 31 - 1), st.integers(-2, 2000)),
        FieldDescriptor.TYPE_INT64: st.integers(-(2 ** 63), 2 ** 63 - 1),
        FieldDescriptor.TYPE_UINT32: st.integers(0, 2 ** 32 - 1),
        FieldDescriptor.TYPE_UINT64: st.integers(0, 2 ** 64 - 1),
        FieldDescriptor.TYPE_ENUM: st.integers(-3, 12),  # unknown values too: proto3 keeps them
        FieldDescriptor.TYPE_DOUBLE: st.floats(), FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
        FieldDescriptor.TYPE_BYTES: st.binary(max_size=64)}
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in descriptor.fields:
        if f.message_type is not None:
            if f.message_type.GetOptions().map_entry or depth > 1:
                continue
            strategy = _strategy(f.message_type, depth + 1)
        else:
            strategy = scalars[f.type]
        fields[f.name] = st.lists(strategy, max_size=4) if f.is_repeated else strategy
    cls = message_factory.GetMessageClass(descriptor)
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: cls(**values))


POLICY_METHODS = list(policy_pb2.DESCRIPTOR.services_by_name["Policy"].methods)
HOSTILE = st.tuples(st.sampled_from(POLICY_METHODS), st.booleans()).flatmap(
    lambda pair: st.tuples(st.just(pair[0]), st.just(pair[1]), _strategy(pair[0].input_type)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile=HOSTILE)
async def test_hostile_input_to_every_policy_rpc_gets_a_proper_status(guarded: Guarded, hostile: Any) -> None:
    method, with_token, request = hostile
    metadata = ADMIN if with_token else ()
    if method.name in ("Authenticate", "Authorize") and with_token and request.WhichOneof("credential") != \
            "client_certificate":
        request.api_key = guarded.valid_key  # past authentication: the rest of the request decides
    try:
        if method.server_streaming:
            stream = getattr(guarded.stub, method.name)(request, metadata=metadata, timeout=10)
            try:
                await stream.read()
            finally:
                stream.cancel()
        else:
            await call(guarded.stub, method.name, request, metadata)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (method.name, exc.details())
        assert "Traceback" not in (exc.details() or "")
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert re.match(r"[\w.\[\]]+: ", exc.details() or ""), exc.details()  # names the field


async def test_lmesh_audit_tail_prints_one_line_per_record(guarded: Guarded) -> None:
    created = await guarded.key("cli-tail", ["smollm2-*"])
    await call(guarded.stub, "Authorize", policy_pb2.AuthorizeRequest(
        api_key=created.api_key, model="smollm2-135m:1", input_tokens=5, max_tokens=7))
    result = await guarded.cli("audit", "tail", "-n", "2", "--tenant", "cli-tail")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert re.match(r"#\d+ \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z key\.create ok principal=key_[0-9a-f]{8} "
                    r"tenant=cli-tail ", lines[0]), lines[0]
    assert re.match(r"#\d+ \S+ authorize allowed principal=key_[0-9a-f]{8} tenant=cli-tail model=smollm2-135m:1 "
                    r"tokens=input:5,max:7 trace=[0-9a-f]{32} — API key$", lines[1]), lines[1]
    as_json = await guarded.cli("audit", "tail", "-n", "1", "--json", "--action", "authorize", "--tenant", "cli-tail")
    record = json.loads(as_json.stdout)
    assert (record["action"], record["tokens"], len(record["hash"])) == ("authorize", {"input": 5, "max": 7}, 64)
    empty = await guarded.cli("audit", "tail", "-n", "0")
    assert empty.returncode == 0 and empty.stdout == ""


async def test_lmesh_audit_tail_follow_prints_new_records_as_they_come(guarded: Guarded) -> None:
    created = await guarded.key("cli-follow")
    process = await asyncio.create_subprocess_exec(
        *LMESH, "audit", "tail", "--follow", "-n", "1", "--tenant", "cli-follow", "--admin-token", ADMIN_TOKEN,
        env={**guarded.env(), "PYTHONFAULTHANDLER": "1"}, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    try:
        backlog = await asyncio.wait_for(process.stdout.readline(), 60)
        assert b" key.create ok " in backlog
        note = await asyncio.wait_for(process.stderr.readline(), 30)
        assert note.startswith(b"lmesh: following the audit log from #")
        for model in ("a", "b"):
            await call(guarded.stub, "Authorize", policy_pb2.AuthorizeRequest(api_key=created.api_key, model=model))
        lines = [await asyncio.wait_for(process.stdout.readline(), 10) for _ in range(2)]
        assert [b" authorize allowed " in line and f"model={m} ".encode() in line
                for line, m in zip(lines, "ab", strict=True)] == [True, True], lines
    finally:
        process.send_signal(signal.SIGINT)
        exited = asyncio.ensure_future(process.communicate())
        done, _ = await asyncio.wait({exited}, timeout=30)
        if not done:  # where it hangs: faulthandler prints every thread's stack on SIGABRT
            process.send_signal(signal.SIGABRT)
            _, err = await exited
            pytest.fail(f"lmesh audit tail --follow did not end within 30 s of SIGINT:\n{err.decode()}")
        out, err = exited.result()
    assert process.returncode == 130 and b"Traceback" not in err, err
    guarded.outputs += [backlog.decode(), out.decode(), err.decode()]


@pytest.mark.parametrize(("args", "expected"), [
    (["audit", "tail", "-n", "-1"], "argument -n: must be an integer from 0 to 1000, got '-1'"),
    (["audit", "tail", "-n", "x"], "argument -n: must be an integer from 0 to 1000, got 'x'"),
    (["audit", "tail", "-n", "1001"], "argument -n: must be an integer from 0 to 1000, got '1001'"),
    (["audit", "tail", "--action", "\udcff"], "argument --action: must be UTF-8 text"),
    (["audit", "verify", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_of_lmesh_audit_are_argparse_errors(args: list[str], expected: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert expected in err.splitlines()[-1] and "Traceback" not in err


async def test_lmesh_audit_errors_from_policy_are_one_line(guarded: Guarded) -> None:
    wrong = await guarded.cli("audit", "verify", token="wrong")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1
    assert wrong.stderr.startswith("lmesh: UNAUTHENTICATED: invalid admin token; pass --admin-token")
    bad = await guarded.cli("audit", "tail", "--action", "x" * 300)
    assert bad.returncode == 2 and bad.stderr == ("lmesh: INVALID_ARGUMENT: filter.action: must be at most 256 "
                                                  "characters\n")
    control = await guarded.cli("audit", "tail", "--tenant", "a\tb")
    assert control.returncode == 2 and control.stderr.startswith("lmesh: INVALID_ARGUMENT: filter.tenant: ")


async def test_lmesh_audit_verify_asks_policy_and_names_an_edited_record(guarded: Guarded) -> None:
    ok = await guarded.cli("audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert re.fullmatch(r"ok: \d+ records, #1 to #\d+, head sha256 [0-9a-f]{64}\n", ok.stdout), ok.stdout
    # Someone edits one record of the running policy's log in place (same length: a key id's digit).
    current = guarded.data_dir / AUDIT_DIR / CURRENT
    lines = current.read_bytes().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if b'"action":"key.revoke"' in line)
    seq = json.loads(lines[index])["seq"]
    offset = sum(len(line) for line in lines[:index]) + lines[index].index(b'"principal":"key_') + 17
    with current.open("r+b") as file:
        file.seek(offset)
        digit = file.read(1)
        file.seek(offset)
        file.write(b"0" if digit != b"0" else b"1")
    bad = await guarded.cli("audit", "verify")
    assert bad.returncode == 1 and bad.stdout == "" and bad.stderr.count("\n") == 1, bad
    assert bad.stderr.startswith(f"lmesh: the audit log does not verify: record #{seq} was edited: its content does "
                                 "not match its hash (current.jsonl line "), bad.stderr
    offline = await guarded.cli("audit", "verify", "--file", str(guarded.data_dir), token=None)
    assert offline.returncode == 1 and f"record #{seq} was edited" in offline.stderr
    recorded = (await tail(guarded, 1, action="audit.verify"))[0]
    assert recorded.outcome == "failed" and f"record #{seq} was edited" in recorded.detail


async def test_no_key_or_admin_token_in_the_audit_the_logs_or_the_spans(guarded: Guarded) -> None:
    """Runs last in this module: after every test above used keys, the admin token and hostile input."""
    assert len(guarded.secrets) > 4
    audit_bytes = b"".join(p.read_bytes() for p in (guarded.data_dir / AUDIT_DIR).iterdir())
    assert audit_bytes.count(b"\n") > 50
    span_texts = []
    for span in guarded.spans.get_finished_spans():
        span_texts += [span.name, str(span.status.description), json.dumps(dict(span.attributes or {}))]
        span_texts += [f"{e.name} {dict(e.attributes or {})}" for e in span.events]
    assert len(span_texts) > 50
    assert any("audit log open at" in text for text in guarded.logs.texts)
    for where, text in (("audit", audit_bytes.decode()), ("logs", "\n".join(guarded.logs.texts)),
                        ("spans", "\n".join(span_texts)), ("cli", "\n".join(guarded.outputs))):
        assert not PLAINTEXT_KEY.search(text), f"an API key in the {where}"
        for secret in guarded.secrets:
            assert secret not in text and secret[4:24] not in text, f"a secret in the {where}"
