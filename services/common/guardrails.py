"""Guardrails: the rules' model, their detectors, and incremental screening of a text (a prompt's message, or an
answer as it streams).

Policy owns the rules (services/policy/rules.py reads them from the operators' YAML file and sends them to the
gateways); the gateway enforces them with this module (services/gateway/screen.py), so screening a stream costs
no hop per token. Both sides use the same code, so what `lmesh policy rules check` accepts is what a gateway
compiles.

Matching runs on a normalised copy of the text, each normalised character mapped back to the original characters
it came from, so a redaction replaces exactly the original characters of a match (zero-width characters inside
it included) and everything else passes byte for byte:

- NFKC per cluster (a character with the combining marks that follow it): full-width letters and digits, ligatures
  and compatibility forms become their plain forms;
- format characters (zero-width space, joiner and non-joiner, word joiner, BOM, soft hyphen, bidi controls, tags)
  and variation selectors are dropped;
- every decimal digit of any script becomes its ASCII digit, every dash `-`, and every run of whitespace one space
  (so "4 1 1 1", full-width "4111" and "4\u200b111" read "4 1 1 1", "4111" and "4111").

Each detector is a regular expression of bounded width (the most normalised characters a match spans, with the
characters it looks at after it), optionally a check (Luhn for cards, mod 97 for IBANs) and a continuation (a
secret's tail: a long API key or a private key's body is redacted to its end without holding the stream for it).
On a stream, text is held back only while it could still be part of a match (the `regex` module's partial
matching), and never more than the widest active detector: that is the hold-back window. Matching is incremental:
each detector resumes where it stopped, so a delta costs work in proportion to its own length and what is held,
never a rescan of the answer.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import hashlib
import importlib
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import regex

from services.common.access import version_allowed

MAX_PATTERN_WIDTH = 256  # normalised characters an operator's deny pattern may span at most (its hold-back)
MAX_WHITESPACE_RUN = 64  # original whitespace characters one normalised space stands for, at most
MAX_CLUSTER = 32  # characters one cluster (a base and its combining marks) holds, at most
LOOKBEHIND = 4  # normalised characters of context kept before the earliest position still being matched
DEFAULT_REPLACEMENT = "[REDACTED:{rule}]"


class Action(enum.StrEnum):
    BLOCK = "block"
    REDACT = "redact"
    FLAG = "flag"


class Stage(enum.StrEnum):
    INPUT = "input"
    OUTPUT = "output"


class DetectorKind(enum.StrEnum):
    DENY = "deny"
    EMAIL = "email"
    PHONE = "phone"
    CARD = "card"
    IBAN = "iban"
    IPV4 = "ipv4"
    SECRET = "secret"


class PatternError(ValueError):
    """An operator's deny pattern that cannot be used; the message says why."""


@dataclass(frozen=True)
class RuleSpec:
    """One rule as the operator wrote it (checked): what it detects, what it does, where it applies."""

    id: str
    detect: DetectorKind
    action: Action
    stages: frozenset[Stage] = frozenset({Stage.INPUT, Stage.OUTPUT})
    tenants: tuple[str, ...] = ()  # globs; empty: every tenant
    models: tuple[str, ...] = ()  # references or globs, as an API key's models; empty: every model
    phrases: tuple[str, ...] = ()  # deny only: literal phrases (case and spacing between words ignored)
    patterns: tuple[str, ...] = ()  # deny only: regular expressions of bounded width
    replacement: str = ""  # redact only; "" means DEFAULT_REPLACEMENT

    @property
    def replacement_text(self) -> str:
        return self.replacement or DEFAULT_REPLACEMENT.format(rule=self.id)

    def applies(self, stage: Stage, tenant: str, model_id: str, aliases: Sequence[str] = ()) -> bool:
        if stage not in self.stages:
            return False
        if self.tenants and not any(fnmatch.fnmatchcase(tenant, p) for p in self.tenants):
            return False
        return not self.models or version_allowed(self.models, model_id, aliases)


def rules_version(specs: Sequence[RuleSpec]) -> str:
    """A digest of the rules' content: equal rules, equal version, wherever they were read."""
    digest = hashlib.sha256()
    for spec in specs:
        digest.update(repr((spec.id, spec.detect.value, spec.action.value, sorted(s.value for s in spec.stages),
                            spec.tenants, spec.models, spec.phrases, spec.patterns, spec.replacement)).encode())
    return digest.hexdigest()[:16]


