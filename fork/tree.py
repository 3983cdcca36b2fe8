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
    written = []
    for _, name in (c for c in changes if c[0] == "A"):
        (fork / name).parent.mkdir(parents=True, exist_ok=True)
        (fork / name).write_text(git(tree, "show", f"{BRANCH}:{name}"))
        written.append(str(fork / name))
    patch = fork / "patches" / f"v{version}.patch"
    patch.write_text("".join(unified(name, git(tree, "show", f"{tag}:{name}"), git(tree, "show", f"{BRANCH}:{name}"))
                             for status, name in changes if status == "M"))
    return written + [str(patch)]
