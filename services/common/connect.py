"""Consul Connect for the mesh: this process's identity, mTLS credentials, and callers checked against intentions.

How the pieces fit (the wiring into server.py and discovery.py is done there, not here):

- `MeshIdentity` is this process's Connect identity (`lmesh-<service>`, or `lmesh-operator` for the CLI): the
  agent's CA roots and a leaf certificate for the service, kept current by blocking queries on both agent
  endpoints (renewal and CA rotation are learned within milliseconds, without polling).
- Each internal service serves its API on an mTLS port (`server_credentials()`: a client certificate from the
  mesh CA is required at the handshake) and grpc.health on a second port of the same grpc.aio server with
  server-only TLS (`health_server_credentials()`), which Consul's gRPC check can reach (`tls_health_check()`):
  Consul's checker cannot present a client certificate. Since every method is reachable on both ports,
  `MeshAuthInterceptor` refuses any non-health method that arrives without a verified peer SPIFFE ID, and asks
  an `IntentionAuthorizer` about the ones that do.
- Server credentials are dynamic: each new handshake gets the newest leaf and roots, so a rotation needs no
  restart, and connections (and streams) opened before it keep going. Channel credentials are fixed when a
  channel is built: a channel pool subscribes with `on_change()` and, when it fires, builds new channels for
  new calls with `channel_credentials()` and closes the old ones once their in-flight calls end (as
  ServiceResolver does for vanished endpoints). On a CA rotation the roots change first (the new root is added,
  the old one stays trusted) and leaves are re-issued later, each change firing on_change once.
- Callers name the server they expect with `channel_options(service)`: the leaf has no DNS SAN, so the name
  checked is the subject CN Consul derives from the service name (`server_name_for`).

Known noise: grpc's server logs `E... No match found for server name: <CN>` once per TLS handshake (not per
call), because the client sends the CN as SNI and grpc's server-side SNI matching ignores the CN when the
certificate has any SAN (Consul's leaf has a URI SAN). It is harmless (the server has one certificate and
uses it) and cannot be switched off alone from Python: GRPC_VERBOSITY=NONE would also hide real errors, so
it is left on. Long-lived channels keep it to one line per connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import consul
import consul.aio
import grpc
from consul.callback import CB

from services.common.config import ConfigError, host_port, split_consul_addr
from services.common.errors import PermissionDenied, Reason, Unauthenticated, end_if_cancelled

log = logging.getLogger("lmesh.connect")

MTLS_ENV = "LMESH_MTLS"
MTLS_ADVICE = f"start Consul with Connect enabled, or set {MTLS_ENV}=off"
# A blocking query's wait. Also how long a watch takes to notice an agent restarted without its state (its
# index starts lower than the one the watch holds, so the agent answers only when the wait ends).
WATCH_WAIT_S = 5  # an idle watch costs the local agent one query per wait: short is cheap
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
AUTHORIZE_TIMEOUT_S = 2.0
# After intentions change, the agent's authorize endpoint answers from its own cache of intentions, which its
# own blocking query refreshes at about the moment ours returns. Decisions made in this window are cached only
# until it ends, so one computed by an agent a moment behind cannot outlive the window.
SETTLE_S = 1.0
# A CA the agent stops naming when the trust domain changes (a dev agent restarted without its state) stays
# trusted this long: connections and channels made before keep working while every process moves over.
FORMER_CA_GRACE_S = 30.0
# Every intention gone at once (a dev agent restarted without its state): decisions already made stand this
# long, while whoever applies the intentions (`lmesh dev`, an operator) does so again.
VANISHED_INTENTIONS_GRACE_S = 15.0
MAX_CACHED_CALLERS = 4096
HEALTH_METHOD_PREFIX = "/grpc.health."

_SPIFFE_SERVICE = re.compile(r"^spiffe://(?P<td>[^/]+)/ns/(?P<ns>[^/]+)/dc/(?P<dc>[^/]+)/svc/(?P<svc>[^/]+)$")
_CN_INVALID = re.compile(r"[^a-z0-9]")
_CN_MAX = 64


class MeshUnavailable(Exception):
    """The mesh identity cannot be had from Consul; the message says what to do."""


def mtls_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether mesh mTLS is on: LMESH_MTLS unset, `on`, `1` or `true` means on; `off`, `0` or `false` off."""
    raw = (environ if environ is not None else os.environ).get(MTLS_ENV, "").strip().lower()
    if raw in ("", "on", "1", "true", "yes"):
        return True
    if raw in ("off", "0", "false", "no"):
        return False
    raise ConfigError(f"{MTLS_ENV} must be on or off, got {raw!r}")


