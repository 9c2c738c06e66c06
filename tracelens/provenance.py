"""Where a generated file came from: the command that produced it, the tracelens version and the git commit.

``provenance(command)`` gives ``{"command", "version", "commit"}``; ``provenance_lines(command)`` the Markdown
lines every generated report opens with. The commit is read with ``git`` from the package's own source folder,
and only when that folder's files are tracked by the repository git finds there (an installed copy inside some
other checkout is not that checkout's commit): ``HEAD`` plus " (dirty)" when the working tree has uncommitted
changes (untracked files included), else "unknown" (no git, not a checkout, or git timed out).
"""

from __future__ import annotations

import re
import subprocess
from importlib.metadata import PackageNotFoundError, version as _dist_version
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
GIT_TIMEOUT_S = 10.0
UNKNOWN = "unknown"


def version() -> str:
    """The installed tracelens distribution's version (importlib.metadata), or "unknown (not installed)"."""
    try:
        return _dist_version("tracelens")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _git(*args: str, cwd: Path) -> str | None:
    """``git args`` run in ``cwd`` (stdout stripped), or None when git is missing, fails or times out."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit(source: Path = PACKAGE_DIR) -> str:
    """The commit of the checkout holding ``source`` (a folder of tracked files), " (dirty)" appended when its
    working tree has uncommitted changes; "unknown" when ``source`` is not tracked by a git checkout."""
    if _git("ls-files", "--error-unmatch", "--", ".", cwd=source) is None:  # untracked here, or no checkout
        return UNKNOWN
    head = _git("rev-parse", "HEAD", cwd=source)
    if head is None:
        return UNKNOWN
    status = _git("status", "--porcelain", cwd=source)
    return head if status == "" else f"{head} (dirty)" if status is not None else f"{head} (status unknown)"


def provenance(command: str) -> dict[str, str]:
    """``{"command", "version", "commit"}`` of a file produced now by ``command``."""
    return {"command": command, "version": version(), "commit": git_commit()}


def _code(text: str) -> str:
    """``text`` as a Markdown code span, fenced with one backtick more than its longest run of them."""
    fence = "`" * (max(map(len, re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def provenance_lines(command: str) -> list[str]:
    """The Markdown lines a generated report opens with: command, tracelens version, git commit."""
    p = provenance(command)
    return [f"- Command: {_code(p['command'])}", f"- tracelens version: {p['version']}",
            f"- Git commit: {p['commit']}"]
