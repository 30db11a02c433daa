"""Typed settings declared once (services/common/config.py): flags, environment fallbacks, defaults and checks
all come from one dataclass per service."""

from __future__ import annotations

import argparse
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.cli import SERVICES, build_parser, main
from services.common.config import (
    ConfigError,
    ServiceConfig,
    add_setting_arguments,
    config_from_args,
    int_type,
    lmesh_home,
    setting,
    settings_from_args,
)
from services.gateway.main import GatewaySettings
from services.inference.engine import EngineLimits
from services.inference.main import InferenceSettings
from services.policy.main import PolicySettings
from services.registry.main import RegistrySettings
from services.tokenizer.loader import TokenizerCache
from services.tokenizer.main import TokenizerSettings

SETTING_VARIABLES = ("LMESH_HOST", "LMESH_PORT", "LMESH_ADVERTISE_HOST", "LMESH_GRACE_S", "LMESH_LOG_LEVEL",
                     "LMESH_MTLS", "LMESH_MAX_ACTIVE", "LMESH_MAX_QUEUE", "LMESH_ORT_THREADS", "LMESH_PREFILL_CHUNK",
                     "LMESH_PREFIX_CACHE_MB", "LMESH_RESOLVE_TTL_S", "LMESH_TOKENIZER_MAX_MODELS", "LMESH_TLS_CERT",
                     "LMESH_TLS_KEY", "LMESH_TLS_CLIENT_CA", "LMESH_TLS_CLIENT_CERT_PORT", "LMESH_ADMIN_TOKEN",
                     "LMESH_METRICS_PORT", "CONSUL_HTTP_ADDR")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*SETTING_VARIABLES, "LMESH_TEST_N", "LMESH_TEST_SECRET", "LMESH_TEST_SWITCH"):
        monkeypatch.delenv(name, raising=False)


@dataclass(frozen=True)
class Toy:
    n: int = setting(flag="--n", env="LMESH_TEST_N", default=3, parse=int_type(1), help="a count, ≥ 1")
    tags: tuple[str, ...] = setting(flag="--tag", repeatable=True, default=("a",), help="a tag; repeatable")
    switch: int = setting(env="LMESH_TEST_SWITCH", default=0, parse=int_type(0, 1), help="0 or 1")
    secret: str | None = setting(env="LMESH_TEST_SECRET", secret=True, default=None, help="a token")


def toy(*argv: str) -> Toy:
    parser = argparse.ArgumentParser(prog="toy")
    add_setting_arguments(parser, Toy)
    return settings_from_args(Toy, parser.parse_args(list(argv)))


# ---- the declaration helper ---------------------------------------------------------------------------------

def test_a_flag_beats_its_variable_which_beats_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert toy() == Toy() == Toy(n=3, tags=("a",), switch=0, secret=None)
    monkeypatch.setenv("LMESH_TEST_N", " 7 ")
    assert toy().n == 7
    assert toy("--n", "9").n == 9
    monkeypatch.setenv("LMESH_TEST_N", "")  # empty counts as unset
    assert toy().n == 3
    assert toy("--tag", "x", "--tag", "y").tags == ("x", "y")


def test_a_bad_variable_names_it_only_when_it_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMESH_TEST_N", "0")
    with pytest.raises(ConfigError, match=r"^LMESH_TEST_N must be an integer ≥ 1, got '0'$"):
        toy()
    assert toy("--n", "2").n == 2  # a flag given: the variable is never read
    monkeypatch.setenv("LMESH_TEST_SWITCH", "2")
    with pytest.raises(ConfigError, match=r"^LMESH_TEST_SWITCH must be an integer from 0 to 1, got '2'$"):
        toy("--n", "2")


def test_a_bad_flag_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        toy("--n", "0")
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "toy: error: argument --n: must be an integer ≥ 1, got '0'"


def test_a_secret_stays_out_of_reprs_and_off_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMESH_TEST_SECRET", "s3cret")
    settings = toy()
    assert settings.secret == "s3cret"
    assert "s3cret" not in repr(settings) and "s3cret" not in repr(ServiceConfig("x", settings=settings))
    assert "s3cret" not in repr(PolicySettings(admin_token="s3cret"))
    assert "s3cret" not in repr(RegistrySettings(admin_token="s3cret"))
    with pytest.raises(TypeError, match="environment only"):
        setting(flag="--token", env="LMESH_TEST_SECRET", secret=True, default=None, help="a token")
    with pytest.raises(TypeError, match="needs a flag, an environment variable or both"):
        setting(default=1, help="nothing gives it")


# ---- each service's declaration ------------------------------------------------------------------------------

