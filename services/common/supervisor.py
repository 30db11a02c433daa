"""One supervisor for the mesh's processes, shared by `lmesh dev`, the tests and the benchmark.

It starts `lmesh serve <service>` children (each with its own log file and data dir), watches Consul agents
started elsewhere, says precisely how a process ended, and stops everything gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from services.common.consul_agent import ConsulAgent

T = TypeVar("T")
POLL_S = 0.2  # how often exits are looked for while waiting on something else
TAIL_BYTES = 64 * 1024  # enough for a last line; logs of a long run can be large


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_message(label: str, returncode: int, log_path: Path | None, reason: str = "") -> str:
    """How a process ended, in one line: the signal that killed it, or its exit status (with `reason` when the
    status is an error), and where its log is."""
    where = f" (log: {log_path})" if log_path else ""
    if returncode < 0:  # Popen's way of saying "killed by signal -returncode"
        return f"{label} was killed by {signal_name(-returncode)}{where}"
    said = f": {reason}" if reason and returncode != 0 else ""
    return f"{label} exited with status {returncode}{said}{where}"


def last_line(log_path: Path, offset: int = 0) -> str:
    """The last non-empty line written to `log_path` after byte `offset`, without the CLI's "lmesh: " prefix."""
    try:
        with log_path.open("rb") as log:
            log.seek(max(offset, log.seek(0, 2) - TAIL_BYTES))
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].removeprefix("lmesh: ") if lines else ""


@dataclass
class Supervised:
    """One process the supervisor started or watches."""

    name: str  # the supervisor's key: "inference-int8" for a second inference process
    label: str  # how messages name it: "lmesh-inference", "the Consul agent"
    process: subprocess.Popen[bytes]
    log_path: Path | None
    # Where this run's output starts in the (appended) log: only its own lines may explain its exit.
    log_offset: int = 0
    # An lmesh service prints a one-line reason as its last line when it refuses to start; a Consul agent's last
    # line is whatever it logged last, often long before it died, so it explains nothing.
    says_why: bool = True
    started_here: bool = True  # False for a watched process (a Consul agent), stopped after the rest

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> bool:
        return self.process.poll() is not None

    def exit_message(self) -> str:
        returncode = self.process.poll()
        if returncode is None:
            return f"{self.label} is still running (pid {self.pid})"
        reason = last_line(self.log_path, self.log_offset) if self.says_why and self.log_path else ""
        return exit_message(self.label, returncode, self.log_path, reason)


class ProcessExited(RuntimeError):
    """A supervised process ended while something needed it; the message says how and where its log is."""

    def __init__(self, process: Supervised) -> None:
        super().__init__(process.exit_message())
        self.process = process


