"""Build and run ``kmesh-connload`` (benchmarks/connload.c): latency that includes connect().

Why a C client of our own: wrk starts a request's clock after the TCP handshake, so the
connect() our cgroup program rewrites is not in its latency. This client times socket() +
connect() + request + response + close() per request (CLOCK_MONOTONIC), with a fixed number of
requests in flight and a bound on count and duration. A Python client would add tens of
microseconds of interpreter time per request, more than the cost we want to see.

The binary is compiled on first use into ``.build/connload/`` (``cc``, or ``$CC``), named by the
source's hash so an edited source is rebuilt and concurrent runs never see a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import netns

SOURCE = Path(__file__).resolve().parent / "connload.c"
BUILD_DIR = Path(__file__).resolve().parent.parent / ".build" / "connload"
MARKER = "KMESH_CONNLOAD "
HTTP_REQUEST = r"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
HTTP_EXPECT = "HTTP/1.1 200"


@dataclass
class ConnResult:
    """One kmesh-connload run, in the units the report uses (ms like WrkResult)."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    rps: float
    requests: int
    errors: int
    duration_s: float
    concurrency: int
    cycle_ms: float  # concurrency / rps: the wall time per request of one in-flight slot
    cpu_us_per_req: float = 0.0  # filled by the caller from cgroup cpu.stat

    def as_dict(self) -> dict:
        return asdict(self)


def binary(build_dir: Path = BUILD_DIR) -> Path:
    """The compiled client for the current source, building it when missing."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    out = build_dir / f"kmesh-connload-{digest}"
    if out.is_file() and os.access(out, os.X_OK):
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler for benchmarks/connload.c: apt-get install gcc (or set CC)")
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = build_dir / f".{out.name}.{os.getpid()}"
    proc = subprocess.run([cc, "-O2", "-Wall", "-pthread", "-o", str(tmp), str(SOURCE)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed: {proc.stderr.strip()[-400:]}")
    tmp.replace(out)
    return out


def parse_line(stdout: str) -> ConnResult:
    """The ConnResult from the client's marker line."""
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            raw = json.loads(line[len(MARKER):])
            break
    else:
        raise ValueError(f"kmesh-connload printed no summary line: {stdout.strip()[-300:]!r}")
    duration_s = raw["duration_us"] / 1e6
    rps = raw["requests"] / duration_s if duration_s > 0 else 0.0
    return ConnResult(
        p50_ms=raw["p50_us"] / 1000, p90_ms=raw["p90_us"] / 1000, p99_ms=raw["p99_us"] / 1000,
        p999_ms=raw["p999_us"] / 1000, mean_ms=raw["mean_us"] / 1000, min_ms=raw["min_us"] / 1000,
        max_ms=raw["max_us"] / 1000, rps=rps, requests=raw["requests"], errors=raw["errors"],
        duration_s=duration_s, concurrency=raw["concurrency"],
        cycle_ms=raw["concurrency"] / rps * 1000 if rps else 0.0)


@dataclass
class Side:
    """One client of a lockstep pair: where it connects and from which cgroup (which decides
    the BPF programs its sockets meet)."""

    addr: str
    port: int
    cgroup: Path


def _argv(addr: str, port: int, concurrency: int, duration_s: float, count: int, request: str,
          expect: str) -> list[str]:
    argv = [str(binary()), "-a", addr, "-p", str(port), "-c", str(concurrency), "-r", request, "-e", expect]
    if duration_s > 0:
        argv += ["-d", f"{duration_s:g}"]
    if count > 0:
        argv += ["-n", str(count)]
    return argv


def run_connload_lockstep(first: Side, second: Side, ns: str, *, duration_s: float = 0.0, count: int = 0,
                          cpus: str | None = None, request: str = HTTP_REQUEST,
                          expect: str = HTTP_EXPECT) -> tuple[ConnResult, ConnResult]:
    """Two clients in `ns` that alternate request by request (kmesh-connload -i/-o): `first`
    from its cgroup, then `second` from its own, and so on, each bound by count and duration.
    Pinned to the same `cpus`, they see the same machine at the same moments, so the ratio of
    their percentiles is paired sample by sample. Returns (first's result, second's result)."""
    if duration_s <= 0 and count <= 0:
        raise ValueError("run_connload_lockstep needs duration_s > 0 or count > 0 (bounded runs only)")
    a_to_b, b_to_a = os.pipe(), os.pipe()
    procs: list[subprocess.Popen[str]] = []
    try:
        for side, tin, tout in ((first, b_to_a[0], a_to_b[1]), (second, a_to_b[0], b_to_a[1])):
            argv = _argv(side.addr, side.port, 1, duration_s, count, request, expect) + \
                ["-i", str(tin), "-o", str(tout)]
            procs.append(subprocess.Popen(
                netns.netns_argv(argv, ns, cpus), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                stdin=subprocess.DEVNULL, pass_fds=(tin, tout),
                preexec_fn=lambda cg=side.cgroup: netns.enter_cgroup(cg)))
        os.write(b_to_a[1], b"k")  # the first token: `first` starts
    finally:
        for fd in (*a_to_b, *b_to_a):
            os.close(fd)  # only the clients hold the pipes now: one exiting ends the other
    outs = []
    try:
        for proc, side in zip(procs, (first, second), strict=True):
            out, err = proc.communicate(timeout=(duration_s or 60) + 30)
            if proc.returncode != 0:
                raise RuntimeError(f"kmesh-connload to {side.addr}:{side.port} (lockstep) exit "
                                   f"{proc.returncode}: {(err or out).strip()[-300:]}")
            outs.append(parse_line(out))
    finally:
        for proc in procs:
            netns.stop(proc)  # type: ignore[arg-type]
    return outs[0], outs[1]


def run_connload(addr: str, port: int, ns: str, cgroup: Path, *, concurrency: int = 1,
                 duration_s: float = 0.0, count: int = 0, cpus: str | None = None,
                 request: str = HTTP_REQUEST, expect: str = HTTP_EXPECT) -> ConnResult:
    """One bounded run inside `ns`/`cgroup` (the cgroup decides which BPF programs see the
    connects). Raises when the client fails or nothing succeeded."""
    if duration_s <= 0 and count <= 0:
        raise ValueError("run_connload needs duration_s > 0 or count > 0 (bounded runs only)")
    argv = _argv(addr, port, concurrency, duration_s, count, request, expect)
    res = netns.run(argv, ns, cgroup, cpus=cpus, timeout=(duration_s or 60) + 30)
    if res.returncode != 0:
        raise RuntimeError(f"kmesh-connload to {addr}:{port} exit {res.returncode}: "
                           f"{(res.stderr or res.stdout).strip()[-300:]}")
    return parse_line(res.stdout)
