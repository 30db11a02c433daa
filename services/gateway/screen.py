"""The gateway's guardrails: it enforces the rules policy decided, with the rules it got from policy.

- Rules: one WatchRules stream per gateway process brings every version as policy's rules file changes; each
  version is compiled once. A request takes the version in force when it starts and keeps it to its end; no call
  to policy per request or per token.
- Input: each message is screened before the prompt is rendered: a `block` match refuses the request
  (PERMISSION_DENIED, reason CONTENT_BLOCKED, naming the rule id and the message, never the text), a `redact`
  match is replaced in the prompt.
- Output: the answer's deltas go through an incremental screen (services/common/guardrails.py) that holds back
  only what may still be part of a match; logprob entries are let out with their text, and an entry whose token
  holds redacted text loses its token (id, bytes, text and alternatives). A `block` match ends the stream before
  it, FINISH_REASON_CONTENT_FILTER, and stops the generation.
- Audit: what was done (rule ids and positions) goes to policy's audit log (RecordScreening), for a blocked answer
  with the tokens it used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from lmesh.common.v1 import generation_pb2
from lmesh.policy.v1 import policy_pb2
from lmesh.policy.v1.policy_pb2_grpc import PolicyStub
from lmesh.registry.v1 import registry_pb2

from services.common.errors import LmeshError, PermissionDenied, Reason, Unavailable
from services.common.follow import StreamFollower
from services.common.guardrails import (
    NO_RULES,
    Action,
    CompiledRules,
    DetectorKind,
    Finding,
    PatternError,
    Profile,
    RuleSpec,
    Screen,
    Stage,
    describe,
    screen_text,
)
from services.common.peers import Peer
from services.gateway.chat import ChatDelta, ChatEnd, ChatParams
from services.gateway.logprobs import Candidate, TokenLogprob, VocabularyCache

log = logging.getLogger("lmesh.gateway.guardrails")

FIRST_RULES_TIMEOUT_S = 10.0
REPORT_TIMEOUT_S = 5.0
LARGE_MESSAGE_CHARS = 64 * 1024  # screened in a worker thread, off the event loop
REDACTED_TOKEN_ID = -1

_DETECT = {getattr(policy_pb2, f"DETECTOR_{kind.name}"): kind for kind in DetectorKind}
_ACTION = {getattr(policy_pb2, f"RULE_ACTION_{action.name}"): action for action in Action}
_STAGE = {getattr(policy_pb2, f"SCREENING_STAGE_{stage.name}"): stage for stage in Stage}
_ACTION_PB = {action: value for value, action in _ACTION.items()}
_STAGE_PB = {stage: value for value, stage in _STAGE.items()}


def specs_from_proto(rules: policy_pb2.RuleSet) -> list[RuleSpec]:
    """The rules of a RuleSet (ValueError for one this gateway does not understand, e.g. a newer detector)."""
    specs = []
    for rule in rules.rules:
        if rule.detect not in _DETECT or rule.action not in _ACTION or any(s not in _STAGE for s in rule.stages):
            raise ValueError(f"rule {rule.id!r} uses a detector, action or stage this gateway does not know")
        specs.append(RuleSpec(rule.id, _DETECT[rule.detect], _ACTION[rule.action],
                              frozenset(_STAGE[s] for s in rule.stages) or frozenset(Stage), tuple(rule.tenants),
                              tuple(rule.models), tuple(rule.phrases), tuple(rule.patterns), rule.replacement))
    return specs


@dataclass
class Screening:
    """One request's guardrails: who asked, which model, the rules version it keeps, what was found."""

    request_id: str = ""
    principal: policy_pb2.Principal | None = None
    model_id: str = ""
    aliases: tuple[str, ...] = ()
    rules: CompiledRules | None = None

    def profile(self, stage: Stage) -> Profile:
        if self.rules is None or self.principal is None:
            return NO_RULES
        return self.rules.profile(stage, self.principal.tenant, self.model_id, self.aliases)


@dataclass(frozen=True)
class Located:
    """A finding, and where: the stage, and for the input the message's index."""

    stage: Stage
    finding: Finding
    message_index: int = 0