# --- SPIFFE IDs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceIdentity:
    """The parts of a Consul service SPIFFE ID `spiffe://<trust domain>/ns/<ns>/dc/<dc>/svc/<service>`."""

    trust_domain: str
    namespace: str
    datacenter: str
    service: str


def parse_spiffe_id(uri: str) -> ServiceIdentity | None:
    """The service identity in `uri`, or None when it is not a Consul service SPIFFE ID."""
    match = _SPIFFE_SERVICE.match(uri)
    if match is None:
        return None
    return ServiceIdentity(match["td"], match["ns"], match["dc"], match["svc"])


def in_trust_domain(spiffe_id: str, trust_domain: str) -> bool:
    """Whether `spiffe_id` names a service of this mesh's trust domain (`<cluster uuid>.consul`)."""
    parsed = parse_spiffe_id(spiffe_id)
    return parsed is not None and bool(trust_domain) and parsed.trust_domain.lower() == trust_domain.lower()


def spiffe_id_for(trust_domain: str, service: str, datacenter: str = "dc1", namespace: str = "default") -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/dc/{datacenter}/svc/{service}"


def server_name(service: str, trust_domain: str, namespace: str = "default") -> str:
    """The subject CN of `service`'s Connect leaf: `<service, lower case, letters and digits only>.svc.<ns>.<first
    8 characters of the trust domain>.consul`, the service part cut so the CN fits in 64 characters (seen on
    Consul 1.8.7). Note that `lmesh-gateway` and `lmeshgateway` share a CN: name services so they do not."""
    suffix = f".svc.{namespace}.{trust_domain[:8]}.consul"
    return _CN_INVALID.sub("", service.lower())[: max(1, _CN_MAX - len(suffix))] + suffix


def peer_spiffe_id(context: grpc.aio.ServicerContext) -> str | None:
    """The SPIFFE ID of the verified client certificate of the call, or None (no client certificate: the health
    port, an insecure port). gRPC sets `peer_spiffe_id` only from a certificate it verified against the roots,
    and only when it holds exactly one SPIFFE URI SAN."""
    try:
        auth = context.auth_context()
    except Exception:  # a context without a transport (tests, in-process calls)
        return None
    for value in auth.get("peer_spiffe_id", ()):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        if text.startswith("spiffe://"):
            return text
    return None


# --- Consul HTTP ----------------------------------------------------------------------------------------------


def _consul(consul_or_addr: str | consul.aio.Consul) -> tuple[consul.aio.Consul, bool]:
    """An asyncio client for a CONSUL_HTTP_ADDR-style address (owned: closed by whoever made it), or the given
    client (shared: left open)."""
    if isinstance(consul_or_addr, str):
        scheme, host, port = split_consul_addr(consul_or_addr)
        return consul.aio.Consul(host=host, port=port, scheme=scheme), True
    return consul_or_addr, False


def _where(client: consul.aio.Consul) -> str:
    return str(getattr(client.http, "base_uri", "Consul"))


async def _get(client: consul.aio.Consul, path: str, index: int | None = None,
               wait_s: float | None = None) -> tuple[int, Any]:
    """GET `path` (a blocking query when `index` is given): (X-Consul-Index, decoded JSON)."""
    params: list[tuple[str, Any]] = []
    if index is not None:
        params += [("index", index), ("wait", f"{wait_s or WATCH_WAIT_S}s")]
    bound = (wait_s or WATCH_WAIT_S) * 17 / 16 + 5 if index is not None else 10.0
    async with asyncio.timeout(bound):  # a connection that went silent cannot hold a watch for ever
        raw_index, data = await client.http.get(CB.json(index=True), path, params=params,
                                                headers=client.prepare_headers())
    return int(raw_index), data


async def _send(client: consul.aio.Consul, method: str, path: str, body: dict[str, Any],
                timeout_s: float = 10.0) -> Any:
    call = {"POST": client.http.post, "PUT": client.http.put}[method]
    async with asyncio.timeout(timeout_s):
        return await call(CB.json(), path, data=json.dumps(body), headers=client.prepare_headers())