def test_the_declared_defaults_are_those_used_before() -> None:
    inference = InferenceSettings()
    assert (inference.models, inference.max_active, inference.max_queue, inference.threads, inference.prefill_chunk,
            inference.prefix_cache_mb) == (("default",), 16, 64, 0, 256, 256)
    limits = EngineLimits()  # what the engine takes when given nothing
    assert (limits.max_active, limits.max_queue, limits.prefill_chunk, limits.prefix_cache_bytes) == (
        inference.max_active, inference.max_queue, inference.prefill_chunk, inference.prefix_cache_mb << 20)
    tokenizer = TokenizerSettings()
    assert (tokenizer.resolve_ttl_s, tokenizer.max_models) == (5.0, 8)
    cache = inspect.signature(TokenizerCache).parameters
    assert (cache["resolve_ttl_s"].default, cache["max_models"].default) == (5.0, 8)
    assert PolicySettings().admin_token is None and RegistrySettings().admin_token is None
    assert GatewaySettings() == GatewaySettings(tls_cert=None, tls_key=None, tls_client_ca=None)
    common = ServiceConfig("policy")
    assert (common.host, common.port, common.advertise_host, common.consul_addr, common.grace_s, common.log_level,
            common.mtls) == ("127.0.0.1", 0, "", "127.0.0.1:8500", 10.0, "INFO", True)
    assert common.data_dir == lmesh_home() / "policy"


@pytest.mark.parametrize("service", SERVICES)
def test_lmesh_serve_with_nothing_set_gets_the_declared_defaults(service: str) -> None:
    module = __import__(f"services.{service}.main", fromlist=["SETTINGS"])
    config = config_from_args(service, build_parser().parse_args(["serve", service]), module.SETTINGS)
    assert config == ServiceConfig(service, settings=module.SETTINGS())
    assert config.settings_as(module.SETTINGS) == module.SETTINGS()


def test_flags_and_variables_reach_the_typed_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LMESH_MAX_QUEUE", "5")
    monkeypatch.setenv("LMESH_GRACE_S", "2.5")
    monkeypatch.setenv("LMESH_MTLS", "OFF")
    args = build_parser().parse_args(["serve", "inference", "--model", "a:1", "--model", "b", "--max-active", "2",
                                      "--data-dir", str(tmp_path), "--log-level", "debug"])
    config = config_from_args("inference", args, InferenceSettings)
    assert config.settings == InferenceSettings(models=("a:1", "b"), max_active=2, max_queue=5)
    assert (config.grace_s, config.log_level, config.mtls, config.data_dir) == (2.5, "DEBUG", False, tmp_path)


def test_a_service_given_another_services_settings_says_so() -> None:
    with pytest.raises(TypeError, match="lmesh-tokenizer takes TokenizerSettings, not InferenceSettings"):
        ServiceConfig("tokenizer", settings=InferenceSettings()).settings_as(TokenizerSettings)


# ---- LMESH_MTLS and the gateway's TLS files ------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [("on", True), ("off", False), ("Off", False), (" ON ", True),
                                                 ("", True)])
