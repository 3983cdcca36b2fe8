"""Turn the fork's delta into a vLLM source tree: pinned upstream sdist + our files + patch.

    python fork/build.py                      # vLLM 0.32.0 -> vllm-fork/ (a git repository)
    python fork/build.py --version 0.33.0 --dest /tmp/vllm-0.33.0-fork
    python fork/build.py --onto /tmp/site --version 0.26.0   # patch an installed vllm/
    python fork/build.py --export [--dest vllm-fork]         # its commits back into fork/

The tree's history (fork/tree.py): the release as published, tagged v<version>, then
the delta as a commit on the branch route-logger.

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
import tree

ROOT = Path(__file__).resolve().parent.parent
FORK = ROOT / "fork"


def unpack(version: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        with tarfile.open(release.sdist(version)) as tar:
            tar.extractall(tmp, filter="data")  # files owned by the caller: git trusts the tree
        if dest.exists():
            shutil.rmtree(dest)
        (Path(tmp) / f"vllm-{version}").rename(dest)


def apply_delta(version: str, tree: Path) -> None:
    """Our new modules are copied in; the call sites come from one patch per base."""
    patch = FORK / "patches" / f"v{version}.patch"
    subprocess.run(["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-d", str(tree),
                    "-i", str(patch)], check=True)
    for src in (FORK / "vllm").rglob("*.py"):
        (tree / src.relative_to(FORK)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tree / src.relative_to(FORK))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="0.32.0", choices=sorted(release.SDISTS))
    parser.add_argument("--dest", type=Path, default=ROOT / "vllm-fork")
    parser.add_argument("--onto", type=Path, help="patch this existing tree instead")
    parser.add_argument("--export", action="store_true", help="write --dest's commits back into fork/")
    args = parser.parse_args()
    if args.onto:
        apply_delta(args.version, args.onto)
        print(f"patched {args.onto} with the route-logger delta for vLLM {args.version}")
        return
    dest = args.dest.resolve()
    try:
        if args.export:
            print("\n".join(tree.export(dest, FORK)))
            return
        build(args.version, dest)
    except (release.ReleaseError, RuntimeError, subprocess.CalledProcessError) as e:
        sys.exit(f"fork/build.py: {getattr(e, 'stderr', None) or e}")
    print(f"{dest}: vLLM {args.version} + route logger (git -C {dest} diff v{args.version})")


def build(version: str, dest: Path) -> None:
    unpack(version, dest)
    tree.commit_pristine(dest, version)
    apply_delta(version, dest)
    tree.commit_delta(dest, version)


if __name__ == "__main__":
    main()
