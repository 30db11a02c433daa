"""Server bootstrap shared by all five services: gRPC server, health, reflection, Consul, signals, drain.

Lifecycle: bind → start → register in Consul (check critical until SERVING) → warm up (e.g. load the model)
→ SERVING → passing in Consul (then it logs "serving") → ... → SIGTERM/SIGINT → NOT_SERVING → deregister
→ finish in-flight calls within the grace period → close peers and flush telemetry → exit.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import consul
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from services.common.config import ServiceConfig, host_port, split_consul_addr
from services.common.connect import MeshSecurity, MeshUnavailable
from services.common.consul_agent import consul_advice, probe_consul
from services.common.discovery import SERVER_OPTIONS, ConsulRegistration, Mesh
from services.common.errors import LmeshError, Reason, Unavailable
from services.common.rpc import ServerInterceptor
from services.common.telemetry import (
    MetricsEndpoint,
    prometheus_wanted,
    setup_metrics,
    setup_tracing,
    shutdown_telemetry,
)

log = logging.getLogger("lmesh.server")
V1_REFLECTION_SERVICE = "grpc.reflection.v1.ServerReflection"


@dataclass
class ServiceRuntime:
    """What a service's wiring gets to build its servicers with."""

    config: ServiceConfig
    mesh: Mesh
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    registration: ConsulRegistration | None = None
    # The Prometheus endpoint (/metrics), unless OTEL_METRICS_EXPORTER leaves prometheus out.
    metrics_endpoint: MetricsEndpoint | None = None

    @property
    def tracer(self) -> Any:
        return self.tracer_provider.get_tracer(f"lmesh.{self.config.service}")

    @property
    def meter(self) -> Any:
        return self.meter_provider.get_meter(f"lmesh.{self.config.service}")


@dataclass(frozen=True)
class ExtraPort:
    """One more port of a public service's server, with credentials of its own (the gateway's
    client-certificate port); its bound number is registered in Consul meta under `meta_key`."""

    meta_key: str
    port: int  # 0: a free one
    credentials: grpc.ServerCredentials
    flag: str  # the setting that chooses it, for messages


@dataclass
class ServiceParts:
    """A service's servicers and hooks, built from the runtime by the service's own module."""

    # (add_XServicer_to_server, servicer, full service name from the descriptor)
    servicers: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]]
    # Runs after the port is bound and registered, before SERVING (load the model, open stores).
    warm_up: Callable[[], Awaitable[None]] | None = None
    # Consul service meta to register with (read after warm-up).
    meta: Callable[[], dict[str, str]] | None = None
    # Runs when draining starts (stop admitting work) and after the server stopped (release resources).
    on_drain: Callable[[], Awaitable[None]] | None = None
    on_stop: Callable[[], Awaitable[None]] | None = None
    # Called a moment before the drain's grace runs out, with the error that still-running streams end with
    # (inference ends its queued and generating sequences with it).
    on_grace_expiring: Callable[[LmeshError], None] | None = None
    # The largest request message the server accepts (gRPC refuses a larger one with RESOURCE_EXHAUSTED before
    # any of our code runs); None keeps SERVER_OPTIONS' limit for the mesh's own traffic (artifact uploads).
    max_request_bytes: int | None = None
    # Serves callers outside the mesh (the gateway): no mesh certificate asked of them.
    public: bool = False
    # A public service's TLS: its port's credentials (None: plaintext; when set, Consul's check uses TLS too and
    # the instance has meta `tls` "true"), and further ports on the same server (`extra_ports`).
    public_credentials: grpc.ServerCredentials | None = None
    extra_ports: Sequence[ExtraPort] = ()
    # Consul tags besides `lmesh` (lmesh-tools: `lmesh-tool`, which marks a tool provider).
    tags: Sequence[str] = ()
    extra: dict[str, Any] = field(default_factory=dict)


