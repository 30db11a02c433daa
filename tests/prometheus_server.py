"""A real Prometheus server for the tests, on a free port, scraping with deploy/prometheus/prometheus.yml's rules
(deploy/scripts/install_prometheus.sh provides the binary).

Debian's Prometheus is built without Consul service discovery ("Disable Consul SD until its Debian package is back in
shape", its changelog), so `consul_sd_configs` cannot run here. The tests give Prometheus the same targets through
`file_sd_configs` instead: one per instance that Consul's health API lists, with the `__meta_consul_*` labels
Prometheus's Consul discovery sets (https://prometheus.io/docs/prometheus/latest/configuration/configuration/
#consul_sd_config). Everything after discovery (the deploy file's relabelling, the scrape, the queries) is
Prometheus's own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx2
import yaml

from services.common.config import lmesh_cache
from services.common.consul_agent import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def prometheus_binary() -> Path | None:
    """The prometheus to run: $LMESH_PROMETHEUS, the installer's, one on PATH, else what the installer fetches now
    (None only when it truly cannot be had here)."""
    for candidate in (os.environ.get("LMESH_PROMETHEUS"), str(lmesh_cache() / "bin" / "prometheus"),
                      shutil.which("prometheus")):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    result = subprocess.run(["bash", str(ROOT / "deploy" / "scripts" / "install_prometheus.sh")],
                            capture_output=True, text=True, timeout=300)
    path = Path(result.stdout.strip()) if result.returncode == 0 else None
    return path if path is not None and os.access(path, os.X_OK) else None


def consul_targets(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """file_sd target groups for the instances of Consul's `/v1/health/service/<name>` answers, labelled as
    Prometheus's Consul discovery labels them."""
    groups = []
    for entry in instances:
        node, service = entry["Node"], entry["Service"]
        address = service["Address"] or node["Address"]
        checks = [check["Status"] for check in entry.get("Checks", [])]
        health = ("critical" if "critical" in checks else "warning" if "warning" in checks else "passing")
        labels = {
            "__meta_consul_address": node["Address"],
            "__meta_consul_dc": node.get("Datacenter", ""),
            "__meta_consul_health": health,
            "__meta_consul_node": node["Node"],
            "__meta_consul_service": service["Service"],
            "__meta_consul_service_address": address,
            "__meta_consul_service_id": service["ID"],
            "__meta_consul_service_port": str(service["Port"]),
            "__meta_consul_tags": "," + ",".join(service.get("Tags") or []) + ",",
        }
        for key, value in (service.get("Meta") or {}).items():
            labels["__meta_consul_service_metadata_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
        groups.append({"targets": [f"{address}:{service['Port']}"], "labels": labels})
    return groups


class PrometheusServer:
    """One Prometheus process over the deploy file's lmesh job, its Consul discovery replaced by `targets_file`
    (rewrite it to change what is discovered), scraping every second."""

    def __init__(self, binary: Path, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.targets_file = folder / "lmesh-targets.json"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        config = yaml.safe_load(DEPLOY_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        (job,) = config["scrape_configs"]
        del job["consul_sd_configs"]
        job["file_sd_configs"] = [{"files": [str(self.targets_file)], "refresh_interval": "1s"}]
        return config

    def write_targets(self, groups: list[dict[str, Any]]) -> None:
        staged = self.targets_file.with_suffix(".tmp")
        staged.write_text(json.dumps(groups))
        staged.replace(self.targets_file)  # whole, or Prometheus may read half a file

    def start(self, groups: list[dict[str, Any]]) -> PrometheusServer:
        config_path = self.folder / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config()))
        self.write_targets(groups)
        log_path = self.folder / "prometheus.log"
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), f"--config.file={config_path}", f"--storage.tsdb.path={self.folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {log_path.read_text()[-2000:]}")
            try:
                if httpx2.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx2.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus was not ready on port {self.port}: {log_path.read_text()[-2000:]}")

    async def api(self, path: str, **params: str) -> Any:
        async with httpx2.AsyncClient(base_url=self.url, timeout=10) as client:
            answer = (await client.get(f"/api/v1/{path}", params=params)).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
