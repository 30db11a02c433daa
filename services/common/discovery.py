"""Consul: registering this process, and resolving peers by service name without touching Consul per call.

A ServiceResolver holds one blocking query per service name on `/v1/health/service/<name>?passing`, keeps
the current endpoints with one channel each, and picks an endpoint per call: fewest calls in flight, then
least load reported in Consul meta, round robin among equals. A call that fails with UNAVAILABLE marks its
endpoint down for a moment, so traffic moves off a dead instance before Consul's health check notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import consul
import consul.aio
import grpc

from services.common.config import host_port
from services.common.errors import Unavailable, end_if_cancelled

if TYPE_CHECKING:
    from services.common.connect import MeshSecurity
    from services.common.peers import Peer, PeerService

log = logging.getLogger("lmesh.discovery")

T = TypeVar("T")
S = TypeVar("S")

# 64 MiB messages: prompts and artifact chunks are far below, but defaults (4 MiB) are easy to hit by users.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Detect a dead peer on an idle stream within seconds rather than the OS's TCP timeout.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# The server side must accept those pings, or it answers idle channels with GOAWAY "too_many_pings".
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # gRPC sets SO_REUSEPORT by default: a second server on a fixed port (a forgotten gateway on 50051) would
    # silently share its traffic instead of failing to bind.
    ("grpc.so_reuseport", 0),
]
MARK_DOWN_S = 3.0
# A blocking query's wait: also how long a watch takes to see an agent restarted without its state (its index
# starts lower than the one the watch holds, so it answers only when the wait ends).
WATCH_WAIT_S = 5  # an idle watch costs the local agent one query per wait: short is cheap
# How long instances that a (possibly restarted) agent stopped listing stay in use while their channels work: a
# restarted agent knows nothing until the services register again and pass a check, about two seconds.
UNCONFIRMED_GRACE_S = 15.0
# After a gap, how long an instance that is still registered but whose check is critical stays in use while its
# channel works: an agent restarted with its state first lists everything passing from its stored catalog, then
# runs the restored checks, which start critical for a second or more.
RESTORED_CHECKS_WINDOW_S = 10.0
# How long an instance whose check just failed, but which is still registered and connected, remains a last
# resort for calls that no passing instance can take: a check answered a moment too late (a process busy holding
# the GIL, a loaded machine) costs one check interval or two, and is no reason to refuse every call meanwhile.
LAST_RESORT_S = 5.0


@dataclass(frozen=True)
class WatchAnswer:
    """One answer of a health watch: the instances, and whether the agent may have restarted since the last
    answer (the query before it failed, or Consul's index went back), so that it may not know them yet."""

    nodes: list[dict[str, Any]]
    after_gap: bool


async def health_watch(client: consul.aio.Consul, name: str, failure_level: int,
                       passing: bool = False) -> AsyncIterator[WatchAnswer]:
    """The instances of `name` (`passing` ones only, if asked), now and after every change: blocking queries on
    `/v1/health/service/<name>`, with back-off while Consul fails (logged at `failure_level`). Each query is
    bounded (Consul answers within the wait plus 1/16 of it as jitter), so a connection that went silent cannot
    hold a watch for ever."""
    index: str | None = None
    last_index = 0
    backoff = 0.2
    failed = False
    while True:
        try:
            async with asyncio.timeout(WATCH_WAIT_S * 17 / 16 + 5):
                index, nodes = await client.health.service(name, passing=passing, index=index,
                                                           wait=f"{WATCH_WAIT_S}s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            end_if_cancelled(exc)
            log.log(failure_level, "Consul watch on %s failed (%s); retrying in %.1fs", name, exc, backoff)
            index = None
            failed = True
            await asyncio.sleep(backoff)  # back off a failing Consul, not a polling loop
            backoff = min(backoff * 2, 5.0)
            continue
        backoff = 0.2
        number = int(index) if index and index.isdigit() else 0
        yield WatchAnswer(nodes, after_gap=failed or number < last_index)
        failed, last_index = False, number


def consul_client(addr: str) -> consul.aio.Consul:
    """An asyncio Consul client for a CONSUL_HTTP_ADDR-style address (`host:port` or `scheme://host:port`)."""
    parts = urlsplit(addr if "//" in addr else f"//{addr}")
    return consul.aio.Consul(host=parts.hostname or "127.0.0.1", port=parts.port or 8500,
                             scheme=parts.scheme or "http")


class StaleAnswers:
    """Logs an answer served stale because a dependency is down once per key and outage, not once per request
    (a busy gateway would write a line per chat for as long as the registry is away)."""

    def __init__(self, logger: logging.Logger, dependency: str, served: str) -> None:
        self._log = logger
        self._dependency = dependency  # "registry"
        self._served = served  # "serving the last resolution of %r"
        self._stale: set[str] = set()

    def served_stale(self, key: str) -> None:
        if key not in self._stale:
            self._stale.add(key)
            self._log.warning(f"{self._dependency} unavailable; {self._served} (said once until it answers again)",
                              key)

    def answered(self, key: str) -> None:
        if key in self._stale:
            self._stale.discard(key)
            self._log.info("%s answers again for %r", self._dependency, key)


class ConsulRegistration:
    """This process's entry in Consul, with a gRPC health check on its own port; on an mTLS mesh, Connect-native,
    with the check on its TLS health port (`tls_health_port`: Consul's check has no client certificate). A public
    port that serves TLS (`check_tls`: the gateway with --tls-cert) is checked over TLS, without verifying."""

    def __init__(self, client: consul.aio.Consul, name: str, address: str, port: int,
                 tls_health_port: int | None = None, *, check_tls: bool = False, tags: Sequence[str] = ()
                 ) -> None:
        self._client = client
        self.tags = ["lmesh", *(tag for tag in tags if tag != "lmesh")]
        self.name = name
        self.address = address.strip("[]")  # Consul keeps IPv6 addresses bare
        self.port = port
        self.tls_health_port = tls_health_port
        self.check_tls = check_tls
        self.service_id = f"{name}-{address}-{port}"
        self.meta: dict[str, str] = {}
        # Meta the bootstrap adds to whatever the service registers (its ports: metrics_port, ...), so a service
        # that updates its own meta (inference's load) keeps them.
        self.fixed_meta: dict[str, str] = {}
        self._keeper: asyncio.Task[None] | None = None
        self.reregistrations = 0

    async def register(self, meta: dict[str, str] | None = None) -> None:
        """Registers (or, with the same id, updates) the service; Consul probes grpc.health.v1 every second.
        From the first success until `deregister()`, a watch registers it again whenever Consul forgets it."""
        if meta is not None:
            self.meta = dict(meta)
        await self._register()
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep(), name=f"keep-{self.service_id}")

    async def _register(self) -> None:
        if self.tls_health_port is None and self.check_tls:
            # The gateway's TLS port: server-only TLS, so Consul's check (which has no certificate) passes.
            check = {"GRPC": host_port(self.address, self.port), "GRPCUseTLS": True, "TLSSkipVerify": True,
                     "Interval": "1s", "Timeout": "1s", "DeregisterCriticalServiceAfter": "1m"}
            connect = None
        elif self.tls_health_port is None:
            check = consul.Check.grpc(host_port(self.address, self.port), interval="1s", timeout="1s",
                                      deregister="1m")
            connect = None
        else:
            # By hand: py-consul's Check.grpc(use_tls=...) sends a field Consul 1.8.7 refuses. Not verified: the
            # check proves liveness; identity is the mTLS port's business.
            check = {"GRPC": host_port(self.address, self.tls_health_port), "GRPCUseTLS": True,
                     "TLSSkipVerify": True, "Interval": "1s", "Timeout": "1s",
                     "DeregisterCriticalServiceAfter": "1m"}
            connect = {"Native": True}
        meta = {**self.fixed_meta, **self.meta}
        if self.tls_health_port is not None:
            meta["health_port"] = str(self.tls_health_port)
        await self._client.agent.service.register(
            self.name, service_id=self.service_id, address=self.address, port=self.port,
            tags=self.tags, meta=meta, check=check, connect=connect,
        )

    async def _keep(self) -> None:
        """Consul forgets this instance when its agent restarts without its state (a dev agent, a wiped data dir)
        or after its check stayed critical for a minute; a blocking query on the service notices, and the
        instance registers again instead of staying unreachable while it runs."""
        async for answer in health_watch(self._client, self.name, logging.DEBUG):
            if any(node["Service"]["ID"] == self.service_id for node in answer.nodes):
                continue
            log.warning("Consul no longer lists %s; registering it again", self.service_id)
            try:
                await self._register()
                self.reregistrations += 1
            except Exception as exc:  # the watch's next answer says whether to try again
                log.warning("could not register %s again: %s", self.service_id, exc)

    async def wait_passing(self, timeout_s: float = 5.0) -> bool:
        """Waits until Consul reports this instance passing (blocking queries, not polling); False on timeout."""
        index = None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    index, nodes = await self._client.health.service(self.name, index=index, wait="2s",
                                                                     passing=True)
                    if any(node["Service"]["ID"] == self.service_id for node in nodes):
                        return True
        except TimeoutError:
            return False

    async def deregister(self) -> None:
        if self._keeper is not None:  # first, or it would register a draining instance again
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        try:
            await self._client.agent.service.deregister(self.service_id)
        except Exception as exc:  # Consul gone at shutdown must not stop us from draining
            log.warning("could not deregister %s from Consul: %s", self.service_id, exc)


def meta_models(meta: Mapping[str, str], key: str) -> list[str]:
    """The `name:version` entries of an inference replica's comma-separated Consul meta `key`: `models` (warm,
    advertised), `loading` or `draining`."""
    return [model for model in meta.get(key, "").split(",") if model]


@dataclass
class _Fallen:
    """An instance whose check failed while it stayed registered and connected: a last resort until `until`."""

    endpoint: Endpoint
    until: float
    used: bool = False


@dataclass
class Endpoint:
    """One passing instance of a service, with its channel and the calls in flight to it."""

    service_id: str
    address: str
    port: int
    meta: dict[str, str]
    channel: grpc.aio.Channel
    outstanding: int = 0
    down_until: float = 0.0
    # Set while Consul does not list it after an agent restart: used until then unless a call to it fails.
    unconfirmed_until: float = 0.0
    _stubs: dict[object, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return host_port(self.address, self.port)

    @property
    def models(self) -> list[str]:
        """The model versions an inference instance serves (its Consul meta `models`, comma-separated)."""
        return meta_models(self.meta, "models")

    def load_key(self) -> tuple[int, int]:
        reported = 0
        for key in ("load_active", "load_queued"):
            value = self.meta.get(key, "0")
            reported += int(value) if value.isdigit() else 0
        return self.outstanding, reported

    def stub(self, stub_class: Callable[[grpc.aio.Channel], T]) -> T:
        """A stub on the instance's current channel (cached)."""
        return self.stub_on(self.channel, stub_class)

    def stub_on(self, channel: grpc.aio.Channel, stub_class: Callable[[grpc.aio.Channel], T]) -> T:
        if channel is not self.channel:  # a channel renewed since the call took it: rare, not cached
            return stub_class(channel)
        existing = self._stubs.get(stub_class)
        if existing is None:
            existing = self._stubs[stub_class] = stub_class(self.channel)
        return existing


# Makes the channel to one instance: (target, Consul service name) -> channel.
ChannelFactory = Callable[[str, str], grpc.aio.Channel]


def plaintext_channel(target: str, service: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


# A channel retired (its instance gone, or its credentials renewed) is closed once no call runs on it, and not
# before this many seconds: calls made on it without being counted (a caller's own stub) get that long.
RETIRED_CHANNEL_MIN_S = 30.0
# A renewed channel takes over from the one before once it has connected, or after this long: across a change of
# trust domain (a restarted dev agent's new CA) a peer may present its former leaf a moment longer, which the
# renewed channel refuses (the name it verifies has the new trust domain) while the one before still works.
RENEWED_CHANNEL_WAIT_S = 10.0


class ServiceResolver:
    """The live, passing instances of one Consul service, kept current by a blocking-query watch."""

    def __init__(self, client: consul.aio.Consul, name: str,
                 channel_factory: ChannelFactory = plaintext_channel) -> None:
        self._client = client
        self.name = name
        self._channel_factory = channel_factory
        self._endpoints: dict[str, Endpoint] = {}
        # Calls in flight per channel, and channels waiting for theirs to end before they are closed.
        self._in_flight: dict[grpc.aio.Channel, int] = {}
        self._retired: set[grpc.aio.Channel] = set()
        self._loaded = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._round_robin = itertools.count()
        # Channel-close tasks in flight, referenced so the event loop does not drop them half done.
        self._closing: set[asyncio.Future[None]] = set()
        self._renewing: dict[str, asyncio.Task[None]] = {}  # service id -> the renewed channel waiting to connect
        self._restored_checks_until = 0.0  # monotonic end of the window after a gap (RESTORED_CHECKS_WINDOW_S)
        self._listed_since_gap: set[str] = set()  # ids the agent listed (passing or not) since the last gap
        # Instances whose check failed in the last LAST_RESORT_S while they stayed registered and connected.
        self._fallen: dict[str, _Fallen] = {}

    def _close_now(self, channel: grpc.aio.Channel) -> None:
        self._retired.discard(channel)
        task = asyncio.ensure_future(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _retire_channel(self, channel: grpc.aio.Channel) -> None:
        """Closes `channel` once no counted call runs on it (and RETIRED_CHANNEL_MIN_S have passed)."""
        def close_when_idle() -> None:
            if self._in_flight.get(channel, 0):
                self._retired.add(channel)  # the last call on it closes it
            else:
                self._close_now(channel)

        asyncio.get_running_loop().call_later(RETIRED_CHANNEL_MIN_S, close_when_idle)

    @contextlib.contextmanager
    def in_flight(self, endpoint: Endpoint) -> Iterator[grpc.aio.Channel]:
        """Counts a call to `endpoint` while the block runs; yields the channel it runs on."""
        channel = endpoint.channel
        endpoint.outstanding += 1
        self._in_flight[channel] = self._in_flight.get(channel, 0) + 1
        try:
            yield channel
        finally:
            endpoint.outstanding -= 1
            left = self._in_flight[channel] - 1
            if left:
                self._in_flight[channel] = left
            else:
                del self._in_flight[channel]
                if channel in self._retired:
                    self._close_now(channel)

    def renew_channels(self) -> None:
        """New channels for every instance (this process's credentials changed), each taking over once it has
        connected (RENEWED_CHANNEL_WAIT_S); calls running on the old ones finish there."""
        loop = asyncio.get_running_loop()
        # Fallen ones too: one that passes again is used on its channel.
        for endpoint in [*self._endpoints.values(), *(fallen.endpoint for fallen in self._fallen.values())]:
            waiting = self._renewing.pop(endpoint.service_id, None)
            if waiting is not None:
                waiting.cancel()  # credentials changed again: the newest channel is the one to wait for
            renewed = self._channel_factory(endpoint.target, self.name)
            self._renewing[endpoint.service_id] = loop.create_task(
                self._take_over(endpoint, renewed), name=f"renew-{self.name}-{endpoint.service_id}")

    async def _take_over(self, endpoint: Endpoint, renewed: grpc.aio.Channel) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(renewed.channel_ready(), RENEWED_CHANNEL_WAIT_S)
        except asyncio.CancelledError:
            self._close_now(renewed)
            raise
        if self._renewing.get(endpoint.service_id) is asyncio.current_task():
            del self._renewing[endpoint.service_id]
        if not self._holds(endpoint):  # the instance went meanwhile
            self._close_now(renewed)
            return
        old, endpoint.channel = endpoint.channel, renewed
        endpoint._stubs.clear()
        self._retire_channel(old)

    def _holds(self, endpoint: Endpoint) -> bool:
        """Whether `endpoint` is still one of this resolver's instances, passing or fallen."""
        fallen = self._fallen.get(endpoint.service_id)
        passing = self._endpoints.get(endpoint.service_id)
        return passing is endpoint or (fallen is not None and fallen.endpoint is endpoint)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name=f"watch-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        renewing, self._renewing = list(self._renewing.values()), {}
        for task in renewing:
            task.cancel()
        await asyncio.gather(*renewing, return_exceptions=True)
        for endpoint in [*self._endpoints.values(), *(fallen.endpoint for fallen in self._fallen.values())]:
            await endpoint.channel.close()
        self._endpoints.clear()
        self._fallen.clear()

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    async def passing(self, first_load_timeout: float = 5.0) -> list[Endpoint]:
        """The instances Consul reports passing now (possibly none), after the watch's first answer."""
        await self._loaded_once(first_load_timeout)
        return self.endpoints()

    async def _loaded_once(self, timeout: float) -> None:
        self.start()
        if not self._loaded.is_set():
            try:
                await asyncio.wait_for(self._loaded.wait(), timeout)
            except TimeoutError:
                raise Unavailable(f"{self.name}: Consul did not answer; is it running at CONSUL_HTTP_ADDR?") from None

    async def _watch(self) -> None:
        # Every registered instance, not only passing ones: after a gap, one whose check is critical may be a
        # restored check that has not run yet, while one that is not listed at all may have deregistered.
        async for answer in health_watch(self._client, self.name, logging.WARNING):
            passing = [node for node in answer.nodes if _all_checks_pass(node)]
            await self._update(passing, answer.after_gap, registered={
                node["Service"]["ID"] for node in answer.nodes if not _all_checks_pass(node)})

    async def _update(self, nodes: list[dict[str, Any]], after_gap: bool = False,
                      registered: set[str] | frozenset[str] = frozenset()) -> None:
        """Takes Consul's passing instances (`nodes`) and the ids of those `registered` but not passing.

        Instances no longer passing are dropped at once, except after a gap in the watch (the agent may have
        restarted): then an instance the agent has not listed since the gap (it may not have heard from it yet),
        or one it lists with a critical check within RESTORED_CHECKS_WINDOW_S of the gap (a restored check that
        has not run yet), stays in use, unconfirmed, for UNCONFIRMED_GRACE_S while its channel works. One the agent
        listed after the gap and then no longer lists at all has deregistered: it goes at once. An instance new to
        this resolver is not taken from the first answer after a gap (a stored catalog says passing before any
        check has run) while instances it knows are listed too, only from a later one.
        """
        now = time.monotonic()
        if after_gap:
            self._restored_checks_until = now + RESTORED_CHECKS_WINDOW_S
            self._listed_since_gap = set()
        seen: dict[str, Endpoint] = {}
        # After a gap, instances new to this resolver wait for a later answer, unless it knows none of those listed
        # (its first answer, or every instance it knew is gone): then they are all there is.
        defer_new = after_gap and any(node["Service"]["ID"] in self._endpoints for node in nodes)
        for node in nodes:
            svc = node["Service"]
            address = svc.get("Address") or node["Node"]["Address"]
            service_id = svc["ID"]
            meta = dict(svc.get("Meta") or {})
            current = self._endpoints.get(service_id)
            if current is None and (fallen := self._fallen.pop(service_id, None)) is not None:
                if fallen.endpoint.target == host_port(address, int(svc["Port"])):
                    current = fallen.endpoint  # passing again: the same channel, still connected
                else:
                    self._retire([fallen.endpoint])
            if current is None and defer_new:
                # A restarted agent's stored catalog lists instances passing that may have died meanwhile (their
                # checks run later): a new one is taken from the next answer, once its check has spoken.
                continue
            if current is not None and current.target == host_port(address, int(svc["Port"])):
                current.meta = meta
                current.unconfirmed_until = 0.0
                seen[service_id] = current
            else:
                channel = self._channel_factory(host_port(address, int(svc["Port"])), self.name)
                seen[service_id] = Endpoint(service_id, address, int(svc["Port"]), meta, channel)
        deregistered = self._listed_since_gap - set(seen) - registered
        self._listed_since_gap |= set(seen) | registered
        restoring = now < self._restored_checks_until
        gone: list[Endpoint] = []
        for service_id, endpoint in self._endpoints.items():
            if service_id in seen:
                continue
            unlisted = after_gap or (restoring and service_id not in self._listed_since_gap)
            restored = restoring and service_id in registered
            if (unlisted or restored) and not endpoint.unconfirmed_until and _channel_works(endpoint.channel):
                endpoint.unconfirmed_until = now + UNCONFIRMED_GRACE_S
                asyncio.get_running_loop().call_later(UNCONFIRMED_GRACE_S, self._drop_unconfirmed)
                log.info("Consul's agent %s %s after a gap in its answers (restarted?); using it until it "
                         "passes again or fails", "has not yet passed the check of" if restored
                         else "no longer lists", service_id)
            if endpoint.unconfirmed_until > now and service_id not in deregistered:
                seen[service_id] = endpoint
            elif service_id in registered and not after_gap and _channel_connected(endpoint.channel):
                self._fallen[service_id] = _Fallen(endpoint, now + LAST_RESORT_S)
                asyncio.get_running_loop().call_later(LAST_RESORT_S, self._expire_fallen)
            else:
                gone.append(endpoint)
        # A fallen instance that is no longer registered has deregistered (drained): it is no last resort.
        gone += [self._fallen.pop(service_id).endpoint for service_id in list(self._fallen)
                 if service_id not in registered]
        self._endpoints = seen
        self._listed_since_gap &= set(seen) | registered  # only what may still be asked about
        self._retire(gone)
        self._loaded.set()
        async with self._changed:
            self._changed.notify_all()

    def _retire(self, gone: list[Endpoint]) -> None:
        for endpoint in gone:
            # In-flight streams on a vanished instance end on their own; closing now would cut a drain short.
            self._retire_channel(endpoint.channel)

    def _drop_unconfirmed(self, failed: Endpoint | None = None) -> None:
        """Drops unconfirmed instances whose grace has passed (and `failed`, if it is unconfirmed)."""
        now = time.monotonic()
        gone = [e for e in self._endpoints.values()
                if e.unconfirmed_until and (e.unconfirmed_until <= now or e is failed)]
        for endpoint in gone:
            del self._endpoints[endpoint.service_id]
            log.info("dropped %s: Consul has not listed it again", endpoint.service_id)
        self._retire(gone)

    def _expire_fallen(self) -> None:
        now = time.monotonic()
        expired = [service_id for service_id, fallen in self._fallen.items() if fallen.until <= now]
        self._retire([self._fallen.pop(service_id).endpoint for service_id in expired])

    def _last_resort(self, predicate: Callable[[Endpoint], bool] | None, now: float) -> list[Endpoint]:
        """Fallen instances (see LAST_RESORT_S) matching `predicate` that are still connected and have not failed
        a call since: Envoy's panic routing, for when no passing instance can take a call, bounded in time."""
        return [e for e in (fallen.endpoint for fallen in self._fallen.values() if fallen.until > now)
                if e.down_until <= now and _channel_connected(e.channel) and (predicate is None or predicate(e))]

    def recently_passing(self) -> list[Endpoint]:
        """The passing instances and, after them, those that are a last resort now (see LAST_RESORT_S)."""
        return [*self._endpoints.values(), *self._last_resort(None, time.monotonic())]

    async def wait_for(self, predicate: Callable[[Endpoint], bool] | None = None,
                       timeout: float = 30.0) -> Endpoint:
        """Waits until an endpoint matching `predicate` is passing in Consul (start-up ordering, tests)."""
        async def ready() -> Endpoint:
            async with self._changed:
                while True:
                    for endpoint in self._endpoints.values():
                        if not endpoint.unconfirmed_until and (predicate is None or predicate(endpoint)):
                            return endpoint
                    await self._changed.wait()

        self.start()
        return await asyncio.wait_for(ready(), timeout)

    async def pick(self, predicate: Callable[[Endpoint], bool] | None = None,
                   first_load_timeout: float = 5.0, none_match: str = "") -> Endpoint:
        """An endpoint for the next call: up, matching `predicate`, with the fewest calls in flight; when no
        passing instance matches, one whose check failed a moment ago (see LAST_RESORT_S).

        `none_match` is the UNAVAILABLE message when instances pass but none matches `predicate`.
        """
        await self._loaded_once(first_load_timeout)
        now = time.monotonic()
        candidates = [e for e in self._endpoints.values() if predicate is None or predicate(e)]
        if not candidates and self._fallen:
            candidates = self._last_resort(predicate, now)
        if not candidates:
            raise Unavailable(none_match if none_match and self._endpoints else f"no passing instance of {self.name}")
        up = [e for e in candidates if e.down_until <= now] or candidates
        # Fewest calls in flight from this process first; then the load the instance reports in Consul meta
        # (inference: active + queued sequences), which also counts other callers' work.
        least = min(e.load_key() for e in up)
        tied = [e for e in up if e.load_key() == least]
        chosen = tied[next(self._round_robin) % len(tied)]
        fallen = self._fallen.get(chosen.service_id)
        if fallen is not None and fallen.endpoint is chosen and not fallen.used:
            fallen.used = True
            log.warning("no passing instance of %s can take a call: using %s, whose health check failed %.1f s ago "
                        "but which is still registered and connected", self.name, chosen.service_id,
                        LAST_RESORT_S - (fallen.until - now))
        return chosen

    def mark_down(self, endpoint: Endpoint) -> None:
        endpoint.down_until = time.monotonic() + MARK_DOWN_S
        if endpoint.unconfirmed_until:  # it failed before Consul listed it again: not worth another try
            self._drop_unconfirmed(failed=endpoint)


def _all_checks_pass(node: dict[str, Any]) -> bool:
    """Whether Consul would list this instance as passing (`?passing`): every check on it and its node passes."""
    return all(check.get("Status") == "passing" for check in node.get("Checks") or ())


def _channel_connected(channel: grpc.aio.Channel) -> bool:
    """Whether a channel holds a live connection now (a process that died leaves it idle or failing)."""
    return channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY


def _channel_works(channel: grpc.aio.Channel) -> bool:
    """Whether a channel is not known to be broken (connected, idle or connecting)."""
    return channel.get_state(try_to_connect=False) not in (grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                                                           grpc.ChannelConnectivity.SHUTDOWN)


class Mesh:
    """This process's view of its peers: one resolver per Consul service name, created on first use, and the
    credentials its calls carry (see services.common.peers): its mesh identity on every channel when the mesh
    runs mTLS (`security`), the admin token where a call asks for it."""

    def __init__(self, consul_addr: str, *, security: MeshSecurity | None = None,
                 admin_token: str | None = None) -> None:
        self.consul = consul_client(consul_addr)
        self.admin_token = admin_token
        self.security = security
        self._channel_factory: ChannelFactory = security.channel if security is not None else plaintext_channel
        self._resolvers: dict[str, ServiceResolver] = {}
        # A renewed certificate or new CA roots: calls from now on go over channels that carry them.
        self._unsubscribe = security.identity.on_change(lambda _: self.renew_channels()) if security else None

    def resolver(self, service_name: str) -> ServiceResolver:
        resolver = self._resolvers.get(service_name)
        if resolver is None:
            resolver = self._resolvers[service_name] = ServiceResolver(self.consul, service_name,
                                                                       self._channel_factory)
            resolver.start()
        return resolver

    def peer(self, service: PeerService[S]) -> Peer[S]:
        """This process's handle on `service` (REGISTRY, POLICY, ... from services.common.peers)."""
        from services.common.peers import Peer

        return Peer(self.resolver(service.name), service, self.admin_token)

    def renew_channels(self) -> None:
        """New channels to every mesh peer, for calls from now on (this process's mesh certificate was renewed);
        channels to a public port (the gateway's) carry no mesh certificate and stay."""
        from services.common.connect import PUBLIC_SERVICES

        for name, resolver in self._resolvers.items():
            if name not in PUBLIC_SERVICES:
                resolver.renew_channels()

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        for resolver in self._resolvers.values():
            await resolver.close()
        self._resolvers.clear()
        await self.consul.close()
        if self.security is not None:
            await self.security.close()