class RunningService:
    """A started service; `stop()` runs the graceful shutdown sequence."""

    def __init__(self, runtime: ServiceRuntime, parts: ServiceParts, server: grpc.aio.Server,
                 health_servicer: health.aio.HealthServicer, port: int, interceptor: ServerInterceptor) -> None:
        self.runtime = runtime
        self.parts = parts
        self.server = server
        self.interceptor = interceptor
        self.health = health_servicer
        self.port = port
        self._service_names = [name for _, _, name in parts.servicers]
        self._stopped = asyncio.Event()
        # The bound numbers of parts.extra_ports, by meta key.
        self.extra_ports: dict[str, int] = {}

    @property
    def target(self) -> str:
        return f"{self.runtime.config.address}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        config = self.runtime.config
        log.info("draining lmesh-%s (grace %.1fs)", config.service, config.grace_s)
        await self.health.enter_graceful_shutdown()
        if self.runtime.registration is not None:
            await self.runtime.registration.deregister()
        if self.parts.on_drain is not None:
            await self.parts.on_drain()
        # gRPC cuts what still runs when the grace ends with a bare "Cancelling all calls": end it a moment
        # before, saying why.
        grace = config.grace_s
        expiring = asyncio.get_running_loop().call_later(grace - min(0.5, grace / 4), self._expire)
        await self.server.stop(grace)
        expiring.cancel()
        if self.parts.on_stop is not None:
            await self.parts.on_stop()
        await self.runtime.mesh.close()
        if self.runtime.metrics_endpoint is not None:
            await self.runtime.metrics_endpoint.stop()
        await shutdown_telemetry(self.runtime.tracer_provider, self.runtime.meter_provider)
        log.info("lmesh-%s stopped", config.service)


    def _expire(self) -> None:
        grace = self.runtime.config.grace_s
        error = Unavailable(f"lmesh-{self.runtime.config.service} shut down before this stream finished (its "
                            f"--grace of {grace:g} s was running out); retry", reason=Reason.DRAINING)
        self.interceptor.expired = error
        if self.parts.on_grace_expiring is not None:
            self.parts.on_grace_expiring(error)