async def _watch(client: consul.aio.Consul, path: str, what: str, index: int = 0) -> AsyncIterator[tuple[int, Any]]:
    """Answers of blocking queries on `path`, starting after `index`; each answer is yielded (also unchanged ones
    at the end of a wait: callers compare). While Consul fails it backs off (0.2 s doubling to 5 s) and says so
    once per outage; it never raises except when cancelled."""
    backoff = BACKOFF_MIN_S
    failing = False
    while True:
        try:
            new_index, data = await _get(client, path, index=index)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            end_if_cancelled(exc)
            if not failing:
                log.warning("Consul watch on %s failed (%s); retrying with back-off", what, _brief(exc))
                failing = True
            await asyncio.sleep(backoff)  # back off a failing Consul, not a polling loop
            backoff = min(backoff * 2, BACKOFF_MAX_S)
            # The agent may have restarted without its state (a dev agent: a new CA, new intentions), its index
            # starting over: a query with ours would wait out its whole wait before saying anything.
            index = 0
            continue
        if failing:
            log.info("Consul watch on %s answers again", what)
            failing = False
        backoff = BACKOFF_MIN_S
        # An index lower than ours: the agent lost its state (restarted); start over from its answer.
        index = max(new_index, 0)
        yield new_index, data


def _brief(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "…"


def _start_error(client: consul.aio.Consul, service: str, exc: BaseException) -> MeshUnavailable:
    where = _where(client)
    text = _brief(exc)
    if isinstance(exc, consul.ACLPermissionDenied):
        return MeshUnavailable(f"Consul at {where} refused a certificate for {service} ({text}): give this process a "
                               f"token with service:write on {service} (CONSUL_HTTP_TOKEN), or set {MTLS_ENV}=off")
    if "Connect must be enabled" in text:
        return MeshUnavailable(f"Consul at {where} has Connect disabled: {MTLS_ADVICE}")
    if isinstance(exc, consul.ConsulException):
        return MeshUnavailable(f"Consul at {where} could not issue a certificate for {service} ({text}): "
                               f"{MTLS_ADVICE}")
    if isinstance(exc, (KeyError, TypeError, ValueError)):
        return MeshUnavailable(f"Consul at {where} answered without a usable certificate for {service} ({text}): "
                               f"{MTLS_ADVICE}")
    if isinstance(exc, TimeoutError):
        return MeshUnavailable(f"Consul at {where} did not answer in time: {MTLS_ADVICE}")
    return MeshUnavailable(f"Consul at {where} is unreachable ({text}): {MTLS_ADVICE}")


async def fetch_roots(consul_addr: str) -> tuple[str, bytes]:
    """(trust domain, CA roots PEM) from the Consul agent at `consul_addr`, once (MeshUnavailable if it cannot)."""
    client, _ = _consul(consul_addr)
    try:
        _, data = await _get(client, "/v1/agent/connect/ca/roots")
        fields = _roots_fields(data or {})
        if not fields:
            raise MeshUnavailable(f"Consul at {_where(client)} has no Connect CA roots: is Connect enabled?")
        return str(fields["trust_domain"]), bytes(fields["roots_pem"])
    except MeshUnavailable:
        raise
    except Exception as exc:
        raise MeshUnavailable(f"Consul at {_where(client)} did not give its CA roots ({_brief(exc)})") from None
    finally:
        await client.close()


# --- Identity -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeshMaterial:
    """One consistent snapshot of this process's identity; `generation` grows by one per change."""

    generation: int
    trust_domain: str
    spiffe_id: str
    roots_pem: bytes  # every root Consul trusts now (during a rotation: the new one and the old one)
    cert_pem: bytes
    key_pem: bytes
    valid_before: str


ChangeCallback = Callable[[MeshMaterial], None]


def _roots_fields(data: dict[str, Any]) -> dict[str, Any]:
    roots = [root["RootCert"].strip() + "\n" for root in data.get("Roots") or () if root.get("RootCert")]
    if not roots:
        return {}
    return {"trust_domain": str(data["TrustDomain"]), "roots_pem": "".join(roots).encode()}


def _leaf_fields(data: dict[str, Any]) -> dict[str, Any]:
    # CertPEM is the leaf, followed after a CA rotation by the new root cross-signed by the old one.
    return {"spiffe_id": str(data["ServiceURI"]), "cert_pem": str(data["CertPEM"]).encode(),
            "key_pem": str(data["PrivateKeyPEM"]).encode(), "valid_before": str(data.get("ValidBefore", ""))}


class MeshIdentity:
    """This process's Consul Connect identity as one service, kept current in the background.

    `await MeshIdentity.start(consul, "lmesh-gateway")`; then credentials from it; `await close()` at the end.
    """

    def __init__(self, client: consul.aio.Consul, service: str, owns_client: bool) -> None:
        self._client = client
        self._owns_client = owns_client
        self.service = service
        self._material: MeshMaterial | None = None
        self._callbacks: list[ChangeCallback] = []
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._channel_credentials: tuple[int, grpc.ChannelCredentials] | None = None
        self._agent_roots = b""  # the roots the agent names now
        self._former: tuple[str, bytes] | None = None  # (trust domain, roots) of the CA before a change

    @classmethod
    async def start(cls, consul_or_addr: str | consul.aio.Consul, service: str,
                    timeout_s: float = 15.0) -> MeshIdentity:
        """Fetches the CA roots and this service's leaf (waiting for a just-started agent's CA), then keeps both
        current. Raises MeshUnavailable, with what to do, when Consul is unreachable or has Connect off."""
        client, owned = _consul(consul_or_addr)
        identity = cls(client, service, owned)
        try:
            async with asyncio.timeout(timeout_s):
                roots_index, roots = await identity._first_roots()
                leaf_index, leaf = await _get(client, identity._leaf_path)
            identity._material = MeshMaterial(generation=1, **_roots_fields(roots), **_leaf_fields(leaf))
            identity._agent_roots = identity._material.roots_pem
        except asyncio.CancelledError:
            await identity._close_client()
            raise
        except Exception as exc:
            await identity._close_client()
            raise _start_error(client, service, exc) from exc
        identity._tasks = [
            asyncio.create_task(identity._keep(identity._roots_path, "CA roots", roots_index, identity._apply_roots),
                                name=f"connect-roots-{service}"),
            asyncio.create_task(identity._keep(identity._leaf_path, f"leaf of {service}", leaf_index,
                                               identity._apply_leaf), name=f"connect-leaf-{service}"),
        ]
        log.info("mesh identity %s (leaf valid before %s)", identity.spiffe_id, identity.material.valid_before)
        return identity

    _roots_path = "/v1/agent/connect/ca/roots"

    @property
    def _leaf_path(self) -> str:
        return f"/v1/agent/connect/ca/leaf/{self.service}"

    async def _first_roots(self) -> tuple[int, dict[str, Any]]:
        """The roots, once the agent's CA has one: a just-elected dev agent answers an empty list (and its leaf
        endpoint "CA root is nil") for a moment. Blocking queries wait for the first root."""
        index, roots = await _get(self._client, self._roots_path)
        while not (roots or {}).get("Roots"):
            index, roots = await _get(self._client, self._roots_path, index=index, wait_s=2)
        return index, roots

    async def _keep(self, path: str, what: str, index: int, apply: Callable[[Any], None]) -> None:
        async for _, data in _watch(self._client, path, what, index):
            try:
                apply(data)
            except Exception as exc:  # a malformed answer must not end the watch
                log.warning("ignored an unusable answer for %s: %s", what, _brief(exc))

    def _apply_roots(self, data: dict[str, Any]) -> None:
        fields = _roots_fields(data)
        if not fields:  # no roots: an agent whose CA is not up yet; keep trusting what we trusted
            return
        current = self.material
        if fields["trust_domain"] != current.trust_domain:
            log.warning("the Consul agent's CA changed from trust domain %s to %s (restarted without its state?); "
                        "the former stays trusted for %.0f s", current.trust_domain, fields["trust_domain"],
                        FORMER_CA_GRACE_S)
            self._former = (current.trust_domain, self._agent_roots or current.roots_pem)
            asyncio.get_running_loop().call_later(FORMER_CA_GRACE_S, self._forget_former, current.trust_domain)
        self._agent_roots = fields["roots_pem"]
        self._update(trust_domain=fields["trust_domain"], roots_pem=self._trusted_roots())

    def _trusted_roots(self) -> bytes:
        former = self._former[1] if self._former is not None else b""
        return self._agent_roots + former

    def _forget_former(self, trust_domain: str) -> None:
        if self._former is not None and self._former[0] == trust_domain:
            self._former = None
            self._update(roots_pem=self._trusted_roots())

    def accepted_trust_domains(self) -> tuple[str, ...]:
        """The trust domains whose identities this process accepts: the agent's, and for FORMER_CA_GRACE_S after
        a change of CA, the one before."""
        current = self.material.trust_domain
        return (current,) if self._former is None else (current, self._former[0])

    def _apply_leaf(self, data: dict[str, Any]) -> None:
        self._update(**_leaf_fields(data))

    def _update(self, **changes: Any) -> None:
        current = self.material
        if all(getattr(current, key) == value for key, value in changes.items()):
            return  # a blocking query's wait ended without a change
        material = replace(current, generation=current.generation + 1, **changes)
        self._material = material
        log.info("mesh identity %s changed (%s); generation %d", material.spiffe_id, ", ".join(sorted(changes)),
                     material.generation)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for callback in list(self._callbacks):
            try:
                callback(material)
            except Exception:
                log.exception("an on_change callback of the mesh identity failed")

    @property
    def material(self) -> MeshMaterial:
        if self._material is None:
            raise RuntimeError("MeshIdentity used before start()")
        return self._material

    @property
    def generation(self) -> int:
        return self.material.generation

    @property
    def trust_domain(self) -> str:
        return self.material.trust_domain

    @property
    def spiffe_id(self) -> str:
        return self.material.spiffe_id

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Calls `callback(material)` in the event loop after every change (new roots, new leaf); returns the
        function that unsubscribes it. A channel pool uses it to build new channels (see the module doc)."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    async def wait_for_change(self, after_generation: int, timeout_s: float | None = None) -> MeshMaterial:
        """The material once its generation is past `after_generation` (TimeoutError after `timeout_s`)."""
        async with asyncio.timeout(timeout_s):
            while self.material.generation <= after_generation:
                await self._changed.wait()
        return self.material

    def _dynamic_server_credentials(self, client_auth: bool) -> grpc.ServerCredentials:
        def configuration(material: MeshMaterial) -> Any:
            return grpc.ssl_server_certificate_configuration(
                [(material.key_pem, material.cert_pem)], material.roots_pem if client_auth else None)

        served = self.material

        def fetch() -> Any:
            # Called by gRPC before each handshake; None keeps the configuration it has.
            nonlocal served
            current = self._material
            if current is None or current.generation == served.generation:
                return None
            try:
                config = configuration(current)
            except Exception:
                log.exception("could not build the TLS configuration for generation %d", current.generation)
                return None
            served = current
            return config

        return grpc.dynamic_ssl_server_credentials(configuration(served), fetch,
                                                   require_client_authentication=client_auth)

    def server_credentials(self) -> grpc.ServerCredentials:
        """For the API port: mTLS, a client certificate chaining to the mesh roots required at the handshake;
        every new handshake gets the newest leaf and roots."""
        return self._dynamic_server_credentials(client_auth=True)

    def health_server_credentials(self) -> grpc.ServerCredentials:
        """For the health port: TLS with this leaf, no client certificate asked (Consul's check has none)."""
        return self._dynamic_server_credentials(client_auth=False)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials with the current leaf and roots, fixed for the channels built with them."""
        material = self.material
        cached = self._channel_credentials
        if cached is None or cached[0] != material.generation:
            credentials = grpc.ssl_channel_credentials(material.roots_pem, material.key_pem, material.cert_pem)
            cached = self._channel_credentials = (material.generation, credentials)
        return cached[1]

    def server_name_for(self, service: str) -> str:
        """The name a channel to `service` must verify (its leaf's CN), for `grpc.ssl_target_name_override`."""
        return server_name(service, self.trust_domain)

    def channel_options(self, service: str) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name_for(service))]

    def secure_channel(self, target: str, service: str,
                       options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """A channel to `target` that presents this identity and accepts only `service`'s leaf."""
        return grpc.aio.secure_channel(target, self.channel_credentials(),
                                       options=[*options, *self.channel_options(service)])

    async def _close_client(self) -> None:
        if self._owns_client:
            await self._client.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._callbacks.clear()
        await self._close_client()


# --- Intentions -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


@dataclass
class _Cached:
    decision: Decision
    expires_at: float | None  # monotonic; None: until intentions change


class IntentionAuthorizer:
    """Whether callers may call one target service, per Consul intentions, answered from a cache.

    Decisions come from the agent's `/v1/agent/connect/authorize`, cached per caller SPIFFE ID; a blocking query
    on `/v1/connect/intentions` (Consul 1.8.7 answers it the moment an intention is created, changed or deleted)
    empties the cache, so a change takes effect on the next call. Fails closed: a caller without a cached
    decision is denied while Consul cannot answer. A decision cached before Consul went away stays in use
    until Consul answers again and says intentions changed.

    Call `start()` (or `await wait_watching()`) when the service starts: the watch's first answer empties the
    cache too. The agent answers authorize from its own cache of intentions, refreshed by its own blocking
    query at about the moment ours returns; decisions made within SETTLE_S of a change are therefore cached
    only until SETTLE_S has passed, so an answer from an agent a moment behind cannot outlive that second.
    """

    def __init__(self, consul_or_addr: str | consul.aio.Consul, target: str,
                 trust_domain: str | Callable[[], str | Sequence[str]]) -> None:
        self._client, self._owns_client = _consul(consul_or_addr)
        self.target = target
        self._trust_domain = trust_domain if callable(trust_domain) else (lambda: trust_domain)
        self._cache: dict[str, _Cached] = {}
        self._inflight: dict[str, asyncio.Task[Decision]] = {}
        self._generation = 0  # intentions changes seen
        self._changed = asyncio.Event()
        self._settle_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._watching = asyncio.Event()

    @property
    def generation(self) -> int:
        """How many times the watch has seen intentions change (the first answer counts as one)."""
        return self._generation

    def start(self) -> IntentionAuthorizer:
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name=f"intentions-{self.target}")
        return self

    async def wait_watching(self, timeout_s: float = 5.0) -> None:
        """Waits for the watch's first answer from Consul (start-up ordering, tests)."""
        self.start()
        async with asyncio.timeout(timeout_s):
            await self._watching.wait()

    async def wait_for_change(self, after_generation: int, timeout_s: float | None = None) -> int:
        async with asyncio.timeout(timeout_s):
            while self._generation <= after_generation:
                await self._changed.wait()
        return self._generation

    async def _watch(self) -> None:
        seen: int | None = None
        held = False  # whether Consul held intentions at its last answer
        grace: asyncio.TimerHandle | None = None
        reapplying_until = 0.0  # intentions came back after vanishing: they are still being applied until then
        async for index, listed in _watch(self._client, "/v1/connect/intentions", "intentions"):
            if index != seen:
                seen = index
                if grace is not None:  # they are being applied again
                    grace.cancel()
                    grace = None
                    reapplying_until = time.monotonic() + VANISHED_INTENTIONS_GRACE_S
                if held and not listed:
                    log.warning("every intention is gone from Consul (an agent restarted without its state?); the "
                                "decisions made stand for %.0f s, until intentions are applied again",
                                VANISHED_INTENTIONS_GRACE_S)
                    grace = asyncio.get_running_loop().call_later(VANISHED_INTENTIONS_GRACE_S, self._invalidate)
                else:
                    self._invalidate(soft=time.monotonic() < reapplying_until)
                held = bool(listed)
            self._watching.set()

    def _invalidate(self, soft: bool = False) -> None:
        """Decisions are asked again: at once, or (`soft`, while vanished intentions are applied one by one and
        the agent's own cache catches up) once SETTLE_S has passed, the decisions made before standing until then."""
        self._generation += 1
        now = time.monotonic()
        if soft:
            for key, cached in self._cache.items():
                self._cache[key] = _Cached(cached.decision, min(cached.expires_at or math.inf, now + SETTLE_S))
        else:
            self._cache.clear()
        self._settle_until = now + SETTLE_S
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def authorize(self, caller: str | None) -> Decision:
        """May `caller` (the peer's SPIFFE ID, None when it showed none) call the target service?"""
        if not caller:
            return Decision(False, "no verified client certificate: call the mesh port with a mesh identity")
        parsed = parse_spiffe_id(caller)
        if parsed is None:
            return Decision(False, f"{caller!r} is not a Consul service identity")
        accepted = self._trust_domain()
        domains = (accepted,) if isinstance(accepted, str) else tuple(accepted)
        if not any(in_trust_domain(caller, domain) for domain in domains):
            return Decision(False, f"{caller} is not of this mesh's trust domain {domains[0]}")
        self.start()
        # Intentions name services, not trust domains (checked above): a caller's new certificate after a CA
        # change (an agent restarted without its state) keeps the decision its service already has.
        key = f"{parsed.namespace}/{parsed.datacenter}/{parsed.service}"
        cached = self._cache.get(key)
        if cached is not None and (cached.expires_at is None or cached.expires_at > time.monotonic()):
            return cached.decision
        task = self._inflight.get(key)
        if task is None:  # one question to Consul per caller at a time, however many calls wait for it
            task = asyncio.create_task(self._ask(caller, key, cached))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._inflight.pop(key, None) if self._inflight.get(key)
                                   is done else None)
        return await asyncio.shield(task)

    async def _ask(self, caller: str, key: str, fallback: _Cached | None) -> Decision:
        body = {"Target": self.target, "ClientCertURI": caller}
        for _ in range(3):
            generation = self._generation
            try:
                answer = await _send(self._client, "POST", "/v1/agent/connect/authorize", body,
                                     timeout_s=AUTHORIZE_TIMEOUT_S)
                reason = str(answer.get("Reason", ""))
                # Deny by default whatever Consul's own default: only an intention that matches may allow.
                matched = reason.startswith("Matched")
                decision = Decision(bool(answer["Authorized"]) and matched, reason if matched else
                                    f"no intention allows this call, and lmesh denies by default (Consul: {reason})")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if fallback is not None:  # decided after the last change we know of: the best there is
                    return fallback.decision
                log.warning("Consul could not authorize %s -> %s: %s", caller, self.target, _brief(exc))
                return Decision(False, f"Consul could not answer whether {caller} may call {self.target} "
                                       f"({_brief(exc)}); denied until it can")
            if generation != self._generation:
                continue  # intentions changed while Consul answered: ask again
            now = time.monotonic()
            if len(self._cache) >= MAX_CACHED_CALLERS:
                self._cache.clear()
            self._cache[key] = _Cached(decision, self._settle_until if now < self._settle_until else None)
            return decision
        return decision  # changing faster than we can ask: the latest answer, uncached

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        if self._owns_client:
            await self._client.close()


