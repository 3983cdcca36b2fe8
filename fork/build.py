"""Turn the fork's delta into a vLLM source tree: pinned upstream sdist + our files + patch.

    python fork/build.py                      # vLLM 0.31.0 -> vllm-fork/
    python fork/build.py --version 0.26.0 --dest /tmp/vllm-0.26.0-fork
    python fork/build.py --onto /tmp/site --version 0.26.0   # patch an installed vllm/

The sdist is downloaded once into .cache/ (PyPI's simple API) and checked against the
sha256 pinned in UPSTREAM below. Nothing here is committed to this repository.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORK = ROOT / "fork"
UPSTREAM = {  # version -> sha256 of vllm-<version>.tar.gz on PyPI
    "0.31.0": "dde46f1efbe846e5bd0c5c4ec6ec71842c42254c7ff3d9bebb2a57028715d380",
    "0.26.0": "23e9fa19d7e20ce7dcc1c074d41503e2116d23f19e688f5d5ea91b741f958502",
}
INDEX = "https://pypi.org/simple/vllm/"


def sdist(version: str) -> Path:
    path = ROOT / ".cache" / f"vllm-{version}.tar.gz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        request = urllib.request.Request(
            INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
        )
        files = json.load(urllib.request.urlopen(request, timeout=60))["files"]
        url = next(f["url"] for f in files if f["filename"] == path.name)
        print(f"downloading {url}", flush=True)
        with urllib.request.urlopen(url, timeout=600) as r, open(f"{path}.part", "wb") as f:
            shutil.copyfileobj(r, f)
        Path(f"{path}.part").rename(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != UPSTREAM[version]:
        sys.exit(f"{path}: sha256 {digest} is not the pinned {UPSTREAM[version]}")
    return path


def unpack(version: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        with tarfile.open(sdist(version)) as tar:
            tar.extractall(tmp, filter="tar")
        if dest.exists():
            shutil.rmtree(dest)
        (Path(tmp) / f"vllm-{version}").rename(dest)


def apply_delta(version: str, tree: Path, dry_run: bool = False) -> None:
    """Our new modules are copied in; the call sites come from one patch per base."""
    patch = FORK / "patches" / f"v{version}.patch"
    cmd = ["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-d", str(tree)]
    if dry_run:
        cmd.append("--dry-run")
    subprocess.run(cmd + ["-i", str(patch)], check=True)
    if not dry_run:
        for src in (FORK / "vllm").rglob("*.py"):
            shutil.copy2(src, tree / src.relative_to(FORK))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="0.31.0", choices=sorted(UPSTREAM))
    parser.add_argument("--dest", type=Path, default=ROOT / "vllm-fork")
    parser.add_argument("--onto", type=Path, help="patch this existing tree instead")
    args = parser.parse_args()
    if args.onto:
        apply_delta(args.version, args.onto)
        print(f"patched {args.onto} with the route-logger delta for vLLM {args.version}")
        return
    dest = args.dest.resolve()
    unpack(args.version, dest)
    apply_delta(args.version, dest)
    print(f"{dest}: vLLM {args.version} + route logger")


if __name__ == "__main__":
    main()
