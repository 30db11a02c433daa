"""The process supervisor `lmesh dev`, the tests and the benchmark share: how it reports an exit, and how it stops."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.consul_agent import ConsulAgent
from services.common.supervisor import ProcessExited, Supervisor

# Prints "ready" once its SIGTERM handler is set; on SIGTERM appends its name to ORDER_FILE and exits 0.
POLITE = """
import os, signal, sys, time
def stop(*_):
    with open(os.environ["ORDER_FILE"], "a") as f:
        f.write(sys.argv[1] + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""
MISLEADING = "2024-01-01T00:00:00Z [WARN] agent: Check is now critical: check=service:lmesh-tokenizer"


def python(script: str, *args: str) -> list[str]:
    return [sys.executable, "-c", script, *args]


def wait_ready(supervisor: Supervisor, name: str) -> None:
    deadline = time.monotonic() + 10
    while "ready" not in supervisor.log(name):
        assert not supervisor.processes[name].exited(), supervisor.log(name)
        assert time.monotonic() < deadline, "the child never said ready"
        time.sleep(0.02)


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    env = {**os.environ, "ORDER_FILE": str(tmp_path / "order")}
    supervisor = Supervisor(tmp_path / "logs", data_root=tmp_path / "data", env=env, grace_s=1)
    yield supervisor
    supervisor.stop_all()


def test_a_killed_process_is_named_by_its_signal_not_by_its_last_log_line(supervisor: Supervisor) -> None:
    entry = supervisor.spawn("child", python(f"print({MISLEADING!r}, flush=True); print('ready', flush=True); "
                                             "import time; time.sleep(60)"), label="the child")
    wait_ready(supervisor, "child")
    supervisor.kill("child")
    assert entry.process.returncode == -signal.SIGKILL
    assert entry.exit_message() == f"the child was killed by SIGKILL (log: {entry.log_path})"


def test_an_error_exit_says_the_reason_this_run_logged_and_never_an_earlier_runs(supervisor: Supervisor) -> None:
    supervisor.logs.mkdir(parents=True)
    (supervisor.logs / "quiet.log").write_text("lmesh: a reason from an earlier run\n")
    quiet = supervisor.spawn("quiet", python("import sys; sys.exit(3)"), label="quiet")
    assert quiet.process.wait(10) == 3
    assert quiet.exit_message() == f"quiet exited with status 3 (log: {quiet.log_path})"
    assert "earlier run" in supervisor.log("quiet")  # appended to, not truncated

    said = supervisor.spawn("said", python("import sys; print('lmesh: cannot bind port 1'); sys.exit(2)"),
                            label="said")
    assert said.process.wait(10) == 2
    assert said.exit_message() == f"said exited with status 2: cannot bind port 1 (log: {said.log_path})"


def test_a_clean_exit_appends_no_log_line(supervisor: Supervisor) -> None:
    entry = supervisor.spawn("done", python("print('lmesh-x stopped')"), label="done")
    assert entry.process.wait(10) == 0
    assert entry.exit_message() == f"done exited with status 0 (log: {entry.log_path})"


def test_a_service_that_refuses_to_start_says_why(supervisor: Supervisor) -> None:
    """The real `lmesh serve` path: a service prints its one-line reason, and the message carries it."""
    supervisor.env["OTEL_TRACES_EXPORTER"] = "zipkin"
    supervisor.env["CONSUL_HTTP_ADDR"] = "127.0.0.1:1"
    entry = supervisor.start("registry", name="registry-2")
    assert entry.process.wait(30) == 2
    assert entry.log_path == supervisor.logs / "registry-2.log"
    assert entry.exit_message() == ("lmesh-registry (registry-2) exited with status 2: OTEL_TRACES_EXPORTER='zipkin': "
                                    "lmesh exports traces with otlp, console, none (not zipkin) "
                                    f"(log: {entry.log_path})")


def test_a_running_name_cannot_be_started_twice(supervisor: Supervisor) -> None:
    supervisor.spawn("one", python(STUBBORN))
    with pytest.raises(ValueError, match="already running"):
        supervisor.spawn("one", python(STUBBORN))


def test_stop_all_stops_what_it_started_before_what_it_watches_and_kills_the_stubborn(
        supervisor: Supervisor, tmp_path: Path) -> None:
    supervisor.grace_s = 0.5
    log = (tmp_path / "watched.log").open("ab")
    watched = subprocess.Popen(python(POLITE, "watched"), stdout=log, stderr=subprocess.STDOUT,
                               env=supervisor.env)
    log.close()
    supervisor.watch("watched", watched, "the watched one", tmp_path / "watched.log")
    for name in ("a", "b"):
        supervisor.spawn(name, python(POLITE, name))
    stubborn = supervisor.spawn("stubborn", python(STUBBORN))
    for name in ("watched", "a", "b", "stubborn"):
        wait_ready(supervisor, name)
    began = time.monotonic()
    supervisor.stop_all()
    assert time.monotonic() - began < 5
    order = (tmp_path / "order").read_text().split()
    assert sorted(order[:2]) == ["a", "b"] and order[2:] == ["watched"]
    assert stubborn.process.returncode == -signal.SIGKILL
    assert watched.returncode == 0
    assert supervisor.first_exited() is not None


async def test_wait_exit_leaves_the_event_loop_running(supervisor: Supervisor) -> None:
    supervisor.spawn("polite", python(POLITE, "polite"))
    await asyncio.to_thread(wait_ready, supervisor, "polite")
    with pytest.raises(TimeoutError, match=r"did not exit within 0\.2 s"):
        await supervisor.wait_exit("polite", timeout=0.2)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.05)
    supervisor.terminate("polite")
    assert await supervisor.wait_exit("polite") == 0
    ticker.cancel()
    assert ticks >= 3


