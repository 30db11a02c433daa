"""Detokenizing an answer in the gateway, from the vocabulary it caches, where that gives the tokenizer's text.

A byte-level vocabulary (GPT-2's, SmolLM2's) decodes by concatenating its tokens' bytes and reading them as UTF-8:
the gateway then needs no message to the tokenizer and back per decode step. Whether a version's tokenizer decodes
that way is not assumed but checked once per version: the tokenizer service decodes its whole vocabulary, in a
scrambled order with the special tokens among it, and the answer must equal the bytes' concatenation read here.
Versions that fail the check (SentencePiece's leading space, a decoder that cleans up spaces) keep the
tokenizer's DetokenizeStream; so do the first chats of a version, while its check runs.
"""

from __future__ import annotations

import codecs
import logging
import random
from collections.abc import Sequence

from lmesh.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from services.common.errors import FailedPrecondition
from services.common.peers import Peer
from services.gateway.checked import CheckedOnce
from services.gateway.logprobs import Vocabulary, VocabularyCache

log = logging.getLogger("lmesh.gateway.detokenize")

CHECK_TIMEOUT_S = 30.0
MAX_CHECKED_MODELS = 8  # versions whose check (and vocabulary, a few MB) is kept


class ByteDetokenizer:
    """Token ids in, text deltas out: the tokens' bytes (special tokens skipped) through an incremental UTF-8
    decoder, which holds back an incomplete character (at most 3 bytes) and replaces invalid bytes with U+FFFD
    as soon as they cannot become a character. The deltas concatenated equal `decode(ids)` of a byte-level
    tokenizer with skip_special_tokens."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self._token_bytes = vocabulary.token_bytes
        self._special = vocabulary.special_token_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> str:
        token_bytes, special, size = self._token_bytes, self._special, len(self._token_bytes)
        for token_id in ids:
            if not 0 <= token_id < size:
                # The tokenizer refuses such an id too: the replica's model and this version's tokenizer differ.
                raise FailedPrecondition(f"the model generated token id {token_id}, outside its tokenizer's "
                                         f"vocabulary of {size}")
        return self._utf8.decode(b"".join(token_bytes[i] for i in ids if i not in special))

    def flush(self) -> str:
        """What is held back (an incomplete character comes out as U+FFFD); the answer ends."""
        return self._utf8.decode(b"", final=True)


def probe_ids(vocabulary: Vocabulary) -> list[int]:
    """Every id of the vocabulary once, in a fixed scrambled order: tokens meet neighbours of every kind (partial
    UTF-8 bytes, special tokens, leading spaces) as they would in answers. A token that starts with a space comes
    first: decoders that treat the text's start specially (SentencePiece's, which drops that space) show it."""
    ids = list(range(len(vocabulary.token_bytes)))
    random.Random(0).shuffle(ids)
    spaced = next((i for i, token_id in enumerate(ids) if vocabulary.token_bytes[token_id].startswith(b" ")), 0)
    ids.insert(0, ids.pop(spaced))
    return ids


def decodes_by_bytes(vocabulary: Vocabulary, probe: Sequence[int], decoded: str) -> bool:
    """Whether `decoded`, the tokenizer's text of `probe` with special tokens skipped, is what the vocabulary's
    bytes give."""
    detokenizer = ByteDetokenizer(vocabulary)
    return detokenizer.push(probe) + detokenizer.flush() == decoded


def _check_failed(model_id: str, error: BaseException) -> None:
    log.warning("checking how %s detokenizes failed (%s); its answers go through the tokenizer for now", model_id,
                error)


class LocalDetokenizing:
    """Per model version: its vocabulary when the gateway may detokenize its answers itself, once checked."""

    def __init__(self, vocabularies: VocabularyCache, tokenizer: Peer[tokenizer_pb2_grpc.TokenizerStub]) -> None:
        self._vocabularies = vocabularies
        self._tokenizer = tokenizer
        # A check that could not run (the tokenizer unreachable) is tried again by a later chat.
        self._checks: CheckedOnce[Vocabulary] = CheckedOnce("detokenize", MAX_CHECKED_MODELS, _check_failed)

    def vocabulary(self, model_id: str) -> Vocabulary | None:
        """The version's vocabulary if its check passed; None while it runs (it starts here) or if it failed."""
        return self._checks.get(model_id, lambda: self._check(model_id))

    async def _check(self, model_id: str) -> Vocabulary | None:
        vocabulary = await self._vocabularies.get(model_id)
        probe = probe_ids(vocabulary)
        response = await self._tokenizer.call(
            lambda t: t.Decode, tokenizer_pb2.DecodeRequest(model=model_id, token_ids=probe, skip_special_tokens=True),
            timeout=CHECK_TIMEOUT_S)
        if decodes_by_bytes(vocabulary, probe, response.text):
            log.info("%s: answers are detokenized in the gateway (its tokenizer decodes by bytes)", model_id)
            return vocabulary
        log.info("%s: answers are detokenized by the tokenizer service (its decoder is not byte-level)", model_id)
        return None
