"""Build and locate ``libkmesh_tlv.so``, the Envoy dynamic module that reads the kernel's TLV.

Why built here and not shipped: it is a few hundred lines of C compiled with the system compiler
against nothing but libc (the Envoy callbacks resolve from the envoy binary at dlopen time), so
``make setup`` builds it in a second and tests rebuild it when the source changes. A hash of the
source and the compiler flags is kept next to the library; a different hash means stale.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE = PACKAGE_DIR / "kmesh_tlv" / "kmesh_tlv.c"
#: the module name Envoy is given (``dynamic_module_config.name``): it opens lib<NAME>.so
MODULE_NAME = "kmesh_tlv"
LIB_NAME = f"lib{MODULE_NAME}.so"
CFLAGS = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
          "-fvisibility=hidden", "-pthread"]


def module_dir() -> Path:
    """Directory holding lib<NAME>.so: what ENVOY_DYNAMIC_MODULES_SEARCH_PATH must name.

    ``$KMESH_WAYPOINT_MODULE_DIR`` overrides the default ``<repo>/.build/waypoint``."""
    override = os.environ.get("KMESH_WAYPOINT_MODULE_DIR")
    if override:
        return Path(override)
    return PACKAGE_DIR.parent / ".build" / "waypoint"


def library_path() -> Path:
    return module_dir() / LIB_NAME


def _compiler() -> str:
    for cc in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    raise RuntimeError("no C compiler found (cc/gcc/clang); run `make setup` to install clang")


def _fingerprint(cc: str) -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update("\0".join([cc, *CFLAGS]).encode())
    return h.hexdigest()


def build(force: bool = False) -> Path:
    """Compile the module into module_dir() unless an up-to-date copy is there; return its path.

    Safe to call from several processes at once (a lock file serialises them) and atomic (the
    library is renamed into place, so a running Envoy never sees a half-written file)."""
    out_dir = module_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / LIB_NAME
    stamp = out_dir / f"{LIB_NAME}.sha256"
    cc = _compiler()
    want = _fingerprint(cc)
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and lib.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
            return lib
        fd, tmp = tempfile.mkstemp(prefix=".libkmesh_tlv.", suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE} with {cc} failed:\n{proc.stderr.strip()}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        stamp.write_text(want + "\n")
    return lib


def main() -> None:
    """`python -m waypoint.module [--force]`: what scripts/setup.sh runs."""
    import sys

    lib = build(force="--force" in sys.argv[1:])
    print(f"waypoint: {lib}", file=sys.stderr)


if __name__ == "__main__":
    main()
