"""Configuration every service shares, read from flags with environment fallbacks.

Environment fallbacks are checked only when used (a flag left out, a command that reads them), so a bad value
in one variable never breaks an unrelated command, `--help` included; it fails in one line naming the variable.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

DEFAULT_CONSUL_ADDR = "127.0.0.1:8500"
DEFAULT_CONSUL_PORT = 8500
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})

T = TypeVar("T")


class ConfigError(Exception):
    """A bad environment setting; its message names the variable and what it must be.

    Deliberately not a ValueError: argparse turns those raised by a flag's type into a message about the flag.
    """


class EnvDefault(str):
    """A flag's default taken from an environment variable (or `fallback` when unset or empty), parsed by the
    flag's type only when the flag is left out, which then names the variable if the value is bad."""

    env: str

    def __new__(cls, env: str, fallback: str) -> EnvDefault:
        raw = os.environ.get(env, "").strip()
        value = super().__new__(cls, raw or fallback)
        value.env = env if raw else ""
        return value


def _checked(parse: Callable[[str], T], expected: str) -> Callable[[str], T]:
    """An argparse type from `parse` (which raises ValueError on a bad value): a bad flag is an argparse error,
    a bad environment default a ConfigError, both saying what the value must be."""

    def convert(value: str) -> T:
        try:
            return parse(value.strip())
        except ValueError:
            env = getattr(value, "env", "")
            if env:
                raise ConfigError(f"{env} must be {expected}, got {str(value)!r}") from None
            raise argparse.ArgumentTypeError(f"must be {expected}, got {value!r}") from None

    return convert


def int_type(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type for an integer in [minimum, maximum]."""
    expected = f"an integer ≥ {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"

    def parse(text: str) -> int:
        number = int(text)
        if number < minimum or (maximum is not None and number > maximum):
            raise ValueError(text)
        return number

    return _checked(parse, expected)


def float_type(minimum: float) -> Callable[[str], float]:
    """An argparse type for a finite number ≥ minimum."""

    def parse(text: str) -> float:
        number = float(text)
        if not math.isfinite(number) or number < minimum:
            raise ValueError(text)
        return number

    return _checked(parse, f"a number ≥ {minimum:g}")


def _address(text: str) -> str:
    """An address peers and Consul can dial: an IP literal (IPv6 with or without brackets) or a DNS name."""
    text = text.strip()
    if not text:
        return text
    try:
        ipaddress.ip_address(text.strip("[]"))
        return text
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if len(text) > 253 or not all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label)
                                  for label in labels):
        raise ValueError(text)
    return text


ADDRESS_TYPE = _checked(_address, "an IP address or a host name")


def _level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise ValueError(text)
    return text.upper()


log_level_type = _checked(_level, "one of " + ", ".join(LOG_LEVELS))
PORT_TYPE = int_type(0, 65535)


def env_int(name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    """The integer in environment variable `name` (`default` when unset or empty); ConfigError when malformed."""
    return int_type(minimum, maximum)(EnvDefault(name, str(default)))


def lmesh_home() -> Path:
    """Where services keep state when no data directory is given (LMESH_HOME, default ./.lmesh)."""
    return Path(os.environ.get("LMESH_HOME", ".lmesh")).resolve()


def lmesh_cache() -> Path:
    """Where downloaded artifacts and built models are cached (LMESH_CACHE, default ~/.cache/lmesh)."""
    return Path(os.environ.get("LMESH_CACHE", Path.home() / ".cache" / "lmesh")).resolve()


def split_consul_addr(addr: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a CONSUL_HTTP_ADDR-style address: `host[:port]` or `http(s)://host[:port]`."""
    parts = urlsplit(addr if "//" in addr else f"//{addr}")
    port = parts.port  # raises ValueError for a port that is not a number in 0-65535
    if (parts.scheme not in ("", "http", "https") or not parts.hostname or parts.path not in ("", "/")
            or port == 0):
        raise ValueError(addr)
    return parts.scheme or "http", parts.hostname, port or DEFAULT_CONSUL_PORT


def consul_addr() -> str:
    """The Consul HTTP address, from the standard CONSUL_HTTP_ADDR (empty counts as unset, as in Consul's CLI)."""
    addr = os.environ.get("CONSUL_HTTP_ADDR", "").strip() or DEFAULT_CONSUL_ADDR
    try:
        split_consul_addr(addr)
    except ValueError:
        raise ConfigError(f"CONSUL_HTTP_ADDR must be host[:port] or http(s)://host[:port] with a port from 1 to "
                          f"65535, got {addr!r}") from None
    return addr


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

    @property
    def binds_wildcard(self) -> bool:
        """Whether it listens on every interface, so the bind address cannot be what peers dial."""
        return self.host.strip() in WILDCARD_HOSTS


def add_env_argument(parser: argparse.ArgumentParser, flag: str, env: str, fallback: str, description: str, *,
                     type: Callable[[str], Any] = str, fallback_help: str = "",
                     choices: tuple[str, ...] | None = None) -> None:
    """A flag whose default is $env, then `fallback` (checked by `type` only when the flag is left out)."""
    parser.add_argument(flag, type=type, choices=choices, default=EnvDefault(env, fallback),
                        help=f"{description} (default: ${env}, then {fallback_help or fallback})")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    add_env_argument(parser, "--host", "LMESH_HOST", "127.0.0.1", "bind address (0.0.0.0: every interface)")
    add_env_argument(parser, "--port", "LMESH_PORT", "0", "gRPC port, 0-65535 (peers find it through Consul)",
                     type=PORT_TYPE, fallback_help="0: a free one")
    add_env_argument(parser, "--advertise-host", "LMESH_ADVERTISE_HOST", "", "address registered in Consul",
                     type=ADDRESS_TYPE,
                     fallback_help="the bind address; for a wildcard bind, the local address that routes to Consul")
    parser.add_argument("--data-dir", default=None, help="state directory (default: $LMESH_HOME/<service>)")
    add_env_argument(parser, "--grace", "LMESH_GRACE_S", "10", "seconds in-flight calls get to finish on SIGTERM",
                     type=float_type(0))
    add_env_argument(parser, "--log-level", "LMESH_LOG_LEVEL", "INFO", "log level, any case", type=log_level_type,
                     choices=LOG_LEVELS)


def config_from_args(service: str, args: argparse.Namespace, extra: dict[str, str] | None = None) -> ServiceConfig:
    data_dir = Path(args.data_dir).resolve() if args.data_dir else lmesh_home() / service
    return ServiceConfig(
        service=service,
        host=args.host.strip(),
        port=args.port,
        advertise_host=args.advertise_host.strip(),
        consul_addr=consul_addr(),
        data_dir=data_dir,
        grace_s=args.grace,
        extra=extra or {},
    )


def host_port(host: str, port: int) -> str:
    """`host:port` as gRPC and Consul's checks take it: an IPv6 literal in brackets, an empty host (every
    interface) as 0.0.0.0."""
    host = host or "0.0.0.0"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
