"""The real ``kmesh-daemon`` process under benchmark: started, fed, measured and cleaned up.

Why a module of its own: the control-plane, scale and CLI figures must come from the process a
node runs (admin API, metrics server, enrollment watcher against a Kubernetes API, event
reader, DataplaneSync), not from a harness that lacks those parts. Three children:

- a sandbox API server (``python -m sandbox.apiserver``) the enrollment watcher lists and
  watches (no pods on the bench node: it converges at once, as on an empty node);
- the synthetic xDS server of ``benchmarks.controlplane serve`` (delta ADS over gRPC on
  loopback) which can hold its responses until told to release them;
- the daemon, through its console script, inside ``unshare --mount`` with a private bpffs
  mounted there (its pins vanish with it) and its programs attached to a dedicated child
  cgroup of the run's cgroup, never the root.

Timestamps: the server prints the CLOCK_MONOTONIC time just before it hands the first full
response to gRPC; the daemon's admin ``/status`` reports (``dataplane_sync``) the monotonic start
and end of its last full sync and last incremental pass. CLOCK_MONOTONIC is one clock for all
processes of the machine, so "sent -> maps written" is a difference of two readings.

Memory: VmRSS / VmHWM of the daemon pid (the loader child that compiles the BPF programs exits
before the daemon is up, so its bcc/LLVM memory is not the daemon's). Map memory is what the
kernel charges for the maps the daemon holds: the sum of ``memlock`` in ``/proc/<pid>/fdinfo``
over distinct ``map_id`` (hash maps are preallocated: this is the capacity's cost, not the
entries').
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.controlplane import _Child

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_argv() -> list[str]:
    """The console script (``kmesh-daemon``, what the DaemonSet runs) next to this interpreter."""
    script = Path(sys.executable).parent / "kmesh-daemon"
    return [str(script)] if script.exists() else [sys.executable, "-m", "daemon"]


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = {"VmRSS:": "rss_mib", "VmHWM:": "hwm_mib"}.get(line.split(":", 1)[0] + ":")
        if key:
            out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def map_memory(pid: int) -> dict[str, Any]:
    """Kernel memory charged for the BPF maps `pid` holds (fdinfo memlock, each map once)."""
    seen: dict[int, dict[str, int]] = {}
    fd_dir = Path(f"/proc/{pid}/fdinfo")
    for info in fd_dir.iterdir():
        try:
            fields = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if "map_id" not in fields or "memlock" not in fields:
            continue
        seen[int(fields["map_id"])] = {"memlock": int(fields["memlock"]),
                                       "max_entries": int(fields.get("max_entries", "0"))}
    total = sum(v["memlock"] for v in seen.values())
    return {"map_mib": round(total / 2**20, 1), "maps": len(seen)}


def _get(url: str, timeout: float = 30.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback admin API
        return json.loads(resp.read())


def _wait(pred: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except (OSError, ValueError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; last: {str(last)[:300]}")


@dataclass
class Stack:
    """API server + synthetic xDS server for one size; daemons come and go against it."""

    services: int
    endpoints: int
    work: Path
    cgroup_parent: Path
    prefix: str = field(default_factory=lambda: "kd" + secrets.token_hex(3))
    apiserver: subprocess.Popen | None = None
    server: _Child | None = None
    xds_port: int = 0

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def kubeconfig(self) -> Path:
        return self.work / "kubeconfig"

    def start(self, timeout: float = 900.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.work / "apiserver.log", "w")  # noqa: SIM115 - the child keeps it
        self.apiserver = subprocess.Popen(
            [sys.executable, "-m", "sandbox.apiserver", "--port", "0", "--kubeconfig", str(self.kubeconfig),
             "--state-dir", str(self.work / "api")],
            cwd=REPO, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.server = _Child(["serve", "--services", str(self.services), "--endpoints", str(self.endpoints),
                              "--hold"])
        _wait(lambda: "apiserver ready on" in (self.work / "apiserver.log").read_text(), 60, "the API server")
        _, line = self.server.wait(lambda s: s.startswith("port "), timeout=timeout)
        self.xds_port = int(line.split()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.apiserver is not None and self.apiserver.poll() is None:
            self.apiserver.terminate()
            try:
                self.apiserver.wait(20)
            except subprocess.TimeoutExpired:
                self.apiserver.kill()
                self.apiserver.wait(5)
        self.apiserver = None

    def hold(self) -> None:
        assert self.server is not None
        mark = len(self.server.lines)
        self.server.send("hold")
        self.server.wait(lambda s: s == "holding", start=mark, timeout=30)

    def release(self) -> int:
        """Let the held response go; returns the line index to look for its ``sent`` line from."""
        assert self.server is not None
        mark = len(self.server.lines)
        self.server.send("release")
        return mark

    def sent(self, start: int, count: int | None = None, timeout: float = 900.0) -> tuple[float, int]:
        """(monotonic time, resource count) of the first ``sent address`` line from `start`."""
        assert self.server is not None
        want = "sent address " + (f"{count} " if count is not None else "")
        _, line = self.server.wait(lambda s: s.startswith(want), start=start, timeout=timeout)
        parts = line.split()
        return float(parts[3]), int(parts[2])


@dataclass
class RealDaemon:
    """One ``kmesh-daemon`` process against a Stack, in a private mount namespace."""

    stack: Stack
    name: str = "d"
    capacity: dict[str, int] | None = None
    max_message_mib: int = 0
    proc: subprocess.Popen | None = None
    admin_port: int = 0
    metrics_port: int = 0

    @property
    def tag(self) -> str:
        return f"{self.stack.prefix}{self.name}"

    @property
    def cgroup(self) -> Path:
        return self.stack.cgroup_parent / f"kmesh-bench-{self.tag}"

    @property
    def bpffs(self) -> Path:
        return Path(f"/tmp/{self.tag}-bpffs")

    @property
    def log(self) -> Path:
        return self.stack.work / f"daemon-{self.name}.log"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def __enter__(self) -> RealDaemon:
        """Only guarantees close(): converge() starts the daemon once the server holds its data."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 300.0) -> None:
        if os.geteuid() != 0:
            raise PermissionError("the real daemon needs root (BPF, cgroups, mounts)")
        if self.proc is not None:
            raise RuntimeError(f"daemon {self.tag} already started (pid {self.proc.pid})")
        self.cgroup.mkdir(exist_ok=True)
        self.bpffs.mkdir(exist_ok=True)
        self.admin_port, self.metrics_port = free_port(), free_port()
        argv = [*daemon_argv(), "--mode=dual-engine", "--enable-bypass=false", "--enable-bpf-log=true",
                "--cgroup-root", str(self.cgroup), "--bpf-fs", str(self.bpffs), "--pin-prefix", "kmesh",
                "--proc-root", "/proc", "--admin-addr", self.admin,
                "--metrics-addr", f"127.0.0.1:{self.metrics_port}", "--plaintext",
                "--kubeconfig", str(self.stack.kubeconfig)]
        if self.capacity:
            argv += ["--capacity", ",".join(f"{k}={v}" for k, v in self.capacity.items())]
        if self.max_message_mib:
            argv += ["--xds-max-message-mib", str(self.max_message_mib)]
        # unshare execs sh, sh execs the daemon: the Popen pid is the daemon's pid
        wrapped = ["unshare", "--mount", "--propagation", "private", "--",
                   "sh", "-c", 'mount -t bpf bpf "$0" && exec "$@"', str(self.bpffs), *argv]
        env = {**os.environ, "XDS_ADDRESS": f"127.0.0.1:{self.stack.xds_port}", "CLUSTER_ID": "Kubernetes",
               "NODE_NAME": "node-1", "POD_NAME": f"kmesh-{self.tag}", "POD_NAMESPACE": "kmesh-system",
               "INSTANCE_IP": "127.0.0.1", "SERVICE_ACCOUNT": "kmesh"}
        env.setdefault("BCC_KERNEL_SOURCE", str(REPO / ".build" / "kernel-src"))
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(wrapped, cwd=REPO, env=env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)

        def started() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"kmesh-daemon exited with {self.proc.returncode}: {self.log_tail()}")
            return "kmesh-daemon started" in self.log.read_text(errors="replace")

        _wait(started, timeout, "kmesh-daemon started")

    def log_tail(self, n: int = 3) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"kmesh-daemon exited with {self.proc.returncode}: {self.log_tail()}")
        return _get(f"http://{self.admin}/status")

    def wait_status(self, pred: Any, timeout: float, what: str, interval: float = 0.2) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            st = self.status()
            return st if pred(st) else None

        return _wait(check, timeout, what, interval)

    def memory(self) -> dict[str, Any]:
        return {**proc_memory(self.pid), **map_memory(self.pid)}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGTERM: the daemon finds no DaemonSet in the sandbox API and uninstalls itself
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        # the private bpffs went with the daemon's mount namespace; the directories are ours
        for path in (self.cgroup, self.bpffs):
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def converge(stack: Stack, daemon: RealDaemon, settle_s: float = 2.0,
             timeout: float = 900.0) -> dict[str, Any]:
    """Start `daemon` against a held `stack`, read its base RSS, release, time the full sync.

    Returns converge_s (first full response sent -> maps written), parse_s (sent -> the full
    sync started: transfer, decode, state), write_s (projection + map writes), the reconciler's
    own seconds/write_seconds, base and converged memory.
    """
    stack.hold()
    assert stack.server is not None
    mark = len(stack.server.lines)
    daemon.start()
    stack.server.wait(lambda s: s.startswith("waiting address"), start=mark, timeout=120)
    time.sleep(settle_s)
    base = daemon.memory()
    mark = stack.release()
    t_sent, n_sent = stack.sent(mark, timeout=timeout)
    st = daemon.wait_status(lambda st: st["dataplane_sync"].get("syncs", 0) >= 1, timeout,
                            "the first full sync", interval=0.5)
    sync = st["dataplane_sync"]
    result = sync.get("last_result") or {}
    if sync.get("last_error") or result.get("rejected"):
        rejected = result.get("rejected") or {}
        raise RuntimeError(f"the daemon did not write everything: {sync.get('last_error') or ''} "
                           f"{len(rejected)} rejected, e.g. {list(rejected.items())[:2]}")
    done, started = sync["last_sync_done_monotonic"], sync["last_sync_started_monotonic"]
    return {
        "converge_s": round(done - t_sent, 3),
        "parse_s": round(started - t_sent, 3),
        "write_s": round(done - started, 3),
        "reconcile_s": result.get("seconds"),
        "reconcile_syscalls_s": result.get("write_seconds"),
        "written": result.get("written"),
        "resources_sent": n_sent,
        "base_rss_mib": base["rss_mib"],
        "base_map_mib": base["map_mib"],
        "status_resources": st["xds"].get("resources"),
    }


def tool_available() -> str | None:
    """None when a real daemon can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (BPF, cgroups, mounts)"
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None
