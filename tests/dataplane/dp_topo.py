"""Shared constants and projection builders of the data-plane tests (imported by conftest and
the test modules; a uniquely named module, because every test area has its own conftest)."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

from daemon.dataplane.model import Backend, Endpoint, LbMode, Projection, Service, ServicePort, Waypoint

HERE = Path(__file__).resolve().parent
PY = sys.executable
PODS = {"c1": 1, "s1": 2, "s2": 3, "s3": 4, "c2": 5}
SERVERS = ("s1", "s2", "s3")
VIP4 = "10.96.0.10"
VIP6 = "fd00:96::10"

def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def sh_quiet(*args: str) -> None:
    subprocess.run(args, check=False, capture_output=True, text=True)


def ip4(pod: str) -> str:
    return f"10.244.0.{PODS[pod]}"


def ip6(pod: str) -> str:
    return f"fd00:244::{PODS[pod]}"


def uid(pod: str) -> str:
    return f"Kubernetes//Pod/default/{pod}"


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def backends() -> dict[str, Backend]:
    return {uid(p): Backend(uid(p), p, "default", packed(ip4(p)), packed(ip6(p))) for p in PODS}


def service(name: str, vips: tuple[str, ...], endpoints: list[Endpoint], port: int = 80,
            lb: LbMode = LbMode.RANDOM) -> Service:
    return Service(name, tuple(packed(v) for v in vips), (ServicePort(port, tuple(endpoints)),), lb)


def ep(pod: str, weight: int = 1, priority: int = 0, port: int = 8080) -> Endpoint:
    return Endpoint(uid(pod), port, weight, priority)


def base_projection() -> Projection:
    web = service("default/web", (VIP4, VIP6), [ep("s1"), ep("s2"), ep("s3")])
    return Projection({web.name: web}, backends())


def projection_json(proj: Projection) -> str:
    def ip(b: bytes | None) -> str | None:
        return str(ipaddress.ip_address(b)) if b else None

    def wp(w: Waypoint | None) -> dict | None:
        return None if w is None else {"address": ip(w.address), "port": w.port, "name": w.name}

    return json.dumps({
        "backends": [{"uid": b.uid, "name": b.name, "namespace": b.namespace, "ipv4": ip(b.ipv4),
                      "ipv6": ip(b.ipv6), "handoff_port": b.handoff_port, "waypoint": wp(b.waypoint)}
                     for b in proj.backends.values()],
        "services": [{"name": s.name, "vips": [ip(v) for v in s.vips], "lb_mode": int(s.lb_mode),
                      "waypoint": wp(s.waypoint),
                      "ports": [{"port": p.port, "endpoints": [
                          {"backend_uid": e.backend_uid, "target_port": e.target_port, "weight": e.weight,
                           "priority": e.priority} for e in p.endpoints]} for p in s.ports]}
                     for s in proj.services.values()],
    })
