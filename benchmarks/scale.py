"""Scale curve: the real kmesh-daemon converging 10k, 100k and 1M endpoints.

Each point is 10 endpoints per service (1k, 10k, 100k services) served by the synthetic xDS
server of benchmarks.controlplane to a fresh real daemon (benchmarks.realdaemon: admin,
metrics, enrollment watcher, event reader, BPF data plane in a child cgroup, private bpffs).
Per point: converge_s (first full response sent -> maps written, from the daemon's /status),
parse_s / write_s (its split), rss_mib (VmRSS after convergence + a few seconds), peak_rss_mib
(VmHWM), map_mib (kernel memory of the daemon's maps: fdinfo memlock; hash maps are
preallocated, so this follows the capacity, not the entries).

Capacities: the 10k and 100k points run the daemon's default map sizes (what it ships with);
the 1M point raises them with the daemon's ``--capacity`` flag (about 1.25x the entries it
needs) and its xDS message limit with ``--xds-max-message-mib`` (the 1.1M resources arrive as
one ~300 MB delta response; the default limit of 200 MiB stops at roughly 800k endpoints).

Runs per point (``REPEATS``): 3 fresh daemons for 10k and 100k (medians, every run listed in
``converge_s_runs``), one for 1M (it takes ~2 minutes); ``ratio_1m_over_100k_converge`` is the
quotient of those (target <= 12: linear growth is 10).

Where the next limit is (measured 2026-12-03 16:23 UTC by make bench on the 2-core, 24 GiB VM,
commit 08819f5: 1M endpoints converged in 16.0 s, parse 5.5 + write 10.5; daemon RSS 716 MiB steady / 1437 MiB
peak; 895 MiB of kernel map memory), in the order they would bite past 1M:

1. time grows faster than the endpoints: 10x the endpoints took ~15x the time (100k -> 1M; the
   parse 11x, the write 15.5x) and ~8.5x (10k -> 100k). A py-spy profile of the 1M write shows
   no step that is super-linear by algorithm: the same code spends more per element (the first
   sync's bulk backend pass ~18x its 100k time, the per-service planning ~15x), i.e. the 1M
   working set (700 MiB of Python objects, 900 MiB of maps) misses caches and TLBs where 100k
   mostly did not. At 10M the first sync would take minutes.
2. memory: ~0.7 GiB steady (1.4 GiB peak: the decoded push plus the write buffers, a first
   sync's km_names alone is 256 MB at 1M) of daemon RSS plus ~0.9 GiB of map memory per 1M
   endpoints, so this machine tops out near 10M endpoints; a 1 GiB pod limit stops before 1M.
3. one xDS response: a workload costs ~254 bytes on the wire; the client's default 200 MiB
   limit stops near 800k endpoints (hence ``--xds-max-message-mib``), and protobuf's hard 2 GiB
   message cap near 8M (beyond that the server would have to split the initial push).
4. map sizes: ``Capacity.validate`` allows at most 2^24 (16.7M) entries a map.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# name -> (services, endpoints per service)
POINTS: dict[str, tuple[int, int]] = {"10k": (1_000, 10), "100k": (10_000, 10), "1m": (100_000, 10)}
QUICK_POINTS: dict[str, tuple[int, int]] = {"1k": (100, 10), "10k": (1_000, 10)}
# fresh daemons per point (medians): the small points are cheap, so their noise is cut; 1M takes
# ~2 minutes a run and stays a single measurement
REPEATS: dict[str, int] = {"1k": 1, "10k": 3, "100k": 3, "1m": 1}
DEFAULT_CAPACITY = {"frontends": 262_144, "services": 65_536, "endpoints": 262_144, "backends": 131_072}


def capacity_for(services: int, endpoints: int) -> dict[str, int] | None:
    """None when the defaults hold the point with 20 % to spare, else sizes ~1.25x the need.

    Needs: frontends = one per service VIP:port + one per pod IP; services = service ports;
    endpoints = one slot per endpoint (weight 1); backends = one per pod.
    """
    pods = services * endpoints
    need = {"frontends": services + pods, "services": services, "endpoints": pods, "backends": pods}
    if all(n * 1.2 <= DEFAULT_CAPACITY[k] for k, n in need.items()):
        return None
    return {k: max(DEFAULT_CAPACITY[k], int(n * 1.25)) for k, n in need.items()}


def message_mib_for(services: int, endpoints: int) -> int:
    """xDS message limit for the point: ~250 bytes a resource on the wire, doubled; 0 = default."""
    size = (services + services * endpoints) * 250
    return 0 if size * 2 < 200 * 2**20 else min(2047, int(size * 2 / 2**20) + 1)


def measure_point(services: int, endpoints: int, cgroup_parent: Path,
                  settle_s: float = 3.0, repeats: int = 1) -> dict[str, Any]:
    """`repeats` fresh daemons against one server; medians, with every run's converge listed."""
    import statistics

    from benchmarks import realdaemon as rd

    cap = capacity_for(services, endpoints)
    started = time.monotonic()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kmesh-bench-scale-") as tmp, \
            rd.Stack(services, endpoints, Path(tmp), cgroup_parent) as stack:
        generated = time.monotonic() - started
        for r in range(repeats):
            with rd.RealDaemon(stack, name=f"s{r}", capacity=cap,
                               max_message_mib=message_mib_for(services, endpoints)) as daemon:
                res = rd.converge(stack, daemon, settle_s=min(2.0, settle_s), timeout=1800)
                time.sleep(settle_s)
                runs.append({**res, **daemon.memory()})

    def med(key: str) -> Any:
        return round(statistics.median(r[key] for r in runs), 3)

    return {
        "converge_s": med("converge_s"),
        "converge_s_runs": [r["converge_s"] for r in runs],
        "rss_mib": med("rss_mib"),
        "map_mib": med("map_mib"),
        "peak_rss_mib": med("hwm_mib"),
        "base_rss_mib": med("base_rss_mib"),
        "parse_s": med("parse_s"),
        "write_s": med("write_s"),
        "runs": repeats,
        "endpoints": services * endpoints,
        "services": services,
        "written_entries": runs[-1]["written"],
        "capacity": cap or "daemon defaults",
        "server_generate_s": round(generated, 1),
    }