async def start_service(
    config: ServiceConfig,
    build: Callable[[ServiceRuntime], ServiceParts],
    *,
    register: bool = True,
    extra_exporters: Sequence[SpanExporter] = (),
    metric_readers: Sequence[MetricReader] = (),
) -> RunningService:
    """Starts a service and returns once it is SERVING (warm-up done) and registered in Consul."""
    if register and config.binds_wildcard and not config.advertise_host:
        config = replace(config, advertise_host=_route_to_consul(config))
    # Checked before any gRPC server exists: grpc.aio cannot stop a server that never started.
    serve_metrics = prometheus_wanted()  # a bad OTEL_METRICS_EXPORTER fails here, in one line
    # A clash of the service's own ports is a mistake whatever else listens: said first.
    problem = (_metrics_port_clash(config) if serve_metrics else None) or _bind_problem(config)
    if problem is None and serve_metrics:
        problem = _metrics_port_problem(config)
    if problem is not None:
        raise OSError(problem)
    # Telemetry first: a bad OTEL_* setting fails here, before anything that needs closing exists.
    tracer_provider = setup_tracing(f"lmesh-{config.service}", extra_exporters)
    endpoint = MetricsEndpoint(f"lmesh-{config.service}") if serve_metrics else None
    meter_provider = setup_metrics(f"lmesh-{config.service}", metric_readers,
                                   prometheus=endpoint.registry if endpoint is not None else None)
    security = await _mesh_security(config, tracer_provider, meter_provider)
    runtime = ServiceRuntime(config=config, mesh=Mesh(config.consul_addr, security=security),
                             tracer_provider=tracer_provider, meter_provider=meter_provider,
                             metrics_endpoint=endpoint)
    try:
        parts = build(runtime)  # may refuse its settings (the gateway's TLS files)
        problem = _extra_ports_problem(config, parts)
        if problem is not None:
            raise OSError(problem)
    except BaseException:
        await runtime.mesh.close()
        await shutdown_telemetry(runtime.tracer_provider, runtime.meter_provider)
        raise
    # A service the mesh calls takes calls only from it: mTLS, and each caller checked against intentions.
    guard = security.serve() if security is not None and not parts.public else None
    interceptor = ServerInterceptor(config.service, runtime.tracer, guard, meter=runtime.meter)
    options = SERVER_OPTIONS
    if parts.max_request_bytes is not None:
        options = [*(o for o in options if o[0] != "grpc.max_receive_message_length"),
                   ("grpc.max_receive_message_length", parts.max_request_bytes)]
    server = grpc.aio.server(interceptors=[interceptor], options=options)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for add, servicer, _ in parts.servicers:
        add(servicer, server)
    enable_reflection(server, [name for _, _, name in parts.servicers])
    health_port: int | None = None
    extra_ports: dict[str, int] = {}
    extra_problem: str | None = None
    try:
        if guard is not None and security is not None:
            port = server.add_secure_port(host_port(config.host, config.port), security.identity.server_credentials())
            # Consul's check has no client certificate: grpc.health alone on a port of its own, server-only TLS;
            # any other method called there finds no caller identity and is refused.
            health_port = server.add_secure_port(host_port(config.host, config.health_port),
                                                 security.identity.health_server_credentials())
        elif parts.public_credentials is not None:
            port = server.add_secure_port(host_port(config.host, config.port), parts.public_credentials)
        else:
            port = server.add_insecure_port(host_port(config.host, config.port))
        for extra in parts.extra_ports:
            try:
                extra_ports[extra.meta_key] = server.add_secure_port(host_port(config.host, extra.port),
                                                                     extra.credentials)
            except RuntimeError:
                extra_ports[extra.meta_key] = 0
            if not extra_ports[extra.meta_key]:
                extra_problem = _extra_ports_problem(config, parts) or (
                    f"could not listen on {host_port(config.host, extra.port)} ({extra.flag})")
                break
    except RuntimeError:  # grpc's own message points at GRPC_VERBOSITY, not at the cause
        port = 0
    if port != 0 and extra_problem is None and endpoint is not None:
        try:
            await endpoint.start(config.host, config.metrics_port)
        except OSError as exc:
            extra_problem = _metrics_port_problem(config) or (
                f"could not listen on {host_port(config.host, config.metrics_port)} (--metrics-port): "
                f"{exc.strerror or exc}")
    if port == 0 or extra_problem is not None:
        if parts.on_stop is not None:
            await parts.on_stop()
        await runtime.mesh.close()
        await shutdown_telemetry(runtime.tracer_provider, runtime.meter_provider)
        if port != 0:
            raise OSError(extra_problem)
        # Taken since the check above, or refused by gRPC alone (a free port 0 cannot be "in use").
        raise OSError(_bind_problem(config) or (_port_taken(config) if config.port else
                                                f"could not listen on {host_port(config.host, 0)}"))
    await server.start()
    running = RunningService(runtime, parts, server, health_servicer, port, interceptor)
    running.extra_ports = extra_ports
    await running.set_serving(False)
    where = host_port(config.host, port) + (" (TLS)" if parts.public_credentials is not None else "")
    where += "".join(f", {key} {value}" for key, value in extra_ports.items())
    log.info("lmesh-%s listening on %s, advertised as %s", config.service, where, running.target)

    # What the bootstrap registers for every service: its other ports, and whether its port speaks TLS.
    fixed_meta = {key: str(value) for key, value in extra_ports.items()}
    if endpoint is not None:
        fixed_meta["metrics_port"] = str(endpoint.port)
    if parts.public_credentials is not None:
        fixed_meta["tls"] = "true"

    def meta() -> dict[str, str]:
        return {**fixed_meta, **(parts.meta() if parts.meta else {})}

    try:
        if register:
            registration = ConsulRegistration(runtime.mesh.consul, config.consul_service_name,
                                              config.address, port, tls_health_port=health_port,
                                              check_tls=parts.public_credentials is not None, tags=parts.tags)
            registration.fixed_meta = fixed_meta
            try:
                await registration.register(meta())
            except (OSError, aiohttp.ClientError, consul.ConsulException) as exc:
                raise OSError(await _registration_failed(config, port, exc)) from exc
            runtime.registration = registration
        if parts.warm_up is not None:
            await parts.warm_up()
        if register and parts.meta is not None and runtime.registration is not None:
            await runtime.registration.register(meta())
    except BaseException:
        await running.stop()
        raise
    await running.set_serving(True)
    # "serving" in the log means callers can find it: Consul probes the health check about once a second.
    if runtime.registration is not None and not await runtime.registration.wait_passing():
        log.warning("lmesh-%s is serving, but Consul does not report it passing yet", config.service)
    log.info("lmesh-%s serving", config.service)
    return running


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Server reflection under both names clients use: grpc.reflection.v1 (the standard, which buf curl and
    newer tools ask first) and v1alpha (what grpcio ships, and older grpcurl asks). The two protocols are the
    same messages under two package names, so one servicer answers both."""
    _register_v1_reflection_descriptor()
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME, V1_REFLECTION_SERVICE]
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_REFLECTION_SERVICE, {"ServerReflectionInfo": handler}),))


def _register_v1_reflection_descriptor() -> None:
    """Puts grpc/reflection/v1/reflection.proto into the default descriptor pool, so reflection can describe the
    v1 service it lists (grpcio-reflection ships only v1alpha's; v1 is the same file under another package)."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(V1_REFLECTION_SERVICE)
        return
    except KeyError:
        pass
    alpha = reflection_pb2.DESCRIPTOR
    v1 = descriptor_pb2.FileDescriptorProto()
    alpha.CopyToProto(v1)
    v1.name, v1.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    old, new = f".{alpha.package}.", ".grpc.reflection.v1."
    for message in v1.message_type:
        for member in message.field:
            if member.HasField("type_name"):  # message fields only: setting it on a scalar would be an error
                member.type_name = member.type_name.replace(old, new)
    for service in v1.service:
        for method in service.method:
            method.input_type, method.output_type = (method.input_type.replace(old, new),
                                                     method.output_type.replace(old, new))
    pool.AddSerializedFile(v1.SerializeToString())


def _bind_error(host: str, port: int) -> OSError | None:
    """Why a listener could not bind host:port now (address reuse on, as gRPC sets it; port reuse off)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except OSError as exc:  # socket.gaierror: not a name or address
        return exc
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc
    return None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind host:port now (a bad host counts as free: binding it reports that)."""
    error = _bind_error(host, port)
    return error is None or isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL


def _bind_problem(config: ServiceConfig) -> str | None:
    """The one line that says why the service cannot listen at its --host and --port, or None if it can."""
    error = _bind_error(config.host, config.port)
    if error is None:
        return None
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        return (f"cannot bind --host {config.host}: not an address of this machine; pass one of its addresses, "
                "or 0.0.0.0 for all of them")
    if error.errno == errno.EADDRINUSE and config.port:
        return _port_taken(config)
    if error.errno == errno.EACCES:
        return (f"could not listen on {host_port(config.host, config.port)}: ports below 1024 need privileges; "
                "pick another with --port")
    return f"could not listen on {host_port(config.host, config.port)}: {error.strerror or error}"


def _extra_ports_problem(config: ServiceConfig, parts: ServiceParts) -> str | None:
    """Why one of the service's extra ports cannot be bound now (the same as --port, or taken), or None."""
    for extra in parts.extra_ports:
        if extra.port and extra.port == config.port:
            return f"{extra.flag} must be another port than --port ({config.port})"
        error = _bind_error(config.host, extra.port) if extra.port else None
        if error is not None and not isinstance(error, socket.gaierror) and error.errno == errno.EADDRINUSE:
            return (f"could not listen on {host_port(config.host, extra.port)} ({extra.flag}): the port is in use; "
                    f"stop what listens there or pick another with {extra.flag}")
    return None


def _metrics_port_clash(config: ServiceConfig) -> str | None:
    """--metrics-port set to another port of the service, or None."""
    port = config.metrics_port
    for other, flag in ((config.port, "--port"), (config.health_port, "--health-port")):
        if port and port == other:
            return f"--metrics-port must be another port than {flag} ({port})"
    return None


def _metrics_port_problem(config: ServiceConfig) -> str | None:
    """Why the Prometheus endpoint cannot listen on --metrics-port now (another port of the service, or taken),
    or None."""
    port = config.metrics_port
    if not port:
        return None
    clash = _metrics_port_clash(config)
    if clash is not None:
        return clash
    error = _bind_error(config.host, port)
    if error is not None and not isinstance(error, socket.gaierror) and error.errno == errno.EADDRINUSE:
        return (f"could not listen on {host_port(config.host, port)} (--metrics-port): the port is in use; stop "
                "what listens there or pick another with --metrics-port (LMESH_METRICS_PORT)")
    return None


def _port_taken(config: ServiceConfig) -> str:
    return (f"could not listen on {host_port(config.host, config.port)}: the port is in use; stop what listens "
            "there or pick another with --port")


def _route_to_consul(config: ServiceConfig) -> str:
    """The local address that routes to the Consul agent: what peers (and Consul's health check) can dial when
    the service binds every interface. A UDP connect only picks the route; nothing is sent."""
    try:
        _, host, port = split_consul_addr(config.consul_addr)
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(address)
            local = str(probe.getsockname()[0])
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot tell which address to advertise for --host {config.host or '(all)'}: no route to "
                      f"Consul at {config.consul_addr} ({exc}); pass --advertise-host or set LMESH_ADVERTISE_HOST"
                      ) from exc
    log.info("lmesh-%s binds every interface: advertising %s, the address that routes to Consul "
             "(--advertise-host overrides)", config.service, local)
    return local


