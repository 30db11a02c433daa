"""The guardrail rules file: operators write it in YAML, policy reads it (`--rules FILE`, LMESH_POLICY_RULES; the
built-in default rules without one), checks it naming the bad line, follows its changes without a restart and sends
every version to the gateways (WatchRules), which enforce it (services/common/guardrails.py).

    rules:
      - id: payment-cards          # letters, digits, '.', '_', '-'; unique
        detect: card               # deny | email | phone | card | iban | ipv4 | secret
        action: redact             # block | redact | flag
        applies_to: [input, output]   # default: both
        tenants: [acme, "beta-*"]  # globs; default: every tenant
        models: ["smollm2-*"]      # model references or globs, as an API key's; default: every model
        replacement: "[card]"      # redact only; default "[REDACTED:<id>]"
      - id: codenames
        detect: deny
        action: block
        phrases: ["project nightingale"]   # case and the spacing between words do not matter
        patterns: ['\\bACME-\\d{4}\\b']      # regular expressions of bounded width (no anchors, no lookaround)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lmesh.policy.v1 import policy_pb2

from services.common.errors import InvalidArgument, Unavailable
from services.common.guardrails import (
    MAX_PATTERN_WIDTH,
    Action,
    DetectorKind,
    PatternError,
    RuleSpec,
    Stage,
    compile_rule,
    phrase_pattern,
    regex_width,
    rules_version,
)
from services.policy.audit import AuditEvent, AuditSink
from services.policy.keys import KEY_ID_PATTERN, MAX_MODEL_PATTERN_LEN, TENANT_PATTERN

log = logging.getLogger("lmesh.policy.rules")

DEFAULT_RULES_PATH = Path(__file__).with_name("default_rules.yaml")
MAX_FILE_BYTES = 1024 * 1024
MAX_RULES = 256
MAX_ENTRIES = 256  # phrases, patterns, tenants or models of one rule
MAX_PHRASE_CHARS = 200
MAX_REPLACEMENT_CHARS = 64
MAX_SCOPE_CHARS = 256
RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SCOPE = re.compile(r"[A-Za-z0-9._:*?\[\]!/-]+")
RULE_KEYS = ("id", "detect", "action", "applies_to", "tenants", "models", "phrases", "patterns", "replacement")
POLL_S = 1.0


class RulesError(ValueError):
    """A rules file that cannot be used: `line` (1-based; 0 when it is the file as a whole) and what is wrong."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}" if line else problem)
        self.line = line
        self.problem = problem

    def located(self, source: str) -> str:
        """`source:line: problem`, the one line `lmesh policy rules check` prints."""
        return f"{source}:{self.line}: {self.problem}" if self.line else f"{source}: {self.problem}"


@dataclass(frozen=True)
class RuleFile:
    """Checked rules: the specs in file order, their version (a digest of their content) and where they came from."""

    specs: tuple[RuleSpec, ...]
    version: str
    source: str

    def to_proto(self) -> policy_pb2.RuleSet:
        return policy_pb2.RuleSet(version=self.version, source=self.source,
                                  rules=[_rule_pb(spec) for spec in self.specs])

    def hold_width(self) -> int:
        """The longest hold-back any stream gets under these rules (normalised characters)."""
        return max((d.width for s in self.specs if s.action != Action.FLAG for d in compile_rule(s).detectors),
                   default=0)


_DETECT_PB = {kind: getattr(policy_pb2, f"DETECTOR_{kind.name}") for kind in DetectorKind}
_ACTION_PB = {action: getattr(policy_pb2, f"RULE_ACTION_{action.name}") for action in Action}
_STAGE_PB = {stage: getattr(policy_pb2, f"SCREENING_STAGE_{stage.name}") for stage in Stage}


