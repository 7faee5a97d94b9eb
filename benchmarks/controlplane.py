"""Control-plane figures: the real kmesh-daemon fed 10,000 services x 10 endpoints over gRPC.

What runs (benchmarks.realdaemon): a sandbox API server, the synthetic xDS server below
(``serve``: sandbox.pilot's delta ADS servicer over resources generated here, in its own
process) and the daemon's console script with everything a node runs: admin API, metrics
server, enrollment watcher, event reader, BPF data plane attached to a child cgroup, pins on a
private bpffs. ``repeats`` fresh daemons connect one after the other to the same server; each
one's maps start empty (the previous daemon uninstalled itself on SIGTERM).

Figures (every repeat is kept: median, and min/max/runs beside it):

- converge = the server's first full response handed to gRPC -> the daemon's first full sync
  done (``/status`` dataplane_sync.last_sync_done_monotonic; CLOCK_MONOTONIC is one clock for
  every process on the machine). parse = sent -> the full sync started (transfer, decode,
  state); write = the full sync (projection + map writes).
- single update = the server sends one changed workload -> the daemon's incremental pass done,
  over ``updates`` updates per repeat.
- daemon_rss_mib = VmRSS of the daemon pid after convergence, the updates and ``settle_s``
  seconds; daemon_peak_rss_mib = its VmHWM. map_mib = kernel memory of its maps (fdinfo memlock).

RSS split (``rss_split_mib``), with how each share is measured:

- base: the same daemon's RSS once it is up (BPF loaded, attached, admin/metrics/enrollment/
  events running, its xDS stream open) but before the server releases any data (the server
  holds its first response until told: ``serve --hold``).
- xds_state: the daemon cannot run without its data plane, so this share comes from a second,
  reduced process (``xds-only`` below: XdsClient -> State ->
  DataplaneSync walking the projection, no reconciler): its RSS growth from just before its xDS
  client starts to convergence (decoded state + cached projection). Same code, same data, but
  not the real daemon: an estimate, labelled as one.
- dataplane: the rest, steady RSS - base - xds_state (the reconciler's mirror of the maps,
  names, allocator state, fragmentation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- server child
def _workload(i: int, services: int, endpoints: int, bump: int = 0) -> tuple[str, bytes]:
    from daemon.xds.gen.istio.workload import workload_pb2 as wl

    s = i // endpoints
    uid = f"Kubernetes//Pod/bench/p{i}"
    n = i + bump * 200_000
    w = wl.Workload(uid=uid, name=f"p{i}", namespace="bench", node="node-1", service_account="default",
                    trust_domain="cluster.local", cluster_id="Kubernetes",
                    addresses=[bytes([10, 64 + (n >> 16) % 64, (n >> 8) & 255, n & 255])])
    w.services[f"bench/s{s}.bench.svc.cluster.local"].ports.add(service_port=80, target_port=8080)
    return uid, wl.Address(workload=w).SerializeToString()


def serve_main(services: int, endpoints: int, port: int = 0, hold: bool = False) -> int:
    """Generate the resources, then serve them on 127.0.0.1:port.

    hold: every response waits (after it is built, before it is handed to gRPC) until ``release``
    arrives on stdin; ``hold`` re-arms the gate. A real daemon can then connect and settle, and
    its RSS be read, before any xDS data reaches it (the "base" share of its memory).
    """
    from concurrent import futures

    import grpc

    from daemon.xds.gen.istio.workload import workload_pb2 as wl
    from sandbox.pilot.server import DeltaAdsServer, ResourceStore

    store = ResourceStore()
    res: dict[str, bytes] = {}
    for s in range(services):
        svc = wl.Service(name=f"s{s}", namespace="bench", hostname=f"s{s}.bench.svc.cluster.local",
                         addresses=[wl.NetworkAddress(address=bytes([10, 96 + (s >> 16), (s >> 8) & 255,
                                                                     s & 255]))],
                         ports=[wl.Port(service_port=80, target_port=8080)])
        res[f"bench/s{s}.bench.svc.cluster.local"] = wl.Address(service=svc).SerializeToString()
    for i in range(services * endpoints):
        uid, raw = _workload(i, services, endpoints)
        res[uid] = raw
    store.update(ADDRESS_TYPE, res)
    del res
    gate = threading.Event()
    if not hold:
        gate.set()

    def on_send(type_url: str, n: int) -> None:
        if not gate.is_set():
            _out(f"waiting {type_url.rsplit('.', 1)[-1].lower()} {n}")  # a client is connected
            gate.wait()
        _out(f"sent {type_url.rsplit('.', 1)[-1].lower()} {n} {time.monotonic()}")

    # sandbox.pilot.server.serve caps a response at 256 MiB; 1M endpoints need more (~300 MB)
    opts = [("grpc.max_send_message_length", 2047 * 1024 * 1024),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=opts)
    DeltaAdsServer(store, None, on_send).add_to(server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    _out(f"port {port}")
    bumps: dict[int, int] = {}
    for line in sys.stdin:
        parts = line.split()
        if parts and parts[0] == "update":
            i = int(parts[1])
            bumps[i] = bumps.get(i, 0) + 1
            uid, raw = _workload(i, services, endpoints, bumps[i])
            store.update(ADDRESS_TYPE, {uid: raw})
        elif parts and parts[0] == "hold":
            gate.clear()
            _out("holding")
        elif parts and parts[0] == "release":
            gate.set()
        elif parts and parts[0] == "quit":
            break
    gate.set()
    server.stop(0)
    return 0


# ---------------------------------------------------------------------------- xDS-only child
class NullDataplane:
    """No BPF: walks what would be written, so the xDS side's cost can be measured alone."""

    kind = "null (projection walk only)"

    def _walk(self, projection: Any, services: Any = None) -> Any:
        names = projection.services if services is None else services
        n = 0
        for name in names:
            svc = projection.services.get(name)
            if svc is not None:
                n += sum(len(p.endpoints) for p in svc.ports)
        return type("R", (), {"written": n, "deleted": 0, "rejected": {}, "seconds": 0.0})()

    def sync(self, projection: Any) -> Any:
        return self._walk(projection)

    def update(self, projection: Any, services: Any, backends: Any) -> Any:
        return self._walk(projection, services)

    def close(self) -> None:
        pass


