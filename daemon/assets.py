"""Where the non-Python trees are: ``manifests/`` and ``bpf/``, in a checkout or an installed wheel.

Why one module: kmeshctl renders ``manifests/`` and the loader compiles ``bpf/``; both must work
from a source checkout (editable install, tests) and from a wheel installed anywhere, where the
trees travel as the data package ``kmesh_assets`` next to ``daemon`` in site-packages (see
setup.py). Nothing here imports or assumes the repository layout beyond "sibling of daemon/".
"""

from __future__ import annotations

import os
from pathlib import Path

_SITE = Path(__file__).resolve().parent.parent  # the checkout, or site-packages
TREES = ("manifests", "bpf")


class AssetError(LookupError):
    """A data tree is missing from both the installed package and the checkout."""


def asset_dir(tree: str) -> Path:
    """The directory of ``tree`` (``manifests`` or ``bpf``): installed copy first, then checkout."""
    if tree not in TREES:
        raise ValueError(f"unknown asset tree {tree!r}; one of {', '.join(TREES)}")
    for candidate in (_SITE / "kmesh_assets" / tree, _SITE / tree):
        if candidate.is_dir():
            return candidate
    raise AssetError(f"the {tree}/ tree is neither installed ({_SITE / 'kmesh_assets' / tree}) nor in a "
                     f"checkout ({_SITE / tree}); reinstall kmesh-py")


def manifests_dir() -> Path:
    """$KMESH_MANIFESTS_DIR when set (an operator's own templates), else the packaged manifests."""
    env = os.environ.get("KMESH_MANIFESTS_DIR")
    return Path(env) if env else asset_dir("manifests")


def bpf_dir() -> Path:
    """The BPF C sources and headers the loader compiles ($KMESH_BPF_DIR overrides)."""
    env = os.environ.get("KMESH_BPF_DIR")
    return Path(env) if env else asset_dir("bpf")


def checkout_root() -> Path | None:
    """The source checkout this code runs from, if any (for .build/ caches such as kernel-src)."""
    return _SITE if (_SITE / "pyproject.toml").is_file() and (_SITE / "daemon").is_dir() else None


def kernel_headers_fallback() -> Path | None:
    """Headers for bcc when the node has no /lib/modules/$(uname -r)/build: $KMESH_KERNEL_HEADERS
    (the image's merged Debian tree), else the checkout's .build/kernel-src (`make setup`)."""
    env = os.environ.get("KMESH_KERNEL_HEADERS")
    if env and Path(env).is_dir():
        return Path(env)
    built = _SITE / ".build" / "kernel-src"
    return built if built.is_dir() else None
