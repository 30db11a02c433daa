"""A benchmark worker process: loads one baseline runtime and generates on request (JSON lines on stdin/stdout).

`python -m bench.worker inproc|genai --model-dir DIR`. It prints `{"ready": true}` once loaded, then answers
each request line `{"prompts": [[ids...], ...], "max_new_tokens": N}` with one line
`{"tokens": [[...]], "ttft_s": [...], "itl_s": [[...]], "wall_s": s}`. Run in its own process so its peak
memory (VmHWM) is its own. `inproc` takes one prompt per request (batch 1); `genai` takes a static batch of
equally long prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np


class InProcess:
    """The reference: a plain ONNX Runtime greedy loop with KV cache, batch 1 (services.model.reference)."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        from services.model.manifest import ModelManifest
        from services.model.reference import load_session

        self.manifest = ModelManifest.load(model_dir)
        self.session = load_session(model_dir, intra_op_threads=threads)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
        from services.model.reference import empty_past, run_step

        if len(prompts) != 1:
            raise ValueError("the in-process loop runs one prompt at a time")
        # The loop of services.model.reference.greedy_with_session, timed per token.
        eos = set(self.manifest.eos_token_ids)
        start = time.perf_counter()
        ids = np.asarray(prompts, dtype=np.int64)
        total = ids.shape[1]
        logits, past = run_step(self.session, self.manifest, ids, np.asarray([total - 1]), np.asarray([total - 1]),
                                empty_past(self.manifest, 1))
        out: list[int] = []
        times: list[float] = []
        while len(out) < max_new_tokens:
            token = int(np.argmax(logits[-1]))
            if token in eos:
                break
            out.append(token)
            times.append(time.perf_counter())
            if len(out) == max_new_tokens:
                break
            total += 1
            logits, past = run_step(self.session, self.manifest, np.asarray([[token]], np.int64),
                                    np.asarray([total - 1]), np.asarray([0]), past)
        wall = time.perf_counter() - start
        ttft = times[0] - start if times else float("nan")
        return {"tokens": [out], "ttft_s": [ttft], "itl_s": [list(np.diff(times))], "wall_s": wall}


class GenAI:
    """onnxruntime-genai over the model its builder made (fp32, CPU), greedy."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import onnxruntime_genai as og

        config = og.Config(str(model_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.og = og
        self.model = og.Model(config)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
        og = self.og
        length = len(prompts[0])
        if any(len(p) != length for p in prompts):
            raise ValueError("a static batch needs prompts of one length (genai would pad with the EOS id)")
        start = time.perf_counter()
        params = og.GeneratorParams(self.model)
        # max_length bounds the whole sequence; it also sizes genai's KV buffers, so keep it tight.
        params.set_search_options(max_length=length + max_new_tokens, do_sample=False, batch_size=len(prompts))
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray(prompts, dtype=np.int32))
        times: list[float] = []
        while not generator.is_done():
            generator.generate_next_token()
            times.append(time.perf_counter())
        wall = time.perf_counter() - start
        tokens = [[int(t) for t in generator.get_sequence(i)[length:]] for i in range(len(prompts))]
        # Every row gets a token per step, so a step's time is each row's gap; a row that hit EOS stops early.
        ttft = [times[0] - start] * len(prompts) if times else [float("nan")] * len(prompts)
        itl = [list(np.diff(times[: len(row)])) for row in tokens]
        return {"tokens": tokens, "ttft_s": ttft, "itl_s": itl, "wall_s": wall}


class WorkerProcess:
    """The benchmark's handle on a worker child process."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @classmethod
    async def start(cls, backend: str, model_dir: Path, log_path: Path) -> WorkerProcess:
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.worker", backend, "--model-dir", str(model_dir),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log)
        worker = cls(process, log_path)
        await worker._read()  # {"ready": true} once the model is loaded
        return worker

    async def generate(self, prompts: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"prompts": prompts, "max_new_tokens": max_new_tokens}) + "\n").encode())
        await self.process.stdin.drain()
        return await self._read()

    async def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            await self.process.wait()
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"worker exited with {self.process.returncode}; {self.log_path}:\n{tail}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def peak_rss_mb(self) -> float | None:
        from bench.stats import peak_rss_mb

        return peak_rss_mb(self.process.pid)

    async def close(self) -> None:
        if self.process.returncode is not None:
            return
        assert self.process.stdin is not None
        self.process.stdin.close()  # end of requests: the worker exits
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def serve(backend: InProcess | GenAI, requests: TextIO, replies: TextIO) -> None:
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        reply = backend.generate(request["prompts"], int(request["max_new_tokens"]))
        replies.write(json.dumps(reply, default=float) + "\n")
        replies.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    parser.add_argument("backend", choices=("inproc", "genai"))
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    # Our stdout is the protocol; native libraries that print must not corrupt it.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    backend = InProcess(args.model_dir, args.threads) if args.backend == "inproc" else GenAI(args.model_dir,
                                                                                          args.threads)
    serve(backend, sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
