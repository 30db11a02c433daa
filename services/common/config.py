"""Configuration: each service declares its typed settings once, and flags, environment fallbacks, defaults,
checks and `--help` are all derived from that one declaration.

    @dataclass(frozen=True)
    class TokenizerSettings:
        max_models: int = setting(flag="--max-models", env="LMESH_TOKENIZER_MAX_MODELS", default=8,
                                  parse=int_type(1), help="model versions whose tokenizers are kept loaded, ≥ 1")

`add_setting_arguments(parser, TokenizerSettings)` adds `--max-models` (default: $LMESH_TOKENIZER_MAX_MODELS,
then 8); `settings_from_args(TokenizerSettings, args)` builds the typed object (a flag beats its variable, which
beats the default); in-process callers and tests write `TokenizerSettings(max_models=2)`, the rest from the
declaration. `ServiceConfig` declares the settings every service shares the same way, and carries the service's
own settings object (`config.settings_as(TokenizerSettings)`).

Environment fallbacks are checked only when used (a flag left out, a command that reads them), so a bad value
in one variable never breaks an unrelated command, `--help` included; it fails in one line naming the variable.
A secret (`secret=True`) is read from the environment only, never a flag (a flag would show it to every user in
`ps`), and is left out of reprs, so logging a config never prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
import shutil
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

DEFAULT_CONSUL_ADDR = "127.0.0.1:8500"
DEFAULT_CONSUL_PORT = 8500
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})

T = TypeVar("T")
S = TypeVar("S")


class ConfigError(Exception):
    """A bad setting (an environment variable, or settings that do not go together); its message names the
    variable or flag and what it must be.

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


class Because(ValueError):
    """A bad value with the reason why, which the message adds: `must be a readable file, got 'x' (no such
    file)`."""


def _checked(parse: Callable[[str], T], expected: str) -> Callable[[str], T]:
    """An argparse type from `parse` (which raises ValueError on a bad value): a bad flag is an argparse error,
    a bad environment default a ConfigError, both saying what the value must be."""

    def convert(value: str) -> T:
        try:
            return parse(value.strip())
        except ValueError as exc:
            why = f" ({exc})" if isinstance(exc, Because) else ""
            env = getattr(value, "env", "")
            if env:
                raise ConfigError(f"{env} must be {expected}, got {str(value)!r}{why}") from None
            raise argparse.ArgumentTypeError(f"must be {expected}, got {value!r}{why}") from None

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


def _on_off(text: str) -> bool:
    if text.lower() not in ("on", "off"):
        raise ValueError(text)
    return text.lower() == "on"


ON_OFF_TYPE = _checked(_on_off, "on or off")


