"""The seed paper's calculator experiment, through the mesh: arithmetic questions with 2 to 10 operands, answered by
the model alone and by the model with the mesh's calculator tool (`ChatStart.tools`), accuracy and latency per
operand count.

    python -m bench.calculator --model-dir ~/.cache/lmesh/models/smollm2-135m-instruct [--per-size 50]
        [--model smollm2-135m-tools [--extra-model-dir DIR]]

`--model` is the model the chats ask for (default: `default`, the --model-dir build); another name is registered from
--extra-model-dir (default: the cache's models/<name>, where `make tools-model` builds the tuned model).

Questions come from a fixed seed, half written as expressions ("What is 12 + 7 * 3?") and half in words ("What
is twelve plus seven times three?" with digits: "12 plus 7 times 3"). An answer is right when the exact result
appears in it as a number. Writes bench/results/calculator.json and docs/calculator.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from lmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

SEED = 20260518
SIZES = range(2, 11)
WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
RESULTS = Path(__file__).parent / "results" / "calculator.json"
PLOT = Path(__file__).parent.parent / "docs" / "calculator.png"


@dataclass(frozen=True)
class Question:
    operands: int
    form: str  # "expression" or "words"
    expression: str  # what the calculator is given: `12 + 7 * 3`
    text: str  # what the model is asked
    answer: Fraction


def _value(tokens: list[str]) -> Fraction:
    """The value of `a op b op c ...` with * and / before + and -."""
    terms: list[Fraction] = []
    signs: list[int] = []
    current = Fraction(int(tokens[0]))
    sign = 1
    for op, number in zip(tokens[1::2], tokens[2::2], strict=True):
        if op == "*":
            current *= int(number)
        elif op == "/":
            current /= int(number)
        else:
            terms.append(current)
            signs.append(sign)
            current, sign = Fraction(int(number)), (1 if op == "+" else -1)
    terms.append(current)
    signs.append(sign)
    return sum((s * t for s, t in zip(signs, terms, strict=True)), Fraction(0))


def make_question(rng: random.Random, operands: int, form: str) -> Question:
    """Operands 1 to 99; a division divides its left factor exactly, so every answer is an integer."""
    tokens = [str(rng.randint(1, 99))]
    factor = int(tokens[0])  # the running product of the current term, for exact division
    for _ in range(operands - 1):
        op = rng.choice("+-*/" if factor > 1 else "+-*")
        if op == "/":
            divisors = [d for d in range(2, min(factor, 99) + 1) if factor % d == 0]
            if not divisors:
                op = rng.choice("+-*")
        if op == "/":
            number = rng.choice(divisors)
            factor //= number
        else:
            number = rng.randint(1, 99) if op != "*" else rng.randint(2, 12)
            factor = factor * number if op == "*" else number
        tokens += [op, str(number)]
    expression = " ".join(tokens)
    if form == "words":
        spoken = " ".join(WORDS.get(t, t) for t in tokens)
        text = f"What is {spoken}?"
    else:
        text = f"What is {expression}?"
    return Question(operands, form, expression, text, _value(tokens))


def questions(per_size: int, seed: int = SEED) -> list[Question]:
    rng = random.Random(seed)
    return [make_question(rng, size, "expression" if i % 2 == 0 else "words")
            for size in SIZES for i in range(per_size)]


def answered_right(text: str, answer: Fraction) -> bool:
    """Whether the exact answer appears as a number in `text` (thousands separators allowed; `650`, `650.0` and
    `650/1` are the same number)."""
    for found in NUMBER.findall(text):
        try:
            if Fraction(found.replace(",", "")) == answer:
                return True
        except (ValueError, ZeroDivisionError):
            continue
    return False


async def ask(stub: gateway_pb2_grpc.GatewayStub, key: str, question: Question, with_tools: bool,
              max_tokens: int = 64, model: str = "default") -> dict[str, Any]:
    start = gateway_pb2.ChatStart(
        model=model, messages=[gateway_pb2.Message(role="user", content=f"{question.text} Answer with the number.")],
        max_tokens=max_tokens, no_cache=True)
    if with_tools:
        start.tools.names.append("calculator")
    started = time.perf_counter()
    text, steps = [], []
    async for response in stub.Chat(iter([gateway_pb2.ChatRequest(start=start)]),
                                    metadata=[("authorization", f"Bearer {key}")], timeout=120):
        text.append(response.delta)
        if response.HasField("tool_step") and response.tool_step.state != gateway_pb2.ToolStep.STATE_STARTED:
            steps.append({"arguments": response.tool_step.arguments_json, "result": response.tool_step.result_json,
                          "error": response.tool_step.error_message})
    answer = "".join(text)
    return {"operands": question.operands, "form": question.form, "tools": with_tools,
            "right": answered_right(answer, question.answer), "latency_s": time.perf_counter() - started,
            "answer": answer, "steps": steps, "expected": str(question.answer)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    table: dict[str, dict[int, dict[str, float]]] = {}
    for mode in ("alone", "calculator"):
        picked = [r for r in rows if r["tools"] == (mode == "calculator")]
        table[mode] = {}
        for size in SIZES:
            of_size = [r for r in picked if r["operands"] == size]
            if of_size:
                latencies = sorted(r["latency_s"] for r in of_size)
                table[mode][size] = {"accuracy": sum(r["right"] for r in of_size) / len(of_size),
                                     "p50_latency_s": latencies[len(latencies) // 2], "n": len(of_size)}
    return table


def plot(results: list[Path], path: Path) -> None:
    """Accuracy per operand count, alone and with the calculator, of every model whose results are given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.2, 4.2))
    for result in results:
        report = json.loads(result.read_text())
        model = report.get("model", "default")
        name = "SmolLM2-135M-Instruct" if model == "default" else model
        for mode, style, label in (("alone", "--", "alone"), ("calculator", "-", "+ calculator tool")):
            table = {int(size): row for size, row in report["table"][mode].items()}
            sizes = sorted(table)
            axis.plot(sizes, [100 * table[s]["accuracy"] for s in sizes], style, marker="o",
                      label=f"{name} {label} (n={int(table[sizes[0]]['n'])}/size)")
    axis.set_xlabel("operands")
    axis.set_ylabel("answers right (%)")
    axis.set_ylim(-3, 103)
    axis.set_title("Arithmetic through the lmesh mesh, with and without the calculator tool")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


