"""Data-plane map benchmarks: reconciler full sync, single endpoint change, connect latency.

- ``sync``: 10,000 services x 10 endpoints (100,000 endpoints, 100,000 backends with a pod IP
  each) written into fresh maps by ``Reconciler.sync``; reported: total seconds, of which map
  syscall seconds (summed over the writer threads), element count, and the RSS the reconciler
  added (its mirror plus what the pass left resident). Programs are compiled the way
  ``Dataplane.open`` does it, in a child process (``rss_after_load_mib``: what that cost this
  process). Then a no-op resync, the cost of one ``map_pressure`` (mirror counts plus counting
  the manage and LRU sock maps), and ``load()`` + resync (a restarted daemon over existing pins).
- ``update``: one endpoint removed from / restored to one service via ``Reconciler.update``,
  alternating; median / p90 / max milliseconds over 41 changes. The removed endpoint is the
  first in slot order, so every slot after it is rewritten (the worst case for one change).
- ``connect``: socket + connect + one request + close, timed per connection by
  ``benchmarks.connload`` (C, one connection in flight), in a netns topology from
  ``benchmarks.netns`` (nothing leaves the machine). Clients per round, order rotating:
  ``direct`` from a cgroup with no programs attached at all (the baseline), ``vip`` from the mesh
  cgroup (translated by our connect4; monitoring on, events read by a thread as the daemon
  does), ``direct_mesh`` from the mesh cgroup to the pod IP (our programs run, nothing to
  translate) and, when the data plane has the monitoring switch, ``vip_monitor_off`` (events
  and sockops state callbacks off). Reported: medians over rounds of each p50/p90 and of the
  per-round ratios to direct, with min/max over rounds.

Maps live in a private bpffs mounted for the run; the map benchmarks do not attach anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SERVICES = 10_000
ENDPOINTS_PER_SERVICE = 10
CONNECT_ROUNDS = 9
CONNECT_PER_ROUND = 1500

_SERVER = r"""
import ctypes, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
assert ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) == 0
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(1024)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.recv(64); c.sendall(b"ok\n"); c.close()
"""

def _log(msg: str) -> None:
    print(f"[dataplane_maps] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _private_bpffs() -> Iterator[Path]:
    """A fresh bpffs instance mounted in a temp dir (never /sys/fs/bpf), removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="kmesh-bench-bpffs-"))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(tmp)], check=True, capture_output=True)
    try:
        yield tmp
    finally:
        subprocess.run(["umount", str(tmp)], capture_output=True)
        try:
            tmp.rmdir()
        except OSError:
            pass