class Intention(NamedTuple):
    source: str
    destination: str
    action: str  # "allow" | "deny"


# Exactly the request path: who calls whom (DESIGN.md), plus the operator CLI's identity.
MESH_CALLS: dict[str, tuple[str, ...]] = {
    # ... and the mesh's own tools (lmesh-tools) and the embeddings that choose among tools; tools of other teams
    # are theirs to allow.
    "lmesh-gateway": ("lmesh-policy", "lmesh-registry", "lmesh-tokenizer", "lmesh-inference", "lmesh-tools",
                      "lmesh-embeddings"),
    "lmesh-inference": ("lmesh-registry",),
    "lmesh-tokenizer": ("lmesh-registry",),
    "lmesh-operator": ("lmesh-policy", "lmesh-registry"),
}


# The services that only the request path may reach.
MESH_DESTINATIONS = tuple(sorted({d for destinations in MESH_CALLS.values() for d in destinations}))


def default_intentions() -> list[Intention]:
    """An allow per hop of the request path, then `* -> <service>` deny for each lmesh service they reach: deny
    by default whatever Consul's ACL default, without touching other services that share the cluster. An exact
    source wins over `*` in Consul's precedence; the allows come first, so applying them to a running mesh never
    denies a hop that should pass."""
    allows = [Intention(source, destination, "allow")
              for source, destinations in MESH_CALLS.items() for destination in destinations]
    return [*allows, *(Intention("*", destination, "deny") for destination in MESH_DESTINATIONS)]


