"""Starting a local Consul dev agent (for `lmesh dev` and the tests), on chosen or free ports."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.common.config import lmesh_cache, split_consul_addr
from services.common.supervisor import exit_message


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, taken: Iterable[int] = ()) -> list[int]:
    """`count` free ports, all different and none in `taken`: free_port() may hand out a port again at once, since
    nothing holds it until its user binds it."""
    ports: list[int] = []
    seen = set(taken)
    while len(ports) < count:
        port = free_port()
        if port not in seen:
            seen.add(port)
            ports.append(port)
    return ports


def find_consul() -> str:
    """The consul binary `make consul` installed, or one on PATH."""
    installed = lmesh_cache() / "bin" / "consul"
    if installed.exists():
        return str(installed)
    on_path = shutil.which("consul")
    if on_path:
        return on_path
    raise FileNotFoundError("no consul binary: run `make consul`")


def probe_consul(http_addr: str, timeout: float = 0.5) -> str:
    """What answers at a CONSUL_HTTP_ADDR-style address (`host:port` or `scheme://host:port`): "leader" (a Consul
    agent with a leader), "no leader" (an agent without one yet), "other" (something that is not Consul's HTTP
    API, e.g. a gRPC port) or "nothing"."""
    try:
        scheme, host, port = split_consul_addr(http_addr)
    except ValueError:
        return "nothing"
    host = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"{scheme}://{host}:{port}/v1/status/leader", timeout=timeout) as resp:
            body = resp.read().strip()
    except (urllib.error.HTTPError, http.client.HTTPException):  # an HTTP error status or not HTTP/1 at all
        return "other"
    except (OSError, ValueError):
        return "nothing"
    if resp.status != 200 or not body.startswith(b'"'):
        return "other"
    return "leader" if len(body) > 2 else "no leader"


def consul_answers(http_addr: str, timeout: float = 0.5) -> bool:
    """True when a Consul agent with a leader answers at `host:port` (or `scheme://host:port`, as
    CONSUL_HTTP_ADDR may be written)."""
    return probe_consul(http_addr, timeout) == "leader"


def consul_advice(probed: str) -> str:
    """What to do about what `probe_consul` found, when it is not an agent with a leader."""
    if probed == "other":
        return "something else answers there; point CONSUL_HTTP_ADDR at the agent's HTTP port (8500 by default)"
    if probed == "no leader":
        return "the agent has no cluster leader yet; wait for one or see the agent's log"
    return "is the mesh running? (`make run`)"


@dataclass
class ConsulAgent:
    """A `consul agent -dev` child process; every port is its own, so agents never collide."""

    http_port: int
    process: subprocess.Popen[bytes]
    data_dir: str
    log_path: Path | None = None

    @property
    def http_addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @classmethod
    def start(cls, http_port: int | None = None, log_path: Path | None = None,
              timeout: float = 20.0) -> ConsulAgent:
        http_port = http_port or free_port()
        dns, grpc_port, server, serf_lan, serf_wan = free_ports(5, taken=(http_port,))
        data_dir = tempfile.mkdtemp(prefix="lmesh-consul-")
        args = [
            find_consul(), "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
            "-http-port", str(http_port), "-dns-port", str(dns), "-grpc-port", str(grpc_port),
            "-server-port", str(server), "-serf-lan-port", str(serf_lan),
            "-serf-wan-port", str(serf_wan), "-node", f"lmesh-dev-{http_port}", "-log-level", "warn",
        ]
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=data_dir,
                                   env={**os.environ}, start_new_session=True)
        agent = cls(http_port=http_port, process=process, data_dir=data_dir, log_path=log_path)
        deadline = time.monotonic() + timeout
        while not consul_answers(agent.http_addr):
            if process.poll() is not None:
                raise RuntimeError(exit_message("the Consul agent", process.returncode, log_path))
            if time.monotonic() > deadline:
                agent.stop()
                raise TimeoutError("consul did not elect a leader in time")
            time.sleep(0.1)  # start-up readiness probe of a child process, bounded by the deadline
        return agent

    def restart(self) -> None:
        """Stops the agent and starts a new one on the same HTTP port: a dev agent keeps no state, so it then knows
        no service until they register again."""
        self.stop()
        fresh = ConsulAgent.start(http_port=self.http_port, log_path=self.log_path)
        self.process, self.data_dir = fresh.process, fresh.data_dir

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)
