"""Carry the fork's call sites from one pinned vLLM release to another, with git's
three-way merge.

    python fork/port.py 0.33.0 --from 0.32.0
    python fork/port.py 0.34.0 --from 0.33.0 --drop vllm/v1/worker/gpu_model_runner.py

For each file that fork/patches/v<from>.patch touches, `git merge-file` merges the
change from the old release's file (base) to that file patched (ours) into the new
release's file (theirs). If every file merges cleanly, the new release's patch is
written as the diff of its files against the merged ones; otherwise each conflicting
file and hunk is named and nothing is written. A file the new release no longer has
(deleted or moved) is named and nothing is written, unless ``--drop`` gives it: then
its call sites are left behind, for a port by hand. Both releases must be pinned in
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


class MissingFiles(Exception):
    """Files the patch touches that a release does not have."""

    def __init__(self, version: str, names: list[str]):
        super().__init__(f"vLLM {version} has no {', '.join(names)} (deleted or moved upstream): "
                         "port those call sites by hand, or pass --drop for each to carry the rest")


def pristine(version: str, files: list[str], dest: Path) -> Path:
    """Those files of the release's sdist, under ``dest``."""
    prefix = f"vllm-{version}/"
    with tarfile.open(release.sdist(version)) as tar:
        missing = [name for name in files if prefix + name not in tar.getnames()]
        if missing:
            raise MissingFiles(version, missing)
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


def port(new: str, old: str, out_dir: Path = PATCHES,
         drop: tuple[str, ...] = ()) -> tuple[Path | None, dict[str, list[str]]]:
    """Writes ``out_dir``/v<new>.patch and returns it, or returns the conflicts by file.
    Raises MissingFiles for touched files that ``new`` lacks and ``drop`` does not name."""
    patch = PATCHES / f"v{old}.patch"
    files = touched(patch)
    unknown = sorted(set(drop) - set(files))
    if unknown:
        raise ValueError(f"--drop {', '.join(unknown)}: not touched by {patch.name}")
    with tempfile.TemporaryDirectory() as tmp:
        base = pristine(old, files, Path(tmp) / "base")
        ours = pristine(old, files, Path(tmp) / "ours")
        subprocess.run(["patch", "-p1", "--batch", "--quiet", "-d", str(ours), "-i", str(patch)], check=True)
        files = [name for name in files if name not in drop]
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
    parser.add_argument("--drop", action="append", default=[], metavar="PATH",
                        help="a touched file the new release deleted: leave its call sites behind")
    args = parser.parse_args()
    try:
        out, conflicts = port(args.version, args.old, drop=tuple(args.drop))
    except (release.ReleaseError, MissingFiles, ValueError) as e:
        sys.exit(f"fork/port.py: {e}")
    if conflicts:
        sys.exit("fork/port.py: conflicts, nothing written:\n" + "\n".join(
            f"  {name}: {', '.join(hunks)}" for name, hunks in conflicts.items()))
    print(f"wrote {out}: the call sites of v{args.old} merged into vLLM {args.version}"
          + "".join(f"; {name} dropped" for name in args.drop))


if __name__ == "__main__":
    main()
