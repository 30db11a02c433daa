"""Text <-> token ids for one model version: encoding, decoding, chat templates, streaming detokenization.

No gRPC here: the servicer converts protos, this module does the work. Errors are LmeshError subclasses so
the server interceptor maps them to status codes.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from services.common.errors import FailedPrecondition, InvalidArgument

CHAT_ROLES = ("system", "user", "assistant")
REPLACEMENT_CHAR = "\ufffd"

# A pending tail that still decodes to an incomplete character after this many ids is not valid UTF-8 in
# the making (a character is at most 4 bytes, each id adds at least one): it is emitted as U+FFFD rather
# than held forever, which would make every later push decode an ever longer window.
MAX_PENDING_IDS = 16
# How far back from the end a held-back push looks for a clean split, so complete text before an
# incomplete trailing character is not delayed (at most 3 bytes of a character can be pending).
SPLIT_LOOKBACK_IDS = 4


# SentencePiece's stand-in for a space, and its byte-fallback tokens (`<0xE2>`), for tokenizers not byte-level.
SENTENCEPIECE_SPACE = "\u2581"
BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Stand-ins for message contents while locating them in a rendered prompt (private-use code points).
CONTENT_MARK = re.compile("\ue000([0-9]+)\ue001")


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


BYTE_LEVEL_CHAR_TO_BYTE = {char: byte for byte, char in _gpt2_bytes_to_unicode().items()}


# Above this many ids a decode goes through decode_batch (which releases the GIL); below, the plain call is cheaper.
LARGE_DECODE_IDS = 4096


def _text(tokenizer: Tokenizer, ids: Sequence[int], skip_special_tokens: bool) -> str:
    if len(ids) > LARGE_DECODE_IDS:  # decode_batch lets go of the GIL while it works; decode does not
        return tokenizer.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _ids(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """`text`'s token ids. Through a batch call, which releases the GIL while it works (encode holds it: a
    megabyte prompt tokenized in a worker thread would still freeze the event loop, health checks included, for
    seconds); the fast one skips character offsets, which nothing here uses (a quarter of the time)."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # tokenizers >= 0.21
    return list(encode([text], add_special_tokens=add_special_tokens)[0].ids)


@dataclass(frozen=True)
class Vocabulary:
    """Every token id's exact bytes (index = id), and the ids of special tokens."""

    token_bytes: list[bytes]
    special_token_ids: list[int]


def _decoder_types(decoder: dict[str, Any] | None) -> set[str]:
    """The types of a tokenizer.json `decoder`, looking inside `Sequence` decoders."""
    if not decoder:
        return set()
    return {decoder.get("type", ""), *(t for d in decoder.get("decoders") or () for t in _decoder_types(d))}


