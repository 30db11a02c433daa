"""What the audit log costs a decision: the append itself, a decision made durable alone, concurrent decisions
sharing syncs, and Authorize over gRPC with and without the audit (policy's servicer on a local port, no Consul).

  python -m bench.audit_append [--dir DIR] [--decisions 2000] [--concurrency 1,8,64]

DIR (default: a temporary folder under the current directory) should be on the disk policy's data dir would use:
the cost is mostly that disk's fdatasync.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from lmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.admin import AdminGuard
from services.common.peers import POLICY, direct_stub
from services.policy.accounting import Accounting
from services.policy.audit import AuditEvent, AuditLog, MemoryAudit
from services.policy.auditing import AuditedPolicyServicer
from services.policy.keys import KeyStore
from services.policy.ledger import SqliteLedger
from services.policy.servicer import PolicyServicer


def _event(i: int) -> AuditEvent:
    return AuditEvent("authorize", "allowed", principal="key_3f9a1c2b", tenant="acme", model="smollm2-135m:1",
                      tokens={"input": 120 + i % 7, "max": 256}, trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
                      detail="API key")


def fsync_alone(directory: Path, n: int = 300) -> float:
    """µs per write + fdatasync of one ~400-byte line: the disk's floor for a decision made durable alone."""
    fd, name = tempfile.mkstemp(dir=directory)
    try:
        line = b"x" * 400 + b"\n"
        started = time.perf_counter()
        for _ in range(n):
            os.write(fd, line)
            os.fdatasync(fd)
        return (time.perf_counter() - started) / n * 1e6
    finally:
        os.close(fd)
        os.unlink(name)


def append_cpu(directory: Path, n: int = 20_000) -> float:
    """µs of the caller's time per append when the sync is deferred: encode, hash, write (no fdatasync)."""
    with AuditLog(directory / "cpu") as log, log.deferred():
        started = time.perf_counter()
        for i in range(n):
            log.append(_event(i))
        return (time.perf_counter() - started) / n * 1e6


async def decisions(directory: Path, total: int, concurrency: int) -> tuple[float, float, float]:
    """`total` decisions by `concurrency` tasks, each made durable before it ends: (decisions/s, median latency
    ms, records per fdatasync)."""
    with AuditLog(directory / f"concurrent-{concurrency}") as log:
        latencies: list[float] = []

        async def worker(count: int) -> None:
            for i in range(count):
                started = time.perf_counter()
                async with log.decisions():
                    log.append(_event(i))
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        done = len(latencies)
        return done / elapsed, statistics.median(latencies) * 1000, done / max(1, log.syncs)


async def authorize_rpc(directory: Path, total: int, concurrency: int, audited: bool) -> tuple[float, float]:
    """Authorize over gRPC on localhost: (calls/s, median latency ms), with the audit log or without."""
    store = KeyStore(directory / f"rpc-{audited}-{concurrency}")
    store.open()
    audit = AuditLog(directory / f"rpc-{audited}-{concurrency}")
    audit.open()
    admin = AdminGuard(None)
    accounting = Accounting(store, SqliteLedger(directory / f"rpc-{audited}-{concurrency}"),
                            audit if audited else MemoryAudit())
    await accounting.open()
    servicer = (AuditedPolicyServicer(store, admin, audit, accounting=accounting) if audited
                else PolicyServicer(store, admin, accounting=accounting))
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _, key = store.create("acme", ["smollm2-*"])
    request = policy_pb2.AuthorizeRequest(api_key=key, model="smollm2-135m", input_tokens=12, max_tokens=64)
    latencies: list[float] = []
    try:
        async with direct_stub(POLICY, f"127.0.0.1:{port}") as stub:
            for _ in range(20):  # warm up
                await stub.Authorize(request)

            async def worker(count: int) -> None:
                for _ in range(count):
                    started = time.perf_counter()
                    await stub.Authorize(request)
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
    finally:
        await server.stop(None)
        await accounting.close()
        audit.close()
        store.close()
    return len(latencies) / elapsed, statistics.median(latencies) * 1000


async def run(directory: Path, total: int, levels: list[int]) -> None:
    print(f"audit log on {directory}")
    print(f"write + fdatasync of one line, alone: {fsync_alone(directory):.0f} µs")
    print(f"append without its sync (encode, SHA-256, write): {append_cpu(directory):.1f} µs of the caller's time")
    print(f"{'tasks':>6} {'decisions/s':>12} {'median ms':>10} {'records/sync':>13}")
    for level in levels:
        rate, median, per_sync = await decisions(directory, total, level)
        print(f"{level:>6} {rate:>12.0f} {median:>10.2f} {per_sync:>13.1f}")
    print(f"Authorize over gRPC ({total} calls):")
    print(f"{'tasks':>6} {'audit':>6} {'calls/s':>9} {'median ms':>10}")
    for level in levels:
        for audited in (False, True):
            rate, median = await authorize_rpc(directory, total, level, audited)
            print(f"{level:>6} {'on' if audited else 'off':>6} {rate:>9.0f} {median:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where the logs go (default: under the current dir)")
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,8,64")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir or Path.cwd(), prefix="audit-bench-") as folder:
        asyncio.run(run(Path(folder), args.decisions, levels))


if __name__ == "__main__":
    main()
