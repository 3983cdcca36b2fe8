"""Carry the fork's call sites from one pinned vLLM release to another, with git's
three-way merge.

    python fork/port.py 0.33.0 --from 0.32.0

For each file that fork/patches/v<from>.patch touches, `git merge-file` merges the
change from the old release's file (base) to that file patched (ours) into the new
release's file (theirs). If every file merges cleanly, the new release's patch is
written as the diff of its files against the merged ones; otherwise each conflicting
file and hunk is named and nothing is written. Both releases must be pinned in
release.py. Our own modules (fork/vllm/) are not patched: they are copied as they are.
"""

import argparse
import difflib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import release

PATCHES = Path(__file__).resolve().parent / "patches"


def touched(patch: Path) -> list[str]:
    return [line[len("+++ b/"):].split("\t")[0] for line in patch.read_text().splitlines()
            if line.startswith("+++ b/")]


def pristine(version: str, files: list[str], dest: Path) -> Path:
    """Those files of the release's sdist, under ``dest``."""
    prefix = f"vllm-{version}/"
    with tarfile.open(release.sdist(version)) as tar:
        for name in files:
            member = tar.getmember(prefix + name)
            member.name = name
            tar.extract(member, dest, filter="data")
    return dest


def merge(base: Path, ours: Path, theirs: Path) -> tuple[str, list[str]]:
    """The merged text and its conflicting hunks ("lines A-B: <the fork's first line>")."""
    result = subprocess.run(["git", "merge-file", "-p", "-L", "fork", "-L", "old release", "-L", "new release",
                             str(ours), str(base), str(theirs)], capture_output=True, text=True)
    if result.returncode < 0 or result.returncode > 127:
        raise RuntimeError(f"git merge-file failed: {result.stderr}")
    hunks, start, first = [], None, ""
    for number, line in enumerate(result.stdout.splitlines(), 1):
        if line.startswith("<<<<<<< fork"):
            start, first = number, ""
        elif start is not None and not first and line.strip():
            first = line.strip()
        elif line.startswith(">>>>>>> new release") and start is not None:
            hunks.append(f"lines {start}-{number}: {first}")
            start = None
    return result.stdout, hunks


def unified(name: str, before: str, after: str) -> str:
    lines = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                 f"a/{name}", f"b/{name}")
    return f"diff -ru a/{name} b/{name}\n" + "".join(lines)


def port(new: str, old: str, out_dir: Path = PATCHES) -> tuple[Path | None, dict[str, list[str]]]:
    """Writes ``out_dir``/v<new>.patch and returns it, or returns the conflicts by file."""
    patch = PATCHES / f"v{old}.patch"
    files = touched(patch)
    with tempfile.TemporaryDirectory() as tmp:
        base = pristine(old, files, Path(tmp) / "base")
        ours = pristine(old, files, Path(tmp) / "ours")
        subprocess.run(["patch", "-p1", "--batch", "--quiet", "-d", str(ours), "-i", str(patch)], check=True)
        theirs = pristine(new, files, Path(tmp) / "theirs")
        merged, conflicts = {}, {}
        for name in files:
            merged[name], hunks = merge(base / name, ours / name, theirs / name)
            if hunks:
                conflicts[name] = hunks
        if conflicts:
            return None, conflicts
        out = out_dir / f"v{new}.patch"
        out.write_text("".join(unified(n, (theirs / n).read_text(), merged[n]) for n in files))
        return out, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="the release to port to")
    parser.add_argument("--from", dest="old", required=True, help="the release whose patch is carried")
    args = parser.parse_args()
    try:
        out, conflicts = port(args.version, args.old)
    except release.ReleaseError as e:
        sys.exit(f"fork/port.py: {e}")
    if conflicts:
        sys.exit("fork/port.py: conflicts, nothing written:\n" + "\n".join(
            f"  {name}: {', '.join(hunks)}" for name, hunks in conflicts.items()))
    print(f"wrote {out}: the call sites of v{args.old} merged into vLLM {args.version}")


if __name__ == "__main__":
    main()
