"""Child-process and polling helpers shared by the daemon and policy test fixtures.

Why here: tests/daemon and tests/policy both start the real control-plane stand-ins and the
real daemon as subprocesses that announce readiness with a log line, and both poll HTTP status
until a condition holds; one copy keeps their timeouts, log handling and cleanup identical.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Call `pred` until it returns something truthy (exceptions count as "not yet"); return it."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Send `sig` to a child we started (if still running) and reap it; SIGKILL after 20 s."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def start_logged(cmd: list[str], log: Path, ready: str, name: str, env: dict[str, str] | None = None,
                 timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start `cmd` (cwd = repo root) with stderr appended to `log`; wait for a line of new log
    output containing `ready` and return the process and that line. The child is stopped
    before raising when it exits early or is not ready within `timeout`."""
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=logf,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + timeout
    fresh = ""
    while time.monotonic() < deadline:
        with log.open("rb") as f:
            f.seek(offset)
            fresh = f.read().decode(errors="replace")
        for line in fresh.splitlines():
            if ready in line:
                return proc, line
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}:\n{fresh[-3000:]}")
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"{name} not ready in {timeout}s:\n{fresh[-3000:]}")