@dataclass
class IntentionChanges:
    created: list[Intention]
    updated: list[Intention]
    unchanged: list[Intention]


async def apply_intentions(consul_or_addr: str | consul.aio.Consul,
                           intentions: Sequence[Intention] | None = None) -> IntentionChanges:
    """Makes Consul hold `intentions` (default: `default_intentions()`): creates the missing ones, changes the
    action of those that differ, leaves the rest (and intentions not named here) alone. Idempotent: Consul
    1.8.7 refuses a second intention for the same source and destination, so existing ones are updated."""
    client, owned = _consul(consul_or_addr)
    changes = IntentionChanges([], [], [])
    try:
        held = await _listed(client)
        for wanted in intentions if intentions is not None else default_intentions():
            await _apply_one(client, wanted, held, changes)
    finally:
        if owned:
            await client.close()
    return changes


async def held_intentions(consul_or_addr: str | consul.aio.Consul) -> dict[tuple[str, str], str]:
    """The intentions Consul holds: (source, destination) -> action."""
    client, owned = _consul(consul_or_addr)
    try:
        return {pair: str(held.get("Action", "")) for pair, held in (await _listed(client)).items()}
    finally:
        if owned:
            await client.close()


async def _listed(client: consul.aio.Consul) -> dict[tuple[str, str], dict[str, Any]]:
    """The intentions Consul holds, by (source, destination), default namespace only."""
    _, listed = await _get(client, "/v1/connect/intentions")
    return {(i["SourceName"], i["DestinationName"]): dict(i) for i in listed or ()
            if i.get("SourceNS", "default") == i.get("DestinationNS", "default") == "default"}


