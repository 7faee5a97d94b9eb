"""CLI figures: ``kmeshctl --help`` wall time and ``kmeshctl dump workloads`` at 10,000 workloads.

Both are timed end to end as a user sees them: a fresh ``.venv/bin/kmeshctl`` process per run
(interpreter start, imports, the request, rendering, exit), median of several runs after one
untimed warm-up, every run kept in ``*_runs_s``. The dump asks the real ``kmesh-daemon``
(benchmarks.realdaemon) holding 1,000 services x 10 endpoints = 10,000 workloads it received
over gRPC, so the daemon's ``/debug/config_dump`` (building the dump from its state and
serialising it) is part of the figure.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KMESHCTL = REPO / ".venv" / "bin" / "kmeshctl"


def _time(argv: list[str], runs: int) -> tuple[float, list[float], str]:
    """Median wall seconds of `runs` fresh processes (after one untimed warm-up run)."""
    times: list[float] = []
    out = ""
    for i in range(runs + 1):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[-3:])}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
        out = proc.stdout
        if i:  # the first run warms the page cache and .pyc files
            times.append(elapsed)
    return statistics.median(times), times, out


def run(help_runs: int = 7, dump_runs: int = 5, workloads: int = 10_000, kmeshctl: Path = KMESHCTL,
        cgroup_parent: Path | None = None) -> dict:
    """{"cli": {"help_s", "dump_10k_s", ...}}; an unavailable figure is "not available: <reason>"."""
    res: dict = {}
    if not kmeshctl.exists():
        reason = f"not available: {kmeshctl} missing (run make setup)"
        return {"cli": {"help_s": reason, "dump_10k_s": reason}}
    try:
        median, times, _ = _time([str(kmeshctl), "--help"], help_runs)
        res["help_s"] = round(median, 4)
        res["help_runs_s"] = [round(t, 4) for t in times]
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        res["help_s"] = f"not available: {exc}"
    try:
        res.update(_dump(dump_runs, workloads, kmeshctl, cgroup_parent))
    except (RuntimeError, OSError, TimeoutError, subprocess.TimeoutExpired) as exc:
        res["dump_10k_s"] = f"not available: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return {"cli": res}


def _dump(runs: int, workloads: int, kmeshctl: Path, cgroup_parent: Path | None) -> dict:
    """kmeshctl dump workloads (table and -o json) against a real daemon holding `workloads` pods."""
    from benchmarks import realdaemon as rd

    why = rd.tool_available()
    if why:
        raise RuntimeError(f"the real daemon {why}")
    if cgroup_parent is None:
        from sandbox.cgroups import cgroup2_root

        cgroup_parent = cgroup2_root()
    per_service = 10
    services = max(1, workloads // per_service)
    workloads = services * per_service
    with tempfile.TemporaryDirectory(prefix="kmesh-bench-cli-") as tmp, \
            rd.Stack(services, per_service, Path(tmp), cgroup_parent) as stack, \
            rd.RealDaemon(stack, name="cli") as daemon:
        rd.converge(stack, daemon, settle_s=0.5)
        addr = daemon.admin
        median, times, out = _time([str(kmeshctl), "dump", "workloads", "--admin-addr", addr], runs)
        rows = out.count("\n") - 1
        if rows != workloads:
            raise RuntimeError(f"dump printed {rows} rows, expected {workloads}")
        json_median, json_times, json_out = _time([str(kmeshctl), "dump", "workloads", "-o", "json",
                                                   "--admin-addr", addr], runs)
        if len(json.loads(json_out)) != workloads:
            raise RuntimeError(f"dump -o json did not return {workloads} workloads")
    return {"dump_10k_s": round(median, 4), "dump_runs_s": [round(t, 4) for t in times],
            "dump_workloads": workloads, "dump_10k_json_s": round(json_median, 4),
            "dump_json_runs_s": [round(t, 4) for t in json_times],
            "dump_against": "the real kmesh-daemon's admin API (benchmarks.realdaemon), "
                            f"{services} services x {per_service} endpoints over gRPC"}


if __name__ == "__main__":
    json.dump(run(), sys.stdout, indent=2)
    print()
