"""Waypoint test topology and decoders, shared by the test_dataplane_waypoint*.py modules.

Adds a waypoint pod ``wp`` (10.244.0.9, fd00:244::9) to the data-plane topology's bridge; the
projection gives it a waypoint Service ``default/waypoint`` (VIPs 10.96.0.30 / fd00:96::30,
port 15008) and puts ``default/wpweb`` (VIPs 10.96.0.20 / fd00:96::20, port 80 -> s1..s3:8080)
behind it. The hand-off header decoders below are written from the formats' specifications
(Kmesh TLV: shared/reference/kmesh-facts.md section 3; PROXY v2: haproxy's proxy-protocol.txt),
not from bpf/handoff.c.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import replace
from pathlib import Path

from dp_topo import HERE, PY, backends, ep, packed, service, sh, uid

from daemon.dataplane.model import Backend, Endpoint, Projection, Service, ServicePort, Waypoint

WP_IP4, WP_IP6 = "10.244.0.9", "fd00:244::9"
WP_VIP4, WP_VIP6 = "10.96.0.30", "fd00:96::30"
WEB_VIP4, WEB_VIP6 = "10.96.0.20", "fd00:96::20"
TLV_PORT, PROXY_PORT = 15019, 15030
WP_UID = "Kubernetes//Pod/default/waypoint-7d9f"
PP2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def add_pod(br_ns: str, ns: str, index: int, v4: str, v6: str) -> None:
    """A netns with one veth on the topology bridge."""
    sh("ip", "netns", "add", ns)
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", br_ns, "link", "add", f"v{index}", "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "-n", br_ns, "link", "set", f"v{index}", "master", "br0", "up")
    sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", "eth0")
    sh("ip", "-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")


def wp_backend(handoff_port: int = 0) -> Backend:
    return Backend(WP_UID, "waypoint-7d9f", "default", packed(WP_IP4), packed(WP_IP6), handoff_port)


def waypoint_service(with_endpoint: bool = True) -> Service:
    eps = (Endpoint(WP_UID, 15008),) if with_endpoint else ()
    return Service("default/waypoint", (packed(WP_VIP4), packed(WP_VIP6)),
                   (ServicePort(15008, eps), ServicePort(15021, eps and (Endpoint(WP_UID, 15021),))))


WAYPOINT = Waypoint(packed(WP_VIP4), 15008, "default/waypoint")


def projection(handoff_port: int = 0, wp_endpoint: bool = True, web_waypoint: Waypoint | None = WAYPOINT,
               pod_waypoint: str = "") -> Projection:
    """base topology + waypoint pod/service + default/wpweb behind the waypoint (and, when
    pod_waypoint names a server pod, that pod's own waypoint)."""
    bes = backends()
    bes[WP_UID] = wp_backend(handoff_port)
    if pod_waypoint:
        bes[uid(pod_waypoint)] = replace(bes[uid(pod_waypoint)], waypoint=WAYPOINT)
    web = service("default/web", ("10.96.0.10", "fd00:96::10"), [ep("s1"), ep("s2"), ep("s3")])
    wpweb = replace(service("default/wpweb", (WEB_VIP4, WEB_VIP6), [ep("s1"), ep("s2"), ep("s3")]),
                    waypoint=web_waypoint)
    wps = waypoint_service(wp_endpoint)
    return Projection({s.name: s for s in (web, wpweb, wps)}, bes)


def run_client(topology, pod: str, target: str, payload: Path, mode: str = "send", dual: bool = False,
               cgroup: Path | None = None) -> dict:
    cmd = [PY, str(HERE / "wp_client.py"), "--netns", topology.ns_path(pod),
           "--cgroup", str(cgroup or topology.cgroup), "--target", target, "--mode", mode,
           "--payload", str(payload)]
    if dual:
        cmd.append("--dual-stack")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


# ------------------------------------------------------------------ independent decoders
def decode_tlv(b: bytes) -> tuple[str, int, int]:
    """Kmesh TLV -> (original ip, original port, header length)."""
    assert b[0] == 0x01, b[:8]
    n = int.from_bytes(b[1:5], "big")
    assert n in (6, 18), n
    ip = str(ipaddress.ip_address(b[5:5 + n - 2]))
    port = int.from_bytes(b[5 + n - 2:5 + n], "big")
    assert b[5 + n] == 0xFE and b[6 + n:10 + n] == bytes(4), b[:10 + n]
    return ip, port, 10 + n


def decode_pp2(b: bytes) -> tuple[tuple[str, int], tuple[str, int], int]:
    """PROXY protocol v2 -> ((src ip, port), (dst ip, port), header length)."""
    assert b[:12] == PP2_SIG, b[:16]
    assert b[12] == 0x21, hex(b[12])  # version 2, command PROXY
    fam, n = b[13], int.from_bytes(b[14:16], "big")
    body = b[16:16 + n]
    if fam == 0x11:  # TCP over IPv4
        assert n >= 12
        a, z = 4, 8
    else:
        assert fam == 0x21 and n >= 36, (hex(fam), n)  # TCP over IPv6
        a, z = 16, 32
    src = str(ipaddress.ip_address(body[:a]))
    dst = str(ipaddress.ip_address(body[a:z]))
    sport, dport = int.from_bytes(body[z:z + 2], "big"), int.from_bytes(body[z + 2:z + 4], "big")
    return (src, sport), (dst, dport), 16 + n