def _rss_mib() -> tuple[float, float]:
    rss = hwm = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return round(rss, 1), round(hwm, 1)


def _malloc_trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def xds_only_main(address: str) -> int:
    """The xDS side of the daemon alone (XdsClient -> State -> DataplaneSync -> NullDataplane)."""
    import h2.connection  # noqa: F401 - imported before the baseline RSS: not part of anyone's state

    from daemon.state import Change, State
    from daemon.wiring import DataplaneSync
    from daemon.xds import h2grpc  # noqa: F401
    from daemon.xds.client import XdsClient, XdsConfig
    from daemon.xds.gen.kmesh import ads_pb2  # noqa: F401

    _malloc_trim()
    base_rss, _ = _rss_mib()
    dp = NullDataplane()
    _out(json.dumps({"ev": "dataplane", "kind": dp.kind, "rss_mib": _rss_mib()[0],
                     "rss_before_dataplane_mib": base_rss}))
    state = State(node_name="node-1")

    def on_change(change: Change) -> None:
        if change.services or change.backends:
            _out(json.dumps({"ev": "applied", "t": time.monotonic(), "services": len(change.services),
                             "backends": len(change.backends), "received": client.last_received_monotonic}))

    state.subscribe(on_change)

    def on_applied(kind: str, result: Any, t: float) -> None:
        _out(json.dumps({"ev": "written", "kind": kind, "t": t, "written": getattr(result, "written", None),
                         "rejected": len(getattr(result, "rejected", {}) or {})}))

    sync = DataplaneSync(state, dp, on_applied=on_applied)
    client = XdsClient(XdsConfig(address=address, plaintext=True, pod_name="kmesh-bench",
                                 pod_namespace="kmesh-system", node_name="node-1"), state)
    client.start()
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "rss":
                rss, hwm = _rss_mib()
                counts = client.status()["resources"]
                _out(json.dumps({"ev": "rss", "rss_mib": rss, "hwm_mib": hwm, "status": counts}))
            elif cmd == "quit":
                break
    finally:
        client.stop()
        sync.stop()
    return 0


