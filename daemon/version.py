"""The daemon's version record, served on /version and printed by ``kmeshctl version``."""

from __future__ import annotations

import platform
import sys
from functools import cache
from typing import Any


@cache
def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("kmesh-py")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source tree)
        return "0.1.0"


@cache
def git_commit() -> str:
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
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