async def run(model_dir: Path, per_size: int, concurrency: int, model: str = "default",
              extra_models: tuple[Path, ...] = ()) -> dict[str, Any]:
    from bench.full_mesh import full_mesh
    from services.common.peers import public_gateway

    asked = questions(per_size)
    with tempfile.TemporaryDirectory(prefix="lmesh-calculator-") as work:
        async with full_mesh(model_dir, Path(work), extra_models=extra_models) as mesh:
            async with public_gateway(mesh.grpc_target) as stub:
                gate = asyncio.Semaphore(concurrency)

                async def one(question: Question, with_tools: bool) -> dict[str, Any]:
                    async with gate:
                        return await ask(stub, mesh.key, question, with_tools, model=model)

                rows = []
                for with_tools in (False, True):
                    rows += await asyncio.gather(*(one(q, with_tools) for q in asked))
    table = summarize(rows)
    return {"seed": SEED, "per_size": per_size, "model": model, "table": table, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--per-size", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default="default", help="the model the chats use (a name, name:version or alias)")
    parser.add_argument("--extra-model-dir", type=Path, action="append", default=[],
                        help="a model directory to register and serve besides --model-dir (repeatable)")
    args = parser.parse_args()
    extra = tuple(args.extra_model_dir)
    name = args.model.partition(":")[0]
    if args.model != "default" and not extra:
        from services.common.config import lmesh_cache

        guess = lmesh_cache() / "models" / name
        if not (guess / "lmesh_model.json").is_file():
            parser.error(f"--model {args.model}: no --extra-model-dir and no build at {guess}")
        extra = (guess,)
    report = asyncio.run(run(args.model_dir, args.per_size, args.concurrency, args.model, extra))
    # Another model's run is written beside the default's, not over it.
    suffix = "" if args.model == "default" else f"-{name}"
    results = RESULTS.with_name(f"{RESULTS.stem}{suffix}.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=1, default=str))
    plotted = PLOT  # every model measured so far, in one figure
    plot(sorted(RESULTS.parent.glob(f"{RESULTS.stem}*.json")), plotted)
    print(f"{'operands':>8} {'alone':>8} {'calculator':>11} {'p50 s alone':>12} {'p50 s tool':>11}")
    for size in SIZES:
        alone, tool = report["table"]["alone"].get(size), report["table"]["calculator"].get(size)
        if alone and tool:
            print(f"{size:>8} {alone['accuracy']:>8.0%} {tool['accuracy']:>11.0%} {alone['p50_latency_s']:>12.2f} "
                  f"{tool['p50_latency_s']:>11.2f}")
    print(f"wrote {results} and {plotted}")


if __name__ == "__main__":
    main()