class OutputGate:
    """The answer's screen with its logprob entries: `feed` each delta (and the entries riding on it), then
    `finish`; each returns the text to send now and the entries that may ride on it.

    An entry is let out once the text it holds has been (UTF-8 byte positions of the answer, special tokens
    counting none); one whose bytes overlap a redaction is scrubbed. Where the answer held invalid UTF-8 (U+FFFD in
    the text, raw bytes in the entries), positions may drift by up to 3 bytes each: the checks widen by that."""

    def __init__(self, profile: Profile, special_token_ids: frozenset[int] = frozenset()) -> None:
        self.screen = Screen(profile)
        self._special = special_token_ids
        self._pending: deque[tuple[int, int, TokenLogprob]] = deque()  # (start byte, end byte, entry)
        self._token_end = 0
        self._redacted: list[tuple[int, int]] = []
        self._slack = 0
        self._unsent: list[TokenLogprob] = []  # let out, waiting for a message with text

    @property
    def blocked(self) -> Finding | None:
        return self.screen.blocked

    def _add(self, entries: Sequence[TokenLogprob]) -> None:
        for entry in entries:
            start = self._token_end
            if entry.chosen.token_id not in self._special:
                self._token_end += len(entry.chosen.data)
            self._pending.append((start, self._token_end, entry))

    def _scrubbed(self, start: int, end: int, entry: TokenLogprob) -> TokenLogprob:
        slack = self._slack
        if end > start and any(start < b + slack and a < end + slack for a, b in self._redacted):
            return TokenLogprob(Candidate(REDACTED_TOKEN_ID, b"", entry.chosen.logprob), ())
        return entry

    def _let_out(self, upto_bytes: int | None) -> None:
        pending = self._pending
        while pending and (upto_bytes is None or pending[0][1] + self._slack <= upto_bytes):
            start, end, entry = pending.popleft()
            self._unsent.append(self._scrubbed(start, end, entry))
        if pending and self._redacted:
            oldest = pending[0][0] - self._slack
            self._redacted = [r for r in self._redacted if r[1] > oldest]

    def feed(self, text: str, entries: Sequence[TokenLogprob] = ()) -> tuple[str, list[TokenLogprob]]:
        if self.blocked is not None:
            return "", []
        self._add(entries)
        self._slack += 3 * text.count("\ufffd")
        release = self.screen.push(text)
        if self.blocked is not None:
            self._pending.clear()
            self._unsent.clear()
            return "", []
        self._redacted += release.redacted_bytes
        self._let_out(release.upto_bytes)
        if not release.text:
            return "", []
        entries_out, self._unsent = self._unsent, []
        return release.text, entries_out

    def finish(self, entries: Sequence[TokenLogprob] = ()) -> tuple[str, list[TokenLogprob]]:
        """The rest of the text and every entry left (none after a block)."""
        if self.blocked is not None:
            return "", []
        self._add(entries)
        release = self.screen.finish()
        if self.blocked is not None:
            self._pending.clear()
            self._unsent.clear()
            return "", []
        self._redacted += release.redacted_bytes
        self._let_out(None)
        entries_out, self._unsent = self._unsent, []
        return release.text, entries_out


