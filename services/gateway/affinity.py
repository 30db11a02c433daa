"""Session affinity: the next turn of a conversation goes to the inference replica that served the last one, whose
prefix cache still holds the conversation's KV, unless that costs the request a wait that load balancing would
spare it.

- A session is named by the caller (gRPC `ChatStart.session`, OpenAI's `user`) and kept only as a hash of the
  caller's tenant and that name (`session_key`): tenant A's "alice" never steers tenant B's, and no session name,
  which may be user data, is held or logged in clear.
- `SessionAffinity` remembers, for a bounded number of sessions (least recently used forgotten first), the
  replica that last served each. That replica is taken while it has a free decode place (its load below its
  `max_active`) or is no busier than the least loaded replica; otherwise the choice is load balancing's (None),
  and the replica that then serves the session is remembered for its next turns.
- A session it does not know (new, forgotten, or whose replica is gone) goes to the least loaded replica, and
  among equally loaded ones to the one rendezvous hashing picks: gateways that share no memory place a session
  alike while loads are even (a session's turns through another gateway then find the same replica), and a
  placement by hash alone never unbalances the replicas (on a CPU, where a decode step's time grows with its
  batch, a replica holding more sessions than its share slows all of them).

Load is what the gateway knows without asking: its own calls in flight to a replica, and the replica's own count
(active plus queued sequences) in its Consul meta, whichever is larger. The replica's count lags by up to about
a second, so right after a burst it may overstate the load: the error leads to load balancing, never to a queue.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.discovery import Endpoint

DEFAULT_MAX_SESSIONS = 100_000
# What a replica that does not report `max_active` in its meta is taken to decode at once (inference's default).
DEFAULT_CAPACITY = 16


def session_key(tenant: str, session: str) -> str:
    """The session's identity within its tenant, as a hash (safe to log and to keep)."""
    return hashlib.sha256(f"{tenant}\0{session}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ReplicaLoad:
    """A replica as placement sees it."""

    replica: str  # its Consul service id
    load: int  # sequences running or waiting there, as well as the gateway knows
    capacity: int  # sequences it decodes at once

    @property
    def has_room(self) -> bool:
        return self.load < self.capacity


def replica_load(endpoint: Endpoint) -> ReplicaLoad:
    """An inference replica's load: this gateway's calls to it in flight or the load it reports, the larger."""
    in_flight, reported = endpoint.load_key()
    capacity = endpoint.meta.get("max_active", "")
    return ReplicaLoad(endpoint.service_id, max(in_flight, reported),
                       int(capacity) if capacity.isdigit() and int(capacity) > 0 else DEFAULT_CAPACITY)


def rendezvous(session: str, replicas: Sequence[ReplicaLoad]) -> ReplicaLoad:
    """The replica with the highest hash of (session, replica): every gateway picks the same one from the same
    set, and a replica's leaving moves only its own sessions."""
    return max(replicas, key=lambda r: hashlib.sha256(f"{session}\0{r.replica}".encode()).digest())


class SessionAffinity:
    """Which replica served each session last (bounded), and where its next request should go."""

    def __init__(self, max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        self.max_sessions = max_sessions
        self._last: OrderedDict[str, str] = OrderedDict()  # session key -> replica's service id, oldest first

    def __len__(self) -> int:
        return len(self._last)

    def preferred(self, session: str, replicas: Sequence[ReplicaLoad]) -> str | None:
        """The replica for the session's next request among `replicas` (those serving its model, up), or None
        when load balancing should choose: the session's replica has no free place and another is less loaded."""
        if not replicas:
            return None
        least = min(r.load for r in replicas)
        last = self._last.get(session)
        remembered = next((r for r in replicas if r.replica == last), None) if last is not None else None
        if remembered is None:  # new, forgotten, or its replica is gone: load first, then the hash
            return rendezvous(session, [r for r in replicas if r.load == least]).replica
        return remembered.replica if remembered.has_room or remembered.load <= least else None

    def served(self, session: str, replica: str) -> None:
        """Records the replica that took the session's request (the least recently used session goes beyond the
        bound)."""
        self._last[session] = replica
        self._last.move_to_end(session)
        while len(self._last) > self.max_sessions:
            self._last.popitem(last=False)


@dataclass(frozen=True)
class SessionPlacement:
    """One request's session, with the table that places it (the hook InferenceStream calls)."""

    affinity: SessionAffinity
    session: str  # session_key(tenant, name)

    def choose(self, endpoints: Sequence[Endpoint]) -> str | None:
        """The service id of the replica to lease among `endpoints` (those serving the model and not refused
        yet), or None for load balancing. Replicas marked down for a moment are left out, as the resolver does."""
        now = time.monotonic()
        up = [e for e in endpoints if e.down_until <= now]
        return self.affinity.preferred(self.session, [replica_load(e) for e in up])

    def served(self, endpoint: Endpoint) -> None:
        self.affinity.served(self.session, endpoint.service_id)
