"""The fork is a delta: our modules plus one patch per pinned vLLM release."""

import filecmp
import importlib.util
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


release = load("release", "release.py")  # build.py imports it by this name
build = load("fork_build", "build.py")


@pytest.mark.parametrize("version", sorted(release.SDISTS))
def test_patch_applies_cleanly_to_its_release(version, tmp_path):
    tree = tmp_path / "vllm"
    build.unpack(version, tree)
    result = subprocess.run(
        ["patch", "-p1", "--dry-run", "--batch", "--forward", "-d", str(tree),
         "-i", str(ROOT / "fork" / "patches" / f"v{version}.patch")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout
    assert "offset" not in result.stdout and "fuzz" not in result.stdout, result.stdout


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