class Supervisor:
    """The processes of one mesh, by name, in start order."""

    def __init__(self, logs: Path, data_root: Path, env: Mapping[str, str], cwd: Path | None = None,
                 grace_s: float = 15.0, own_sessions: bool = True) -> None:
        self.logs = logs
        self.data_root = data_root
        self.env = dict(env)
        self.cwd = cwd
        self.grace_s = grace_s  # how long a process may take to exit after SIGTERM before it gets SIGKILL
        # In their own sessions, a Ctrl-C at the terminal reaches only the supervisor, which then stops them in
        # order; without (the tests), it stops them at once along with the test run.
        self.own_sessions = own_sessions
        self.processes: dict[str, Supervised] = {}

    def start(self, service: str, *args: str, name: str = "", data_dir: Path | None = None,
              env: Mapping[str, str] | None = None) -> Supervised:
        """Starts `lmesh serve SERVICE --data-dir DATA_DIR ARGS`; `name` (default SERVICE) keys a second process of
        one service, and names its log (LOGS/NAME.log) and default data dir (DATA_ROOT/NAME)."""
        name = name or service
        data_dir = data_dir or self.data_root / name
        argv = [sys.executable, "-m", "services.cli", "serve", service, "--data-dir", str(data_dir), *args]
        label = f"lmesh-{service}" if name == service else f"lmesh-{service} ({name})"
        return self.spawn(name, argv, label=label, env=env)

    def spawn(self, name: str, argv: Sequence[str], label: str = "", says_why: bool = True,
              env: Mapping[str, str] | None = None) -> Supervised:
        """Starts any command as a supervised process, its output appended to LOGS/NAME.log."""
        if name in self.processes and not self.processes[name].exited():
            raise ValueError(f"{self.processes[name].label} is already running (pid {self.processes[name].pid})")
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            offset = log.tell()
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(env or self.env),
                                       cwd=self.cwd, start_new_session=self.own_sessions)
        return self._add(Supervised(name, label or name, process, log_path, offset, says_why))

    def watch(self, name: str, process: subprocess.Popen[bytes], label: str, log_path: Path | None,
              says_why: bool = False) -> Supervised:
        """Supervises a process started elsewhere: its exit is reported like any other's, and `stop_all` stops it
        after the processes started here (they may need it to shut down cleanly)."""
        return self._add(Supervised(name, label, process, log_path, says_why=says_why, started_here=False))

    def watch_consul_agent(self, agent: ConsulAgent, name: str = "consul") -> Supervised:
        # Services deregister from the agent as they stop, so it must outlive them.
        return self.watch(name, agent.process, "the Consul agent", agent.log_path)

    def _add(self, process: Supervised) -> Supervised:
        self.processes.pop(process.name, None)  # a restarted name moves to the end of the start order
        self.processes[process.name] = process
        return process

    # ---- ending processes --------------------------------------------------------------------------------------

    def terminate(self, name: str) -> None:
        """SIGTERM (a service drains, then exits); returns at once."""
        with contextlib.suppress(ProcessLookupError):
            self.processes[name].process.send_signal(signal.SIGTERM)

    def kill(self, name: str) -> None:
        """SIGKILL, and waits until it is gone."""
        process = self.processes[name].process
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(10)

    def stop(self, name: str) -> None:
        """Gracefully: SIGTERM, up to `grace_s` to exit, then SIGKILL."""
        self._stop_together([self.processes[name]])

    def stop_all(self) -> None:
        """Stops every process: those started here at once (each drains on its own), newest first, then the
        watched ones."""
        newest_first = list(reversed(self.processes.values()))
        self._stop_together([p for p in newest_first if p.started_here])
        self._stop_together([p for p in newest_first if not p.started_here])

    def _stop_together(self, processes: list[Supervised]) -> None:
        running = [p for p in processes if not p.exited()]
        for entry in running:
            with contextlib.suppress(ProcessLookupError):
                entry.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for entry in running:
            try:
                entry.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                entry.process.kill()
                entry.process.wait()

    # ---- watching ----------------------------------------------------------------------------------------------

    async def wait_exit(self, name: str, timeout: float = 20.0) -> int:
        """Its exit status, waited for in a thread so the event loop keeps running; TimeoutError after `timeout`."""
        entry = self.processes[name]
        try:
            return await asyncio.to_thread(entry.process.wait, timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{entry.label} (pid {entry.pid}) did not exit within {timeout:g} s") from None

    def first_exited(self, names: Sequence[str] = ()) -> Supervised | None:
        """The first of `names` (default: every process) that has exited, or None."""
        for entry in self._select(names):
            if entry.exited():
                return entry
        return None

    def wait_any_exit(self, names: Sequence[str] = ()) -> Supervised:
        """Blocks until one of `names` (default: every process) exits, and returns it. Polls rather than
        waitpid(-1), which would reap children that others own."""
        while (gone := self.first_exited(names)) is None:
            time.sleep(POLL_S)
        return gone

    async def while_running(self, work: Awaitable[T], names: Sequence[str] = ()) -> T:
        """`work`'s result; raises ProcessExited as soon as one of `names` (default: every process) exits first,
        so nobody waits out a timeout for a process that is already gone."""
        watched = self._select(names)
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                for entry in watched:
                    if entry.exited():
                        raise ProcessExited(entry)
        finally:
            task.cancel()

    def _select(self, names: Sequence[str]) -> list[Supervised]:
        return [self.processes[n] for n in names] if names else list(self.processes.values())

    def log(self, name: str) -> str:
        """Everything in its log file (earlier runs under the same name included)."""
        path = self.processes[name].log_path
        return path.read_text(errors="replace") if path else ""
