"""The gateway's own detokenizing: the same text as the tokenizer's, and only for versions whose tokenizer decodes
by bytes (checked against the tokenizer service's own Decode)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from services.common.errors import FailedPrecondition, Unavailable
from services.gateway.detokenize import ByteDetokenizer, LocalDetokenizing, decodes_by_bytes, probe_ids
from services.gateway.logprobs import Vocabulary, VocabularyCache
from services.tokenizer.servicer import TokenizerServicer
from services.tokenizer.text import IncrementalDetokenizer, ModelTokenizer
from tests.test_tokenizer import IM_END, IM_START, SAMPLE_TEXTS, SPECIAL_TOKENS, TRAINING_TEXT, train_small_tokenizer


@pytest.fixture(scope="module")
def byte_level() -> ModelTokenizer:
    return ModelTokenizer(train_small_tokenizer(), name="small:1")


@pytest.fixture(scope="module")
def sentencepiece_like() -> ModelTokenizer:
    """A Metaspace tokenizer (SentencePiece's scheme): decode drops the space that starts the text."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[*SPECIAL_TOKENS, "<unk>"], show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer)
    return ModelTokenizer(tokenizer, name="sp:1")


def vocabulary_of(tokenizer: ModelTokenizer) -> Vocabulary:
    vocabulary = tokenizer.vocabulary()
    return Vocabulary(vocabulary.token_bytes, frozenset(vocabulary.special_token_ids))


@pytest.mark.parametrize("seed", range(4))
def test_deltas_concatenate_to_the_tokenizers_text_however_the_ids_are_chunked(byte_level: ModelTokenizer,
                                                                               seed: int) -> None:
    rng = random.Random(seed)
    for text in SAMPLE_TEXTS:
        ids = byte_level.encode(text, False)
        ids = [*ids[:3], IM_START, *ids[3:], IM_END]  # special tokens are skipped, as the stream skips them
        detokenizer, streamed = ByteDetokenizer(vocabulary_of(byte_level)), IncrementalDetokenizer(byte_level, True)
        here, there, at = "", "", 0
        while at < len(ids):
            chunk = ids[at:at + rng.choice([1, 1, 2, 3])]
            at += len(chunk)
            delta = detokenizer.push(chunk)
            assert "\ufffd" not in delta  # an incomplete character is held back, never split
            here += delta
            there += streamed.push(chunk)
        here += detokenizer.flush()
        there += streamed.flush()
        assert here == there == byte_level.decode(ids, skip_special_tokens=True)


def test_an_incomplete_character_at_the_end_comes_out_as_a_replacement(byte_level: ModelTokenizer) -> None:
    ids = byte_level.encode("🤖", False)
    assert len(ids) > 1  # the emoji's bytes span tokens
    detokenizer = ByteDetokenizer(vocabulary_of(byte_level))
    assert detokenizer.push(ids[:-1]) == ""
    assert detokenizer.flush() == "\ufffd"


def test_an_id_outside_the_vocabulary_is_refused(byte_level: ModelTokenizer) -> None:
    with pytest.raises(FailedPrecondition, match="outside its tokenizer's vocabulary"):
        ByteDetokenizer(vocabulary_of(byte_level)).push([5, 10_000])


def test_only_a_byte_level_decoder_passes_the_check(byte_level: ModelTokenizer,
                                                   sentencepiece_like: ModelTokenizer) -> None:
    for tokenizer, passes in ((byte_level, True), (sentencepiece_like, False)):
        vocabulary = vocabulary_of(tokenizer)
        probe = probe_ids(vocabulary)
        assert sorted(probe) == list(range(len(vocabulary.token_bytes)))
        assert decodes_by_bytes(vocabulary, probe, tokenizer.decode(probe, skip_special_tokens=True)) is passes


class ServicerPeer:
    """The tokenizer's peer without the network: each call goes to a real TokenizerServicer; `down` makes the
    next calls fail as an unreachable tokenizer would."""

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        tokenizer_model = tokenizer

        class OneModel:
            async def get(self, model: str) -> ModelTokenizer:
                return tokenizer_model

        self.servicer = TokenizerServicer(OneModel())  # type: ignore[arg-type]
        self.calls: list[str] = []
        self.down = 0

    async def call(self, method: Any, request: Any, **_: Any) -> Any:
        bound = method(self.servicer)
        self.calls.append(bound.__name__)
        if self.down:
            self.down -= 1
            raise Unavailable("lmesh-tokenizer is down")
        return await bound(request, None)


async def settled(local: LocalDetokenizing, model: str) -> Vocabulary | None:
    """Asks until the check that the first ask started has ended."""
    for _ in range(100):
        if (vocabulary := local.vocabulary(model)) is not None:
            return vocabulary
        await asyncio.sleep(0.01)
    return None


async def test_a_version_is_detokenized_here_once_its_check_passed(byte_level: ModelTokenizer) -> None:
    peer = ServicerPeer(byte_level)
    local = LocalDetokenizing(VocabularyCache(peer), peer)  # type: ignore[arg-type]
    assert local.vocabulary("small:1") is None  # the first chat uses the tokenizer's stream: the check starts
    vocabulary = await settled(local, "small:1")
    assert vocabulary is not None and list(vocabulary.token_bytes) == byte_level.vocabulary().token_bytes
    assert peer.calls == ["GetVocabulary", "Decode"]
    assert local.vocabulary("small:1") is vocabulary and len(peer.calls) == 2  # checked once


async def test_a_version_that_fails_the_check_stays_with_the_tokenizer(sentencepiece_like: ModelTokenizer) -> None:
    peer = ServicerPeer(sentencepiece_like)
    local = LocalDetokenizing(VocabularyCache(peer), peer)  # type: ignore[arg-type]
    assert await settled(local, "sp:1") is None
    assert peer.calls == ["GetVocabulary", "Decode"]  # not asked again


async def test_a_check_the_tokenizer_could_not_answer_is_tried_again(byte_level: ModelTokenizer) -> None:
    peer = ServicerPeer(byte_level)
    peer.down = 1
    local = LocalDetokenizing(VocabularyCache(peer), peer)  # type: ignore[arg-type]
    assert local.vocabulary("small:1") is None
    await asyncio.sleep(0.05)
    assert local.vocabulary("small:1") is None  # the failed check was forgotten; this ask started a new one
    assert await settled(local, "small:1") is not None
    assert peer.calls == ["GetVocabulary", "GetVocabulary", "Decode"]
