"""The container image (deploy/container/build.sh): what it promises agrees with what the Kubernetes manifests ask
of it and with the CLI it runs, checked from the build script without building; the pins it installs are complete
for the image's Python. With LMESH_CONTAINER_TESTS=1 the built image itself runs the mesh (bench/container_mesh.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bench import container_mesh
from tests.harness import ROOT
from tests.test_kubernetes import container_env, container_of, documents, pod_spec, workloads

BUILD = ROOT / "deploy" / "container" / "build.sh"
INSTALL_TOOLS = ROOT / "deploy" / "scripts" / "install_container_tools.sh"
PINS = ROOT / "deploy" / "container" / "pins.py"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def build_setting(name: str) -> str:
    """A `name=value` assignment at the top level of build.sh."""
    match = re.search(rf"^{name}=(\S+)", BUILD.read_text(), re.MULTILINE)
    assert match, f"build.sh sets no {name}"
    return match[1]


def image_config() -> dict[str, Any]:
    """What build.sh's `buildah config` gives the image: entrypoint, user, environment, exposed ports."""
    text = BUILD.read_text()
    (config,) = re.findall(r"buildah config \\\n(.*?)\"\$container\"", text, re.DOTALL)
    settings = {name: build_setting(name) for name in ("embeddings_in_image", "tools_embeddings_in_image", "uid")}
    entrypoint = json.loads(re.search(r"--entrypoint '(\[.*?\])'", config)[1])  # type: ignore[index]
    config = re.sub(r"\$(\w+)", lambda m: settings.get(m[1], m[0]), config).replace('"', "")
    env = dict(re.findall(r"--env (\w+)=(\S+)", config))
    ports = {int(p) for p in re.findall(r"--port (\d+)/tcp", config)}
    user = re.search(r"--user ([\d:]+)", config)[1]  # type: ignore[index]
    return {"entrypoint": entrypoint, "env": env, "ports": ports, "user": user}