async def _apply_one(client: consul.aio.Consul, wanted: Intention, held: dict[tuple[str, str], dict[str, Any]],
                     changes: IntentionChanges) -> None:
    body = {"SourceName": wanted.source, "DestinationName": wanted.destination, "SourceType": "consul",
            "Action": wanted.action}
    for _ in range(3):
        existing = held.get((wanted.source, wanted.destination))
        if existing is not None:
            if existing.get("Action") == wanted.action:
                changes.unchanged.append(wanted)
                return
            await _send(client, "PUT", f"/v1/connect/intentions/{existing['ID']}",
                        {**body, "Description": existing.get("Description", ""), "Meta": existing.get("Meta") or {}})
            changes.updated.append(wanted)
            return
        try:
            await _send(client, "POST", "/v1/connect/intentions", {**body, "Description": "lmesh default"})
        except consul.ConsulException as exc:
            if "duplicate intention" not in str(exc):
                raise
            held.update(await _listed(client))  # another process created it since we listed: look again
            continue
        changes.created.append(wanted)
        return
    raise MeshUnavailable(f"could not apply intention {wanted.source} -> {wanted.destination}: it keeps changing")


# --- Health checks and the server-side guard -----------------------------------------------------------------


def tls_health_check(port: int, address: str = "127.0.0.1", interval: str = "1s", timeout: str = "1s",
                     deregister_after: str = "1m") -> dict[str, Any]:
    """A Consul check definition probing grpc.health.v1 on the health port (server-only TLS, not verified: the
    check proves liveness, not identity). Built by hand: py-consul's Check.grpc(use_tls=...) sends a field
    Consul 1.8.7 refuses."""
    return {"GRPC": host_port(address.strip("[]"), port), "GRPCUseTLS": True, "TLSSkipVerify": True,
            "Interval": interval, "Timeout": timeout, "DeregisterCriticalServiceAfter": deregister_after}