# ---- detectors ---------------------------------------------------------------------------------------------


Check = Callable[[str, int, int], tuple[int, int] | None]


@dataclass(frozen=True)
class Extend:
    """A match's tail: the characters of `allowed` (a character class body) that follow it, and `stop_at` (an
    alternative that may read `lookahead` characters past itself: those wait while the text ends there)."""

    allowed: str
    stop_at: str = ""
    lookahead: int = 0

    @functools.cached_property
    def tail(self) -> Any:
        return regex.compile(f"(?:[{self.allowed}]{'|' + self.stop_at if self.stop_at else ''})*+")

    def reach(self, text: str, start: int) -> int:
        match = self.tail.match(text, start)
        return match.end() if match else start


@dataclass(frozen=True)
class Detector:
    """A compiled matcher. `width`: the most normalised characters an attempt at one position examines (its match
    and the characters its lookaheads read after it) — the hold-back it may need. `stops`: a character no match can
    contain or look at beyond, so that a match followed by one is final before `width` characters have come (None:
    only `width` decides). `check`: validates a candidate and returns the span that counts, or None. `extend`: after
    a match, how far its tail reaches (a secret's)."""

    name: str
    pattern: Any  # regex.Pattern[str]
    width: int
    stops: Any = None  # regex.Pattern[str] | None
    check: Check | None = None
    extend: Extend | None = None


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _card_check(text: str, start: int, end: int) -> tuple[int, int] | None:
    """13 to 19 digits passing the Luhn check: the longest such prefix of the candidate that ends where a digit
    group does (not right before another digit)."""
    positions = [i for i in range(start, end) if "0" <= text[i] <= "9"]
    for count in range(min(len(positions), 19), 12, -1):
        last = positions[count - 1]
        if last + 1 < len(text) and "0" <= text[last + 1] <= "9":
            continue
        if _luhn("".join(text[i] for i in positions[:count])):
            return start, last + 1
    return None


