"""LiteLLM's proxy (PyPI `litellm[proxy]`, the `bench` extra) as a real process in front of lmesh's OpenAI endpoint:
what a team would put in front of a model server instead of lmesh's mesh.

Its config names lmesh's `/v1` as an openai-compatible provider (`openai/default` with `api_base`), with lmesh's
API key; clients call the proxy with its master key (it refuses to start without one), and it has no database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx2

from services.common.consul_agent import free_port
from services.common.supervisor import Supervisor

MODEL = "default"  # the name clients ask the proxy for, and lmesh's alias behind it
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Proxy:
    base: str  # http://127.0.0.1:PORT
    key: str  # its master key, the bearer key clients send it


def litellm_executable(explicit: str | None = None) -> str | None:
    """The `litellm` command: `explicit`, else the one next to this Python, else the one on PATH."""
    if explicit:
        return explicit
    here = Path(sys.executable).parent / "litellm"
    return str(here) if here.exists() else shutil.which("litellm")


def proxy_config(upstream_v1: str, api_key: str, master_key: str) -> dict[str, object]:
    return {
        "general_settings": {"master_key": master_key},
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": upstream_v1, "api_key": api_key}}],
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }


def _configure(work: Path, upstream_v1: str, api_key: str) -> tuple[Proxy, Path]:
    """The proxy's address and key, and its config file in `work`."""
    work.mkdir(parents=True, exist_ok=True)
    proxy = Proxy(f"http://127.0.0.1:{free_port()}", f"sk-{secrets.token_hex(16)}")
    config = work / "litellm.yaml"
    config.write_text(json.dumps(proxy_config(upstream_v1, api_key, proxy.key), indent=2))  # JSON is YAML
    return proxy, config


@contextlib.asynccontextmanager
async def litellm_proxy(executable: str, upstream_v1: str, api_key: str, work: Path,
                        supervisor: Supervisor) -> AsyncIterator[Proxy]:
    """Runs the proxy on a free port until the block ends."""
    proxy, config = _configure(work, upstream_v1, api_key)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
           "LITELLM_LOG": "ERROR"}
    supervisor.spawn("litellm", [executable, "--config", str(config), "--host", "127.0.0.1",
                                 "--port", proxy.base.rsplit(":", 1)[1], "--num_workers", "1"],
                     label="LiteLLM proxy", env=env)
    try:
        await supervisor.while_running(_ready(proxy.base), ["litellm"])
        yield proxy
    finally:
        await asyncio.to_thread(supervisor.stop, "litellm")


async def _ready(base: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx2.AsyncClient(base_url=base, timeout=5) as client:
        while True:
            with contextlib.suppress(httpx2.HTTPError):
                if (await client.get("/health/liveliness")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"LiteLLM's proxy at {base} did not come up in {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.5)