class Guardrails:
    """The rules followed from policy, and the screening of each request with them."""

    def __init__(self, policy: Peer[PolicyStub], vocabularies: VocabularyCache,
                 first_rules_timeout_s: float = FIRST_RULES_TIMEOUT_S) -> None:
        self._policy = policy
        self._vocabularies = vocabularies
        self._timeout_s = first_rules_timeout_s
        self._current: CompiledRules | None = None
        self._ready = asyncio.Event()
        self._follower = StreamFollower(
            policy, lambda lease: lease.stub.WatchRules(policy_pb2.WatchRulesRequest(), **lease.options(timeout=None)),
            self.apply, what="guardrail rules", log=log)

    # ---- rules ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts following the rules (in a context of its own: no request's deadline or trace applies)."""
        self._follower.start()

    async def warm_up(self) -> None:
        self.start()

    async def close(self) -> None:
        await self._follower.close()

    async def rules(self) -> CompiledRules:
        """The rules in force; the first request waits for them a moment (UNAVAILABLE when policy sent none)."""
        self.start()
        if self._current is None:
            try:
                await asyncio.wait_for(asyncio.shield(self._ready.wait()), self._timeout_s)
            except TimeoutError:
                raise Unavailable(f"lmesh-policy has sent this gateway no guardrail rules within "
                                  f"{self._timeout_s:g} s; retry", retry_after_s=1.0) from None
        assert self._current is not None
        return self._current

    def apply(self, message: policy_pb2.RuleSet) -> bool:
        """Takes a RuleSet from policy: compiled once per version; one this gateway cannot use is refused with an
        error in the log (the rules in force stay). True when a new version is in force."""
        if self._current is not None and self._current.version == message.version:
            return False
        try:
            compiled = CompiledRules(message.version, specs_from_proto(message), message.source)
        except (ValueError, PatternError) as exc:
            log.error("guardrail rules version %s from lmesh-policy cannot be used here (%s); keeping version %s",
                      message.version, exc, self._current.version if self._current else "none")
            return False
        log.info("guardrail rules: version %s (%d rules, from %s)", compiled.version, len(compiled.rules),
                 compiled.source or "policy")
        self._current = compiled
        self._ready.set()
        return True

    # ---- input ---------------------------------------------------------------------------------------------

    async def screen_input(self, screening: Screening, principal: policy_pb2.Principal,
                           version: registry_pb2.ModelVersion, params: ChatParams) -> ChatParams:
        """The request's messages screened (redactions applied); PermissionDenied for a block."""
        screening.principal = principal
        screening.model_id = f"{version.name}:{version.version}"
        screening.aliases = tuple(version.aliases)
        screening.rules = await self.rules()
        profile = screening.profile(Stage.INPUT)
        if not profile:
            return params
        messages: list[tuple[str, str]] = []
        found: list[Located] = []
        for index, (role, content) in enumerate(params.messages):
            if len(content) > LARGE_MESSAGE_CHARS:
                text, findings, blocked = await asyncio.to_thread(screen_text, profile, content)
            else:
                text, findings, blocked = screen_text(profile, content)
            found += [Located(Stage.INPUT, f, index) for f in findings]
            if blocked is not None:
                await self._report(screening, found, blocked=True)
                field_name = f"messages[{index}].content"
                raise PermissionDenied(
                    f"{field_name}: blocked by guardrail rule '{blocked.rule.id}' (characters {blocked.start}-"
                    f"{blocked.end})", reason=Reason.CONTENT_BLOCKED,
                    metadata={"rule_id": blocked.rule.id, "field": field_name})
            messages.append((role, text))
        if found:
            await self._report(screening, found)
        return dataclasses.replace(params, messages=messages)

    # ---- output --------------------------------------------------------------------------------------------

    async def screen_output(self, screening: Screening, events: AsyncIterator[ChatDelta | ChatEnd],
                            cancel: asyncio.Event, logprobs: bool = False) -> AsyncIterator[ChatDelta | ChatEnd]:
        """The answer's events screened: deltas held back while they may be part of a match, redactions applied,
        a block ending the stream (the generation is cancelled) with FINISH_REASON_CONTENT_FILTER."""
        profile = screening.profile(Stage.OUTPUT)
        if not profile:
            async for event in events:
                yield event
            return
        special: frozenset[int] = frozenset()
        if logprobs:
            special = (await self._vocabularies.get(screening.model_id)).special_token_ids
        gate = OutputGate(profile, special)
        async for event in events:
            if isinstance(event, ChatDelta):
                text, entries = gate.feed(event.text, event.logprobs)
                if gate.blocked is not None:
                    cancel.set()  # the generation stops; its end (usage) still comes
                if text:
                    yield ChatDelta(text, entries)
                continue
            text, entries = gate.finish(event.logprobs)
            if text:
                yield ChatDelta(text, entries)
                entries = []
            findings = [Located(Stage.OUTPUT, f) for f in gate.screen.findings]
            if findings:
                await self._report(screening, findings, blocked=gate.blocked is not None, usage=event.usage)
            if gate.blocked is not None:
                yield ChatEnd(generation_pb2.FINISH_REASON_CONTENT_FILTER, event.usage, [])
            else:
                yield ChatEnd(event.finish_reason, event.usage, entries)

    # ---- audit ---------------------------------------------------------------------------------------------

    async def _report(self, screening: Screening, found: list[Located], *, blocked: bool = False,
                      usage: generation_pb2.Usage | None = None) -> None:
        """Records what was done in policy's audit log; a failure is logged (rule ids and positions only) and the
        request goes on: it was screened all the same."""
        principal = screening.principal or policy_pb2.Principal()
        request = policy_pb2.RecordScreeningRequest(
            request_id=screening.request_id, key_id=principal.key_id, tenant=principal.tenant,
            model=screening.model_id, rules_version=screening.rules.version if screening.rules else "",
            blocked=blocked, usage=usage,
            findings=[policy_pb2.ScreeningFinding(
                rule_id=item.finding.rule.id, action=_ACTION_PB[item.finding.action], stage=_STAGE_PB[item.stage],
                message_index=item.message_index, start=item.finding.start, end=item.finding.end)
                for item in found[:1000]])
        try:
            await self._policy.call(lambda p: p.RecordScreening, request, timeout=REPORT_TIMEOUT_S, retry=False)
        except (grpc.aio.AioRpcError, LmeshError) as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else exc.code
            log.warning("guardrails: could not record %s of %s in policy's audit log (%s)",
                        describe(item.finding for item in found), screening.request_id, code.name)