# ISO 13616 IBAN lengths by country (SWIFT's registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def _iban_check(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The country's IBAN length in letters and digits from `start`, ending at a group's end, mod 97 == 1."""
    length = IBAN_LENGTHS.get(text[start:start + 2])
    if length is None:
        return None
    positions = [i for i in range(start, end) if text[i] != " "]
    if len(positions) < length:
        return None
    last = positions[length - 1]
    if last + 1 < len(text) and text[last + 1].isalnum():
        return None
    chars = "".join(text[i] for i in positions[:length])
    rearranged = chars[4:] + chars[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return (start, last + 1) if int(number) % 97 == 1 else None


_DATE = regex.compile(r"\d{4}[-./ ]\d{1,2}[-./ ]\d{1,2}(?!\d)")


def _phone_check(text: str, start: int, end: int) -> tuple[int, int] | None:
    """International (`+` or `00`, 8 to 15 digits) or national with an area code (10 or 11 digits), not a date."""
    candidate = text[start:end]
    digits = sum(c.isdigit() for c in candidate)
    if candidate.startswith("+") or candidate.startswith("00"):
        return (start, end) if 8 <= digits <= 15 else None
    if not 10 <= digits <= 11 or _DATE.match(candidate):
        return None
    return start, end


def _email_check(text: str, start: int, end: int) -> tuple[int, int] | None:
    """A domain with at least two labels and a top-level label of letters; trailing dots and hyphens left out."""
    at = text.index("@", start, end)
    domain = text[at + 1:end].rstrip(".-")
    labels = domain.split(".")
    while len(labels) >= 2 and not (labels[-1].isalpha() and len(labels[-1]) >= 2):
        labels.pop()
    if len(labels) < 2 or any(not label or label[0] == "-" for label in labels):
        return None
    return start, at + 1 + len(".".join(labels))


API_KEY = regex.compile(
    r"(?<![A-Za-z0-9_\-])(?:sk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_\-]{20}|lmk_[A-Za-z0-9_\-]{43}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}(?![0-9A-Z])|gh[pousr]_[A-Za-z0-9]{30}|github_pat_[A-Za-z0-9_]{22}"
    r"|xox[abposr]-[A-Za-z0-9\-]{10}|AIza[0-9A-Za-z_\-]{35}|[sr]k_(?:live|test)_[A-Za-z0-9]{16})")
PRIVATE_KEY = regex.compile(r"-----BEGIN [A-Z0-9 ]{0,24}PRIVATE KEY(?: BLOCK)?-----")

BUILTIN: dict[DetectorKind, tuple[Detector, ...]] = {
    DetectorKind.EMAIL: (Detector(
        "email", regex.compile(r"(?<![\w.%+\-])[\w.%+\-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,62})(?![A-Za-z0-9.\-])"),
        width=64 + 1 + 63 + 1, stops=regex.compile(r"[^\w.%+\-@]"), check=_email_check),),
    DetectorKind.PHONE: (Detector(
        "phone", regex.compile(r"(?<![\w+])(?<!\d[ \-.])(?:\+ ?|00)?\(?\d(?:[ \-.()]{0,2}\d){6,14}(?!\d)"),
        width=2 + 1 + 15 + 14 * 2 + 1, stops=regex.compile(r"[^\d \-.()+]"), check=_phone_check),),
    DetectorKind.CARD: (Detector(
        "card", regex.compile(r"(?<!\d)\d(?:[ \-]?\d){12,18}(?!\d)"),
        width=19 + 18 + 1, stops=regex.compile(r"[^\d \-]"), check=_card_check),),
    DetectorKind.IBAN: (Detector(
        "iban", regex.compile(r"(?<![A-Za-z0-9])[A-Z]{2} ?\d ?\d(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])"),
        width=2 + 1 + 1 + 1 + 1 + 30 * 2 + 1, stops=regex.compile(r"[^A-Za-z0-9 ]"), check=_iban_check),),
    DetectorKind.IPV4: (Detector(
        "ipv4", regex.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                              r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\d|\.\d)"),
        width=15 + 2, stops=regex.compile(r"[^\d.]")),),
    DetectorKind.SECRET: (
        Detector("api-key", API_KEY, width=47 + 1, stops=regex.compile(r"[^A-Za-z0-9_\-]"),
                 extend=Extend(r"A-Za-z0-9_\-")),
        # A private key's body: base64 lines (and PEM headers) up to the dashes of its END line.
        Detector("private-key", PRIVATE_KEY, width=57, stops=regex.compile(r"[^A-Z0-9 \-]"),
                 extend=Extend(r"A-Za-z0-9+/=:, ", r"-(?!-)", lookahead=1)),
    ),
}

# Characters a deny phrase's words may be separated by, after normalisation (whitespace is one space by then).
PHRASE_SEPARATOR = r"[ _\-]{0,2}"
_sre_parser: Any = importlib.import_module("re._parser")
_ALLOWED_ANCHORS = {"AT_BOUNDARY", "AT_NON_BOUNDARY"}


def phrase_pattern(phrase: str) -> tuple[str, int]:
    """A deny phrase as a pattern (case-insensitive; words separated by up to two spaces, `_` or `-` in any mix,
    or none; whole words at its ends) and its width. Raises PatternError for an empty phrase."""
    words = normalize_text(phrase).split()
    if not words:
        raise PatternError("a phrase needs at least one word")
    body = PHRASE_SEPARATOR.join(regex.escape(w) for w in words)
    start = r"\b" if words[0][0].isalnum() or words[0][0] == "_" else ""
    end = r"\b" if words[-1][-1].isalnum() or words[-1][-1] == "_" else ""
    return f"{start}{body}{end}", sum(map(len, words)) + 2 * (len(words) - 1) + 1


def regex_width(pattern: str) -> int:
    """The most characters `pattern` can match, checked for what the screen needs: it compiles, matches no empty
    text, has a bounded width of at most MAX_PATTERN_WIDTH, uses no anchors (but `\\b`, `\\B`), lookarounds or
    backreferences. Raises PatternError saying what is wrong."""
    import re

    try:
        re.compile(pattern)
        parsed = _sre_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError, TypeError, IndexError) as exc:
        raise PatternError(f"not a valid regular expression ({str(exc).splitlines()[0][:120]})") from None
    _check_tree(parsed)
    try:
        low, high = parsed.getwidth()
    except (RecursionError, OverflowError) as exc:
        raise PatternError("too complex") from exc
    if low == 0:
        raise PatternError("can match empty text")
    if high > MAX_PATTERN_WIDTH:
        raise PatternError(f"can match more than {MAX_PATTERN_WIDTH} characters (bound every repetition, e.g. "
                           "`{1,20}` instead of `+` or `*`)")
    return int(high)