async def test_while_running_fails_as_soon_as_a_watched_process_exits(supervisor: Supervisor) -> None:
    supervisor.spawn("steady", python(STUBBORN))
    supervisor.spawn("dies", python("import sys, time; time.sleep(0.3); print('lmesh: out of memory'); sys.exit(1)"),
                     label="lmesh-dies")
    assert await supervisor.while_running(asyncio.sleep(0, result="done")) == "done"
    began = time.monotonic()
    with pytest.raises(ProcessExited) as raised:
        await supervisor.while_running(asyncio.sleep(30))
    assert time.monotonic() - began < 5
    assert raised.value.process.name == "dies"
    assert str(raised.value) == ("lmesh-dies exited with status 1: out of memory "
                                 f"(log: {supervisor.processes['dies'].log_path})")
    # Watching only the steady one, the dead one is no reason to fail.
    assert await supervisor.while_running(asyncio.sleep(0.3, result="ok"), ["steady"]) == "ok"


def test_a_consul_agent_that_exits_says_its_status_and_log_but_not_its_last_line(tmp_path: Path) -> None:
    log_path = tmp_path / "consul.log"
    log_path.write_text(MISLEADING + "\n")
    with log_path.open("ab") as log:
        process = subprocess.Popen(python(f"print({MISLEADING!r}); raise SystemExit(1)"), stdout=log)
    supervisor = Supervisor(tmp_path / "logs", data_root=tmp_path, env=os.environ)
    supervisor.watch_consul_agent(ConsulAgent(http_port=0, process=process, data_dir=str(tmp_path),
                                              log_path=log_path))
    gone = supervisor.wait_any_exit()
    assert gone.exit_message() == f"the Consul agent exited with status 1 (log: {log_path})"


def test_dev_names_a_killed_consul_agent_as_killed_and_where_its_log_is(tmp_path: Path) -> None:
    """The defect: `lmesh dev` said "consul exited with -9: …Check is now critical…", a line from long before."""
    from services.devmesh import _supervise

    log_path = tmp_path / "consul.log"
    log_path.write_text(MISLEADING + "\n")
    agent = ConsulAgent.start(log_path=log_path)
    try:
        supervisor = Supervisor(tmp_path / "logs", data_root=tmp_path, env=os.environ)
        supervisor.watch_consul_agent(agent)
        os.kill(agent.process.pid, signal.SIGKILL)
        with pytest.raises(ProcessExited) as raised:
            _supervise(supervisor)
        assert str(raised.value) == f"the Consul agent was killed by SIGKILL (log: {log_path})"
    finally:
        agent.stop()
