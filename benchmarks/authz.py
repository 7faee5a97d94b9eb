"""Authorization in the kernel: cost on allowed connections, compile time, time to refusal.

Keys (issue 11): ``authz.allowed_overhead_p50`` (p50 connect() time of allowed connections with
1,000 policies loaded / with none, median of paired interleaved rounds), ``authz.compile_10k_s``
(compile 10,000 policies and write them as a new epoch), ``authz.deny_latency_ms`` (p50 from
connect() to ECONNREFUSED for a refused connection).

Setup, all in namespaces and a bpffs created here and removed at the end: a bridge netns, a
server netns (the authz program linked to its eth0, a listener that accepts and closes) and a
client netns whose addresses belong to an allowed and a refused identity. The programs are the
daemon's (compiled by the same loader child); the tables come from daemon/authz/compiler.py.
The 1,000 policies: 990 in 99 other namespaces (not applying to the destination) and 10 in the
destination's namespace (5 DENY, 5 ALLOW, one of which admits the client), so an allowed SYN
walks every DENY and ALLOW match of a realistic ruleset; 1,000 other workloads supply identities.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PREFIX = f"kmaz{os.getpid()}"
SRV, ALLOWED, DENIED, NODE = "10.251.0.10", "10.251.0.2", "10.251.0.3", "10.251.0.254"
PORT = 8080

_SERVER = r"""
import ctypes, os, socket, sys, threading
fd = os.open(sys.argv[1], os.O_RDONLY); ctypes.CDLL(None).setns(fd, 0x40000000)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""

_CLIENT = r"""
import ctypes, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY); ctypes.CDLL(None).setns(fd, 0x40000000)
for line in sys.stdin:
    n, src, dst, port = line.split(); out = []; errs = 0
    for _ in range(int(n)):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.bind((src, 0)); t0 = time.perf_counter_ns()
        try:
            s.connect((dst, int(port)))
        except ConnectionRefusedError:
            errs += 1
        out.append((time.perf_counter_ns() - t0) / 1000.0); s.close()
    print(json.dumps({"us": out, "refused": errs}), flush=True)
"""


def _log(msg: str) -> None:
    print(f"[bench authz] {msg}", file=sys.stderr, flush=True)


def _sh(*args: str) -> None:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.strip()}")


def _az() -> Any:
    from daemon.xds.gen.istio.security import authorization_pb2 as az

    return az


def _policy(ns: str, name: str, action: int, scope: int, i: int) -> Any:
    """A policy with a realistic mix of kinds (identity, CIDR, ports)."""
    az = _az()
    p = az.Authorization(name=name, namespace=ns, scope=scope, action=action)
    r = p.rules.add()
    c = r.clauses.add()
    m = c.matches.add()
    m.namespaces.add(exact=f"ns-{(i * 7) % 97}")
    m.principals.add(prefix=f"cluster.local/ns/ns-{i % 89}/")
    m.source_ips.add(address=bytes([10, 200, i % 250, 0]), length=24)
    c2 = r.clauses.add()
    m2 = c2.matches.add()
    m2.destination_ports.extend([9000 + i % 50, 443])
    return p


def policy_set(n_other: int, local_ns: str = "default") -> dict[str, Any]:
    az = _az()
    out: dict[str, Any] = {}
    for i in range(n_other):
        ns = f"ns-{i // 10}"
        out[f"{ns}/p{i}"] = _policy(ns, f"p{i}", az.DENY if i % 2 else az.ALLOW, az.NAMESPACE, i)
    for i in range(5):
        out[f"{local_ns}/deny-{i}"] = _policy(local_ns, f"deny-{i}", az.DENY, az.NAMESPACE, i)
    for i in range(4):
        out[f"{local_ns}/allow-{i}"] = _policy(local_ns, f"allow-{i}", az.ALLOW, az.NAMESPACE, i + 50)
    allow = az.Authorization(name="allow-netutils", namespace=local_ns, scope=az.NAMESPACE, action=az.ALLOW)
    m = allow.rules.add().clauses.add().matches.add()
    m.principals.add(exact="cluster.local/ns/default/sa/netutils")
    m.destination_ports.append(PORT)
    out[f"{local_ns}/allow-netutils"] = allow
    return out


def workloads(n_remote: int, n_local_extra: int = 0) -> list[Any]:
    from daemon.authz.compiler import Identity, WorkloadInfo

    def wi(uid: str, ns: str, sa: str, ip: str, node: str) -> WorkloadInfo:
        return WorkloadInfo(uid=uid, name=uid, namespace=ns, addresses=(ipaddress.ip_address(ip).packed,),
                            identity=Identity("cluster.local", ns, sa), node=node)

    out = [wi("fortio", "default", "fortio", SRV, "n1"), wi("netutils", "default", "netutils", ALLOWED, "x"),
           wi("other", "other", "netutils", DENIED, "x")]
    for i in range(n_remote):
        ip = str(ipaddress.ip_address(0x0AC80000 + i))
        out.append(wi(f"w{i}", f"ns-{i % 1000}", f"sa-{i % 3}", ip, "x"))
    for i in range(n_local_extra):
        out.append(wi(f"l{i}", f"ns-{i % 1000}", "sa-0", str(ipaddress.ip_address(0x0AC90000 + i)), "n1"))
    return out