def choice_type(choices: tuple[str, ...]) -> Callable[[str], str]:
    """An argparse type for one of `choices` (any case; given back in lower case)."""

    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(text)
        return text.lower()

    return _checked(parse, " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices))


def _readable_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not text:
        raise ValueError(text)
    if path.exists() and not path.is_file():  # a directory, or a FIFO that opening would block on
        raise Because("a directory" if path.is_dir() else "not a regular file")
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise Because("no such file") from None
    except PermissionError:
        raise Because("not readable by this user") from None
    except OSError as exc:
        raise Because((exc.strerror or type(exc).__name__).lower()) from None
    return path


READABLE_FILE_TYPE = _checked(_readable_file, "a readable file")


def _directory(text: str) -> Path | None:
    """A directory flag's value, absolute; empty means the default."""
    return Path(text).resolve() if text else None


def split_consul_addr(addr: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a CONSUL_HTTP_ADDR-style address: `host[:port]` or `http(s)://host[:port]`."""
    parts = urlsplit(addr if "//" in addr else f"//{addr}")
    port = parts.port  # raises ValueError for a port that is not a number in 0-65535
    if (parts.scheme not in ("", "http", "https") or not parts.hostname or parts.path not in ("", "/")
            or port == 0):
        raise ValueError(addr)
    return parts.scheme or "http", parts.hostname, port or DEFAULT_CONSUL_PORT


def _consul(text: str) -> str:
    split_consul_addr(text)
    return text


CONSUL_ADDR_TYPE = _checked(_consul, "host[:port] or http(s)://host[:port] with a port from 1 to 65535")


def _origins(text: str) -> tuple[str, ...]:
    """Web origins, comma-separated, as browsers send them in `Origin` (`https://chat.example.com`,
    `http://localhost:3000`), or `*`; empty: none."""
    origins = tuple(part.strip() for part in text.split(",") if part.strip())
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
        except ValueError:
            raise Because(f"{origin!r} has a bad port") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query or \
                parts.fragment or parts.username or origin != f"{parts.scheme}://{parts.netloc}".lower():
            raise Because(f"{origin!r} is not scheme://host[:port] in lower case, without a path")
    return origins


ORIGINS_TYPE = _checked(_origins, "comma-separated web origins (scheme://host[:port]) or *")


# ---- the declaration helper ---------------------------------------------------------------------------------

_SETTING = "lmesh.setting"  # the dataclass field metadata key a Setting travels under


@dataclass(frozen=True)
class Setting:
    """How one settings field is given: its flag and/or environment variable, how text becomes its value, its
    help. Made by `setting()`, kept in the dataclass field's metadata."""

    flag: str | None
    env: str | None
    parse: Callable[[str], Any]
    help: str
    default_help: str  # how --help shows the default when the value itself does not say it well
    secret: bool
    repeatable: bool
    metavar: str | None
    choices: tuple[str, ...] | None

    @property
    def dest(self) -> str:
        """The argparse attribute of its flag (`--max-active` → `max_active`)."""
        assert self.flag is not None
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def names(self) -> str:
        """How a message names it: `--tls-key (LMESH_TLS_KEY)`, `--model` or `LMESH_MTLS`."""
        if self.flag and self.env:
            return f"{self.flag} ({self.env})"
        return self.flag or self.env or "?"


def setting(*, help: str, default: Any = dataclasses.MISSING,
            default_factory: Callable[[], Any] | Any = dataclasses.MISSING, flag: str | None = None,
            env: str | None = None, parse: Callable[[str], Any] = str.strip, default_help: str = "",
            secret: bool = False, repeatable: bool = False, metavar: str | None = None,
            choices: tuple[str, ...] | None = None) -> Any:
    """A settings dataclass field given by `flag` (argparse, its value parsed by `parse`) and/or by the
    environment variable `env` (a flag beats it; unset or empty means the default). `parse` raises ValueError for
    a bad value (use `int_type`, `float_type`, ... for messages that say what it must be). A `secret` is read
    from `env` only, taken as it is, and never shown in a repr; a `repeatable` flag (action=append) gives a
    tuple."""
    if not flag and not env:
        raise TypeError("a setting needs a flag, an environment variable or both")
    if secret and (flag or parse is not str.strip):
        raise TypeError(f"secret {env}: read from the environment only, never a flag (it would show in `ps`), "
                        "and never parsed (a message would quote it)")
    if repeatable and (env or not flag):
        raise TypeError(f"{flag or env}: a repeatable setting is a flag without an environment variable")
    spec = Setting(flag=flag, env=env, parse=parse, help=help, default_help=default_help, secret=secret,
                   repeatable=repeatable, metavar=metavar, choices=choices)
    return field(default=default, default_factory=default_factory, repr=not secret,
                 metadata={_SETTING: spec})


def declared(settings: type[Any] | Any) -> Iterator[tuple[dataclasses.Field[Any], Setting]]:
    """The fields of a settings dataclass (class or instance) declared with `setting()`, in order."""
    for f in dataclasses.fields(settings):
        spec = f.metadata.get(_SETTING)
        if spec is not None:
            yield f, spec


def setting_names(settings: type[Any] | Any, name: str) -> str:
    """How a message names field `name` of a settings class: its flag and/or variable (`--tls-key
    (LMESH_TLS_KEY)`), from the one declaration."""
    for f, spec in declared(settings):
        if f.name == name:
            return spec.names
    raise KeyError(name)


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown(f: dataclasses.Field[Any], spec: Setting) -> str:
    if spec.default_help:
        return spec.default_help
    value = _default_of(f)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return "unset" if value is None else str(value)


def add_setting_arguments(parser: argparse.ArgumentParser, settings: type[Any]) -> None:
    """Adds the flags a settings class declares. A flag's default is its variable's value, parsed only when the
    flag is left out (so it is the variable a bad value names), else the declared default."""
    for f, spec in declared(settings):
        if not spec.flag:
            continue
        help_text = f"{spec.help} (default: " + (f"${spec.env}, then " if spec.env else "") + f"{_shown(f, spec)})"
        if spec.repeatable:
            parser.add_argument(spec.flag, action="append", type=spec.parse, default=None, metavar=spec.metavar,
                                help=help_text)
            continue
        raw = os.environ.get(spec.env, "").strip() if spec.env else ""
        default = EnvDefault(spec.env, "") if spec.env and raw else _default_of(f)
        parser.add_argument(spec.flag, type=spec.parse, default=default, metavar=spec.metavar, choices=spec.choices,
                            help=help_text)


def environment_help(*settings: type[Any]) -> str:
    """`--help`'s epilog: the settings read from the environment only (no flag), so they are not missed."""
    rows = [(spec.env, f"{spec.help} (default: {_shown(f, spec)})") for cls in settings
            for f, spec in declared(cls) if spec.env and not spec.flag]
    if not rows:
        return ""
    width = shutil.get_terminal_size().columns - 2  # as argparse's own formatter
    lines = ["environment only (no flag):"]
    for env, text in rows:
        lines += textwrap.wrap(text, max(width, 60), initial_indent=f"  {env:20} ", subsequent_indent=" " * 23)
    return "\n".join(lines)


def _from_env(f: dataclasses.Field[Any], spec: Setting) -> Any:
    """An environment-only setting: its variable parsed (a ConfigError names it), or the declared default."""
    assert spec.env is not None
    if spec.secret:  # taken as it is, as the callers that send it do (services/common/admin.py)
        return os.environ.get(spec.env) or _default_of(f)
    if not os.environ.get(spec.env, "").strip():
        return _default_of(f)
    return spec.parse(EnvDefault(spec.env, ""))


def settings_from_args(kind: type[S], args: argparse.Namespace, /, **given: Any) -> S:
    """The typed settings object from parsed flags (each already its flag, else its variable, else its default)
    and the environment-only settings, read now; `given` fields win. A bad environment-only value, or settings
    that do not go together (the class's __post_init__), is a ConfigError."""
    values: dict[str, Any] = {}
    for f, spec in declared(kind):
        if f.name in given:
            continue
        if not spec.flag:
            values[f.name] = _from_env(f, spec)
            continue
        value = getattr(args, spec.dest, None)
        if value is not None:
            values[f.name] = tuple(value) if spec.repeatable else value
    return kind(**values, **given)


# ---- what every service shares ------------------------------------------------------------------------------

def lmesh_home() -> Path:
    """Where services keep state when no data directory is given (LMESH_HOME, default ./.lmesh)."""
    return Path(os.environ.get("LMESH_HOME", ".lmesh")).resolve()


def lmesh_cache() -> Path:
    """Where downloaded artifacts and built models are cached (LMESH_CACHE, default ~/.cache/lmesh)."""
    return Path(os.environ.get("LMESH_CACHE", Path.home() / ".cache" / "lmesh")).resolve()


def env_int(name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    """The integer in environment variable `name` (`default` when unset or empty); ConfigError when malformed."""
    return int_type(minimum, maximum)(EnvDefault(name, str(default)))


def consul_addr() -> str:
    """The Consul HTTP address, from the standard CONSUL_HTTP_ADDR (empty counts as unset, as in Consul's CLI)."""
    return CONSUL_ADDR_TYPE(EnvDefault("CONSUL_HTTP_ADDR", DEFAULT_CONSUL_ADDR))


@dataclass(frozen=True)
class ServiceConfig:
    """Settings of one service process: those every service shares, declared here, and the service's own typed
    settings object (`settings`, declared in its main.py)."""

    service: str
    host: str = setting(flag="--host", env="LMESH_HOST", default="127.0.0.1",
                        help="bind address (0.0.0.0: every interface)")
    port: int = setting(flag="--port", env="LMESH_PORT", default=0, parse=PORT_TYPE, default_help="0: a free one",
                        help="gRPC port, 0-65535 (peers find it through Consul)")
    advertise_host: str = setting(
        flag="--advertise-host", env="LMESH_ADVERTISE_HOST", default="", parse=ADDRESS_TYPE,
        help="address registered in Consul",
        default_help="the bind address; for a wildcard bind, the local address that routes to Consul")
    consul_addr: str = setting(env="CONSUL_HTTP_ADDR", default=DEFAULT_CONSUL_ADDR, parse=CONSUL_ADDR_TYPE,
                               help="the Consul agent: host[:port] or http(s)://host[:port]")
    # None (the default): LMESH_HOME/<service>, filled in by __post_init__, so it is always a Path once made.
    data_dir: Path = setting(flag="--data-dir", default=None, parse=_directory, default_help="$LMESH_HOME/<service>",
                             help="state directory")
    grace_s: float = setting(flag="--grace", env="LMESH_GRACE_S", default=10.0, parse=float_type(0),
                             help="seconds in-flight calls get to finish on SIGTERM")
    log_level: str = setting(flag="--log-level", env="LMESH_LOG_LEVEL", default="INFO", parse=log_level_type,
                             choices=LOG_LEVELS, help="log level, any case")
    mtls: bool = setting(env="LMESH_MTLS", default=True, parse=ON_OFF_TYPE,
                         help="on or off: mutual TLS between the mesh's services with Consul Connect "
                              "certificates, callers checked against Consul intentions; off only for debugging")
    health_port: int = setting(flag="--health-port", env="LMESH_HEALTH_PORT", default=0, parse=PORT_TYPE,
                               default_help="0: a free one",
                               help="with mTLS, the port serving grpc.health alone over server-only TLS (for "
                                    "Consul's check and probes)")
    metrics_port: int = setting(flag="--metrics-port", env="LMESH_METRICS_PORT", default=0, parse=PORT_TYPE,
                                default_help="0: a free one",
                                help="the plain-HTTP port of the Prometheus endpoint /metrics (Consul meta "
                                     "`metrics_port`; served unless OTEL_METRICS_EXPORTER leaves out prometheus)")
    # The service's own typed settings (InferenceSettings, ...); None: its declared defaults.
    settings: object | None = None

    def __post_init__(self) -> None:
        if self.data_dir is None:
            object.__setattr__(self, "data_dir", lmesh_home() / self.service)

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

    def settings_as(self, kind: type[S]) -> S:
        """The service's own settings, typed: `settings` if it is a `kind`, `kind()` (the declared defaults) when
        none were given."""
        if self.settings is None:
            return kind()
        if not isinstance(self.settings, kind):
            raise TypeError(f"lmesh-{self.service} takes {kind.__name__}, not {type(self.settings).__name__}")
        return self.settings


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every `lmesh serve SERVICE` takes, from ServiceConfig's declaration."""
    add_setting_arguments(parser, ServiceConfig)


def add_serve_arguments(parser: argparse.ArgumentParser, settings: type[Any]) -> None:
    """`lmesh serve SERVICE`'s flags, common and the service's own (class `settings`), with the settings read
    from the environment only listed after them in --help."""
    add_common_arguments(parser)
    add_setting_arguments(parser, settings)
    parser.epilog = environment_help(ServiceConfig, settings)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def config_from_args(service: str, args: argparse.Namespace, settings: type[Any] | None = None) -> ServiceConfig:
    """`lmesh serve SERVICE`'s config: the common settings, and the service's own (class `settings`), from the
    parsed flags and the environment."""
    own = settings_from_args(settings, args) if settings is not None else None
    return settings_from_args(ServiceConfig, args, service=service, settings=own)


def host_port(host: str, port: int) -> str:
    """`host:port` as gRPC and Consul's checks take it: an IPv6 literal in brackets, an empty host (every
    interface) as 0.0.0.0."""
    host = host or "0.0.0.0"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