async def _registration_failed(config: ServiceConfig, port: int, exc: Exception) -> str:
    """One line on why registering in Consul failed, and what to do."""
    if isinstance(exc, consul.ConsulException):  # Consul answered and refused
        return (f"Consul at {config.consul_addr} refused to register lmesh-{config.service} at "
                f"{host_port(config.address, port)} ({str(exc).strip()}); check --advertise-host")
    probed = await asyncio.to_thread(probe_consul, config.consul_addr)
    if probed in ("other", "no leader"):
        return f"Consul at {config.consul_addr} (CONSUL_HTTP_ADDR) is out of reach: {consul_advice(probed)}"
    return (f"Consul at {config.consul_addr} is out of reach ({exc}); start an agent (`lmesh dev` starts one) "
            "or set CONSUL_HTTP_ADDR")


async def _mesh_security(config: ServiceConfig, tracer_provider: TracerProvider,
                         meter_provider: MeterProvider) -> MeshSecurity | None:
    """This service's mesh identity from the local Consul agent (LMESH_MTLS=on), or None, said loudly (off)."""
    if not config.mtls:
        log.warning("lmesh-%s runs WITHOUT mTLS (LMESH_MTLS=off): every process that reaches its port can call it, "
                    "unencrypted and unchecked; use this only for debugging", config.service)
        return None
    try:
        return await MeshSecurity.start(config.consul_addr, config.consul_service_name)
    except MeshUnavailable as exc:
        await shutdown_telemetry(tracer_provider, meter_provider)
        probed = await asyncio.to_thread(probe_consul, config.consul_addr)
        if probed in ("other", "no leader"):
            raise OSError(f"Consul at {config.consul_addr} (CONSUL_HTTP_ADDR) is out of reach: "
                          f"{consul_advice(probed)}") from None
        if probed == "nothing":
            raise OSError(f"Consul at {config.consul_addr} is out of reach; start an agent (`lmesh dev` starts one) "
                          "or set CONSUL_HTTP_ADDR") from None
        raise OSError(str(exc)) from None  # Consul answers, without Connect: the message says what to do


async def serve_forever(config: ServiceConfig, build: Callable[[ServiceRuntime], ServiceParts]) -> None:
    """The entry point's whole life: start, wait for SIGTERM or SIGINT, drain, exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(start_service(config, build))
    stop_wait = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if starting not in done:
        # Stopped during warm-up: cancel it; start_service drains what it started.
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return
    running = starting.result()
    await stop_wait
    await running.stop()


class LateWriteFilter(logging.Filter):
    """grpc logs a failed write at ERROR with a traceback when a stream's peer or deadline ended the call just as
    the servicer wrote to it (a race inside grpc's aio server: the call is over either way). That is a client
    going away, not a bug: one INFO line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        from grpc._cython import cygrpc

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, cygrpc.ExecuteBatchError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "a stream ended while a message was being written to it: %s", (
                record.getMessage(),)
            record.exc_info = record.exc_text = None
        return True


def setup_logging(service: str, level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s %(levelname)s lmesh-{service} %(name)s: %(message)s")
    logging.getLogger("grpc._cython.cygrpc").addFilter(LateWriteFilter())
