"""The gateway's side of accounting: reserve before generating, renew the lease while streaming, settle on every
ending.

`Accounts.reserve` asks policy to admit the request and reserve its prompt plus max_tokens; the reservation id is
the completion id, so a Reserve repeated after a lost answer finds the same reservation. `Accounts.held(...)`
wraps the generation: while it runs, a task renews the lease every third of it; however the block ends (finish,
cancel, the client gone, a deadline, an error, a replica's death), it hands the usage its `Meter` saw to a settle
task of its own, which no cancellation of the chat reaches and which retries while policy is unreachable (Settle
is idempotent). What the gateway never settles (it was killed) policy expires after the lease, charged in full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from lmesh.common.v1 import generation_pb2
from lmesh.policy.v1 import policy_pb2
from lmesh.policy.v1.policy_pb2_grpc import PolicyStub

from services.common.errors import LmeshError
from services.common.peers import Peer

log = logging.getLogger("lmesh.gateway")

SETTLE_PATIENCE_S = 300.0  # how long a settle keeps retrying an unreachable policy before the lease decides
MAYBE_PATIENCE_S = 60.0  # the same for a reservation that may not exist (its Reserve's answer was lost)
# Codes of a failed Reserve after which policy may still have made the reservation.
UNCERTAIN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
SETTLE_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})
# Codes of a Reserve that refused the credential or its request (as opposed to failing to decide).
REFUSED_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT})
MAX_ADMITTED_CREDENTIALS = 10_000


@dataclass
class Meter:
    """What one generation used, as the gateway saw it: the prompt once a replica took the request, the tokens
    received, and at the finish inference's own usage (which replaces both)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ending: policy_pb2.Ending.ValueType = policy_pb2.ENDING_UNSPECIFIED

    def started(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens

    def received(self, tokens: int) -> None:
        self.completion_tokens += tokens

    def finished(self, usage: generation_pb2.Usage, cancelled: bool) -> None:
        self.prompt_tokens, self.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        self.ending = policy_pb2.ENDING_CANCELLED if cancelled else policy_pb2.ENDING_FINISHED


def status_code(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status an exception stands for (a relayed call's, or an LmeshError's), else None."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    if isinstance(exc, LmeshError):
        return exc.code
    return None


def decided(reservation: policy_pb2.ReserveResponse) -> asyncio.Future[policy_pb2.ReserveResponse]:
    """An admission policy has already made, as `Accounts.held` takes it."""
    admission: asyncio.Future[policy_pb2.ReserveResponse] = asyncio.get_running_loop().create_future()
    admission.set_result(reservation)
    return admission


class OverlappedAdmission:
    """Which chats may start generating while policy's Reserve still decides on them.

    Reserve takes a few milliseconds that would otherwise come before the engine's prefill. A chat may overlap the
    two when the same credential's last Reserve at this gateway admitted it and none of its other chats is
    overlapping right now; whatever the engine sends waits until the admission answers, and a refusal cancels the
    generation before anything of it leaves. After a Reserve that did not admit (a refusal, or policy out of reach)
    or with no admission on record, the credential's chats wait for Reserve before generating, until one is
    admitted again: a caller over its limits, or with a revoked key, can make the engine start at most one prompt
    it is then refused, not one per request.

    Credentials are known by a digest (never the key), the most recently admitted MAX_ADMITTED_CREDENTIALS."""

    def __init__(self, enabled: bool = True, max_credentials: int = MAX_ADMITTED_CREDENTIALS) -> None:
        self.enabled = enabled
        self._max = max_credentials
        self._admitted: OrderedDict[bytes, None] = OrderedDict()
        self._overlapping: set[bytes] = set()

    def begin(self, credential: bytes) -> bool:
        """Whether a chat of `credential` may overlap now; if so it counts as overlapping until `ended`."""
        if not self.enabled or credential not in self._admitted or credential in self._overlapping:
            return False
        self._overlapping.add(credential)
        return True

    def ended(self, credential: bytes, overlapped: bool) -> None:
        if overlapped:
            self._overlapping.discard(credential)

    def admitted(self, credential: bytes) -> None:
        self._admitted[credential] = None
        self._admitted.move_to_end(credential)
        while len(self._admitted) > self._max:
            self._admitted.popitem(last=False)

    def refused(self, credential: bytes) -> None:
        self._admitted.pop(credential, None)


class Accounts:
    """Reservations of one gateway process (see the module's docstring)."""

    def __init__(self, policy: Peer[PolicyStub], *, settle_patience_s: float = SETTLE_PATIENCE_S) -> None:
        self._policy = policy
        self._patience_s = settle_patience_s
        self._settling: set[asyncio.Task[None]] = set()

    async def reserve(self, request: policy_pb2.ReserveRequest) -> policy_pb2.ReserveResponse:
        """Admits and reserves (RESOURCE_EXHAUSTED naming the limit when it does not fit). Idempotent per
        reservation id, so it may be retried on another policy instance. A caller cancelled while policy decides
        does not leave the reservation to expire in full: it is settled at zero once the answer comes."""
        call = asyncio.ensure_future(self._policy.call(lambda p: p.Reserve, request, timeout=10))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._abandoned(done, request.reservation_id))
            raise
        except (grpc.aio.AioRpcError, LmeshError) as exc:
            if status_code(exc) in UNCERTAIN_CODES:
                # Policy may have reserved before the answer was lost (it died, or answered too late): settle
                # that at zero if it exists (NOT_FOUND if it does not), rather than let its lease charge it.
                self.settle_later(request.reservation_id, Meter(ending=policy_pb2.ENDING_ERROR), maybe=True)
            raise

    def _abandoned(self, call: asyncio.Future[policy_pb2.ReserveResponse], reservation_id: str) -> None:
        if call.cancelled() or call.exception() is not None:
            if call.cancelled() or status_code(call.exception()) in UNCERTAIN_CODES:  # type: ignore[arg-type]
                self.settle_later(reservation_id, Meter(ending=policy_pb2.ENDING_CLIENT_GONE), maybe=True)
            return
        self.settle_later(reservation_id, Meter(ending=policy_pb2.ENDING_CLIENT_GONE))

    @contextlib.asynccontextmanager
    async def held(self, admission: asyncio.Future[policy_pb2.ReserveResponse],
                   deadline_passed: Callable[[], bool] = lambda: False) -> AsyncIterator[Meter]:
        """The reservation `admission` makes (it may still be deciding: `OverlappedAdmission`), renewed while the
        block runs and settled with the block's `Meter` when it ends. A refused admission leaves nothing to settle;
        one still deciding when the block ends is cancelled (`reserve` settles what policy made at zero)."""
        meter = Meter()
        renewer = asyncio.create_task(self._renew(admission))
        try:
            yield meter
        except asyncio.CancelledError:
            if meter.ending == policy_pb2.ENDING_UNSPECIFIED:
                meter.ending = policy_pb2.ENDING_DEADLINE if deadline_passed() else policy_pb2.ENDING_CLIENT_GONE
            raise
        except BaseException as exc:
            if meter.ending == policy_pb2.ENDING_UNSPECIFIED:
                meter.ending = (policy_pb2.ENDING_DEADLINE if status_code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED
                                else policy_pb2.ENDING_ERROR)
            raise
        finally:
            renewer.cancel()
            if not admission.done():
                admission.cancel()
            elif not admission.cancelled() and admission.exception() is None:
                self.settle_later(admission.result().reservation_id, meter)

    async def _renew(self, admission: asyncio.Future[policy_pb2.ReserveResponse]) -> None:
        try:
            reservation = await asyncio.shield(admission)
        except Exception:
            return  # refused: the chat ends with that refusal, nothing to renew
        if not reservation.metered:
            return
        interval = max(reservation.lease_ms, 300) / 3000
        request = policy_pb2.RenewReservationRequest(reservation_id=reservation.reservation_id)
        while True:
            await asyncio.sleep(interval)
            try:
                answer = await self._policy.call(lambda p: p.RenewReservation, request, timeout=interval)
            except (grpc.aio.AioRpcError, LmeshError) as exc:
                log.debug("renewing reservation %s failed: %s", reservation.reservation_id, exc)
                continue  # the next try is a third of a lease later: two more before it lapses
            if answer.state != policy_pb2.RESERVATION_STATE_OPEN:
                return  # expired meanwhile (policy was out of reach): the settle corrects its charge
            interval = max(answer.lease_ms, 300) / 3000

    def settle_later(self, reservation_id: str, meter: Meter, *, maybe: bool = False) -> None:
        """Settles in a task of its own: the chat's cancellation does not reach it, and the gateway waits for it
        when it stops (`drain`). `maybe`: the reservation may not exist (NOT_FOUND is then the answer)."""
        request = policy_pb2.SettleRequest(reservation_id=reservation_id, prompt_tokens=meter.prompt_tokens,
                                           completion_tokens=meter.completion_tokens,
                                           ending=meter.ending or policy_pb2.ENDING_ERROR)
        task = asyncio.get_running_loop().create_task(self._settle(request, maybe), name=f"settle-{reservation_id}")
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, request: policy_pb2.SettleRequest, maybe: bool = False) -> None:
        loop = asyncio.get_running_loop()
        give_up, delay = loop.time() + (min(self._patience_s, MAYBE_PATIENCE_S) if maybe else self._patience_s), 0.2
        while True:
            try:
                await self._policy.call(lambda p: p.Settle, request, timeout=5)
                return
            except (grpc.aio.AioRpcError, LmeshError) as exc:
                if maybe and status_code(exc) == grpc.StatusCode.NOT_FOUND:
                    return  # it was never made
                if status_code(exc) not in SETTLE_RETRY_CODES or loop.time() + delay > give_up:
                    log.warning("could not settle reservation %s (%s); policy charges it in full when its lease "
                                "ends", request.reservation_id, exc.details() if isinstance(exc, grpc.aio.AioRpcError)
                                else exc.message)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    @property
    def pending(self) -> int:
        return len(self._settling)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Waits (a while) for the settles still running: a gateway that stops settles what it served."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=timeout_s)


def rate_limit_headers(admitted: policy_pb2.ReserveResponse | None) -> list[tuple[str, str]]:
    """OpenAI's `x-ratelimit-*` headers (HTTP) and metadata (gRPC) for the key's per-minute limits, as its admission
    left them (the reset: when the oldest request in the window leaves it); none for a limit the key does not have."""
    if admitted is None or not admitted.HasField("key_window"):
        return []
    window, limits = admitted.key_window, admitted.limits
    reset = openai_duration(window.oldest_leaves_in_ms)
    headers: list[tuple[str, str]] = []
    for kind, limit, used in (("requests", limits.requests_per_minute, window.requests),
                              ("tokens", limits.tokens_per_minute, window.tokens)):
        if limit:
            headers += [(f"x-ratelimit-limit-{kind}", str(limit)),
                        (f"x-ratelimit-remaining-{kind}", str(max(0, limit - used))),
                        (f"x-ratelimit-reset-{kind}", reset)]
    return headers


def openai_duration(ms: int) -> str:
    """A duration as OpenAI writes its rate limits' resets: `20ms`, `8.64s`, `1m0s`."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    minutes, rest = divmod(ms, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"
