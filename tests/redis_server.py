"""A real redis-server on a free port for the tests (deploy/scripts/install_redis.sh provides the binary)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from services.common.config import lmesh_cache
from services.common.consul_agent import free_port

ROOT = Path(__file__).resolve().parent.parent


def redis_binary() -> Path | None:
    """The redis-server to run: $LMESH_REDIS_SERVER, the installer's, one on PATH, else what the installer fetches
    now (None only when it truly cannot be had here)."""
    for candidate in (os.environ.get("LMESH_REDIS_SERVER"), str(lmesh_cache() / "bin" / "redis-server"),
                      shutil.which("redis-server")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    result = subprocess.run(["bash", str(ROOT / "deploy" / "scripts" / "install_redis.sh")], capture_output=True,
                            text=True, timeout=300)
    path = Path(result.stdout.strip()) if result.returncode == 0 else None
    return path if path is not None and os.access(path, os.X_OK) else None


class RedisServer:
    """One redis-server process (no persistence) on a free port of 127.0.0.1."""

    def __init__(self, binary: Path, log_path: Path) -> None:
        self.binary = binary
        self.log_path = log_path
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                 "no", "--protected-mode", "yes"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
