"""The decoder's optional C helper (daemon/xds/wiresplit.c), compiled on first use and cached.

Why optional: it only makes the first full push cheaper (~2 us less CPU per workload, see
issue 12); every result it gives is also what the Python path gives (tests/xds pin that).
Without a C compiler or Python headers the decoder runs its Python path, with a warning.
``make setup`` builds it (``python -m daemon.xds.native``), so the daemon's first push does not
wait for the compiler. Cached under .build/native/ by source digest and Python ABI.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger("kmesh.xds")

SOURCE = Path(__file__).resolve().with_name("wiresplit.c")
BUILD_DIR = Path(__file__).resolve().parents[2] / ".build" / "native"
MODULE = "kmesh_wiresplit"
_lock = threading.Lock()
_loaded: ModuleType | None = None
_tried = False


def build(build_dir: Path = BUILD_DIR) -> Path:
    """The compiled extension for the current source and interpreter, building it when missing."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    out = build_dir / f"{MODULE}-{digest}{suffix}"
    if out.is_file():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError(f"no C compiler for {SOURCE.name}: apt-get install gcc (or set CC)")
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").is_file():
        raise RuntimeError(f"no Python.h under {include}: apt-get install python3-dev")
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = build_dir / f".{out.name}.{os.getpid()}"
    cmd = [cc, "-O2", "-Wall", "-shared", "-fPIC", f"-I{include}", "-o", str(tmp), str(SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed: {proc.stderr.strip()[-400:]}")
    tmp.replace(out)
    return out


def load() -> ModuleType | None:
    """The extension module, built if needed; None (once warned) when it cannot be built."""
    global _loaded, _tried
    if _tried:
        return _loaded
    with _lock:
        if not _tried:
            try:
                path = build()
                loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
                spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
                assert spec is not None
                mod = importlib.util.module_from_spec(spec)
                loader.exec_module(mod)
                _loaded = mod
            except Exception as e:  # noqa: BLE001 - any failure: the Python path does the same work
                log.warning("xds decoder: C helper unavailable, using the Python path: %s", e)
            _tried = True
    return _loaded


if __name__ == "__main__":  # make setup: build it now
    print(build())