@pytest.mark.parametrize("script", [BUILD, INSTALL_TOOLS], ids=lambda p: p.name)
def test_the_scripts_parse(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_the_image_is_the_one_the_manifests_name() -> None:
    """build.sh commits localhost/lmesh:<pyproject version>, which the manifests' `lmesh:<version>` names on a node
    that loaded it, and which bench/container_mesh.py runs by default."""
    assert build_setting("image") == container_mesh.IMAGE_NAME == "localhost/lmesh"
    assert container_mesh.default_image() == f"localhost/lmesh:{VERSION}"
    images = {container["image"] for workload in workloads(documents()).values()
              for container in pod_spec(workload)["containers"]}
    assert images == {f"lmesh:{VERSION}"}


def test_the_entrypoint_runs_the_cli_the_manifests_call() -> None:
    """Entrypoint `lmesh` (pyproject's script), on PATH for the exec probes too; every workload's args are a
    command that CLI's parser accepts."""
    from services.cli import build_parser

    config = image_config()
    assert config["entrypoint"] == ["lmesh"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lmesh"] == "services.cli:main"
    assert "/opt/lmesh/venv/bin" in config["env"]["PATH"].split(":")
    for service, workload in workloads(documents()).items():
        container = container_of(workload)
        args = build_parser().parse_args(container["args"])
        assert (args.command, args.service) == ("serve", service)
        probe = container["readinessProbe"].get("exec", {}).get("command", ["lmesh"])
        assert probe[0] == "lmesh", service


def test_the_user_ports_and_directories_are_the_manifests() -> None:
    """The image's user is the pods' runAsUser/runAsGroup, it exposes exactly the containers' ports, and its
    LMESH_HOME, LMESH_CACHE and embeddings model are where the manifests look for them."""
    config = image_config()
    docs = documents()
    uid = int(build_setting("uid"))
    assert config["user"] == f"{uid}:{uid}"
    ports: set[int] = set()
    for service, workload in workloads(docs).items():
        pod = pod_spec(workload)["securityContext"]
        assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, uid, uid), service
        container = container_of(workload)
        ports |= {p["containerPort"] for p in container["ports"]}
        env = container_env(docs, container)
        assert (env["LMESH_HOME"], env["LMESH_CACHE"]) == (config["env"]["LMESH_HOME"], config["env"]["LMESH_CACHE"])
    assert ports == config["ports"]
    embeddings = container_of(workloads(docs)["embeddings"])["args"]
    model_dir = embeddings[embeddings.index("--model-dir") + 1]
    assert model_dir == build_setting("embeddings_in_image") == config["env"]["LMESH_EMBEDDINGS_MODEL_DIR"]
    tools_dir = embeddings[embeddings.index("--tools-model-dir") + 1]
    assert tools_dir == build_setting("tools_embeddings_in_image") == config["env"]["LMESH_EMBEDDINGS_TOOLS_MODEL_DIR"]


def pins_of(report: dict[str, Any], image_python: str, tmp_path: Path) -> tuple[list[str], list[str]]:
    (tmp_path / "report.json").write_text(json.dumps(report))
    result = subprocess.run([sys.executable, str(PINS), str(tmp_path / "report.json"), image_python,
                             str(tmp_path / "pins.txt")], capture_output=True, text=True, check=True)
    return (tmp_path / "pins.txt").read_text().split(), result.stdout.split("\n")[:-1]


def distribution(name: str, version: str, *requires: str, extras: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
            "requested_extras": list(extras)}


def test_the_pins_add_what_only_the_images_python_needs(tmp_path: Path) -> None:
    """A resolution made under Python 3.11.7 leaves out redis' async-timeout, which the image's 3.11.2 needs;
    markers of extras nobody asked for, other Pythons' requirements and satisfied ones add nothing."""
    report = {"install": [
        distribution("lmesh", "0.1.0", "redis>=5.0", "numpy>=1.26"),
        distribution("redis", "8.2.0", 'async-timeout>=4.0.3; python_full_version < "3.11.3"',
                     'hiredis>=3; extra == "hiredis"'),
        distribution("numpy", "2.4.6", 'tomli; python_version < "3.11"'),
        distribution("uvicorn", "0.55.0", "h11>=0.8", 'httptools>=0.6; extra == "standard"', extras=("standard",)),
        distribution("h11", "0.16.0"),
        distribution("httptools", "0.9.0"),
    ]}
    pins, missing = pins_of(report, "3.11.2", tmp_path)
    assert pins == ["h11==0.16.0", "httptools==0.9.0", "numpy==2.4.6", "redis==8.2.0", "uvicorn==0.55.0"]
    assert missing == ["async-timeout>=4.0.3"]
    assert pins_of(report, "3.11.7", tmp_path)[1] == []
    report["install"].append(distribution("async-timeout", "4.0.2"))  # resolved, but too old for the requirement
    assert pins_of(report, "3.11.2", tmp_path)[1] == ["async-timeout>=4.0.3"]


def test_the_sandbox_flags_never_ask_above_the_hard_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CAP_SYS_RESOURCE the containers' limits are lowered to this host's hard limits (never raised); with
    it, podman's defaults stand and no --ulimit is passed."""
    import resource

    monkeypatch.setattr(container_mesh, "has_capability", lambda bit: False)
    flags, reasons = container_mesh.sandbox_flags()
    limits = dict(flags[i + 1].split("=", 1) for i, flag in enumerate(flags) if flag == "--ulimit")
    for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft, hard = (int(v) for v in limits[name].split(":"))
        assert soft == hard and (resource.getrlimit(limit)[1] == resource.RLIM_INFINITY
                                 or hard <= resource.getrlimit(limit)[1])
    assert reasons and "CAP_SYS_RESOURCE" in reasons[0]
    monkeypatch.setattr(container_mesh, "has_capability", lambda bit: True)
    assert "--ulimit" not in container_mesh.sandbox_flags()[0]


@pytest.mark.skipif(os.environ.get("LMESH_CONTAINER_TESTS") != "1",
                    reason="the container mesh runs only with LMESH_CONTAINER_TESTS=1 (needs podman and `make image`)")
def test_the_built_image_runs_the_mesh_and_answers() -> None:
    """The image as built: its configuration is what build.sh says, and six containers of it with a Consul agent on
    this host answer a chat (bench/container_mesh.py, about a minute)."""
    from tests.conftest import model_dir

    assert shutil.which("podman"), "podman is missing: run deploy/scripts/install_container_tools.sh"
    image = container_mesh.default_image()
    inspected = subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True)
    assert inspected.returncode == 0, f"no image {image}: run `make image`"
    (built,) = json.loads(inspected.stdout)
    expected = image_config()
    assert built["Config"]["Entrypoint"] == expected["entrypoint"]
    assert built["Config"]["User"] == expected["user"]
    assert {int(p.split("/")[0]) for p in built["Config"]["ExposedPorts"]} == expected["ports"]
    assert {k: v for k, v in (e.split("=", 1) for e in built["Config"]["Env"])}.items() >= expected["env"].items()
    result = subprocess.run([sys.executable, "-m", "bench.container_mesh", "--model-dir", str(model_dir())],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    answer = re.search(r"^answer: '(.+)'$", result.stdout, re.MULTILINE)
    assert answer, result.stdout
    assert "containers stopped and removed" in result.stderr
    started = re.findall(r"^started (lmesh-check-\S+):", result.stderr, re.MULTILINE)
    assert len(started) == len(container_mesh.SERVICES)
    listed = subprocess.run(["podman", "ps", "--all", "--format", "{{.Names}}"], capture_output=True, text=True)
    assert set(started).isdisjoint(listed.stdout.split())
