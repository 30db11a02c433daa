"""Operator mistakes (bad flags, environment, addresses, paths) end in one `lmesh: ...` line, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from services.cli import _unavailable, build_parser, main
from services.common.config import ConfigError, config_from_args, consul_addr, env_int
from services.common.consul_agent import ConsulAgent, consul_answers, free_port, probe_consul
from services.common.server import setup_logging
from tests.tls_certs import Pki

ROOT = Path(__file__).resolve().parent.parent
LMESH = [sys.executable, "-m", "services.cli"]


def lmesh(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LMESH, *args], env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single `lmesh: ...` line a failed command printed (and nothing else)."""
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmesh: "), result.stderr
    return lines[0]


def unused_addr() -> str:
    """host:port where nothing listens (a port just freed)."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def grpc_port() -> Iterator[int]:
    """A port where a gRPC server (not Consul) answers, as an operator might mistake it for Consul's."""
    server = grpc.server(ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


# ---- 2, 5: environment defaults and flag values --------------------------------------------------------------

@pytest.mark.parametrize(("var", "value", "args", "expected"), [
    ("LMESH_MAX_ACTIVE", "abc", ["serve", "inference"], "LMESH_MAX_ACTIVE must be an integer ≥ 1, got 'abc'"),
    ("LMESH_MAX_ACTIVE", "0", ["serve", "inference"], "LMESH_MAX_ACTIVE must be an integer ≥ 1, got '0'"),
    ("LMESH_MAX_QUEUE", "-1", ["serve", "inference"], "LMESH_MAX_QUEUE must be an integer ≥ 0, got '-1'"),
    ("LMESH_PREFILL_CHUNK", "x", ["serve", "inference"], "LMESH_PREFILL_CHUNK must be an integer ≥ 1, got 'x'"),
    ("LMESH_PREFIX_CACHE_MB", "1.5", ["serve", "inference"],
     "LMESH_PREFIX_CACHE_MB must be an integer ≥ 0, got '1.5'"),
    ("LMESH_ORT_THREADS", "many", ["serve", "inference"], "LMESH_ORT_THREADS must be an integer ≥ 0, got 'many'"),
    ("LMESH_PORT", "x", ["serve", "policy"], "LMESH_PORT must be an integer from 0 to 65535, got 'x'"),
    ("LMESH_PORT", "70000", ["serve", "gateway"], "LMESH_PORT must be an integer from 0 to 65535, got '70000'"),
    ("LMESH_GRACE_S", "x", ["serve", "registry"], "LMESH_GRACE_S must be a number ≥ 0, got 'x'"),
    ("LMESH_GRACE_S", "nan", ["serve", "registry"], "LMESH_GRACE_S must be a number ≥ 0, got 'nan'"),
    ("LMESH_RESOLVE_TTL_S", "soon", ["serve", "tokenizer"], "LMESH_RESOLVE_TTL_S must be a number ≥ 0, got 'soon'"),
    ("LMESH_TOKENIZER_MAX_MODELS", "0", ["serve", "tokenizer"],
     "LMESH_TOKENIZER_MAX_MODELS must be an integer ≥ 1, got '0'"),
    ("LMESH_LOG_LEVEL", "loud", ["serve", "policy"],
     "LMESH_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'loud'"),
    ("OTEL_TRACES_EXPORTER", "zipkin", ["serve", "policy"],
     "OTEL_TRACES_EXPORTER='zipkin': lmesh exports traces with otlp, console, none (not zipkin)"),
    ("OTEL_METRICS_EXPORTER", "statsd", ["serve", "registry"],
     "OTEL_METRICS_EXPORTER='statsd': lmesh exports metrics with otlp, console, prometheus, none (not statsd)"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", ["serve", "gateway"],
     "OTEL_EXPORTER_OTLP_PROTOCOL='http/json': lmesh speaks OTLP as grpc or http/protobuf"),
])
def test_a_bad_environment_default_names_the_variable(var: str, value: str, args: list[str], expected: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(var, value)
    assert main([*args, "--data-dir", "/nonexistent/never-used"]) == 2
    assert capsys.readouterr().err == f"lmesh: {expected}\n"


@pytest.mark.parametrize("command", [["--help"], ["models", "--help"], ["keys", "list", "--help"],
                                     ["serve", "policy", "--help"], ["serve", "inference", "--help"]])
def test_help_works_whatever_the_environment_holds(command: list[str]) -> None:
    bad = {name: "abc" for name in ("LMESH_PORT", "LMESH_GRACE_S", "LMESH_MAX_ACTIVE", "LMESH_MAX_QUEUE",
                                    "LMESH_PREFILL_CHUNK", "LMESH_PREFIX_CACHE_MB", "LMESH_ORT_THREADS",
                                    "LMESH_RESOLVE_TTL_S", "LMESH_TOKENIZER_MAX_MODELS", "LMESH_LOG_LEVEL")}
    result = lmesh(*command, env=bad)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr


def test_an_unused_bad_variable_does_not_break_another_command(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LMESH_MAX_ACTIVE", "abc")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", unused_addr())
    assert main(["models", "list"]) == 2
    assert "no Consul agent answers" in capsys.readouterr().err  # got as far as looking for the mesh


def test_a_good_environment_default_is_used_and_a_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMESH_MAX_ACTIVE", "3")
    monkeypatch.setenv("LMESH_PORT", " 7001 ")
    monkeypatch.setenv("LMESH_LOG_LEVEL", "debug")
    monkeypatch.setenv("LMESH_ORT_THREADS", "")  # empty counts as unset
    args = build_parser().parse_args(["serve", "inference", "--prefill-chunk", "16"])
    assert (args.max_active, args.port, args.log_level, args.threads, args.prefill_chunk) == (3, 7001, "DEBUG", 0, 16)
    assert build_parser().parse_args(["serve", "inference", "--max-active", "5"]).max_active == 5


@pytest.mark.parametrize(("service", "flag", "value"), [
    ("inference", "--max-active", "0"), ("inference", "--max-queue", "-1"), ("inference", "--prefill-chunk", "0"),
    ("inference", "--prefix-cache-mb", "-1"), ("inference", "--threads", "-2"), ("policy", "--grace", "-3"),
    ("policy", "--grace", "inf"), ("gateway", "--port", "70000"), ("gateway", "--port", "-5"),
    ("tokenizer", "--resolve-ttl", "-1"), ("tokenizer", "--max-models", "0"), ("registry", "--log-level", "loud"),
])
def test_a_bad_flag_value_is_an_argparse_error(service: str, flag: str, value: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", service, f"{flag}={value}"])
    assert exited.value.code == 2
    assert f"argument {flag}: must be " in capsys.readouterr().err


def test_only_serve_loads_a_services_wiring_and_only_the_one_it_runs() -> None:
    """Operator commands start fast: building their parser imports no service's wiring (most of a second)."""
    probe = ("import sys; from services.cli import build_parser; build_parser(sys.argv[1:]).parse_args(sys.argv[1:]); "
             "print(sorted(m for m in sys.modules if m.startswith('services.') and m.endswith('.main')))")
    def loaded(*argv: str) -> str:
        done = subprocess.run([sys.executable, "-c", probe, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": f"{ROOT / 'gen'}:{ROOT}"})
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert loaded("keys", "list") == "[]"
    assert loaded("serve", "gateway", "--max-chats", "3") == "['services.gateway.main']"


def test_env_int_for_other_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMESH_GATEWAY_PORT", raising=False)
    assert env_int("LMESH_GATEWAY_PORT", 50051, minimum=1, maximum=65535) == 50051
    monkeypatch.setenv("LMESH_GATEWAY_PORT", "abc")
    with pytest.raises(ConfigError, match=r"^LMESH_GATEWAY_PORT must be an integer from 1 to 65535, got 'abc'$"):
        env_int("LMESH_GATEWAY_PORT", 50051, minimum=1, maximum=65535)


# ---- 4: log levels -----------------------------------------------------------------------------------------

def test_log_levels_in_any_case_are_accepted_and_listed_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["serve", "policy", "--log-level", "debug"]).log_level == "DEBUG"
    setup_logging("test", "warning")  # no ValueError: Unknown level
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "policy", "--help"])
    assert "DEBUG,INFO,WARNING,ERROR,CRITICAL" in capsys.readouterr().out


# ---- 3: CONSUL_HTTP_ADDR -----------------------------------------------------------------------------------

@pytest.mark.parametrize("addr", ["notahost:abc", "127.0.0.1:abc", "127.0.0.1:0", "127.0.0.1:70000",
                                  "ftp://127.0.0.1:8500", "http://", "127.0.0.1:8500/v1"])
def test_a_malformed_consul_addr_is_one_line(addr: str) -> None:
    for command in (["models", "list"], ["serve", "policy", "--data-dir", "/nonexistent/never-used"]):
        line = one_line_error(lmesh(*command, env={"CONSUL_HTTP_ADDR": addr}))
        assert line == (f"lmesh: CONSUL_HTTP_ADDR must be host[:port] or http(s)://host[:port] with a port from 1 "
                        f"to 65535, got {addr!r}")


@pytest.mark.parametrize("addr", ["127.0.0.1", "localhost:8500", "http://127.0.0.1:8500", "https://[::1]:8501/"])
def test_well_formed_consul_addrs_pass(addr: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", addr)
    assert consul_addr() == addr


def test_an_empty_consul_addr_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "")
    assert consul_addr() == "127.0.0.1:8500"


def test_a_port_that_is_not_consul_says_so(grpc_port: int) -> None:
    addr = f"127.0.0.1:{grpc_port}"
    assert probe_consul(addr) == "other" and not consul_answers(addr)
    assert probe_consul(unused_addr()) == "nothing"
    line = one_line_error(lmesh("models", "list", env={"CONSUL_HTTP_ADDR": addr}))
    assert line.startswith(f"lmesh: no Consul agent answers at {addr} (CONSUL_HTTP_ADDR): something else answers")


def test_serve_against_a_port_that_is_not_consul_says_so(grpc_port: int, tmp_path: Path) -> None:
    addr = f"127.0.0.1:{grpc_port}"
    result = lmesh("serve", "policy", "--data-dir", str(tmp_path), env={"CONSUL_HTTP_ADDR": addr})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lmesh: Consul at {addr} (CONSUL_HTTP_ADDR) is out of reach: something else answers")


@pytest.mark.parametrize(("service", "host"), [("policy", "0.0.0.0"), ("registry", "::"), ("policy", "10.1.2.3")])
def test_a_guarded_service_refuses_to_listen_beyond_localhost_without_the_admin_token(
        service: str, host: str, tmp_path: Path) -> None:
    """Key management and model registration must never be open to whoever reaches the port."""
    result = lmesh("serve", service, "--host", host, "--data-dir", str(tmp_path),
                   env={"LMESH_ADMIN_TOKEN": "", "CONSUL_HTTP_ADDR": unused_addr(), "LMESH_MTLS": "off"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert one_line_error(result) == (
        f"lmesh: lmesh-{service} listens beyond localhost (--host {host}) without LMESH_ADMIN_TOKEN: key "
        "management and model registration would be open; set it (e.g. `openssl rand -base64 32`), the same for "
        "lmesh-policy and lmesh-registry")


# ---- 1, 6: bind and advertise addresses --------------------------------------------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", ""])
def test_a_wildcard_bind_advertises_the_address_that_routes_to_consul(host: str, consul_agent: ConsulAgent,
                                                                      tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "CONSUL_HTTP_ADDR": consul_agent.http_addr, "LMESH_ADVERTISE_HOST": "",
           "LMESH_ADMIN_TOKEN": "s3cret"}  # required beyond localhost
    process = subprocess.Popen([*LMESH, "serve", "policy", "--host", host, "--port", str(port),
                                "--data-dir", str(tmp_path)], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(line.rstrip().endswith("serving") for line in lines):
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
        log = "".join(lines)
        assert re.search(rf"listening on 0\.0\.0\.0:{port}, advertised as 127\.0\.0\.1:{port}", log), log
        assert "advertising 127.0.0.1, the address that routes to Consul" in log
        assert log.rstrip().endswith("serving"), log
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert process.returncode == 0


@pytest.mark.parametrize("host", ["999.1.1.1", "nosuchhost.invalid", "192.0.2.1"])
def test_a_host_that_is_not_this_machines_is_not_called_a_taken_port(host: str, tmp_path: Path) -> None:
    result = lmesh("serve", "tokenizer", "--host", host, "--data-dir", str(tmp_path),
                   env={"CONSUL_HTTP_ADDR": unused_addr()})
    assert one_line_error(result).startswith(f"lmesh: cannot bind --host {host}: not an address of this machine")


def test_a_taken_port_keeps_its_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = lmesh("serve", "policy", "--port", str(port), "--data-dir", str(tmp_path),
                       env={"CONSUL_HTTP_ADDR": unused_addr()})
    assert one_line_error(result) == (f"lmesh: could not listen on 127.0.0.1:{port}: the port is in use; stop what "
                                      "listens there or pick another with --port")


def test_flags_strip_and_keep_the_advertise_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    args = build_parser().parse_args(["serve", "policy", "--host", "0.0.0.0", "--advertise-host", "10.0.0.5"])
    config = config_from_args("policy", args)
    assert config.binds_wildcard and config.address == "10.0.0.5"
    for good in ("::1", "[::1]", "lmesh-policy.lmesh.svc.cluster.local"):
        assert build_parser().parse_args(["serve", "policy", "--advertise-host", good]).advertise_host == good


@pytest.mark.parametrize("bad", ["bad!host", "a..b", "trail-", "x y"])
def test_an_advertise_host_nobody_could_dial_is_refused(bad: str) -> None:
    """Consul would take it and the service would never pass its check."""
    flag = lmesh("serve", "policy", "--advertise-host", bad)
    assert flag.returncode == 2
    assert flag.stderr.splitlines()[-1] == ("lmesh serve policy: error: argument --advertise-host: must be an IP "
                                            f"address or a host name, got {bad!r}")
    line = one_line_error(lmesh("serve", "policy", env={"LMESH_ADVERTISE_HOST": bad}))
    assert line == f"lmesh: LMESH_ADVERTISE_HOST must be an IP address or a host name, got {bad!r}"


# ---- 7: wording and paths ----------------------------------------------------------------------------------

def test_unavailable_hints_only_when_nothing_could_be_reached() -> None:
    served = "no inference replica serves x:1; start one with lmesh serve inference --model x:1"
    assert _unavailable(served) == served
    refused = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused"
    assert _unavailable(refused).endswith("(is the mesh running? `make run`)")
    assert _unavailable("no passing instance of lmesh-policy").endswith("start one with `lmesh serve policy` "
                                                                         "(or `make run`)")
    # A TLS gateway: its certificate not trusted; or a plaintext client (or one without a certificate) shut out.
    untrusted = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
                 "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
                 "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate")
    assert _unavailable(untrusted).endswith("pass --gateway-ca or set LMESH_GATEWAY_CA to the CA that signed it; it "
                                            "must also name the address dialled)")
    assert _unavailable(untrusted + ": OK") == _unavailable(untrusted)  # not "…certificate: OK (the gateway's…"
    closed = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
    assert _unavailable(closed).endswith("(is the mesh running? `make run`; a gateway that serves TLS needs --tls or "
                                         "--gateway-ca, and its client-certificate port a certificate from its "
                                         "client CA)")


def test_a_gateway_whose_certificate_is_not_trusted_is_one_line_without_grpcs_own(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    leaf = pki.issue("gateway", pki.ca("not-the-systems-ca"), "/CN=gateway", server=True)
    cert, key = leaf.pair()
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    argv = [*LMESH, "chat", "--gateway", f"127.0.0.1:{port}", "--tls", "--key", "lmk_x", "hi"]
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"} | {"LMESH_HOME": str(tmp_path)}
    try:
        quiet = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert "the gateway's TLS certificate is not trusted here" in one_line_error(quiet)
        # gRPC's C core logs the handshake on its own line unless told not to; asked for, it still does.
        told = subprocess.run(argv, env=env | {"GRPC_VERBOSITY": "INFO"}, capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
        assert "Handshake failed" in told.stderr and told.stderr.strip().splitlines()[-1].startswith("lmesh: ")
    finally:
        server.stop(None)


def test_chat_with_an_unreachable_gateway_hints_at_the_mesh(tmp_path: Path) -> None:
    line = one_line_error(lmesh("chat", "--gateway", unused_addr(), "--key", "lmk_x", "hi",
                                env={"LMESH_HOME": str(tmp_path)}))
    assert line.startswith("lmesh: UNAVAILABLE: ") and line.endswith("(is the mesh running? `make run`)")


def test_keys_without_the_admin_token_say_how_to_pass_it(consul_agent: ConsulAgent, tmp_path: Path) -> None:
    assert lmesh("intentions", "apply", env={"CONSUL_HTTP_ADDR": consul_agent.http_addr}).returncode == 0
    env = {**os.environ, "CONSUL_HTTP_ADDR": consul_agent.http_addr, "LMESH_ADMIN_TOKEN": "s3cret"}
    process = subprocess.Popen([*LMESH, "serve", "policy", "--data-dir", str(tmp_path)], env=env, cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if line.rstrip().endswith("serving"):
                break
        quiet = {"CONSUL_HTTP_ADDR": consul_agent.http_addr, "LMESH_ADMIN_TOKEN": "",
                 "LMESH_HOME": str(tmp_path / "home")}  # no token saved by `lmesh dev` there either
        line = one_line_error(lmesh("keys", "list", env=quiet))
        assert line.startswith("lmesh: UNAUTHENTICATED: admin token required")
        assert line.endswith("pass --admin-token or set LMESH_ADMIN_TOKEN (the token lmesh-policy and lmesh-registry "
                             "run with)")
        for where in (["keys", "--admin-token", "s3cret", "list"], ["keys", "list", "--admin-token", "s3cret"]):
            listed = lmesh(*where, env=quiet)  # before or after the action, as the hint reads
            assert listed.returncode == 0, listed.stderr
        # `lmesh keys list | head -1`: a reader gone before the output is ends it quietly, as Unix tools do.
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            piped = subprocess.run([*LMESH, "keys", "list", "--admin-token", "s3cret"], stdout=write_end,
                                   stderr=subprocess.PIPE, text=True, timeout=60, cwd=ROOT, env={**os.environ, **quiet})
        finally:
            os.close(write_end)
        assert piped.stderr == "" and piped.returncode == 141
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "lmesh_model.json").write_text(json.dumps({"name": "m"}))
    (folder / "variants").mkdir()
    return folder


def test_register_a_manifest_file_instead_of_its_folder(model_folder: Path) -> None:
    line = one_line_error(lmesh("models", "register", str(model_folder / "lmesh_model.json"),
                                env={"CONSUL_HTTP_ADDR": unused_addr()}))
    assert line == f"lmesh: {model_folder / 'lmesh_model.json'} is a file; pass the folder that holds it: " \
                   f"lmesh models register {model_folder}"
    assert "Errno" not in line


def test_register_a_missing_folder_or_a_folder_as_manifest(model_folder: Path) -> None:
    missing = one_line_error(lmesh("models", "register", str(model_folder / "nope"),
                                   env={"CONSUL_HTTP_ADDR": unused_addr()}))
    assert missing.startswith(f"lmesh: no folder {model_folder / 'nope'}; pass a built model's folder")
    line = one_line_error(lmesh("models", "register", str(model_folder), "--manifest", "variants",
                                env={"CONSUL_HTTP_ADDR": unused_addr()}))
    assert line.startswith(f"lmesh: --manifest variants is a folder in {model_folder}; pass the manifest file's name")
    elsewhere = one_line_error(lmesh("models", "register", str(model_folder), "--manifest", str(model_folder.parent),
                                     env={"CONSUL_HTTP_ADDR": unused_addr()}))
    assert elsewhere.startswith(f"lmesh: --manifest {model_folder.parent} is a folder; pass the manifest file's name")


def test_an_error_echoing_a_newline_stays_one_line() -> None:
    done = lmesh("models", "register", "\r\n", env={"CONSUL_HTTP_ADDR": unused_addr()})
    assert done.returncode == 2 and done.stderr.strip() == "lmesh: no folder \\r\\n; pass a built model's folder " \
        "(`make model` builds one under $LMESH_CACHE)"


def test_serve_with_a_data_dir_that_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    for data_dir in ("/proc/forbidden", str(blocker / "sub")):
        line = one_line_error(lmesh("serve", "registry", "--data-dir", data_dir,
                                    env={"CONSUL_HTTP_ADDR": unused_addr()}))
        assert line.startswith(f"lmesh: cannot use --data-dir {data_dir}: ") and "Errno" not in line
        assert line.endswith("pass a directory this user can create and write")


def test_parser_namespace_types(monkeypatch: pytest.MonkeyPatch) -> None:
    # Defaults come out as plain values of the flag's type, not the environment's strings.
    monkeypatch.setenv("LMESH_GRACE_S", "2.5")
    args = build_parser().parse_args(["serve", "tokenizer"])
    assert isinstance(args, argparse.Namespace)
    assert (args.grace, args.resolve_ttl, args.max_models, args.port) == (2.5, 5.0, 8, 0)



@pytest.mark.parametrize("argv", [["models", "--admin-token", "T", "alias", "x", "m:1"],
                                  ["models", "alias", "x", "m:1", "--admin-token", "T"],
                                  ["models", "--admin-token", "T", "register", "/tmp/m"],
                                  ["keys", "--admin-token", "T", "list"]])
def test_the_admin_token_goes_before_or_after_the_action(argv: list[str]) -> None:
    from services.cli import build_parser

    assert build_parser().parse_args(argv).admin_token == "T"


# Found by bench/hostile.py: a token gRPC metadata cannot carry made grpcio raise ExecuteBatchError, a traceback.
@pytest.mark.parametrize(("argv", "named"), [
    (["keys", "list", "--admin-token", "tøken"], "the admin token (--admin-token)"),
    (["audit", "verify", "--admin-token", "\x1etoken"], "the admin token (--admin-token)"),
    (["models", "gc", "--admin-token", "two\nlines"], "the admin token (--admin-token)"),
    (["chat", "--key", "kéy", "hi"], "the API key (--key, LMESH_API_KEY or .lmesh/dev-api-key)"),
])
def test_a_credential_metadata_cannot_carry_is_one_line(argv: list[str], named: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.cli_runner import run_cli

    monkeypatch.setenv("CONSUL_HTTP_ADDR", unused_addr())  # refused before anything is dialled
    code, _, err = run_cli(argv)
    assert code == 2, err
    assert err.strip() == f"lmesh: {named} holds a character gRPC metadata cannot carry (only printable ASCII can): " \
                          "pass the exact token the services were given"


def test_an_admin_token_variable_metadata_cannot_carry_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.cli_runner import run_cli

    monkeypatch.setenv("CONSUL_HTTP_ADDR", unused_addr())
    monkeypatch.setenv("LMESH_ADMIN_TOKEN", "tok\u00e9n")
    code, _, err = run_cli(["usage"])
    assert code == 2 and err.startswith("lmesh: the admin token (LMESH_ADMIN_TOKEN) holds a character"), err
