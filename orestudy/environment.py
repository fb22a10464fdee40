"""What a run was made with: the versions of the libraries that compute it and orestudy's git commit,
recorded in every run (metrics.json and its MLflow run), so a number can be traced to its code."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

from .config import REPO_ROOT

PACKAGES = ("torch", "torchvision", "ray", "optuna", "mlflow")


def git(*args: str) -> str:
    """git's answer in orestudy's repository; '' where there is no git or no repository (an installed copy)."""
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def from_repo(path: str | Path) -> str:
    """A path as reports and MLflow show it: from orestudy's repository root when inside it (the same on
    every machine), else in full."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def versions() -> dict[str, str]:
    """{python, torch, ..., git_commit, git_dirty}: read from package metadata, so nothing heavy is imported."""
    commit = git("rev-parse", "HEAD")
    dirty = bool(commit) and bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"python": platform.python_version(), **{p: installed(p) for p in PACKAGES},
            "git_commit": commit, "git_dirty": str(dirty).lower() if commit else ""}
