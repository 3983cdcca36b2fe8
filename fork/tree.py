"""`vllm-fork/` as a git repository: the pristine release tagged v<version>, and the fork's
delta as a commit on the branch `route-logger`; and the way back from its commits to fork/.

`git -C vllm-fork diff v0.31.0` shows every line the fork touches. After committing
changes there, `python fork/build.py --export` writes them back: files the branch adds
are our modules (fork/vllm/...); files it modifies are call sites (the release's patch).
"""

import subprocess
from pathlib import Path

from port import unified

BRANCH = "route-logger"
BUILT = "route-logger-built"  # the delta as fork/ held it at build time
IDENTITY = ["-c", "user.name=fork/build.py", "-c", "user.email=fork-build@localhost",
            "-c", "commit.gpgsign=false", "-c", "core.autocrlf=false"]


def git(tree: Path, *args: str) -> str:
    return subprocess.run(["git", *IDENTITY, "-C", str(tree), *args], check=True,
                          capture_output=True, text=True).stdout


def commit_pristine(tree: Path, version: str) -> None:
    git(tree, "init", "-q", "-b", BRANCH)
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", f"vLLM {version}: the release's sdist, as published")
    git(tree, "tag", f"v{version}")


def commit_delta(tree: Path, version: str) -> None:
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", f"Route logger on vLLM {version}: our modules and call sites (fork/)")
    git(tree, "tag", BUILT)


def version_of(tree: Path) -> str:
    tags = git(tree, "tag", "--list", "v*").split()
    if len(tags) != 1:
        raise RuntimeError(f"{tree}: expected one release tag v<version>, found {tags}")
    return tags[0][1:]


def export(tree: Path, fork: Path) -> list[str]:
    """Writes the branch's committed changes against the release tag into ``fork``:
    added files as our modules, modified ones as patches/v<version>.patch. Refuses
    uncommitted changes. Returns the files written."""
    if git(tree, "status", "--porcelain", "--untracked-files=no").strip():
        raise RuntimeError(f"{tree} has uncommitted changes: commit them there first")
    version = version_of(tree)
    tag = f"v{version}"
    changes = [line.split("\t") for line in git(tree, "diff", "--name-status", tag, BRANCH).splitlines()]
    unknown = [c for c in changes if c[0] not in ("A", "M")]
    if unknown:
        raise RuntimeError(f"only added and modified files can be exported: {unknown}")
    texts = {fork / name: git(tree, "show", f"{BRANCH}:{name}") for status, name in changes if status == "A"}
    patch = fork / "patches" / f"v{version}.patch"
    texts[patch] = _patch(tree, tag, BRANCH, [name for status, name in changes if status == "M"])
    _refuse_overwriting_edits(tree, fork, tag, texts)
    for path, text in texts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return [str(path) for path in texts]


def _patch(tree: Path, tag: str, rev: str, names: list[str]) -> str:
    return "".join(unified(name, git(tree, "show", f"{tag}:{name}"), git(tree, "show", f"{rev}:{name}"))
                   for name in names)


def _refuse_overwriting_edits(tree: Path, fork: Path, tag: str, texts: dict[Path, str]) -> None:
    """A file of fork/ edited since the tree was built (neither what the build read nor
    what export writes) would be lost: refused, naming it."""
    if BUILT not in git(tree, "tag", "--list", BUILT).split():
        return  # a tree built before the tag existed
    built = [line.split("\t") for line in git(tree, "diff", "--name-status", tag, BUILT).splitlines()]
    at_build = {fork / name: git(tree, "show", f"{BUILT}:{name}") for status, name in built if status == "A"}
    at_build[fork / "patches" / f"{tag}.patch"] = _patch(tree, tag, BUILT, [n for s, n in built if s == "M"])
    edited = [str(path) for path, text in texts.items()
              if path.exists() and path.read_text() not in (text, at_build.get(path))]
    if edited:
        raise RuntimeError(f"fork/ changed since {tree} was built and export would overwrite it: "
                           f"{', '.join(edited)}; carry those edits into the tree and commit them there, "
                           "or rebuild it (python fork/build.py)")