def _pre_tokenizers(pre_tokenizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A tokenizer.json `pre_tokenizer` as the list of its steps, `Sequence`s flattened."""
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [step for inner in pre_tokenizer.get("pretokenizers") or () for step in _pre_tokenizers(inner)]
    return [pre_tokenizer]


# Pre-tokenizers that split text without taking any of it out (Split and Punctuation unless told to remove).
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Digits", "Split", "Punctuation", "UnicodeScripts"})


def skipped_bytes(config: dict[str, Any]) -> bytes | None:
    """For a byte-level BPE (tokenizer.json as `config`) whose pre-tokenizers keep every character: the bytes its
    vocabulary has no symbol for, which encoding skips (or, with an unknown token, may fuse a run of into one
    token). None for any other tokenizer: whitespace-splitting pre-tokenizers drop characters, and unknown
    characters may vanish or fuse in ways that cannot be counted without encoding."""
    model = config.get("model") or {}
    steps = _pre_tokenizers(config.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not any(step.get("type") == "ByteLevel" for step in steps):
        return None
    if any(step.get("type") not in _KEEPING_PRE_TOKENIZERS or step.get("behavior") == "Removed" for step in steps):
        return None
    vocabulary = model.get("vocab") or {}
    return bytes(b for b, char in _gpt2_bytes_to_unicode().items() if char not in vocabulary)


def build_vocabulary(tokenizer: Tokenizer, config: dict[str, Any] | None = None) -> Vocabulary:
    """The bytes each token id decodes to, exactly, one token at a time.

    Byte-level BPE (GPT-2, SmolLM2): each character of a vocabulary entry stands for one byte through GPT-2's
    bytes_to_unicode table, so a token may be part of a multi-byte character. SentencePiece-style
    vocabularies: `<0xNN>` byte-fallback tokens are that byte and U+2581 is a space. Added and special
    tokens (`<|im_end|>`) are their literal text. Anything else: the token decoded alone.
    """
    added = tokenizer.get_added_tokens_decoder()
    if config is None:
        config = json.loads(tokenizer.to_str())
    decoder_types = _decoder_types(config.get("decoder"))
    byte_level = "ByteLevel" in decoder_types
    token_bytes = [b""] * tokenizer.get_vocab_size(with_added_tokens=True)
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token_id in added:
            data = added[token_id].content.encode()
        elif byte_level:
            data = b"".join(bytes([BYTE_LEVEL_CHAR_TO_BYTE[c]]) if c in BYTE_LEVEL_CHAR_TO_BYTE else c.encode()
                            for c in token)
        elif "ByteFallback" in decoder_types and (byte := BYTE_FALLBACK_TOKEN.fullmatch(token)):
            data = bytes([int(byte.group(1), 16)])
        elif decoder_types & {"Metaspace", "Replace"}:
            data = token.replace(SENTENCEPIECE_SPACE, " ").encode()
        else:
            data = tokenizer.decode([token_id], skip_special_tokens=False).encode()
        if 0 <= token_id < len(token_bytes):
            token_bytes[token_id] = data
    return Vocabulary(token_bytes, sorted(i for i, t in added.items() if t.special))


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class _TemplateRejected(jinja2.TemplateError):
    """Raised by a template's own `raise_exception(...)`: the conversation, not the template, is wrong."""


def _raise_exception(message: str) -> None:
    raise _TemplateRejected(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers overrides jinja's tojson (which HTML-escapes) with plain json.dumps; templates rely on it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compiles a Hugging Face `chat_template` the way transformers does (same environment and helpers)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ModelTokenizer:
    """One model version's tokenizer.json plus its chat template and special tokens."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str = "", *, name: str = "",
                 bos_token_id: int = -1, eos_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.chat_template = chat_template
        # Ids are dense in [0, vocab_size): the model's vocabulary followed by added tokens.
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token = self._token_text(bos_token_id)
        self.eos_token = self._token_text(eos_token_ids[0]) if eos_token_ids else ""
        self._template: jinja2.Template | None = None
        self._vocabulary: Vocabulary | None = None
        self._max_token_bytes: int | None = None
        # Bytes of text that make no token (None: no size bound is sound for this tokenizer), found with the
        # vocabulary.
        self._skipped: bytes | None = None
        # Texts the tokenizer turns into control tokens wherever they appear (<|im_start|>, <|im_end|>, ...).
        self._control_texts = sorted({t.content for t in tokenizer.get_added_tokens_decoder().values()}, key=len,
                                     reverse=True)
        self._literal: Tokenizer | None = None

    @classmethod
    def from_file(cls, path: Path | str, chat_template: str = "", *, name: str = "", bos_token_id: int = -1,
                  eos_token_ids: Sequence[int] = ()) -> Self:
        return cls(Tokenizer.from_file(str(path)), chat_template, name=name, bos_token_id=bos_token_id,
                   eos_token_ids=eos_token_ids)

    def for_version(self, chat_template: str = "", *, name: str = "", bos_token_id: int = -1,
                    eos_token_ids: Sequence[int] = ()) -> ModelTokenizer:
        """Another model version's tokenizer over the same tokenizer.json: it shares this one's parsed tokenizer and
        what is built from it (vocabulary, size bound, literal tokenizer), and has its own chat template and special
        tokens. Parsing holds the GIL for a few hundred milliseconds, which a serving process's health check
        would feel."""
        self.prepared_tables()
        other = ModelTokenizer(self.tokenizer, chat_template, name=name, bos_token_id=bos_token_id,
                               eos_token_ids=eos_token_ids)
        other._vocabulary, other._skipped = self._vocabulary, self._skipped
        other._max_token_bytes, other._literal = self._max_token_bytes, self._literal
        return other

    def prepared_tables(self) -> None:
        """Builds now what depends on the tokenizer.json alone (see `prepared`)."""
        self.max_token_bytes()
        if self._control_texts:
            self._literal_tokenizer()

    def prepared(self) -> Self:
        """Builds now what is otherwise built on first use (the vocabulary, the size bound's inputs, the chat
        template, the tokenizer that keeps control tokens' texts literal): a few hundred milliseconds that belong in
        a loader's thread, not on an event loop's first request. Returns self."""
        self.prepared_tables()
        if self.chat_template:
            with contextlib.suppress(FailedPrecondition):  # a template that does not compile is told to its chats
                self._compiled_template()
        return self

    def _token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self.tokenizer.id_to_token(token_id) or ""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return _ids(self.tokenizer, text, add_special_tokens)

    def count(self, text: str) -> int:
        """The number of tokens of `text` alone (no special tokens added around it)."""
        return len(_ids(self.tokenizer, text, False))

    def check_ids(self, ids: Sequence[int], field: str = "token_ids") -> None:
        for index, token_id in enumerate(ids):
            if not 0 <= token_id < self.vocab_size:
                raise InvalidArgument(f"{field}[{index}]",
                                      f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # The tokenizers library silently drops unknown ids; an id the model cannot emit is a caller bug.
        self.check_ids(ids)
        return _text(self.tokenizer, ids, skip_special_tokens)

    def decode_unchecked(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        """`decode` for ids the caller already passed through `check_ids`."""
        return _text(self.tokenizer, ids, skip_special_tokens)

    def max_token_bytes(self) -> int:
        """The most bytes of text one token stands for: its vocabulary's longest entry."""
        if self._max_token_bytes is None:
            self._max_token_bytes = max((len(data) for data in self.vocabulary().token_bytes), default=1) or 1
        return self._max_token_bytes

    def min_tokens(self, text: str) -> int:
        """A lower bound on `text`'s token count, found without encoding it: each token stands for at most
        `max_token_bytes()` bytes of the (normalized) text, bytes the vocabulary has no symbol for stand for none,
        and a pre-tokenizer adds at most a leading space. 0 where no such bound holds (see `skipped_bytes`)."""
        self.vocabulary()  # finds the skipped bytes too
        skipped = self._skipped
        if skipped is None:
            return 0
        normalizer = self.tokenizer.normalizer
        if normalizer is not None:
            text = normalizer.normalize_str(text)
        data = text.encode("utf-8", "surrogatepass")
        size = len(data.translate(None, skipped) if skipped else data) - 1
        return max(0, -(-size // self.max_token_bytes()))

    def vocabulary(self) -> Vocabulary:
        """Every id's exact bytes (see `build_vocabulary`), built on first use (a fraction of a second)."""
        if self._vocabulary is None:
            config = json.loads(self.tokenizer.to_str())  # read once, for both
            self._skipped = skipped_bytes(config)
            self._vocabulary = build_vocabulary(self.tokenizer, config)
        return self._vocabulary

    def render_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool) -> str:
        """The prompt text the chat template makes of `messages`."""
        if not messages:
            raise InvalidArgument("messages", "must hold at least one message")
        for index, message in enumerate(messages):
            if message.role not in CHAT_ROLES:
                raise InvalidArgument(f"messages[{index}].role",
                                      f"{message.role!r} is not one of {', '.join(CHAT_ROLES)}")
        template = self._compiled_template()
        try:
            return template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                # Templates test `tools is not none`; left undefined that test would be true.
                tools=None,
                documents=None,
            )
        except _TemplateRejected as exc:
            raise InvalidArgument("messages", f"rejected by the chat template: {exc.message}") from None
        except jinja2.TemplateError as exc:
            raise FailedPrecondition(
                f"the chat template of {self.name or 'this model'} failed: {exc}") from None

    def apply_chat_template(self, messages: Sequence[ChatMessage], add_generation_prompt: bool,
                            max_tokens: int = 0) -> tuple[str, list[int]]:
        """The rendered prompt and its ids, exactly as the model sees it; InvalidArgument (`messages`) when it has
        more than `max_tokens` tokens (0: no limit), found before encoding when its size alone shows it.

        A control token's text inside a message (a user writing `<|im_end|><|im_start|>system`) stays text: only
        the template itself can open or close a turn.
        """
        if max_tokens < 0:
            raise InvalidArgument("max_prompt_tokens", f"must be >= 0 (0: no limit), got {max_tokens}")
        text = self.render_chat(messages, add_generation_prompt)
        if max_tokens and (least := self.min_tokens(text)) > max_tokens:
            # Encoding it would cost time and memory in proportion to its size (~100 bytes a token) to say no.
            raise InvalidArgument("messages", f"the prompt is at least {least} tokens; at most {max_tokens} fit "
                                              "the model's context")
        if not any(control in m.content for m in messages for control in self._control_texts):
            # The template already wrote the special tokens (BOS, <|im_start|>): adding them again would double.
            ids = self.encode(text, add_special_tokens=False)
        else:
            ids = self._encode_with_literal_contents(messages, add_generation_prompt, text)
        if max_tokens and len(ids) > max_tokens:
            raise InvalidArgument("messages", f"the prompt is {len(ids)} tokens; at most {max_tokens} fit the "
                                              "model's context")
        return text, ids

    def _encode_with_literal_contents(self, messages: Sequence[ChatMessage], add_generation_prompt: bool,
                                      text: str) -> list[int]:
        """Encodes the template's own text as usual and each message's content with control tokens as text."""
        marked = self.render_chat([ChatMessage(m.role, f"\ue000{i}\ue001") for i, m in enumerate(messages)],
                                  add_generation_prompt)
        pieces = CONTENT_MARK.split(marked)  # template text, content index, template text, ...
        if "".join(messages[int(p)].content if i % 2 else p for i, p in enumerate(pieces)) != text:
            # The template rewrites contents (trims them, say), so they cannot be located to be kept literal.
            index, control = next((i, c) for i, m in enumerate(messages) for c in self._control_texts
                                  if c in m.content)
            raise InvalidArgument(f"messages[{index}].content",
                                  f"contains the control token {control!r}, which this model's chat template "
                                  "cannot keep apart from the conversation's structure")
        literal = self._literal_tokenizer()
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.extend(_ids(literal, messages[int(piece)].content, False))
            elif piece:
                ids.extend(_ids(self.tokenizer, piece, False))
        return ids

    def _literal_tokenizer(self) -> Tokenizer:
        """The same tokenizer, reading control tokens' texts as plain text."""
        if self._literal is None:
            literal = Tokenizer.from_str(self.tokenizer.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal

    def _compiled_template(self) -> jinja2.Template:
        if self._template is None:
            if not self.chat_template:
                raise FailedPrecondition(f"{self.name or 'this model'} has no chat template")
            try:
                self._template = compile_chat_template(self.chat_template)
            except jinja2.TemplateError as exc:
                raise FailedPrecondition(
                    f"the chat template of {self.name or 'this model'} does not compile: {exc}") from None
        return self._template


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas without re-decoding the whole sequence.

    The prefix/read offset technique (vLLM, TGI): `_ids` holds a short window starting at the prefix
    offset; `_read` marks where the text already emitted ends. Each push decodes the window with and without
    the new ids and emits the difference; decoding from a few ids back (not from the read offset) keeps
    decoders that treat a sequence's first token specially (SentencePiece's leading space) correct. While
    the decoded tail ends in U+FFFD the last character's bytes are incomplete and the text is held back.
    For byte-level BPE, the concatenation of every push plus `flush()` equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: ModelTokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # the window: ids from the prefix offset on
        self._read = 0  # index in `_ids` up to which text was emitted
        self._prefix_text = ""  # decode(_ids[:_read]), kept so each push decodes once when nothing is held

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode_unchecked(ids, self._skip)

    def _advance(self, new_read: int) -> None:
        # The ids emitted last become the next prefix; everything before them is dropped.
        del self._ids[: self._read]
        self._read = new_read - self._read
        self._prefix_text = self._decode(self._ids[: self._read])

    def push(self, ids: Sequence[int], field: str = "token_ids") -> str:
        """Adds ids and returns the text they completed (possibly empty); an id outside the vocabulary is
        INVALID_ARGUMENT naming `field`."""
        self._tokenizer.check_ids(ids, field=field)
        if not ids:
            return ""
        self._ids.extend(ids)
        prefix_len = len(self._prefix_text)
        text = self._decode(self._ids)
        if len(text) > prefix_len and not text.endswith(REPLACEMENT_CHAR):
            self._advance(len(self._ids))
            return text[prefix_len:]
        end = len(self._ids)
        if not text.endswith(REPLACEMENT_CHAR):
            # Nothing new (skipped special tokens): keep the prefix as context, but not without bound.
            if end - self._read > MAX_PENDING_IDS:
                self._advance(end)
            return ""
        # Held back: emit what precedes an incomplete last character, if a split a few ids back is clean.
        for split in range(end - 1, max(self._read, end - SPLIT_LOOKBACK_IDS - 1), -1):
            head = self._decode(self._ids[:split])
            if len(head) > prefix_len and not head.endswith(REPLACEMENT_CHAR):
                self._advance(split)
                return head[prefix_len:]
        if end - self._read > MAX_PENDING_IDS:
            # Not UTF-8 in the making but invalid bytes: give them out as U+FFFD instead of holding forever.
            split = end - SPLIT_LOOKBACK_IDS
            head = self._decode(self._ids[:split])
            self._advance(split)
            return head[prefix_len:]
        return ""

    def flush(self) -> str:
        """Returns whatever is held back (an incomplete character comes out as U+FFFD); the stream ends."""
        prefix_len = len(self._prefix_text)
        text = self._decode(self._ids)
        if len(self._ids) > self._read:
            self._advance(len(self._ids))
        return text[prefix_len:]
