"""Run wrk and read its figures exactly.

Why a Lua ``done()`` hook instead of scraping ``--latency`` text: the text rounds to two
decimals in mixed units; the hook prints the histogram's exact percentiles (microseconds),
request count and error counters as one JSON line. ``parse_latency_text`` still reads the
``--latency`` table, as a cross-check and for wrk builds without LuaJIT.

Note on what wrk's latency covers: wrk starts a request's clock when the socket becomes
writable, i.e. after the TCP handshake. With ``Connection: close`` the connect() itself (where
our BPF program runs) is therefore visible in requests/s and in the per-request cycle time
(connections / rps), not in p50/p99.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import netns

MARKER = "KMESH_WRK "

DONE_SCRIPT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'KMESH_WRK {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"p999_us":%d,"mean_us":%.3f,"max_us":%d,"err_connect":%d,"err_read":%d,"err_write":%d,' ..
    '"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass
class WrkResult:
    """One wrk run, in the units the report uses."""

    p50_ms: float
    p99_ms: float
    p90_ms: float
    p999_ms: float
    mean_ms: float
    rps: float
    requests: int
    duration_s: float
    connections: int
    errors: int
    cycle_ms: float  # connections / rps: the full per-request time including connect and handshake
    cpu_us_per_req: float = 0.0  # filled by the caller: CPU of client, proxy and server per request

    def as_dict(self) -> dict:
        return asdict(self)


def parse_done_line(stdout: str, connections: int) -> WrkResult:
    """The WrkResult from the marker line printed by DONE_SCRIPT."""
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            raw = json.loads(line[len(MARKER):])
            break
    else:
        raise ValueError(f"wrk printed no summary line: {stdout.strip()[-300:]!r}")
    duration_s = raw["duration_us"] / 1e6
    rps = raw["requests"] / duration_s if duration_s > 0 else 0.0
    errors = sum(raw[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    return WrkResult(
        p50_ms=raw["p50_us"] / 1000, p99_ms=raw["p99_us"] / 1000, p90_ms=raw["p90_us"] / 1000,
        p999_ms=raw["p999_us"] / 1000, mean_ms=raw["mean_us"] / 1000, rps=rps, requests=raw["requests"],
        duration_s=duration_s, connections=connections, errors=errors,
        cycle_ms=(connections / rps * 1000) if rps else 0.0,
    )


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_latency_text(stdout: str) -> dict[str, float]:
    """Percentiles (ms) and Requests/sec from wrk's human output with --latency."""
    out: dict[str, float] = {}
    for pct, value, unit in re.findall(r"^\s+(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m)\s*$", stdout, re.M):
        out[f"p{pct.rstrip('0').rstrip('.') if '.' in pct else pct}_ms"] = float(value) * _UNITS_MS[unit]
    m = re.search(r"^Requests/sec:\s+([\d.]+)", stdout, re.M)
    if m:
        out["rps"] = float(m.group(1))
    return out


def run_wrk(url: str, ns: str, cgroup: Path, script: Path, *, duration_s: float, connections: int,
            keepalive: bool, cpus: str | None = None, timeout_s: float = 2.0) -> WrkResult:
    """One bounded wrk run (single thread) inside `ns`/`cgroup`."""
    argv = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(duration_s))}s",
            "--timeout", f"{timeout_s:g}s", "--latency", "-s", str(script)]
    if not keepalive:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    res = netns.run(argv, ns, cgroup, cpus=cpus, timeout=duration_s + 30)
    if res.returncode != 0:
        raise RuntimeError(f"wrk exit {res.returncode}: {res.stderr.strip()[-300:]}")
    return parse_done_line(res.stdout, connections)


def write_script(path: Path) -> Path:
    path.write_text(DONE_SCRIPT)
    return path
