"""Linux network namespaces as the "hosts" of a multi-host test, joined by a bridge in the root namespace.

Each host is a namespace with loopback and one veth link whose other end is a port of the run's bridge; the bridge
holds the subnet's `.1` address, so the test process (root namespace) reaches every host directly. Cutting a host
takes its bridge port down: the host keeps its address and processes, but nothing it sends or is sent arrives, as
when a cable is pulled (a black hole, not a refusal, so peers learn it only by timing out).

Names carry the creating process's pid, so parallel runs never share one, and a run that was killed before its
cleanup leaves names that the next run recognises (their pid is gone) and removes. The subnet (10.77.N.0/24) is
the first one no address of this machine uses, chosen under a file lock so two runs starting together differ.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "lmh"  # every name this module makes starts so: lmh<pid>b (bridge), lmh<pid>n<i> (host), lmh<pid>v<i>
SUBNET_BASE = "10.77"
LOCK_PATH = Path("/tmp/lmesh-netns.lock")
_OWNED = re.compile(rf"^{PREFIX}(?P<pid>\d+)[bnv]\d*")


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip`, a kernel or sandbox that refuses); the message says why."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs `ip ARGS`; on failure (with `check`) NetnsUnavailable names the command and what `ip` said."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.returncode}")
    return done


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can (checked by making and removing one)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"{PREFIX}{os.getpid()}n0"
    try:
        ip("netns", "add", probe)
    except (NetnsUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` does not work here: {exc}"
    ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> None:
    """Removes namespaces and links that a run which no longer exists left behind (killed before its cleanup)."""
    namespaces = [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = re.findall(r"^\d+: ([^:@\s]+)", ip("-o", "link", "show", check=False).stdout, re.MULTILINE)
    for name in namespaces:
        match = _OWNED.match(name)
        if match and not _pid_alive(int(match["pid"])):
            ip("netns", "del", name, check=False)
    for name in links:
        match = _OWNED.match(name)
        if match and not _pid_alive(int(match["pid"])):
            ip("link", "del", name, check=False)


def _subnets_in_use() -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    used = set()
    for line in ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        match = re.search(r"\binet (\S+)", line)
        if match:
            used.add(ipaddress.ip_interface(match[1]).network)
    return used


def _free_subnet() -> ipaddress.IPv4Network:
    used = _subnets_in_use()
    start = os.getpid() % 200  # parallel runs usually differ at once; the scan makes sure
    for step in range(250):
        candidate = ipaddress.IPv4Network(f"{SUBNET_BASE}.{(start + step) % 250 + 1}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetnsUnavailable(f"no free /24 left in {SUBNET_BASE}.0.0/16")


@dataclass(frozen=True)
class Host:
    """One namespace: `name` is how the test calls it (host1), `netns` the namespace, `address` its IP on the
    bridge and `port` the bridge's end of its link (what `cut` takes down)."""

    name: str
    netns: str
    address: str
    port: str


@dataclass
class Hosts:
    """`count` hosts on one bridge (see the module). Use as a context manager: leaving it removes everything made,
    whatever happened inside."""

    count: int
    hosts: dict[str, Host] = field(default_factory=dict)
    bridge: str = ""
    bridge_address: str = ""
    subnet: ipaddress.IPv4Network | None = None

    def __enter__(self) -> Hosts:
        try:
            self.create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def create(self) -> None:
        tag = f"{PREFIX}{os.getpid()}"
        LOCK_PATH.touch(exist_ok=True)
        with LOCK_PATH.open("r") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held until the subnet's addresses exist, so the next run sees them
            remove_leftovers()
            self.subnet = _free_subnet()
            addresses = list(self.subnet.hosts())
            self.bridge = f"{tag}b"
            self.bridge_address = str(addresses[0])
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.bridge_address}/{self.subnet.prefixlen}", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for index in range(1, self.count + 1):
                host = Host(name=f"host{index}", netns=f"{tag}n{index}", address=str(addresses[10 + index - 1]),
                            port=f"{tag}v{index}")
                self.hosts[host.name] = host
                ip("netns", "add", host.netns)
                ip("link", "add", host.port, "type", "veth", "peer", "name", f"{tag}p{index}", "netns", host.netns)
                ip("-n", host.netns, "link", "set", f"{tag}p{index}", "name", "eth0")
                ip("-n", host.netns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
                ip("-n", host.netns, "link", "set", "eth0", "up")
                ip("-n", host.netns, "link", "set", "lo", "up")
                ip("link", "set", host.port, "master", self.bridge)
                ip("link", "set", host.port, "up")

    def remove(self) -> None:
        """Deletes the namespaces (their ends of the links go with them), the bridge ports and the bridge. Processes
        still running in a namespace keep it alive, unnamed, until they exit: stop them first."""
        for host in self.hosts.values():
            ip("netns", "del", host.netns, check=False)
            ip("link", "del", host.port, check=False)
        if self.bridge:
            ip("link", "del", self.bridge, check=False)

    def argv_in(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` as run inside `host`'s namespace: `ip netns exec` execs it, so the pid is the command's own."""
        return ["ip", "netns", "exec", self.hosts[host].netns, *argv]

    def run_in(self, host: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
               **popen: Any) -> subprocess.Popen[bytes]:
        """Starts `argv` inside `host`'s namespace (Popen's other arguments as given)."""
        return subprocess.Popen(self.argv_in(host, argv), env=dict(env) if env is not None else None, **popen)

    def cut(self, host: str) -> None:
        """Takes `host`'s link down at the bridge: from now on its packets vanish, both ways."""
        ip("link", "set", self.hosts[host].port, "down")

    def restore(self, host: str) -> None:
        ip("link", "set", self.hosts[host].port, "up")
