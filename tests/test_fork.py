"""The fork is a delta: our modules plus one patch per pinned vLLM release."""

import filecmp
import importlib.util
import py_compile
import shutil
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
port = load("port", "port.py")  # tree.py imports it by this name
tree = load("tree", "tree.py")  # and build.py this one
build = load("fork_build", "build.py")


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


V1_RUNNER = "vllm/v1/worker/gpu_model_runner.py"  # deleted in 0.34.0


@pytest.mark.parametrize("new, old, drop", [("0.32.0", "0.31.0", ()), ("0.33.0", "0.32.0", ()),
                                            ("0.34.0", "0.33.0", (V1_RUNNER,))])
def test_port_reproduces_the_committed_patch(new, old, drop, tmp_path):
    out, conflicts = port.port(new, old, tmp_path, drop=drop)
    assert conflicts == {}
    assert out.read_text() == (ROOT / "fork" / "patches" / f"v{new}.patch").read_text()


def test_port_names_a_file_the_new_release_deleted(tmp_path):
    """0.33.0 -> 0.34.0 without --drop: one line naming the file and the release, a
    non-zero exit, nothing written."""
    result = subprocess.run([sys.executable, str(ROOT / "fork" / "port.py"), "0.34.0", "--from", "0.33.0"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"fork/port.py: vLLM 0.34.0 has no {V1_RUNNER} (deleted or moved upstream): "
                                     "port those call sites by hand, or pass --drop for each to carry the rest")
    assert not list(tmp_path.iterdir())


def test_port_names_each_conflict_and_writes_nothing(tmp_path):
    """0.26.0 -> 0.31.0: upstream rewrote lines next to five of our call sites."""
    out, conflicts = port.port("0.31.0", "0.26.0", tmp_path)
    assert out is None and not list(tmp_path.iterdir())
    assert sorted(conflicts) == ["vllm/envs.py", "vllm/v1/core/sched/output.py", "vllm/v1/engine/output_processor.py",
                                 "vllm/v1/worker/gpu/model_runner.py", "vllm/v1/worker/gpu_model_runner.py"]
    assert any("route_logger.begin_step(scheduler_output)" in h for h in conflicts["vllm/v1/worker/gpu/model_runner.py"])


def test_build_makes_a_git_tree_and_export_writes_its_commits_back(tmp_path):
    """The tag is the release as published, the branch adds the fork; a developer's
    commit there comes back into fork/ (a module and a call site), but never over an
    edit made in fork/ since the build; and the delta exported builds the same tree."""
    work = tmp_path / "vllm-fork"
    build.build("0.32.0", work)
    assert tree.git(work, "log", "--format=%s", "v0.32.0").splitlines() == ["vLLM 0.32.0: the release's sdist, as published"]
    changed = tree.git(work, "diff", "--name-status", "v0.32.0", "route-logger").splitlines()
    ours = sorted(str(p.relative_to(ROOT / "fork")) for p in (ROOT / "fork" / "vllm").rglob("*.py"))
    assert sorted(c.split("\t")[1] for c in changed if c.startswith("A")) == ours
    assert sorted(c.split("\t")[1] for c in changed if c.startswith("M")) == sorted(
        port.touched(ROOT / "fork" / "patches" / "v0.32.0.patch"))

    module = work / "vllm/model_executor/layers/fused_moe/route_log/writer/store.py"
    call_site = work / "vllm/model_executor/layers/fused_moe/router/base_router.py"
    module.write_text(module.read_text() + "# an edit to our module\n")
    call_site.write_text(call_site.read_text().replace(
        "        if self.route_log_fn is not None:", "        # an edit at a call site\n        if self.route_log_fn is not None:"))
    fork = tmp_path / "fork"
    shutil.copytree(ROOT / "fork", fork, ignore=shutil.ignore_patterns("__pycache__"))
    with pytest.raises(RuntimeError, match="uncommitted changes"):
        tree.export(work, fork)
    tree.git(work, "commit", "-qam", "an edit")
    edited_here = fork / "vllm/model_executor/layers/fused_moe/route_log/writer/store.py"
    kept = edited_here.read_text()
    edited_here.write_text(kept + "# edited in fork/ after the build\n")
    with pytest.raises(RuntimeError, match=r"fork/ changed since .*/store\.py"):
        tree.export(work, fork)  # it would be overwritten: refused, nothing written
    assert edited_here.read_text().endswith("# edited in fork/ after the build\n")
    edited_here.write_text(kept)
    written = tree.export(work, fork)
    assert sorted(written) == sorted([str(fork / p) for p in ours] + [str(fork / "patches" / "v0.32.0.patch")])
    exported = fork / "vllm/model_executor/layers/fused_moe/route_log/writer/store.py"
    assert exported.read_text().endswith("# an edit to our module\n")
    patch = (fork / "patches" / "v0.32.0.patch").read_text()
    assert "+        # an edit at a call site\n" in patch
    rebuilt = tmp_path / "rebuilt"
    build.unpack("0.32.0", rebuilt)
    subprocess.run(["patch", "-p1", "--batch", "--quiet", "-d", str(rebuilt), "-i", str(fork / "patches" / "v0.32.0.patch")],
                   check=True)
    assert (rebuilt / call_site.relative_to(work)).read_text() == call_site.read_text()


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
