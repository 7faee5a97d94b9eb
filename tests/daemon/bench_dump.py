"""Benchmark: `kmeshctl dump workloads` over 10,000 workloads (issue 5 target: <= 1 s).

Run: .venv/bin/python -m tests.daemon.bench_dump [--workloads 10000]

A real State holding N workloads (and N/10 services) from real Address protos is served by the
real AdminServer; the CLI runs as a subprocess against it, so the figure includes interpreter
start, the HTTP fetch of /debug/config_dump (built by the daemon on request), JSON parsing and
table formatting. Prints the daemon-side dump time and the CLI wall time (best of 5).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_state(n: int):  # noqa: ANN201 - returns daemon.state.State
    from daemon.state import State
    from daemon.xds.dump import wl
    from daemon.xds.resources import ADDRESS_TYPE, decode_address

    state = State(node_name="node-0")
    recs = []
    n_svc = max(1, n // 10)
    for s in range(n_svc):
        ns = f"ns-{s % 50}"
        svc = wl.Service(name=f"svc-{s}", namespace=ns, hostname=f"svc-{s}.{ns}.svc.cluster.local")
        svc.addresses.add(network="", address=ipaddress.ip_address(f"10.96.{s // 250}.{s % 250 + 1}").packed)
        svc.ports.add(service_port=80, target_port=8080)
        a = wl.Address(service=svc)
        recs.append(decode_address(f"{ns}/{svc.hostname}", ADDRESS_TYPE, a.SerializeToString()))
    for i in range(n):
        s = i % n_svc
        ns = f"ns-{s % 50}"
        name = f"app-{s}-7d9f8c6b5-{i:05d}"
        w = wl.Workload(uid=f"Kubernetes//Pod/{ns}/{name}", name=name,
                        namespace=ns, node=f"node-{i % 20}", cluster_id="Kubernetes",
                        workload_name=f"app-{s}", canonical_name=f"app-{s}", service_account="default")
        w.addresses.append(ipaddress.ip_address(f"10.{1 + i // 65536}.{i // 256 % 256}.{i % 256}").packed)
        w.services[f"{ns}/svc-{s}.{ns}.svc.cluster.local"].ports.add(service_port=80, target_port=8080)
        a = wl.Address(workload=w)
        recs.append(decode_address(w.uid, ADDRESS_TYPE, a.SerializeToString()))
    state.apply_addresses(recs)
    return state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    from daemon.admin import AdminContext, AdminServer

    t0 = time.perf_counter()
    state = build_state(a.workloads)
    print(f"built state: {a.workloads} workloads in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    t0 = time.perf_counter()
    dump = state.config_dump()
    print(f"daemon config_dump(): {time.perf_counter() - t0:.3f}s ({len(dump['workloads'])} workloads)")
    server = AdminServer("127.0.0.1", 0, AdminContext(state=state))
    server.start()
    addr = f"127.0.0.1:{server.server_address[1]}"
    env = {**os.environ, "KMESH_SANDBOX_DIR": "/nonexistent"}
    times = []
    for kind in ("workloads", "services"):
        times = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "kmeshctl.main", "dump", kind, "--admin-addr", addr],
                                 cwd=REPO, env=env, capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - t0)
        lines = out.stdout.count("\n") - 1
        print(f"kmeshctl dump {kind}: {lines} rows, best {min(times):.3f}s, median "
              f"{sorted(times)[len(times) // 2]:.3f}s over {a.runs} runs")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kmeshctl.main", "--help"], cwd=REPO, env=env, capture_output=True,
                   check=True)
    print(f"kmeshctl --help (interpreter + CLI start): {time.perf_counter() - t0:.3f}s")
    server.stop()


if __name__ == "__main__":
    main()
