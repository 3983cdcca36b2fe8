"""The fork is a delta: our modules plus one patch per pinned vLLM release."""

import filecmp
import importlib.util
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str, file: str):
    """By file, not via sys.path: fork/vllm/ would shadow the installed vllm package."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "fork" / file)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


release = load("release", "release.py")  # build.py and port.py import it by this name
build = load("fork_build", "build.py")
port = load("fork_port", "port.py")


@pytest.mark.parametrize("version", sorted(release.SDISTS))
def test_patch_applies_cleanly_to_its_release_and_compiles(version, tmp_path):
    tree = tmp_path / "vllm"
    build.unpack(version, tree)
    patch = ROOT / "fork" / "patches" / f"v{version}.patch"
    result = subprocess.run(["patch", "-p1", "--dry-run", "--batch", "--forward", "-d", str(tree), "-i", str(patch)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "offset" not in result.stdout and "fuzz" not in result.stdout, result.stdout
    build.apply_delta(version, tree)
    ours = [p.relative_to(ROOT / "fork") for p in (ROOT / "fork" / "vllm").rglob("*.py")]
    for name in port.touched(patch) + [str(p) for p in ours]:
        py_compile.compile(str(tree / name), cfile=str(tmp_path / "x.pyc"), doraise=True)


@pytest.mark.parametrize("new, old", [("0.32.0", "0.31.0"), ("0.33.0", "0.32.0")])
def test_port_reproduces_the_committed_patch(new, old, tmp_path):
    out, conflicts = port.port(new, old, tmp_path)
    assert conflicts == {}
    assert out.read_text() == (ROOT / "fork" / "patches" / f"v{new}.patch").read_text()


def test_port_names_each_conflict_and_writes_nothing(tmp_path):
    """0.26.0 -> 0.31.0: upstream rewrote lines next to four of our call sites."""
    out, conflicts = port.port("0.31.0", "0.26.0", tmp_path)
    assert out is None and not list(tmp_path.iterdir())
    assert sorted(conflicts) == ["vllm/envs.py", "vllm/v1/core/sched/output.py",
                                 "vllm/v1/worker/gpu/model_runner.py", "vllm/v1/worker/gpu_model_runner.py"]
    assert any("route_logger.begin_step(scheduler_output)" in h for h in conflicts["vllm/v1/worker/gpu/model_runner.py"])


def test_the_installed_vllm_is_this_fork():
    import vllm

    assert Path(vllm.__file__).resolve().is_relative_to(ROOT / "vllm-fork")
    for ours in (ROOT / "fork" / "vllm").rglob("*.py"):
        installed = ROOT / "vllm-fork" / ours.relative_to(ROOT / "fork")
        assert filecmp.cmp(ours, installed, shallow=False), f"{installed} is stale: rerun scripts/setup.sh"


def test_vllm_sources_are_never_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if f.startswith("vllm-fork/")]
    ignored = subprocess.run(["git", "check-ignore", "-q", "vllm-fork"], cwd=ROOT)
    assert ignored.returncode == 0
