"""The daemon's version record, served on /version and printed by ``kmeshctl version``."""

from __future__ import annotations

import platform
import sys
from functools import cache
from typing import Any

# The one place the version lives: pyproject.toml reads it (tool.setuptools.dynamic), the wheel's
# metadata, `kmeshctl version`, `kmesh-daemon version`, /version and the default image tag follow.
__version__ = "0.1.0"


def version() -> str:
    return __version__


@cache
def git_commit() -> str:
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():  # an installed wheel: never ask an unrelated enclosing repo
        return "unknown"
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=2)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def version_info() -> dict[str, Any]:
    """Same keys as Kmesh's /version (Go fields renamed for Python)."""
    return {
        "gitVersion": f"v{version()}",
        "gitCommit": git_commit(),
        "pythonVersion": platform.python_version(),
        "platform": f"{sys.platform}/{platform.machine()}",
    }