def _check_tree(parsed: Any, depth: int = 0) -> None:
    if depth > 100:
        raise PatternError("nested too deeply")
    for op, value in parsed:
        name = str(op)
        if name == "AT" and str(value) not in _ALLOWED_ANCHORS:
            raise PatternError("anchors (`^`, `$`, `\\A`, `\\Z`) are not allowed: patterns match anywhere")
        if name in ("ASSERT", "ASSERT_NOT"):
            raise PatternError("lookahead and lookbehind are not allowed")
        if name in ("GROUPREF", "GROUPREF_EXISTS"):
            raise PatternError("backreferences are not allowed")
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, _sre_parser.SubPattern):
                _check_tree(item, depth + 1)
            elif isinstance(item, (list, tuple)):
                for sub in item:
                    if isinstance(sub, _sre_parser.SubPattern):
                        _check_tree(sub, depth + 1)


def deny_detector(phrases: Sequence[str], patterns: Sequence[str]) -> Detector:
    """One detector for a deny rule: its phrases and patterns as one alternation (raises PatternError)."""
    parts: list[str] = []
    width = 0
    letters: set[str] = set()
    for phrase in phrases:
        part, phrase_width = phrase_pattern(phrase)
        parts.append(part)
        width = max(width, phrase_width)
        for char in normalize_text(phrase):
            letters.update((char, char.lower(), char.upper(), char.casefold()))
    for pattern in patterns:
        width = max(width, regex_width(pattern) + 1)
        parts.append(f"(?:{pattern})")
    if not parts:
        raise PatternError("a deny rule needs `phrases` or `patterns`")
    try:
        compiled = regex.compile("|".join(parts), regex.IGNORECASE | regex.V0)
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise PatternError(f"not a valid regular expression ({str(exc)[:120]})") from None
    stops = None
    if not patterns:  # an operator's regex may read anything: only its width makes a match final
        alphabet = sorted(c for c in letters | {" ", "_", "-"} if len(c) == 1)
        stops = regex.compile(f"[^{''.join(regex.escape(c) for c in alphabet)}]")
    return Detector("deny", compiled, width=width, stops=stops)


# ---- normalisation -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _dropped(char: str) -> bool:
    """Characters matching ignores: format characters (zero-width, bidi, tags, soft hyphen, BOM), variation
    selectors, the combining grapheme joiner and the Hangul fillers."""
    code = ord(char)
    return (unicodedata.category(char) == "Cf" or 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF
            or code in (0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, 0x180B, 0x180C, 0x180D, 0x180F))


@functools.lru_cache(maxsize=4096)
def _combining(char: str) -> bool:
    return unicodedata.category(char) in ("Mn", "Mc", "Me")


@functools.lru_cache(maxsize=8192)
def _fold_cluster(cluster: str) -> str:
    """A cluster's normalised text: NFKC, then every decimal digit ASCII, every dash `-`, whitespace a space."""
    out = []
    for char in unicodedata.normalize("NFKC", cluster):
        if char.isspace():
            out.append(" ")
        elif char < "\x80":
            out.append(char)
        else:
            category = unicodedata.category(char)
            if category == "Nd":
                out.append(str(unicodedata.decimal(char)))
            elif category == "Pd" or char == "\u2212":
                out.append("-")
            else:
                out.append(char)
    return "".join(out)


def normalize_text(text: str) -> str:
    """`text` as the detectors see it (without the position map)."""
    normalizer = Normalizer()
    normalizer.push(text, 0)
    normalizer.flush()
    return "".join(normalizer.chars)