def _projection(services: int, per_service: int):  # noqa: ANN202 - model types imported lazily
    from daemon.dataplane.model import Backend, Endpoint, Projection, Service, ServicePort

    backends, svcs = {}, {}
    for s in range(services):
        eps = []
        for e in range(per_service):
            i = s * per_service + e
            uid = f"Kubernetes//Pod/ns{s % 50}/pod-{i}"
            ip = bytes([10, 1 + i // 65536, (i // 256) % 256, i % 256])
            backends[uid] = Backend(uid, f"pod-{i}", f"ns{s % 50}", ip, None)
            eps.append(Endpoint(uid, 8080))
        name = f"ns{s % 50}/svc-{s}.ns{s % 50}.svc.cluster.local"
        svcs[name] = Service(name, (bytes([10, 96, s // 256, s % 256]),), (ServicePort(80, tuple(eps)),))
    return Projection(svcs, backends)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_maps(services: int = SERVICES, per_service: int = ENDPOINTS_PER_SERVICE) -> dict:
    import gc

    from daemon.dataplane import socks
    from daemon.dataplane.loader import load_in_child
    from daemon.dataplane.model import ServicePort
    from daemon.dataplane.reconciler import Reconciler
    from daemon.dataplane.types import Capacity

    out: dict = {}
    with _private_bpffs() as fs:
        cap = Capacity()
        rss0 = _rss_mib()
        t = time.perf_counter()
        loaded = load_in_child(fs / "gen", cap)  # what Dataplane.open does: bcc/LLVM in a child
        out["compile_s"] = round(time.perf_counter() - t, 3)
        out["rss_after_load_mib"] = round(_rss_mib() - rss0, 1)
        try:
            proj = _projection(services, per_service)
            gc.collect()
            rss1 = _rss_mib()
            rec = Reconciler(loaded.maps, cap)
            rec.load()
            res = rec.sync(proj)
            if res.rejected:
                raise RuntimeError(f"rejected: {list(res.rejected)[:3]}")
            out["sync"] = {"endpoints": services * per_service, "services": services,
                           "elements_written": res.written, "total_s": round(res.seconds, 3),
                           "map_write_s": round(res.write_seconds, 3),
                           "reconciler_rss_mib": round(_rss_mib() - rss1, 1)}
            res = rec.sync(proj)
            out["resync_noop_s"] = round(res.seconds, 3)
            t = time.perf_counter()
            for _ in range(10):
                counts = rec.counts()
                counts["sock"] = socks.live_count(loaded.maps["sock"])
                counts["manage"] = loaded.maps["manage"].count()
            out["map_pressure_ms"] = round((time.perf_counter() - t) * 100, 3)
            # single endpoint change on one service, alternating remove / restore
            name = next(iter(proj.services))
            svc = proj.services[name]
            eps = svc.ports[0].endpoints
            times, written = [], []
            for k in range(41):
                port = ServicePort(80, eps[1:] if k % 2 == 0 else eps)
                proj.services[name] = dataclasses.replace(svc, ports=(port,))
                r = rec.update(proj, [name], [])
                times.append(r.seconds * 1000)
                written.append(r.written + r.deleted)
            times.sort()
            out["update_one_endpoint_ms"] = {"median": round(statistics.median(times), 3),
                                             "p90": round(times[int(len(times) * 0.9)], 3),
                                             "max": round(times[-1], 3),
                                             "elements_per_change": statistics.median(written)}
            # a restarted daemon: rebuild the mirror from the maps, then the first (no-op) sync
            rec2 = Reconciler(loaded.maps, cap)
            t = time.perf_counter()
            rec2.load()
            load_s = time.perf_counter() - t
            r = rec2.sync(proj)
            out["restart"] = {"load_s": round(load_s, 3), "first_sync_s": round(r.seconds, 3),
                              "first_sync_written": r.written, "first_sync_deleted": r.deleted}
        finally:
            loaded.cleanup()
    return out


def bench_connect(rounds: int = CONNECT_ROUNDS, per_round: int = CONNECT_PER_ROUND) -> dict:
    import socket
    import threading

    from benchmarks import netns
    from benchmarks.connload import run_connload
    from daemon.dataplane import Dataplane, control_connect
    from daemon.dataplane.model import Backend, Endpoint, Projection, Service, ServicePort

    vip = "10.96.250.20"
    prefix = "kd" + secrets.token_hex(3)
    two_cpus = (os.cpu_count() or 1) >= 2
    p50: dict[str, list[float]] = {"direct": [], "vip": [], "direct_mesh": [], "vip_monitor_off": []}
    p90: dict[str, list[float]] = {k: [] for k in p50}
    errors = 0
    programs: dict[str, dict[str, int]] = {}
    with _private_bpffs() as fs, netns.Topology(prefix) as topo:
        server_cmd = [*(["taskset", "-c", "0"] if two_cpus else []), sys.executable, "-c", _SERVER,
                      str(topo.netns_path(topo.ns_server)), "8080"]
        server = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: (topo.server_cgroup / "cgroup.procs").write_text(
                                      str(os.getpid())))
        dp = None
        stop = threading.Event()
        reader: threading.Thread | None = None
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            dp = Dataplane.open(topo.mesh_cgroup, fs / "pins")
            be = Backend("Kubernetes//Pod/bench/echo-0", "echo-0", "bench", socket.inet_aton(netns.POD_IP))
            port = ServicePort(80, (Endpoint(be.uid, 8080),))
            svc = Service("bench/echo", (socket.inet_aton(vip),), (port,))
            dp.sync(Projection({svc.name: svc}, {be.uid: be}))
            control_connect(topo.netns_path(topo.ns_client), True, cgroup=topo.mesh_cgroup)
            opened = dp
            programs = {"direct": netns.effective_programs(topo.plain_cgroup),
                        "mesh": netns.effective_programs(topo.mesh_cgroup)}
            if set(programs["direct"]) & set(netns.MESH_ATTACH_TYPES):
                raise RuntimeError(f"the baseline cgroup has programs in effect: {programs['direct']}")

            def read_events() -> None:  # as the daemon does: monitoring events are consumed
                while not stop.is_set():
                    opened.poll_events(lambda _e: None, timeout_ms=100)

            reader = threading.Thread(target=read_events, name="bench-events", daemon=True)
            reader.start()
            # direct: the plain cgroup has no programs attached at all (not a pass-through)
            clients = {"direct": (netns.POD_IP, 8080, topo.plain_cgroup), "vip": (vip, 80, topo.mesh_cgroup),
                       "direct_mesh": (netns.POD_IP, 8080, topo.mesh_cgroup),
                       "vip_monitor_off": (vip, 80, topo.mesh_cgroup)}
            switch = hasattr(dp, "set_monitoring")  # the monitoring switch (issue 12)
            if not switch:
                del clients["vip_monitor_off"], p50["vip_monitor_off"], p90["vip_monitor_off"]
            names = list(clients)

            def one(name: str, count: int):  # noqa: ANN202 - ConnResult, imported lazily
                addr, port_, cgroup = clients[name]
                if switch:
                    on = name != "vip_monitor_off"
                    opened.set_monitoring(access_log=on, metrics=on)
                return run_connload(addr, port_, topo.ns_client, cgroup, count=count,
                                    cpus="1" if two_cpus else None, request=r"x\n", expect="ok")

            for name in names:  # warm-up
                one(name, 50)
            for rnd in range(rounds):
                for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                    res = one(name, per_round)
                    errors += res.errors
                    p50[name].append(res.p50_ms * 1000)
                    p90[name].append(res.p90_ms * 1000)
        finally:
            stop.set()
            if reader is not None:
                reader.join(timeout=5)
            if dp is not None:
                dp.uninstall()
            server.kill()
            server.wait(timeout=10)

    def ratio(name: str) -> list[float]:
        return [a / b for a, b in zip(p50[name], p50["direct"], strict=True) if b]

    out: dict = {}
    for name in p50:
        out[f"{name}_p50_us"] = round(statistics.median(p50[name]), 1)
        out[f"{name}_p50_us_range"] = [round(min(p50[name]), 1), round(max(p50[name]), 1)]
        out[f"{name}_p90_us"] = round(statistics.median(p90[name]), 1)
    for key, name in (("vip_over_direct_p50", "vip"), ("direct_mesh_over_direct_p50", "direct_mesh"),
                      ("vip_monitor_off_over_direct_p50", "vip_monitor_off")):
        if name not in p50:
            out[key] = "not available: this data plane has no monitoring switch"
            continue
        xs = ratio(name)
        out[key] = round(statistics.median(xs), 3)
        out[f"{key}_range"] = [round(min(xs), 3), round(max(xs), 3)]
    out["baseline"] = "direct: a client in a cgroup with no programs attached"
    out["effective_programs"] = programs
    out["rounds"] = rounds
    out["connections_per_mode"] = rounds * per_round
    out["errors"] = errors
    return out


def run() -> dict:
    """Entry point for ``python -m benchmarks``."""
    if os.geteuid() != 0:
        return {"error": "not available: needs root (BPF, netns, mounts)"}
    repo = Path(__file__).resolve().parent.parent
    os.environ.setdefault("BCC_KERNEL_SOURCE", str(repo / ".build" / "kernel-src"))
    out: dict = {}
    _log(f"reconciler: {SERVICES} services x {ENDPOINTS_PER_SERVICE} endpoints")
    out["maps"] = bench_maps()
    _log("connect latency: VIP vs pod IP, interleaved")
    try:
        out["connect"] = bench_connect()
    except Exception as exc:  # noqa: BLE001 - report, keep the map figures
        out["connect"] = {"error": f"not available: {type(exc).__name__}: {exc}"}
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