def run(points: dict[str, tuple[int, int]] | None = None, cgroup_parent: Path | None = None,
        progress: Any = None, settle_s: float = 3.0, repeats: dict[str, int] | None = None) -> dict[str, Any]:
    """{"10k": {...}, "100k": {...}, "1m": {...}, "ratio_1m_over_100k_converge": x}."""
    from benchmarks import realdaemon as rd

    why = rd.tool_available()
    if why:
        return {"error": f"not available: {why}"}
    if cgroup_parent is None:
        from sandbox.cgroups import cgroup2_root

        cgroup_parent = cgroup2_root()
    out: dict[str, Any] = {}
    for name, (services, endpoints) in (points or POINTS).items():
        if progress:
            progress(f"scale {name}: {services} services x {endpoints} endpoints")
        try:
            n = (REPEATS if repeats is None else repeats).get(name, 1)
            out[name] = measure_point(services, endpoints, cgroup_parent, settle_s, repeats=n)
        except Exception as exc:  # noqa: BLE001 - a point that fails is reported, the others still run
            out[name] = {"error": f"not available: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    for big, small in (("1m", "100k"), ("100k", "10k")):
        a, b = out.get(big, {}).get("converge_s"), out.get(small, {}).get("converge_s")
        if isinstance(a, float) and isinstance(b, float) and b > 0:
            out[f"ratio_{big}_over_{small}_converge"] = round(a / b, 2)
    out["runs_per_point"] = {name: out[name].get("runs", 0) for name in (points or POINTS) if name in out}
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    return out


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    json.dump(run(QUICK_POINTS if quick else None, progress=lambda m: print(m, file=sys.stderr)),
              sys.stdout, indent=2)
    print()