class Normalizer:
    """Original characters in (with their absolute offsets); normalised characters out, each with the span of
    original characters it stands for. The last cluster (or whitespace run) waits for the next character, which
    may extend it."""

    def __init__(self) -> None:
        self.chars: list[str] = []  # normalised characters not yet taken
        self.starts: list[int] = []
        self.ends: list[int] = []
        self._pending: list[str] = []
        self._space = False
        self.pending_start = -1  # -1: nothing pending
        self._pending_end = -1

    def push(self, text: str, offset: int) -> None:
        for index, char in enumerate(text, offset):
            if char < "\x80":
                if char in " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f":
                    self._whitespace(index)
                else:
                    self._base(char, index)
            elif _dropped(char):
                continue
            elif char.isspace():
                self._whitespace(index)
            elif _combining(char) and self._pending and not self._space and len(self._pending) < MAX_CLUSTER:
                self._pending.append(char)
                self._pending_end = index + 1
            else:
                self._base(char, index)

    def _whitespace(self, index: int) -> None:
        if self._space and index - self.pending_start < MAX_WHITESPACE_RUN:
            self._pending_end = index + 1
            return
        self.flush()
        self._space = True
        self.pending_start, self._pending_end = index, index + 1

    def _base(self, char: str, index: int) -> None:
        self.flush()
        self._pending.append(char)
        self.pending_start, self._pending_end = index, index + 1

    def flush(self) -> None:
        """Emits the pending cluster (at the end of the text, or when the next one starts)."""
        if self.pending_start < 0:
            return
        start, end = self.pending_start, self._pending_end
        if self._space:
            folded = " "
        elif len(self._pending) == 1 and self._pending[0] < "\x80":
            folded = self._pending[0]
        else:
            folded = _fold_cluster("".join(self._pending))
        for char in folded:
            self.chars.append(char)
            self.starts.append(start)
            self.ends.append(end)
        self._pending.clear()
        self._space = False
        self.pending_start = self._pending_end = -1


# ---- compiled rules --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledRule:
    spec: RuleSpec
    detectors: tuple[Detector, ...]

    @property
    def holds(self) -> bool:
        """Whether the stream waits for this rule's decision (a flag changes nothing, so it never waits)."""
        return self.spec.action != Action.FLAG


def compile_rule(spec: RuleSpec) -> CompiledRule:
    """Raises PatternError for a deny rule whose phrases or patterns cannot be used."""
    if spec.detect == DetectorKind.DENY:
        return CompiledRule(spec, (deny_detector(spec.phrases, spec.patterns),))
    return CompiledRule(spec, BUILTIN[spec.detect])


@dataclass(frozen=True)
class Profile:
    """The rules that apply to one request at one stage."""

    rules: tuple[CompiledRule, ...]

    @functools.cached_property
    def hold_width(self) -> int:
        """The hold-back window: the most normalised characters a stream may be held for (0: never held)."""
        return max((d.width for r in self.rules if r.holds for d in r.detectors), default=0)

    def __bool__(self) -> bool:
        return bool(self.rules)


NO_RULES = Profile(())


class CompiledRules:
    """A rule set compiled once per version; per-request profiles are cached by scope."""

    def __init__(self, version: str, specs: Sequence[RuleSpec], source: str = "") -> None:
        self.version = version
        self.source = source
        self.rules = tuple(compile_rule(spec) for spec in specs)
        self._profiles: dict[tuple[Stage, str, str, tuple[str, ...]], Profile] = {}

    def profile(self, stage: Stage, tenant: str, model_id: str, aliases: Sequence[str] = ()) -> Profile:
        key = (stage, tenant, model_id, tuple(aliases))
        found = self._profiles.get(key)
        if found is None:
            if len(self._profiles) > 1024:
                self._profiles.clear()
            found = self._profiles[key] = Profile(tuple(
                r for r in self.rules if r.spec.applies(stage, tenant, model_id, aliases)))
        return found


# ---- screening ---------------------------------------------------------------------------------------------------


@dataclass
class Finding:
    """A match that counts: its rule, and where it is in the original text (character offsets; a redaction's end
    grows while its tail is still streaming)."""

    rule: RuleSpec
    detector: str
    start: int
    end: int

    @property
    def action(self) -> Action:
        return self.rule.action


@dataclass
class Release:
    """What a push or the finish lets out: `text` (original text, redactions replaced), the `findings` that became
    final, and where the released original text ends (`upto`, characters; `upto_bytes`, UTF-8 bytes), with the
    redacted spans among it in UTF-8 bytes of the original (`redacted_bytes`)."""

    text: str = ""
    findings: list[Finding] = field(default_factory=list)
    upto: int = 0
    upto_bytes: int = 0
    redacted_bytes: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Cover:
    start: int
    end: int
    replacement: str
    emitted: bool = False
    open: bool = False
    rank: int = 0  # the naming match's detector's place in the profile: of matches that begin together, the first