class _Env:
    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="kmesh-bench-authz-"))
        self.bpffs = self.work / "bpffs"
        self.netns: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.mounted = False
        self.programs: Any = None
        self.writer: Any = None

    def up(self) -> None:
        from daemon.authz.attach import Links
        from daemon.authz.writer import MapWriter
        from daemon.dataplane.loader import load_in_child
        from daemon.dataplane.netns import netns_cookie
        from daemon.dataplane.types import Capacity

        self.bpffs.mkdir()
        _sh("mount", "-t", "bpf", "bpf", str(self.bpffs))
        self.mounted = True
        for short in ("br", "srv", "cli"):
            _sh("ip", "netns", "add", f"{PREFIX}{short}")
            self.netns.append(f"{PREFIX}{short}")
            _sh("ip", "-n", f"{PREFIX}{short}", "link", "set", "lo", "up")
        br = f"{PREFIX}br"
        _sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", br, "addr", "add", f"{NODE}/24", "dev", "br0")
        _sh("ip", "-n", br, "link", "set", "br0", "up")
        for i, (short, ips) in enumerate((("srv", (SRV,)), ("cli", (ALLOWED, DENIED)))):
            ns = f"{PREFIX}{short}"
            _sh("ip", "-n", br, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "-n", br, "link", "set", f"v{i}", "master", "br0", "up")
            for ip in ips:
                _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        srv = subprocess.Popen([sys.executable, "-c", _SERVER, f"/run/netns/{PREFIX}srv", str(PORT)],
                               stdout=subprocess.PIPE, text=True)
        self.procs.append(srv)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        self.client = subprocess.Popen([sys.executable, "-c", _CLIENT, f"/run/netns/{PREFIX}cli"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(self.client)
        gen = self.bpffs / "kmesh" / "v-bench"
        self.programs = load_in_child(gen, Capacity())
        self.writer = MapWriter(gen)
        links = Links(self.bpffs / "kmesh")
        links.attach(f"/run/netns/{PREFIX}srv", netns_cookie(f"/run/netns/{PREFIX}srv"),
                     self.programs.prog_fds["authz"])

    def connects(self, n: int, src: str) -> dict[str, Any]:
        assert self.client.stdin is not None and self.client.stdout is not None
        self.client.stdin.write(f"{n} {src} {SRV} {PORT}\n")
        self.client.stdin.flush()
        return json.loads(self.client.stdout.readline())

    def apply(self, policies: dict[str, Any], wls: list[Any]) -> float:
        from daemon.authz.compiler import compile_tables

        t0 = time.perf_counter()
        self.writer.apply(compile_tables(policies, wls, self.writer.inactive_epoch(), node="n1",
                                         node_addresses=[ipaddress.ip_address(NODE).packed]))
        return time.perf_counter() - t0

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        if self.writer is not None:
            self.writer.close()
        if self.programs is not None:
            self.programs.cleanup()
        for ns in reversed(self.netns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
        if self.mounted:
            shutil.rmtree(self.bpffs / "kmesh", ignore_errors=True)
            subprocess.run(["umount", str(self.bpffs)], capture_output=True, timeout=30, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def run(rounds: int = 9, per_round: int = 2000) -> dict:
    """Entry point for ``python -m benchmarks``."""
    if os.geteuid() != 0:
        return {"error": "not available: needs root (BPF, netns, mounts)"}
    repo = Path(__file__).resolve().parent.parent
    os.environ.setdefault("BCC_KERNEL_SOURCE", str(repo / ".build" / "kernel-src"))
    env = _Env()
    try:
        env.up()
        wls = workloads(1000)
        loaded = policy_set(990)
        assert len(loaded) == 1000
        env.apply({}, wls)
        env.connects(200, ALLOWED)  # warm up
        ratios, p50s = [], {"none": [], "loaded": []}
        _log(f"allowed connections: {rounds} interleaved rounds x {per_round} connects, 0 vs 1000 policies")
        for r in range(rounds):
            order = ("none", "loaded") if r % 2 == 0 else ("loaded", "none")
            got = {}
            for cfg in order:
                env.apply(loaded if cfg == "loaded" else {}, wls)
                res = env.connects(per_round, ALLOWED)
                if res["refused"]:
                    raise RuntimeError(f"{res['refused']} allowed connections were refused ({cfg})")
                got[cfg] = statistics.median(res["us"])
                p50s[cfg].append(got[cfg])
            ratios.append(got["loaded"] / got["none"])
        env.apply(loaded, wls)
        denied = env.connects(300, DENIED)
        if denied["refused"] != 300:
            raise RuntimeError(f"only {denied['refused']}/300 refused")
        _log("compile + write 10,000 policies (1,000 namespaces, 2,000 workloads, 200 on this node)")
        big = policy_set(9990)
        big_wls = workloads(1800, 197)
        compile_s = [env.apply(big, big_wls) for _ in range(3)]
        us = sorted(denied["us"])
        return {
            "allowed_overhead_p50": round(statistics.median(ratios), 4),
            "compile_10k_s": round(statistics.median(compile_s), 3),
            "deny_latency_ms": round(statistics.median(us) / 1000, 4),
            "details": {
                "allowed_connect_p50_us_none": round(statistics.median(p50s["none"]), 1),
                "allowed_connect_p50_us_1000_policies": round(statistics.median(p50s["loaded"]), 1),
                "paired_ratios": [round(x, 4) for x in ratios],
                "deny_latency_p99_ms": round(us[int(len(us) * 0.99) - 1] / 1000, 4),
                "compile_10k_runs_s": [round(x, 3) for x in compile_s],
                "rounds": rounds, "connects_per_round": per_round,
            },
        }
    finally:
        env.down()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
