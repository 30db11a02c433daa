"""The committed gen/ matches protos/, and the contracts keep the conventions other languages rely on."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protos").rglob("*.proto"))


def _diff(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right)
    problems = [f"only in {comparison.left}: {n}" for n in comparison.left_only if n != "__pycache__"]
    problems += [f"only in {comparison.right}: {n}" for n in comparison.right_only if n != "__pycache__"]
    problems += [f"differs: {comparison.left}/{n}" for n in comparison.diff_files]
    for name, sub in comparison.subdirs.items():
        if name != "__pycache__":
            problems += _diff(Path(sub.left), Path(sub.right))
    return problems


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    script = ROOT / "deploy" / "scripts" / "gen_protos.sh"
    subprocess.run(["bash", str(script), sys.executable, str(tmp_path / "gen")], check=True, cwd=ROOT)
    problems = _diff(ROOT / "gen" / "lmesh", tmp_path / "gen" / "lmesh")
    assert not problems, "gen/ is stale, run `make proto`:\n" + "\n".join(problems)


def test_every_proto_is_packaged_per_service_with_language_options() -> None:
    assert {p.parent.parent.name for p in PROTOS} == {"registry", "tokenizer", "inference", "policy", "gateway"}
    for proto in PROTOS:
        text = proto.read_text()
        service = proto.parent.parent.name
        assert f"package lmesh.{service}.v1;" in text, proto
        assert "option go_package" in text and "option java_package" in text, proto


def test_enums_start_unspecified_and_every_rpc_documents_its_errors() -> None:
    for proto in PROTOS:
        text = proto.read_text()
        for name, body in re.findall(r"enum (\w+) \{(.*?)\}", text, re.S):
            first = re.search(r"(\w+) = 0;", body)
            assert first and first.group(1).endswith("_UNSPECIFIED"), (proto.name, name)
        lines = text.splitlines()
        for index, line in enumerate(lines):
            if line.strip().startswith("rpc "):
                comment = []
                j = index - 1
                while j >= 0 and lines[j].strip().startswith("//"):
                    comment.append(lines[j])
                    j -= 1
                documented = "\n".join(comment)
                service_doc = text[: text.find(line)]
                assert documented, f"{proto.name}: {line.strip()} is undocumented"
                assert "Errors" in documented or "Every RPC may return" in service_doc, (proto.name, line.strip())
