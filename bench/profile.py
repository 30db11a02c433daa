"""Optional sampling of the inference process with py-spy while a measured run goes on (`--profile`).

py-spy writes collapsed stacks (`--format raw`, one `frame;frame;... count` line per distinct stack); the
summary says which share of the samples each thread and each function (inclusive and as the leaf) took.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


@contextlib.asynccontextmanager
async def recording(pid: int, output: Path, log: Path) -> AsyncIterator[None]:
    """Samples `pid` (100 Hz, without pausing it) for the duration of the block."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed: `.venv/bin/pip install py-spy`")
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            exe, "record", "--pid", str(pid), "--rate", "100", "--nonblocking", "--threads", "--format", "raw",
            "--output", str(output), stdout=out, stderr=asyncio.subprocess.STDOUT)
    try:
        yield
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


def _function(frame: str) -> str:
    # "name (file.py:123)" -> "name (file.py)"; line numbers split one function into many rows.
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def summarize(raw: Path, top: int = 12) -> str:
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        code = [_function(f) for f in frames if not f.startswith(("thread ", "process "))]
        total += count
        threads[thread] += count
        for function in set(code):
            inclusive[function] += count
        if code:
            leaf[code[-1]] += count
    if not total:
        return f"{raw}: no samples"

    def share(counter: Counter[str]) -> list[str]:
        return [f"  {100 * n / total:5.1f}%  {name}" for name, n in counter.most_common(top)]

    return "\n".join([f"{raw.name}: {total} samples (100 Hz, threads of the inference process, idle excluded)",
                      "by thread:", *share(threads), "inclusive:", *share(inclusive), "leaf (self):", *share(leaf)])
