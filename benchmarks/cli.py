"""CLI figures: ``kmeshctl --help`` wall time and ``kmeshctl dump workloads`` at 10,000 workloads.

Both are timed end to end as a user sees them: a fresh ``.venv/bin/kmeshctl`` process per run
(interpreter start, imports, the request, rendering, exit), median of several runs. The dump
talks to a tiny loopback HTTP server started here that answers ``/version`` and
``/debug/config_dump`` with a synthetic config dump in the ``istioctl ztunnel-config -o json``
shapes the daemon serves, so the figure does not depend on a running daemon.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KMESHCTL = REPO / ".venv" / "bin" / "kmeshctl"


def synthetic_config_dump(workloads: int = 10_000, per_service: int = 10) -> dict:
    """A config dump with `workloads` pods spread over namespaces and nodes, one service per
    `per_service` pods (its endpoints), every tenth service behind a waypoint."""
    wl: list[dict] = []
    services: list[dict] = []
    for i in range(workloads):
        ns = f"ns-{i % 50:02d}"
        app = f"app-{i // per_service:05d}"
        ip = f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
        wl.append({
            "uid": f"Kubernetes//Pod/{ns}/{app}-{i:06d}",
            "workloadIps": [ip],
            "protocol": "TCP",
            "status": "Healthy",
            "name": f"{app}-7c9d8f6b5-{i:06d}",
            "namespace": ns,
            "serviceAccount": app,
            "trustDomain": "cluster.local",
            "workloadName": app,
            "workloadType": "deployment",
            "canonicalName": app,
            "canonicalRevision": "v1",
            "clusterId": "Kubernetes",
            "node": f"node-{i % 20:02d}",
            "network": "",
            "capacity": 1,
            "authorizationPolicies": [],
            **({"waypoint": {"destination": f"{ns}/waypoint.{ns}.svc.cluster.local", "hboneMtlsPort": 15008}}
               if (i // per_service) % 10 == 0 else {}),
        })
    for s in range(0, workloads, per_service):
        ns = f"ns-{s % 50:02d}"
        app = f"app-{s // per_service:05d}"
        host = f"{app}.{ns}.svc.cluster.local"
        vip = f"10.96.{(s // per_service) >> 8 & 255}.{(s // per_service) & 255}"
        endpoints = {
            f"{w['uid']}:/{w['workloadIps'][0]}": {
                "workloadUid": w["uid"], "service": f"{ns}/{host}", "address": f"/{w['workloadIps'][0]}",
                "port": {"80": 8080}}
            for w in wl[s:s + per_service]
        }
        services.append({"name": app, "namespace": ns, "hostname": host, "vips": [f"/{vip}"],
                         "ports": {"80": 8080}, "endpoints": endpoints, "ipFamilies": "IPv4",
                         "subjectAltNames": [], "canonical": True})
    for n in range(50):
        ns = f"ns-{n:02d}"
        services.append({"name": "waypoint", "namespace": ns, "hostname": f"waypoint.{ns}.svc.cluster.local",
                         "vips": [f"/10.97.0.{n + 1}"], "ports": {"15008": 15008}, "endpoints": {},
                         "ipFamilies": "IPv4", "subjectAltNames": [], "canonical": True})
    return {"workloads": wl, "services": services, "policies": []}


@contextmanager
def admin_stub(config_dump: dict) -> Iterator[str]:
    """A loopback HTTP server answering like the daemon's admin API; yields "127.0.0.1:PORT"."""
    body = json.dumps(config_dump).encode()
    version = json.dumps({"pod": "bench-admin-stub", "node": "bench"}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            path = self.path.split("?", 1)[0]
            data = body if path == "/debug/config_dump" else version if path == "/version" else None
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="bench-admin-stub", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


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


def run(help_runs: int = 7, dump_runs: int = 5, workloads: int = 10_000, kmeshctl: Path = KMESHCTL) -> dict:
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
        with admin_stub(synthetic_config_dump(workloads)) as addr:
            median, times, out = _time([str(kmeshctl), "dump", "workloads", "--admin-addr", addr], dump_runs)
            rows = out.count("\n") - 1
            if rows != workloads:
                raise RuntimeError(f"dump printed {rows} rows, expected {workloads}")
            res["dump_10k_s"] = round(median, 4)
            res["dump_runs_s"] = [round(t, 4) for t in times]
            res["dump_workloads"] = workloads
            json_median, _, json_out = _time([str(kmeshctl), "dump", "workloads", "-o", "json",
                                              "--admin-addr", addr], dump_runs)
            if len(json.loads(json_out)) != workloads:
                raise RuntimeError(f"dump -o json did not return {workloads} workloads")
            res["dump_10k_json_s"] = round(json_median, 4)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        res["dump_10k_s"] = f"not available: {exc}"
    return {"cli": res}


if __name__ == "__main__":
    json.dump(run(), sys.stdout, indent=2)
    print()
