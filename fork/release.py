"""The pinned upstream releases the fork is built on: their files on PyPI, fetched and
checked, and the checks that a GPU install runs the fork over that release's kernels.

    python fork/release.py wheel --version 0.31.0     # fetch + sha256-check, print its path
    .venv/bin/python fork/release.py torch WHEEL      # this python's torch: the wheel's, CUDA
    python fork/release.py kernels WHEEL [--tree vllm-fork]  # its compiled files, byte for byte

Every refusal exits non-zero with one message naming what to change.
"""

import argparse
import hashlib
import json
import platform
import shutil
import sys
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
INDEX = "https://pypi.org/simple/vllm/"
# version -> sha256 of vllm-<version>.tar.gz on PyPI
SDISTS = {
    "0.34.0": "fcad848b246a9d8652b47e6425af92334dc02492f9802720f54e27b823cf0113",
    "0.33.0": "f4c33c2503d52bb411146afa9618a4f48bed68912f617e6803ac8d76e4c74112",
    "0.32.0": "d2c957d5eee3d0985012151315ddc62cbe0cd368fc96a5fc3510438d9dddf2ad",
    "0.31.0": "dde46f1efbe846e5bd0c5c4ec6ec71842c42254c7ff3d9bebb2a57028715d380",
    "0.26.0": "23e9fa19d7e20ce7dcc1c074d41503e2116d23f19e688f5d5ea91b741f958502",
}
# (version, machine) -> sha256 of that release's CUDA wheel on PyPI
CUDA_WHEELS = {
    ("0.34.0", "x86_64"): "79ca4b3cd74aec08c4bf476bdf0cb15735b605ae5368526a2faae1e30f044ca2",
    ("0.34.0", "aarch64"): "7d96231fc141ad4b3a441292b77362b285b335ca7d1b0e2ab441d4ebde82f405",
    ("0.33.0", "x86_64"): "4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa",
    ("0.33.0", "aarch64"): "e9e404f52c8494b69bd83fe99fe7ecfa9f6b89fbd156d2a9639c24ea41d6d606",
    ("0.32.0", "x86_64"): "5e2ecdc5b0baf72921c288486417ca82778456a448e4fe60b62ee43c0dfc8611",
    ("0.32.0", "aarch64"): "d0620dbdf99528bcfebe551a8906347a229921fb1602f887bd1286a920da2d44",
    ("0.31.0", "x86_64"): "39132b433967f0962d03d8a5f633b9bee6b32708f566c7d5637b79f8d0ef3433",
    ("0.31.0", "aarch64"): "56edd19c798510b6da5ae4dd38b3bdf55ea7ae261b339a906df006dc3faf751d",
    ("0.26.0", "x86_64"): "adb1e4c9b46d0dfdb094121ae5aad670a42412dd813ed4e5db069ed6a15006de",
    ("0.26.0", "aarch64"): "52a4c3e55c2c80cc8793e52ccc244457ceade25b0ad7caa1c15e5002a95a1b2c",
}


class ReleaseError(Exception):
    """A refusal: the message says what is wrong and what to do."""


def cuda_wheel_name(version: str, machine: str) -> str:
    if (version, machine) not in CUDA_WHEELS:
        pinned = sorted({v for v, m in CUDA_WHEELS if m == machine})
        raise ReleaseError(
            f"no pinned CUDA wheel of vLLM {version} for {machine}; pinned: "
            f"{', '.join(pinned) or 'none for this machine'} (fork/release.py)")
    return f"vllm-{version}-cp38-abi3-manylinux_2_28_{machine}.whl"


