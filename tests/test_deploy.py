"""deploy/scripts/gpu_runtime.sh: which onnxruntime build a virtual environment ends up with.

`nvidia-smi`, `pip` and the environment's `python` are stand-ins here (this machine has no GPU, and a test must
not download onnxruntime-gpu); each records its calls so the script's decisions can be checked.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.harness import ROOT

SCRIPT = ROOT / "deploy" / "scripts" / "gpu_runtime.sh"


def fake_tools(tmp_path: Path, *, gpu: bool, cuda_works: str) -> tuple[Path, Path, dict[str, str]]:
    """A PATH with `nvidia-smi`, and a venv bin with `pip` and `python`; `cuda_works` is the CUDA probe's answers
    in order ("01": fails first, then succeeds)."""
    calls = tmp_path / "calls"
    path_dir, venv_bin = tmp_path / "path", tmp_path / "venv-bin"
    path_dir.mkdir()
    venv_bin.mkdir()
    scripts = {
        path_dir / "nvidia-smi": "echo 'GPU 0: NVIDIA H100 (UUID: GPU-0)'" if gpu else "exit 9",
        venv_bin / "pip": f'echo "pip $*" >> {calls}',
        venv_bin / "python": f"""
case "$2" in
  *importlib.metadata*) echo 1.32.0 ;;
  *) answers=$(cat {tmp_path}/answers); echo "${{answers:1}}" > {tmp_path}/answers
     echo "probe ${{answers:0:1}}" >> {calls}; exit $((1 - ${{answers:0:1}})) ;;
esac""",
    }
    for path, body in scripts.items():
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    (tmp_path / "answers").write_text(cuda_works)
    env = {**os.environ, "PATH": f"{path_dir}:{os.environ['PATH']}"}
    env.pop("LMESH_GPU", None)
    return venv_bin, calls, env


def run(venv_bin: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), str(venv_bin)], env=env, capture_output=True, text=True, timeout=30)


def calls_of(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def test_without_a_gpu_nothing_changes(tmp_path: Path) -> None:
    venv_bin, calls, env = fake_tools(tmp_path, gpu=False, cuda_works="1")
    result = run(venv_bin, env)
    assert result.returncode == 0 and result.stdout == "" and calls_of(calls) == []


def test_with_a_gpu_the_cpu_build_is_swapped_for_the_gpu_build_of_the_same_version(tmp_path: Path) -> None:
    venv_bin, calls, env = fake_tools(tmp_path, gpu=True, cuda_works="01")
    result = run(venv_bin, env)
    assert result.returncode == 0, result.stderr
    assert calls_of(calls) == ["probe 0", "pip uninstall -q -y onnxruntime",
                               "pip install -q onnxruntime-gpu[cuda,cudnn]==1.32.0", "probe 1"]
    assert "CUDA execution provider" in result.stdout


def test_a_gpu_build_that_cannot_start_cuda_is_replaced_by_the_cpu_build(tmp_path: Path) -> None:
    venv_bin, calls, env = fake_tools(tmp_path, gpu=True, cuda_works="00")
    result = run(venv_bin, env)
    assert result.returncode == 0
    assert calls_of(calls)[-2:] == ["pip uninstall -q -y onnxruntime-gpu", "pip install -q onnxruntime==1.32.0"]
    assert result.stderr.startswith("lmesh: onnxruntime-gpu==1.32.0 cannot start CUDA on this machine")


@pytest.mark.parametrize("setting", ["already", "off"])
def test_a_working_gpu_build_or_lmesh_gpu_0_is_left_alone(tmp_path: Path, setting: str) -> None:
    venv_bin, calls, env = fake_tools(tmp_path, gpu=True, cuda_works="1")
    if setting == "off":
        env["LMESH_GPU"] = "0"
    result = run(venv_bin, env)
    assert result.returncode == 0 and result.stdout == ""
    assert calls_of(calls) == ([] if setting == "off" else ["probe 1"])


def test_make_clean_refuses_while_a_dev_mesh_holds_the_home(tmp_path: Path) -> None:
    """A running mesh would go on from deleted databases (a key or a model registered then is lost)."""
    from services.devmesh import hold_home_lock

    home = tmp_path / "home"
    home.mkdir()
    lock = hold_home_lock(home)
    assert not isinstance(lock, str)
    try:
        refused = subprocess.run(["make", "-C", str(ROOT), "clean", f"LMESH_HOME={home}"], capture_output=True,
                                 text=True, timeout=60)
    finally:
        lock.close()
    assert refused.returncode != 0 and home.exists()
    assert refused.stderr.splitlines()[0] == (f"make clean: a mesh using {home} is running (pid {os.getpid()}); stop "
                                              "it first (Ctrl-C where it runs)")
    cleaned = subprocess.run(["make", "-C", str(ROOT), "clean", f"LMESH_HOME={home}"], capture_output=True, text=True,
                             timeout=60)
    assert cleaned.returncode == 0 and not home.exists()
