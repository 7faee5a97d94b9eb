"""The part of a benchmark server process that Envoy and nginx share.

Why one base: both backends run in a namespace and cgroup, answer "LIVE" on a loopback
``/ready`` admin path, and must be killed by pid on failure; keeping that logic once means a
fix to readiness or cleanup applies to both. Subclasses add their own counters (``totals``).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from benchmarks import netns

P = TypeVar("P", bound="ServerProcess")


@dataclass
class ServerProcess:
    """One server started inside a namespace and cgroup; stop() kills it by pid."""

    #: short name in error messages ("envoy", "nginx")
    label: ClassVar[str] = "server"
    #: what the loopback port is called in error messages ("envoy admin", "nginx status")
    admin_label: ClassVar[str] = "server admin"

    proc: subprocess.Popen[bytes]
    netns: str
    cgroup: Path
    admin_port: int
    log: Path

    def admin_get(self, path: str) -> str:
        status, body = netns.http_get(self.netns, f"http://127.0.0.1:{self.admin_port}{path}")
        if status != 200:
            raise RuntimeError(f"{self.admin_label} {path}: {status or body}")
        return body

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                if self.admin_get("/ready").strip() == "LIVE":
                    return
            except RuntimeError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.label} not ready after {timeout:.0f} s: {self._log_tail()}")

    def stop(self) -> None:
        netns.stop(self.proc)

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return "(no log)"


def start_ready(cls: type[P], argv: list[str], ns: str, cgroup: Path, admin_port: int, log: Path,
                cpus: str | None = None) -> P:
    """Spawn `argv` in `ns`/`cgroup` and wait until /ready says LIVE; kill it if it never does."""
    proc = netns.spawn(argv, ns, cgroup, cpus=cpus, log=log)
    server = cls(proc, ns, cgroup, admin_port, log)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server
