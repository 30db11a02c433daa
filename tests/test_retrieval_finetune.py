"""The tool-retrieval model's training (services/embeddings/finetune.py): its data is held out from the benchmark it
is measured on, the build is cached by its recipe, and training moves requests towards their tools."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from bench.tool_catalog_extra import EXTRA_TOOLS
from bench.tool_requests import REQUESTS
from services.embeddings import finetune
from services.embeddings.manifest import ManifestError, default_model_dir, load_manifest
from services.embeddings.retrieval_data import TRAIN_REQUESTS, TRAIN_TOOLS
from services.tools.catalog import MAX_META_VALUE, NAME_PATTERN, TOOLS, matched_text


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def test_the_training_data_is_well_formed() -> None:
    names = [name for name, _ in TRAIN_TOOLS]
    assert len(names) == len(set(names)) >= 60
    assert all(NAME_PATTERN.fullmatch(name) for name in names)
    # Each description would fit the Consul meta contract a real tool registers by.
    assert all(0 < len(description) <= MAX_META_VALUE - 60 for _, description in TRAIN_TOOLS)
    per_tool = Counter(tool for _, tool in TRAIN_REQUESTS)
    assert set(per_tool) == set(names) and min(per_tool.values()) >= 8
    assert len({request for request, _ in TRAIN_REQUESTS}) == len(TRAIN_REQUESTS)


def test_no_benchmark_tool_or_request_is_in_the_training_data() -> None:
    benchmark_tools = {entry.name for entry in (*TOOLS, *EXTRA_TOOLS)}
    assert not benchmark_tools & {name for name, _ in TRAIN_TOOLS}
    benchmark_descriptions = {entry.description for entry in (*TOOLS, *EXTRA_TOOLS)}
    assert not benchmark_descriptions & {description for _, description in TRAIN_TOOLS}
    # Not even a near copy: no training request shares 80% of its words with a benchmark request.
    for request, _ in TRAIN_REQUESTS:
        mine = words(request)
        for benchmark_request, _ in REQUESTS:
            theirs = words(benchmark_request)
            overlap = len(mine & theirs) / max(len(mine | theirs), 1)
            assert overlap < 0.8, (request, benchmark_request)


def test_a_build_of_another_recipe_is_not_current(tmp_path: Path) -> None:
    assert "retrieval_data" in finetune.recipe() and f"seed {finetune.SEED}" in finetune.recipe()
    with pytest.raises(ManifestError):
        finetune.current(tmp_path)  # nothing built
    try:
        load_manifest(default_model_dir())
    except ManifestError:
        pytest.skip("no embeddings model build (`make embeddings-model`)")
    with pytest.raises(ManifestError, match="another build"):
        finetune.current(default_model_dir())  # the untuned model: another name and source


def test_training_moves_requests_towards_their_tools(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    source = default_model_dir() / "source"
    if not (source / "model.safetensors").is_file():
        pytest.skip("no embeddings model build (`make embeddings-model`)")
    from transformers import AutoTokenizer, BertModel

    tools = list(TRAIN_TOOLS[:6])
    requests = [(request, tool) for request, tool in TRAIN_REQUESTS if tool in dict(tools)]

    def loss_of(model_dir: Path) -> float:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = BertModel.from_pretrained(str(model_dir)).eval()
        with torch.no_grad():
            queries = finetune._embed(model, tokenizer, [text for text, _ in requests])
            documents = finetune._embed(model, tokenizer, [matched_text(*tool) for tool in tools])
        target = torch.tensor([[name for name, _ in tools].index(tool) for _, tool in requests])
        return float(torch.nn.functional.cross_entropy(finetune.SCALE * queries @ documents.T, target))

    losses = finetune.train(source, tmp_path / "tuned", tools, requests, epochs=2)
    assert len(losses) == 2
    assert (tmp_path / "tuned" / "model.safetensors").is_file()
    assert (tmp_path / "tuned" / "1_Pooling" / "config.json").is_file()  # a complete sentence-transformers model
    assert loss_of(tmp_path / "tuned") < loss_of(source)
