"""Configuration every service shares, read from flags with environment fallbacks."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONSUL_ADDR = "127.0.0.1:8500"


def lmesh_home() -> Path:
    """Where services keep state when no data directory is given (LMESH_HOME, default ./.lmesh)."""
    return Path(os.environ.get("LMESH_HOME", ".lmesh")).resolve()


def lmesh_cache() -> Path:
    """Where downloaded artifacts and built models are cached (LMESH_CACHE, default ~/.cache/lmesh)."""
    return Path(os.environ.get("LMESH_CACHE", Path.home() / ".cache" / "lmesh")).resolve()


def consul_addr() -> str:
    """The Consul HTTP address, from the standard CONSUL_HTTP_ADDR."""
    return os.environ.get("CONSUL_HTTP_ADDR", DEFAULT_CONSUL_ADDR)


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of one service process."""

    service: str
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str = ""
    consul_addr: str = DEFAULT_CONSUL_ADDR
    data_dir: Path = field(default_factory=lambda: lmesh_home())
    grace_s: float = 10.0
    # Service-specific settings (e.g. the models an inference replica serves).
    extra: dict[str, str] = field(default_factory=dict, repr=False)  # may hold secrets (admin token)

    @property
    def consul_service_name(self) -> str:
        return f"lmesh-{self.service}"

    @property
    def address(self) -> str:
        return self.advertise_host or self.host


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=os.environ.get("LMESH_HOST", "127.0.0.1"), help="bind address")
    parser.add_argument("--port", type=int, default=int(os.environ.get("LMESH_PORT", "0")),
                        help="gRPC port (0 picks a free one; peers find it through Consul)")
    parser.add_argument("--advertise-host", default=os.environ.get("LMESH_ADVERTISE_HOST", ""),
                        help="address registered in Consul (default: the bind address)")
    parser.add_argument("--data-dir", default=None, help="state directory (default: $LMESH_HOME/<service>)")
    parser.add_argument("--grace", type=float, default=float(os.environ.get("LMESH_GRACE_S", "10")),
                        help="seconds in-flight calls get to finish on SIGTERM")


def config_from_args(service: str, args: argparse.Namespace, extra: dict[str, str] | None = None) -> ServiceConfig:
    data_dir = Path(args.data_dir).resolve() if args.data_dir else lmesh_home() / service
    return ServiceConfig(
        service=service,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        consul_addr=consul_addr(),
        data_dir=data_dir,
        grace_s=args.grace,
        extra=extra or {},
    )