# ---------------------------------------------------------------------------- orchestration
class _Child:
    def __init__(self, args: list[str], wrapper: list[str] | None = None, env: dict[str, str] | None = None
                 ) -> None:
        cmd = [*(wrapper or []), sys.executable, "-m", "benchmarks.controlplane", *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=None if env is None else {**os.environ, **env},
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<eof>")
            self.cond.notify_all()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, pred: Any, start: int = 0, timeout: float = 120.0) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.lines):
                    if self.lines[i] == "<eof>":
                        raise RuntimeError(f"benchmark child {self.proc.args} exited early")
                    if pred(self.lines[i]):
                        return i, self.lines[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"benchmark child {self.proc.args}: timed out")
                self.cond.wait(left)

    def close(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait(5)


def _ev(line: str) -> dict[str, Any]:
    try:
        v = json.loads(line)
        return v if isinstance(v, dict) else {}
    except ValueError:
        return {}


def spread(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median, min, max and every value, in measurement order (no repeat is dropped)."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def run(services: int = 10_000, endpoints: int = 10, updates: int = 15, repeats: int = 3,
        cgroup_parent: Path | None = None, settle_s: float = 3.0, base_settle_s: float = 2.0) -> dict:
    """The real kmesh-daemon (benchmarks.realdaemon), `repeats` fresh daemons against one server."""
    from benchmarks import realdaemon as rd

    why = rd.tool_available()
    if why:
        return {"error": f"not available: {why}"}
    if cgroup_parent is None:
        from sandbox.cgroups import cgroup2_root

        cgroup_parent = cgroup2_root()
    runs: list[dict[str, Any]] = []
    lat: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kmesh-bench-cp-") as tmp, \
            rd.Stack(services, endpoints, Path(tmp), cgroup_parent) as stack:
        assert stack.server is not None
        for r in range(repeats):
            with rd.RealDaemon(stack, name=f"r{r}") as daemon:
                res = rd.converge(stack, daemon, settle_s=base_settle_s)
                pos = len(stack.server.lines)
                for k in range(updates):
                    stack.server.send(f"update {(k * 7919 + r) % (services * endpoints)}")
                    t_sent, _ = stack.sent(pos, count=1, timeout=60)
                    pos = len(stack.server.lines)
                    # the pass that writes this update starts after the server sent it (an earlier
                    # pass still finishing must not count: that gave negative "latencies")
                    st = daemon.wait_status(
                        lambda st, t=t_sent: st["dataplane_sync"]["last_started_monotonic"] > t,
                        60, "a single update written", interval=0.01)
                    lat.append((st["dataplane_sync"]["last_done_monotonic"] - t_sent) * 1000)
                    time.sleep(0.2)  # let any follow-up pass finish before the next update
                time.sleep(settle_s)  # steady state: after convergence and updates, a few seconds on
                res.update(daemon.memory())
                runs.append(res)
        xds = _xds_share(stack.server, stack.xds_port, services)

    def fig(key: str, digits: int = 3) -> dict[str, Any]:
        return spread([float(x[key]) for x in runs], digits)

    conv, rss, hwm, base = fig("converge_s"), fig("rss_mib", 1), fig("hwm_mib", 1), fig("base_rss_mib", 1)
    lat_sorted = sorted(lat)
    return {
        "converge_100k_endpoints_s": conv["median"],
        "single_update_ms": round(statistics.median(lat), 2),
        "daemon_rss_mib": rss["median"],
        "converge_100k_endpoints_spread_s": conv,
        "parse_s": fig("parse_s")["median"],
        "write_s": fig("write_s")["median"],
        "parse_spread_s": fig("parse_s"),
        "write_spread_s": fig("write_s"),
        "reconcile_s": fig("reconcile_s")["median"],
        "reconcile_syscalls_s": fig("reconcile_syscalls_s")["median"],
        "single_update_p90_ms": round(lat_sorted[max(0, int(len(lat) * 0.9) - 1)], 2),
        "single_update_spread_ms": spread(lat, 2),
        "daemon_rss_spread_mib": rss,
        "daemon_peak_rss_mib": hwm["median"],
        "daemon_peak_rss_spread_mib": hwm,
        "rss_split_mib": {
            "base": base["median"],
            "xds_state": xds["xds_state_rss_mib"],
            "dataplane": round(rss["median"] - base["median"] - xds["xds_state_rss_mib"], 1),
        },
        "map_mib": fig("map_mib", 1)["median"],
        "xds_only_converge_s": xds["xds_only_converge_s"],
        "xds_only_parse_s": xds["xds_only_parse_s"],
        "xds_only_projection_s": xds["xds_only_projection_s"],
        "written_entries": runs[0]["written"],
        "resources_sent": runs[0]["resources_sent"],
        "repeats": repeats,
        "updates_per_repeat": updates,
        "scale": f"{services} services x {endpoints} endpoints",
        "daemon": "kmesh-daemon console script: admin, metrics, enrollment watcher (sandbox API), "
                  "event reader, BPF data plane in a child cgroup",
        "transport": "grpc delta ADS over 127.0.0.1 (plaintext), server in a separate process",
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _xds_share(server: _Child, port: int, services: int) -> dict[str, float]:
    """A second daemon child on the null data plane: what the xDS side costs on its own."""
    mark = len(server.lines)
    child = _Child(["xds-only", "--address", f"127.0.0.1:{port}"])
    try:
        _, dline = child.wait(lambda s: _ev(s).get("ev") == "dataplane", timeout=300)
        base = _ev(dline)["rss_before_dataplane_mib"]
        _, sent = server.wait(lambda s: s.startswith("sent address"), start=mark)
        t_sent = float(sent.split()[3])
        i_app, app = child.wait(lambda s: _ev(s).get("ev") == "applied" and _ev(s)["services"] >= services)
        _, wr = child.wait(lambda s: _ev(s).get("ev") == "written" and _ev(s)["kind"] == "sync", start=i_app)
        rmark = len(child.lines)
        child.send("rss")
        _, r_line = child.wait(lambda s: _ev(s).get("ev") == "rss", start=rmark)
        t_applied, t_written = _ev(app)["t"], _ev(wr)["t"]
        return {"xds_state_rss_mib": round(_ev(r_line)["rss_mib"] - base, 1),
                "xds_only_converge_s": round(t_written - t_sent, 3),
                "xds_only_parse_s": round(t_applied - t_sent, 3),
                "xds_only_projection_s": round(t_written - t_applied, 3)}
    finally:
        child.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.controlplane")
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("serve")
    s.add_argument("--services", type=int, default=10_000)
    s.add_argument("--endpoints", type=int, default=10)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--hold", action="store_true")
    d = sub.add_parser("xds-only")
    d.add_argument("--address", required=True)
    r = sub.add_parser("run")
    r.add_argument("--services", type=int, default=10_000)
    r.add_argument("--endpoints", type=int, default=10)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        return serve_main(args.services, args.endpoints, args.port, args.hold)
    if args.cmd == "xds-only":
        return xds_only_main(args.address)
    services = getattr(args, "services", 10_000)
    endpoints = getattr(args, "endpoints", 10)
    print(json.dumps(run(services, endpoints), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
