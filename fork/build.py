"""Turn the fork's delta into a vLLM source tree: pinned upstream sdist + our files + patch.

    python fork/build.py                      # vLLM 0.31.0 -> vllm-fork/
    python fork/build.py --version 0.26.0 --dest /tmp/vllm-0.26.0-fork
    python fork/build.py --onto /tmp/site --version 0.26.0   # patch an installed vllm/

The sdist is downloaded once into .cache/ (PyPI's simple API) and checked against the
sha256 pinned in release.py. Nothing here is committed to this repository.
"""

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import release

ROOT = Path(__file__).resolve().parent.parent
FORK = ROOT / "fork"


def unpack(version: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        with tarfile.open(release.sdist(version)) as tar:
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
    parser.add_argument("--version", default="0.31.0", choices=sorted(release.SDISTS))
    parser.add_argument("--dest", type=Path, default=ROOT / "vllm-fork")
    parser.add_argument("--onto", type=Path, help="patch this existing tree instead")
    args = parser.parse_args()
    if args.onto:
        apply_delta(args.version, args.onto)
        print(f"patched {args.onto} with the route-logger delta for vLLM {args.version}")
        return
    dest = args.dest.resolve()
    try:
        unpack(args.version, dest)
    except release.ReleaseError as e:
        sys.exit(f"fork/build.py: {e}")
    apply_delta(args.version, dest)
    print(f"{dest}: vLLM {args.version} + route logger")


if __name__ == "__main__":
    main()