class MeshGuard:
    """The check every call to an internal service passes before its servicer runs (rpc.ServerInterceptor calls
    it): the caller's verified mesh identity (its client certificate's SPIFFE ID), then Consul's intentions.

    No identity (a call on the health port, which asks for no certificate): UNAUTHENTICATED. An identity that
    intentions deny: PERMISSION_DENIED with Consul's reason. Both carry an ErrorInfo reason (MESH_IDENTITY_REQUIRED,
    MESH_DENIED) by which a calling service tells a refused hop from a refused request."""

    def __init__(self, authorizer: IntentionAuthorizer) -> None:
        self.authorizer = authorizer

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        caller = peer_spiffe_id(context)
        target = self.authorizer.target
        if caller is None:
            raise Unauthenticated(f"{target} takes calls only from the mesh: connect with a mesh client certificate "
                                  "(Consul Connect)", reason=Reason.MESH_IDENTITY_REQUIRED)
        decision = await self.authorizer.authorize(caller)
        if not decision.allowed:
            who = parse_spiffe_id(caller)
            raise PermissionDenied(f"{target} refuses calls from {who.service if who else caller}: {decision.reason}",
                                   reason=Reason.MESH_DENIED, metadata={"caller": caller, "target": target})


# The one service whose port is public (API keys, not mesh certificates): channels to it are plain.
PUBLIC_SERVICES = frozenset({"lmesh-gateway"})