def test_mtls_is_on_or_off(value: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMESH_MTLS", value)
    assert config_from_args("registry", build_parser().parse_args(["serve", "registry"])).mtls is expected


@pytest.mark.parametrize("service", ["policy", "gateway"])
def test_a_bad_mtls_is_one_line_naming_it(service: str, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LMESH_MTLS", "yes")
    assert main(["serve", service, "--data-dir", "/nonexistent/never-used"]) == 2
    assert capsys.readouterr().err == "lmesh: LMESH_MTLS must be on or off, got 'yes'\n"


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    for path in files.values():
        path.write_text("-----BEGIN-----\n")
    return files


def test_tls_files_from_flags_or_variables(pem: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve", "gateway", "--tls-cert", str(pem["cert"]), "--tls-key",
                                      str(pem["key"])])
    assert config_from_args("gateway", args, GatewaySettings).settings == GatewaySettings(pem["cert"], pem["key"])
    monkeypatch.setenv("LMESH_TLS_CERT", str(pem["cert"]))
    monkeypatch.setenv("LMESH_TLS_KEY", str(pem["key"]))
    monkeypatch.setenv("LMESH_TLS_CLIENT_CA", str(pem["ca"]))
    config = config_from_args("gateway", build_parser().parse_args(["serve", "gateway"]), GatewaySettings)
    assert config.settings == GatewaySettings(pem["cert"], pem["key"], pem["ca"])


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (["--tls-cert", "{cert}"], {}, "--tls-cert (LMESH_TLS_CERT) is set without --tls-key (LMESH_TLS_KEY): a TLS "
                                   "certificate and its key go together"),
    ([], {"LMESH_TLS_KEY": "{key}"}, "--tls-key (LMESH_TLS_KEY) is set without --tls-cert (LMESH_TLS_CERT): a TLS "
                                     "certificate and its key go together"),
    (["--tls-client-ca", "{ca}"], {}, "--tls-client-ca (LMESH_TLS_CLIENT_CA) is set without --tls-cert "
                                      "(LMESH_TLS_CERT) and --tls-key (LMESH_TLS_KEY): client certificates are "
                                      "checked only on a TLS port"),
    ([], {"LMESH_TLS_CERT": "{cert}", "LMESH_TLS_KEY": "{missing}"},
     "LMESH_TLS_KEY must be a readable file, got '{missing}' (no such file)"),
    ([], {"LMESH_TLS_CLIENT_CA": "{dir}"}, "LMESH_TLS_CLIENT_CA must be a readable file, got '{dir}' (a directory)"),
    (["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-client-cert-port", "50052"], {},
     "--tls-client-cert-port (LMESH_TLS_CLIENT_CERT_PORT) is set without --tls-client-ca (LMESH_TLS_CLIENT_CA): the "
     "client-certificate port is served only with a client CA"),
    ([], {"LMESH_TLS_CLIENT_CERT_PORT": "port"},
     "LMESH_TLS_CLIENT_CERT_PORT must be an integer from 0 to 65535, got 'port'"),
])
def test_bad_tls_settings_are_one_line(argv: list[str], env: dict[str, str], expected: str, pem: dict[str, Path],
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    names = {**{name: str(path) for name, path in pem.items()}, "missing": str(pem["cert"].parent / "nope.pem"),
             "dir": str(pem["cert"].parent)}
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(**names))
    argv = [arg.format(**names) for arg in argv]
    assert main(["serve", "gateway", *argv, "--data-dir", "/nonexistent/never-used"]) == 2
    assert capsys.readouterr().err == f"lmesh: {expected.format(**names)}\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_tls_flag_is_an_argparse_error_naming_it(pem: dict[str, Path],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    pem["key"].chmod(0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "gateway", "--tls-cert", str(pem["cert"]), "--tls-key", str(pem["key"])])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"lmesh serve gateway: error: argument --tls-key: must be a readable file, got {str(pem['key'])!r} "
        "(not readable by this user)")


def test_a_missing_tls_flag_file_is_an_argparse_error_naming_it(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "gateway", "--tls-cert", str(tmp_path / "nope.pem")])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"lmesh serve gateway: error: argument --tls-cert: must be a readable file, got "
        f"{str(tmp_path / 'nope.pem')!r} (no such file)")


def test_help_lists_the_environment_only_settings_whatever_they_hold(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("LMESH_MTLS", "LMESH_TLS_CERT", "LMESH_TLS_KEY", "CONSUL_HTTP_ADDR"):
        monkeypatch.setenv(name, "bad")
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "policy", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "environment only (no flag):" in out and "LMESH_MTLS" in out and "LMESH_ADMIN_TOKEN" in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "gateway", "--help"])
    out = capsys.readouterr().out
    assert "--tls-cert FILE" in out and "$LMESH_TLS_CLIENT_CA" in out and "LMESH_ADMIN_TOKEN" not in out


def test_cors_origins_from_a_flag_or_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMESH_HTTP_CORS_ORIGINS", "https://chat.example.com, http://localhost:3000")
    config = config_from_args("gateway", build_parser().parse_args(["serve", "gateway"]), GatewaySettings)
    assert config.settings_as(GatewaySettings).http_cors_origins == ("https://chat.example.com",
                                                                     "http://localhost:3000")
    args = build_parser().parse_args(["serve", "gateway", "--http-cors-origins", "*"])
    assert config_from_args("gateway", args, GatewaySettings).settings_as(GatewaySettings).http_cors_origins == ("*",)
    monkeypatch.delenv("LMESH_HTTP_CORS_ORIGINS")
    assert GatewaySettings().http_cors_origins == ()  # none: browsers' pages get no answers they may read


@pytest.mark.parametrize("value, why", [
    ("chat.example.com", "'chat.example.com' is not scheme://host[:port] in lower case, without a path"),
    ("https://chat.example.com/", "'https://chat.example.com/' is not scheme://host[:port] in lower case, without a "
                                  "path"),
    ("https://Chat.example.com", "'https://Chat.example.com' is not scheme://host[:port] in lower case, without a "
                                 "path"),
    ("ftp://files.example.com", "'ftp://files.example.com' is not scheme://host[:port] in lower case, without a path"),
    ("https://a.example.com,http://b:99999", "'http://b:99999' has a bad port"),
])
def test_a_bad_cors_origin_is_one_line_naming_it(value: str, why: str, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LMESH_HTTP_CORS_ORIGINS", value)
    assert main(["serve", "gateway", "--data-dir", "/nonexistent/never-used"]) == 2
    assert capsys.readouterr().err == (f"lmesh: LMESH_HTTP_CORS_ORIGINS must be comma-separated web origins "
                                       f"(scheme://host[:port]) or *, got {value!r} ({why})\n")