@dataclass
class _State:
    rule: CompiledRule
    detector: Detector
    pos: int = 0  # next normalised position this detector tries a match at
    hold: int | None = None  # where a match that is not decided yet begins
    tail: Finding | None = None  # a redaction whose tail is still streaming
    tail_at: int = 0  # normalised position the tail reached
    cover: _Cover | None = None  # that redaction's cover
    rank: int = 0  # its place in the profile


class Screen:
    """Incremental screening of one text: `push` its pieces as they come, then `finish`. Each returns what may be
    let out. After a block, nothing more is (`blocked` holds the finding); the held text is dropped."""

    def __init__(self, profile: Profile) -> None:
        self._states = [_State(rule, d, rank=rank)
                        for rank, (rule, d) in enumerate((r, d) for r in profile.rules for d in r.detectors)]
        self._norm = Normalizer()
        self._text = ""  # normalised text from absolute position self._base
        self._base = 0
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._original = ""  # original text not released yet, from absolute offset self._released
        self._released = 0
        self._released_bytes = 0
        self._covers: list[_Cover] = []
        self.findings: list[Finding] = []
        self.blocked: Finding | None = None
        self._complete = False

    def push(self, text: str) -> Release:
        if self.blocked is not None or not text:
            return self._empty()
        offset = self._released + len(self._original)
        self._original += text
        self._norm.push(text, offset)
        return self._advance()

    def finish(self) -> Release:
        if self.blocked is not None:
            return self._empty()
        self._norm.flush()
        self._complete = True
        return self._advance()

    def _empty(self) -> Release:
        return Release(upto=self._released, upto_bytes=self._released_bytes)

    def _advance(self) -> Release:
        norm = self._norm
        if norm.chars:
            self._text += "".join(norm.chars)
            self._starts += norm.starts
            self._ends += norm.ends
            norm.chars.clear()
            norm.starts.clear()
            norm.ends.clear()
        new: list[Finding] = []
        for state in self._states:
            self._scan(state, new)
            if self.blocked is not None:
                self._original = ""
                return Release(findings=new, upto=self._released, upto_bytes=self._released_bytes)
        end = self._base + len(self._text)
        hold = min((s.hold for s in self._states if s.hold is not None and s.rule.holds), default=end)
        if hold < end:
            upto = self._starts[hold - self._base]
        elif norm.pending_start >= 0 and not self._complete:
            upto = norm.pending_start
        else:
            upto = self._released + len(self._original)
        release = self._release(upto)
        release.findings = new
        self._trim(hold)
        return release

    def _scan(self, state: _State, new: list[Finding]) -> None:
        detector, text, base = state.detector, self._text, self._base
        end = base + len(text)
        state.hold = None
        if state.tail is not None and not self._extend(state, end):
            return
        while state.pos < end:
            match = detector.pattern.search(text, state.pos - base, partial=not self._complete)
            if match is None:
                state.pos = end
                return
            start, stop = base + match.start(), base + match.end()
            if not self._complete and (match.partial or not self._final(detector, start, stop, end)):
                state.pos = state.hold = start
                return
            span = (match.start(), match.end()) if detector.check is None else detector.check(
                text, match.start(), match.end())
            if span is None:
                state.pos = start + 1
                continue
            first, last = base + span[0], base + span[1]
            finding = Finding(state.rule.spec, detector.name, self._starts[first - base], self._ends[last - 1 - base])
            state.pos = last
            cover = self._commit(finding, new, state.rank)
            if self.blocked is not None:
                return
            if detector.extend is not None and cover is not None:
                state.tail, state.tail_at, state.cover = finding, last, cover
                if not self._extend(state, end):
                    return

    def _final(self, detector: Detector, start: int, stop: int, end: int) -> bool:
        """Whether a match found in the text so far stays the same whatever comes next: the text reaches past
        the most its attempt can read, or a character it cannot read past comes after it."""
        if start + detector.width <= end:
            return True
        return detector.stops is not None and detector.stops.search(self._text, stop - self._base) is not None

    def _extend(self, state: _State, end: int) -> bool:
        """Grows a redaction's tail over what came; True once it ended (the detector then goes on matching).
        While the text ends inside it, the characters its end may still depend on wait (a hold)."""
        assert state.tail is not None and state.cover is not None and state.detector.extend is not None
        extend = state.detector.extend
        reach = self._base + extend.reach(self._text, state.tail_at - self._base)
        closed = reach < end or self._complete
        if not closed:
            reach = max(state.tail_at, reach - extend.lookahead)
        if reach > state.tail_at:
            state.tail.end = self._ends[reach - 1 - self._base]
            state.cover.end = max(state.cover.end, state.tail.end)
        state.tail_at = reach
        if closed:
            state.cover.open = False
            state.tail = state.cover = None
            state.pos = reach
            return True
        state.cover.open = True
        state.hold = reach
        return False

    def _commit(self, finding: Finding, new: list[Finding], rank: int = 0) -> _Cover | None:
        """Records a finding; a redaction's cover (merged with one it overlaps) is returned. The marker names the
        match that begins first, and of those that begin together the one whose detector comes first in the
        profile: the same however the text was split, whichever match was decided first."""
        self.findings.append(finding)
        new.append(finding)
        if finding.action == Action.BLOCK:
            self.blocked = finding
            return None
        if finding.action != Action.REDACT:
            return None
        for cover in self._covers:
            if finding.start < cover.end and cover.start < finding.end:
                if (finding.start, rank) < (cover.start, cover.rank):
                    cover.start, cover.replacement, cover.rank = finding.start, finding.rule.replacement_text, rank
                cover.end = max(cover.end, finding.end)
                return cover
        cover = _Cover(finding.start, finding.end, finding.rule.replacement_text, rank=rank)
        self._covers.append(cover)
        self._covers.sort(key=lambda c: c.start)
        return cover

    def _release(self, upto: int) -> Release:
        """Lets out the original text up to `upto` (absolute), with the redactions applied."""
        start = self._released
        if upto <= start:
            return self._empty()
        original = self._original
        pieces: list[str] = []
        redacted: list[tuple[int, int]] = []
        position, byte_position = start, self._released_bytes
        for cover in self._covers:
            if cover.end <= position or cover.start >= upto:
                continue
            if cover.start > position:
                piece = original[position - start:cover.start - start]
                pieces.append(piece)
                byte_position += len(piece.encode())
                position = cover.start
            if not cover.emitted:
                if cover.start >= position:  # one that begins inside another (a tail grew over it) adds none
                    pieces.append(cover.replacement)
                cover.emitted = True
            covered_end = min(cover.end, upto)
            covered = original[position - start:covered_end - start]
            size = len(covered.encode())
            redacted.append((byte_position, byte_position + size))
            byte_position += size
            position = covered_end
        if position < upto:
            piece = original[position - start:upto - start]
            pieces.append(piece)
            byte_position += len(piece.encode())
        self._original = original[upto - start:]
        self._released, self._released_bytes = upto, byte_position
        self._covers = [c for c in self._covers if c.end > upto or c.open]
        return Release("".join(pieces), [], upto, byte_position, redacted)

    def _trim(self, hold: int) -> None:
        """Forgets normalised text no detector will read again (keeping a little context for lookbehinds)."""
        keep = min([hold, *(s.pos for s in self._states), *(s.tail_at for s in self._states if s.tail)])
        drop = keep - LOOKBEHIND - self._base
        if drop > 256 or (drop > 0 and len(self._text) > 4096):
            self._text = self._text[drop:]
            del self._starts[:drop]
            del self._ends[:drop]
            self._base += drop


def screen_text(profile: Profile, text: str) -> tuple[str, list[Finding], Finding | None]:
    """A whole text at once (a prompt's message): its screened text, the findings, and the blocking one if any."""
    if not profile:
        return text, [], None
    screen = Screen(profile)
    first = screen.push(text)
    last = screen.finish()
    return first.text + last.text, screen.findings, screen.blocked


def describe(findings: Iterable[Finding]) -> str:
    """Findings as rule ids and positions, never the text matched (for logs and audit details)."""
    return ", ".join(f"{f.rule.id} ({f.action.value}) at {f.start}-{f.end}" for f in findings)