class MeshSecurity:
    """What the mesh's mTLS gives one process: its identity (a leaf for `service`, kept current), the channels it
    calls peers over, and for a service that takes calls from the mesh, the check of its callers (`guard`)."""

    def __init__(self, identity: MeshIdentity, consul_addr: str) -> None:
        self.identity = identity
        self._consul_addr = consul_addr
        self.guard: MeshGuard | None = None

    @classmethod
    async def start(cls, consul_addr: str, service: str) -> MeshSecurity:
        """Raises MeshUnavailable, saying what to do, when Consul is out of reach or has Connect off."""
        return cls(await MeshIdentity.start(consul_addr, service), consul_addr)

    def serve(self) -> MeshGuard:
        """Checks this service's callers from now on: their certificates, then Consul's intentions (followed)."""
        if self.guard is None:
            identity = self.identity
            authorizer = IntentionAuthorizer(self._consul_addr, identity.service, identity.accepted_trust_domains)
            self.guard = MeshGuard(authorizer.start())
        return self.guard

    def channel(self, target: str, service: str) -> grpc.aio.Channel:
        """The channel to one instance of `service`: mTLS with this identity, accepting only that service's
        certificate; a public port (the gateway's) plain."""
        from services.common.discovery import CHANNEL_OPTIONS, plaintext_channel

        if service in PUBLIC_SERVICES:
            return plaintext_channel(target, service)
        return self.identity.secure_channel(target, service, CHANNEL_OPTIONS)

    async def close(self) -> None:
        if self.guard is not None:
            await self.guard.authorizer.close()
        await self.identity.close()
