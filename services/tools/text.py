"""Text statistics and case conversion."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.common.errors import InvalidArgument

MAX_TEXT_BYTES = 1024 * 1024
WORDS_PER_MINUTE = 238  # average silent reading speed of adults (Brysbaert 2019)
CASES = ("upper", "lower", "title", "sentence", "snake", "camel", "kebab")

_WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")
_SENTENCE_END = re.compile(r"[.!?…]+(?=\s|$)")


def _check(text: str) -> None:
    if len(text) > MAX_TEXT_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
        raise InvalidArgument("text", f"over {MAX_TEXT_BYTES} bytes of UTF-8")


@dataclass(frozen=True)
class TextCounts:
    words: int
    characters: int
    characters_without_spaces: int
    sentences: int
    lines: int
    paragraphs: int
    reading_time_minutes: float


def count_text(text: str) -> TextCounts:
    _check(text)
    words = len(_WORD.findall(text))
    stripped = text.strip()
    sentences = len(_SENTENCE_END.findall(stripped))
    if stripped and not _SENTENCE_END.search(stripped[-1:] + " "):
        sentences += 1  # a last sentence without its full stop still counts
    paragraphs = sum(1 for block in re.split(r"\n\s*\n", text) if block.strip())
    return TextCounts(
        words=words,
        characters=len(text),
        characters_without_spaces=sum(1 for ch in text if not ch.isspace()),
        sentences=sentences,
        lines=len(text.splitlines()) if text else 0,
        paragraphs=paragraphs,
        reading_time_minutes=round(words / WORDS_PER_MINUTE, 2),
    )


def change_case(text: str, target_case: str) -> str:
    _check(text)
    case = target_case.strip().lower()
    if case not in CASES:
        raise InvalidArgument("target_case", f"unknown case {target_case.strip()[:32]!r}; one of {', '.join(CASES)}")
    if case == "upper":
        return text.upper()
    if case == "lower":
        return text.lower()
    if case == "title":
        return _WORD.sub(lambda m: m.group(0)[:1].upper() + m.group(0)[1:].lower(), text)
    if case == "sentence":
        lowered = text.lower()
        return re.sub(r"(^\s*|[.!?…]\s+)(\w)", lambda m: m.group(1) + m.group(2).upper(), lowered)
    words = [w.lower() for w in re.findall(r"[^\W_]+", _split_camel(text))]
    if case == "snake":
        return "_".join(words)
    if case == "kebab":
        return "-".join(words)
    return words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:]) if words else ""


def _split_camel(text: str) -> str:
    """"parseHTTPResponse" -> "parse HTTP Response", so identifiers convert between cases too."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", text)