def fetch(filename: str, sha256: str, cache: Path = CACHE) -> Path:
    """The file from PyPI's vllm index, kept in ``cache``; refused unless its sha256 is ``sha256``."""
    path = cache / filename
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        request = urllib.request.Request(INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        files = json.load(urllib.request.urlopen(request, timeout=60))["files"]
        url = next((f["url"] for f in files if f["filename"] == filename), None)
        if url is None:
            raise ReleaseError(f"{filename} is not on {INDEX}")
        print(f"downloading {url}", file=sys.stderr, flush=True)
        part = path.with_name(path.name + ".part")
        with urllib.request.urlopen(url, timeout=600) as r, open(part, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        part.rename(path)
    digest = file_sha256(path)
    if digest != sha256:
        raise ReleaseError(f"{path}: sha256 {digest} is not the pinned {sha256}; delete it to fetch it again")
    return path


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return stream_sha256(f)


def stream_sha256(f) -> str:
    h = hashlib.sha256()
    while block := f.read(1 << 20):
        h.update(block)
    return h.hexdigest()


def sdist(version: str) -> Path:
    if version not in SDISTS:
        raise ReleaseError(f"no pinned vLLM {version}; pinned: {', '.join(sorted(SDISTS))}")
    return fetch(f"vllm-{version}.tar.gz", SDISTS[version])


def cuda_wheel(version: str, machine: str | None = None) -> Path:
    machine = machine or platform.machine()
    return fetch(cuda_wheel_name(version, machine), CUDA_WHEELS[(version, machine)])


def torch_requirement(wheel: Path) -> str:
    """The torch version the wheel was built against (its ``Requires-Dist: torch==X``)."""
    with zipfile.ZipFile(wheel) as whl:
        name = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        for line in whl.read(name).decode().splitlines():
            if line.replace(" ", "").startswith("Requires-Dist:torch=="):
                return line.split("==", 1)[1].strip()
    raise ReleaseError(f"{wheel.name} pins no torch version")


def torch_mismatch(required: str, installed: str, cuda: str | None) -> str | None:
    """Why the installed torch cannot run the wheel's kernels, or None."""
    public = installed.split("+", 1)[0]
    if public != required:
        return (f"torch {installed} is installed; the vLLM kernels were built for torch=={required}: "
                f"install that version or choose the vLLM release built for {public}")
    if cuda is None:
        return (f"torch {installed} is a CPU build; the vLLM CUDA kernels need the CUDA build of torch "
                f"{required} (a pip find-links or index with a +cpu wheel can pick it: install torch=={required} "
                "from PyPI first)")
    return None


def kernel_mismatches(wheel: Path, tree: Path) -> list[str]:
    """The wheel's compiled files (extensions, and the Rust front end) that the tree lacks
    or holds with other bytes."""
    problems = []
    with zipfile.ZipFile(wheel) as whl:
        for name in whl.namelist():
            if not (name.endswith(".so") or name == "vllm/vllm-rs"):
                continue
            path = tree / name
            if not path.exists():
                problems.append(f"{name}: missing")
            else:
                with whl.open(name) as member:
                    if stream_sha256(member) != file_sha256(path):
                        problems.append(f"{name}: differs from the wheel's")
    return problems


def check_torch(wheel: Path) -> None:
    import torch

    why = torch_mismatch(torch_requirement(wheel), torch.__version__, torch.version.cuda)
    if why:
        raise ReleaseError(why)
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): the one {wheel.name} was built for")


def check_kernels(wheel: Path, tree: Path) -> None:
    problems = kernel_mismatches(wheel, tree)
    if problems:
        raise ReleaseError(f"{tree} does not hold {wheel.name}'s compiled files: " + "; ".join(problems))
    print(f"{tree}: every compiled file of {wheel.name}, byte for byte")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wheel", help="fetch the CUDA wheel of a pinned release; print its path")
    p.add_argument("--version", required=True)
    p.add_argument("--machine", default=platform.machine())
    p = sub.add_parser("torch", help="this python's torch is the one the wheel was built for")
    p.add_argument("wheel", type=Path)
    p = sub.add_parser("kernels", help="the tree holds the wheel's compiled files, byte for byte")
    p.add_argument("wheel", type=Path)
    p.add_argument("--tree", type=Path, default=ROOT / "vllm-fork")
    args = parser.parse_args()
    try:
        if args.command == "wheel":
            print(cuda_wheel(args.version, args.machine))
        elif args.command == "torch":
            check_torch(args.wheel)
        else:
            check_kernels(args.wheel, args.tree)
    except ReleaseError as e:
        sys.exit(f"fork/release.py: {e}")


if __name__ == "__main__":
    main()