def _rule_pb(spec: RuleSpec) -> policy_pb2.GuardrailRule:
    return policy_pb2.GuardrailRule(
        id=spec.id, detect=_DETECT_PB[spec.detect], action=_ACTION_PB[spec.action],
        stages=[_STAGE_PB[s] for s in sorted(spec.stages)], tenants=list(spec.tenants), models=list(spec.models),
        phrases=list(spec.phrases), patterns=list(spec.patterns), replacement=spec.replacement)


# ---- parsing ------------------------------------------------------------------------------------------------


def parse_rules(data: bytes, source: str = "rules") -> RuleFile:
    """Checks a rules file's bytes; raises RulesError naming the first bad line."""
    if len(data) > MAX_FILE_BYTES:
        raise RulesError(0, f"the file is larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError(data[:exc.start].count(b"\n") + 1, "not UTF-8 text") from None
    if "\x00" in text:
        raise RulesError(text[:text.index("\x00")].count("\n") + 1, "a NUL character")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise RulesError(event.start_mark.line + 1, "anchors and aliases are not supported: write each "
                                                            "value out")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RulesError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise RulesError(line, f"not valid YAML: {exc.problem or exc.context or 'syntax error'}") from None
    except RecursionError:
        raise RulesError(1, "not valid YAML: nested too deeply") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise RulesError(1, f"not valid YAML ({type(exc).__name__})") from None
    if root is None:
        raise RulesError(1, "the file is empty: write `rules: []` for no rules")
    walker = _Walker()
    specs = walker.document(root)
    return RuleFile(tuple(specs), rules_version(specs), source)


def load_rules(path: Path | None) -> RuleFile:
    """The rules at `path` (the built-in default rules for None); OSError or RulesError when they cannot be used."""
    target = DEFAULT_RULES_PATH if path is None else path
    with open(target, "rb") as file:
        data = file.read(MAX_FILE_BYTES + 1)
    return parse_rules(data, "built-in default rules" if path is None else str(path))


def _line(node: Any) -> int:
    return int(node.start_mark.line) + 1


class _Walker:
    """Walks the composed YAML nodes (never constructing Python objects from tags), so every problem names its
    line, and anchors and aliases (which could multiply a small file) are refused."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def _visit(self, node: Any) -> None:
        if id(node) in self._seen:
            raise RulesError(_line(node), "anchors and aliases are not supported: write each value out")
        self._seen.add(id(node))

    def _mapping(self, node: Any, what: str) -> dict[str, tuple[Any, Any]]:
        self._visit(node)
        if not isinstance(node, yaml.MappingNode):
            raise RulesError(_line(node), f"{what} must be a mapping (`key: value` lines)")
        result: dict[str, tuple[Any, Any]] = {}
        for key, value in node.value:
            self._visit(key)
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                raise RulesError(_line(key), f"{what}: keys must be plain names")
            if key.value in result:
                raise RulesError(_line(key), f"{what}: `{_short(key.value)}` is given twice")
            result[key.value] = (key, value)
        return result

    def _sequence(self, node: Any, what: str, limit: int) -> list[Any]:
        self._visit(node)
        if not isinstance(node, yaml.SequenceNode):
            raise RulesError(_line(node), f"{what} must be a list")
        if len(node.value) > limit:
            raise RulesError(_line(node), f"{what}: at most {limit} entries, got {len(node.value)}")
        return list(node.value)

    def _string(self, node: Any, what: str) -> str:
        self._visit(node)
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            raise RulesError(_line(node), f"{what} must be a string")
        return str(node.value)

    def _strings(self, node: Any, what: str, check: Callable[[str, Any, str], str]) -> tuple[str, ...]:
        if isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:null":
            items = [node]
        else:
            items = self._sequence(node, what, MAX_ENTRIES)
        return tuple(check(self._string(item, f"{what}[{i}]"), item, f"{what}[{i}]") for i, item in enumerate(items))

    def document(self, root: Any) -> list[RuleSpec]:
        top = self._mapping(root, "the file")
        unknown = [name for name in top if name != "rules"]
        if unknown:
            key, _ = top[unknown[0]]
            raise RulesError(_line(key), f"unknown key `{_short(unknown[0])}` (the file holds `rules:`)")
        if "rules" not in top:
            raise RulesError(_line(root), "no `rules:` list (write `rules: []` for no rules)")
        key, value = top["rules"]
        if isinstance(value, yaml.ScalarNode) and value.tag == "tag:yaml.org,2002:null":
            raise RulesError(_line(key), "`rules:` is empty: write `rules: []` for no rules")
        entries = self._sequence(value, "rules", MAX_RULES)
        specs: list[RuleSpec] = []
        ids: dict[str, int] = {}
        for index, entry in enumerate(entries):
            spec = self.rule(entry, f"rules[{index}]")
            if spec.id in ids:
                raise RulesError(_line(entry), f"rules[{index}].id: `{spec.id}` is already the id of the rule on "
                                               f"line {ids[spec.id]}")
            ids[spec.id] = _line(entry)
            specs.append(spec)
        return specs

    def rule(self, node: Any, what: str) -> RuleSpec:
        fields = self._mapping(node, what)
        for name, (key, _) in fields.items():
            if name not in RULE_KEYS:
                raise RulesError(_line(key), f"{what}: unknown key `{_short(name)}` (one of {', '.join(RULE_KEYS)})")
        for required in ("id", "detect", "action"):
            if required not in fields:
                raise RulesError(_line(node), f"{what}: `{required}` is missing")

        def value(name: str) -> Any:
            return fields[name][1]

        rule_id = self._string(value("id"), f"{what}.id")
        if not RULE_ID.fullmatch(rule_id):
            raise RulesError(_line(value("id")), f"{what}.id: letters, digits, '.', '_' and '-', 1 to 64 characters, "
                                                 f"starting with a letter or digit; got {_short(rule_id)!r}")
        what = f"{what} ({rule_id})"
        detect = self._choice(value("detect"), f"{what}.detect", DetectorKind)
        action = self._choice(value("action"), f"{what}.action", Action)
        stages = frozenset(Stage)
        if "applies_to" in fields:
            chosen = self._strings(value("applies_to"), f"{what}.applies_to", self._stage)
            if not chosen:
                raise RulesError(_line(value("applies_to")), f"{what}.applies_to: name input, output or both")
            stages = frozenset(Stage(s) for s in chosen)
        tenants = self._strings(value("tenants"), f"{what}.tenants", self._scope) if "tenants" in fields else ()
        models = self._strings(value("models"), f"{what}.models", self._scope) if "models" in fields else ()
        phrases: tuple[str, ...] = ()
        patterns: tuple[str, ...] = ()
        for name in ("phrases", "patterns"):
            if name in fields and detect != DetectorKind.DENY:
                raise RulesError(_line(fields[name][0]), f"{what}.{name}: only a `detect: deny` rule has {name}")
        if detect == DetectorKind.DENY:
            if "phrases" in fields:
                phrases = self._strings(value("phrases"), f"{what}.phrases", self._phrase)
            if "patterns" in fields:
                patterns = self._strings(value("patterns"), f"{what}.patterns", self._pattern)
            if not phrases and not patterns:
                raise RulesError(_line(node), f"{what}: a `detect: deny` rule needs `phrases` or `patterns`")
        replacement = ""
        if "replacement" in fields:
            if action != Action.REDACT:
                raise RulesError(_line(fields["replacement"][0]),
                                 f"{what}.replacement: only an `action: redact` rule replaces text")
            replacement = self._string(value("replacement"), f"{what}.replacement")
            if len(replacement) > MAX_REPLACEMENT_CHARS or not replacement.isprintable():
                raise RulesError(_line(value("replacement")), f"{what}.replacement: at most "
                                 f"{MAX_REPLACEMENT_CHARS} printable characters on one line")
        spec = RuleSpec(rule_id, detect, action, stages, tenants, models, phrases, patterns, replacement)
        try:
            compile_rule(spec)
        except PatternError as exc:  # checked entry by entry above; this is the alternation of them all
            raise RulesError(_line(node), f"{what}: {exc}") from None
        return spec

    def _choice(self, node: Any, what: str, kind: Any) -> Any:
        text = self._string(node, what)
        try:
            return kind(text)
        except ValueError:
            raise RulesError(_line(node), f"{what}: must be one of {', '.join(k.value for k in kind)}, got "
                                          f"{_short(text)!r}") from None

    @staticmethod
    def _stage(text: str, node: Any, what: str) -> str:
        if text not in (Stage.INPUT, Stage.OUTPUT):
            raise RulesError(_line(node), f"{what}: input or output, got {_short(text)!r}")
        return text

    @staticmethod
    def _scope(text: str, node: Any, what: str) -> str:
        if not 1 <= len(text) <= MAX_SCOPE_CHARS or not SCOPE.fullmatch(text):
            raise RulesError(_line(node), f"{what}: a name or glob of letters, digits and . _ : * ? [ ] ! / -, at "
                                          f"most {MAX_SCOPE_CHARS} characters; got {_short(text)!r}")
        return text

    @staticmethod
    def _phrase(text: str, node: Any, what: str) -> str:
        if len(text) > MAX_PHRASE_CHARS:
            raise RulesError(_line(node), f"{what}: at most {MAX_PHRASE_CHARS} characters")
        try:
            phrase_pattern(text)
        except PatternError as exc:
            raise RulesError(_line(node), f"{what}: {exc}") from None
        return text

    @staticmethod
    def _pattern(text: str, node: Any, what: str) -> str:
        if len(text) > MAX_PATTERN_WIDTH * 4:
            raise RulesError(_line(node), f"{what}: at most {MAX_PATTERN_WIDTH * 4} characters")
        try:
            regex_width(text)
        except PatternError as exc:
            raise RulesError(_line(node), f"{what}: {exc}") from None
        return text


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# ---- the rules in force, followed ---------------------------------------------------------------------------


class RulesSource:
    """The rules in force: read at start (a bad file stops policy, naming the line), then re-read when the file
    changes (looked at once a second; a change that does not check out keeps the rules in force, with a warning
    naming the line, until a later change does). Watchers get the rules now and every new version."""

    def __init__(self, path: Path | None, poll_s: float = POLL_S) -> None:
        self.path = path
        self._poll_s = poll_s
        self.current = load_rules(path)
        self._stamp = self._file_stamp()
        self._changed = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def start(self) -> None:
        if self.path is not None and self._task is None:
            self._task = asyncio.create_task(self._follow(), name="rules-file")

    async def close(self) -> None:
        """Ends every watch (policy is draining: the gateways reconnect elsewhere and keep their rules meanwhile)."""
        self._closed = True
        self._changed.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def reload(self) -> bool:
        """Re-reads the file if it changed; True when a new version is in force."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            fresh = load_rules(self.path)
        except RulesError as exc:
            log.warning("guardrail rules: %s; the rules in force (version %s) stay", exc.located(str(self.path)),
                        self.current.version)
            return False
        except OSError as exc:
            log.warning("guardrail rules: cannot read %s (%s); the rules in force (version %s) stay", self.path,
                        exc.strerror or type(exc).__name__, self.current.version)
            return False
        if fresh.version == self.current.version:
            return False
        log.info("guardrail rules: version %s from %s (%d rules) replaces %s", fresh.version, self.path,
                 len(fresh.specs), self.current.version)
        self.current = fresh
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            self.reload()

    async def watch(self) -> AsyncIterator[RuleFile]:
        """The rules in force, then each new version, until the source closes."""
        sent: str | None = None
        while not self._closed:
            current, changed = self.current, self._changed
            if current.version != sent:
                sent = current.version
                yield current
            await changed.wait()


# ---- what the gateways did: the audit log -------------------------------------------------------------------

MAX_FINDINGS = 1000
MAX_POSITION = 1 << 40
_ACTION_NAMES = {value: action for action, value in _ACTION_PB.items()}
_STAGE_NAMES = {value: stage for stage, value in _STAGE_PB.items()}
_OUTCOMES = {Action.BLOCK: "blocked", Action.REDACT: "redacted", Action.FLAG: "flagged"}
PRINTABLE = re.compile(r"[\x21-\x7e]*")


def screening_events(request: policy_pb2.RecordScreeningRequest, trace_id: str = "") -> list[AuditEvent]:
    """The audit events of a RecordScreening request, one per finding (rule id and position, never text); raises
    InvalidArgument naming a malformed field."""
    def printable(name: str, value: str, limit: int) -> None:
        if len(value) > limit or not PRINTABLE.fullmatch(value):
            raise InvalidArgument(name, f"at most {limit} printable ASCII characters without spaces")

    printable("request_id", request.request_id, 64)
    printable("rules_version", request.rules_version, 64)
    printable("model", request.model, MAX_MODEL_PATTERN_LEN)
    if request.key_id and not KEY_ID_PATTERN.fullmatch(request.key_id):
        raise InvalidArgument("key_id", "must be `key_` followed by 8 hex digits")
    if request.tenant and not TENANT_PATTERN.fullmatch(request.tenant):
        raise InvalidArgument("tenant", "letters, digits, '.', '_' and '-', 1 to 64 characters")
    if len(request.findings) > MAX_FINDINGS:
        raise InvalidArgument("findings", f"at most {MAX_FINDINGS}, got {len(request.findings)}")
    usage = request.usage
    for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_prompt_tokens"):
        if getattr(usage, name) < 0:
            raise InvalidArgument(f"usage.{name}", "must not be negative")
    tokens = ({"prompt": usage.prompt_tokens, "completion": usage.completion_tokens}
              if request.HasField("usage") else {})
    events = []
    for index, finding in enumerate(request.findings):
        where = f"findings[{index}]"
        if not RULE_ID.fullmatch(finding.rule_id):
            raise InvalidArgument(f"{where}.rule_id", "letters, digits, '.', '_' and '-', 1 to 64 characters")
        action = _ACTION_NAMES.get(finding.action)
        if action is None:
            raise InvalidArgument(f"{where}.action", "must be RULE_ACTION_BLOCK, _REDACT or _FLAG")
        stage = _STAGE_NAMES.get(finding.stage)
        if stage is None:
            raise InvalidArgument(f"{where}.stage", "must be SCREENING_STAGE_INPUT or _OUTPUT")
        if not 0 <= finding.start <= finding.end <= MAX_POSITION:
            raise InvalidArgument(f"{where}.start", f"0 <= start <= end <= {MAX_POSITION}, got {finding.start} "
                                                    f"and {finding.end}")
        if finding.message_index < 0 or (stage == Stage.OUTPUT and finding.message_index):
            raise InvalidArgument(f"{where}.message_index", "an input message's index (>= 0); 0 for output")
        place = (f"input messages[{finding.message_index}]" if stage == Stage.INPUT else "output")
        events.append(AuditEvent(
            action=action.value, outcome=_OUTCOMES[action], principal=request.key_id, tenant=request.tenant,
            model=request.model, rule_id=finding.rule_id, tokens=tokens if request.blocked else {},
            trace_id=trace_id, detail=f"{place} characters {finding.start}-{finding.end}; rules "
                                      f"{request.rules_version or '-'}; request {request.request_id or '-'}"))
    return events


def record_screening(audit: AuditSink, request: policy_pb2.RecordScreeningRequest, trace_id: str = "") -> int:
    """Appends a RecordScreening request's events to the audit log (all checked first); how many."""
    events = screening_events(request, trace_id)
    try:
        for event in events:
            audit.append(event)
    except OSError as exc:
        raise Unavailable(f"the audit log could not be written ({exc.strerror or type(exc).__name__})") from exc
    return len(events)
