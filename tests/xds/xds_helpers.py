"""Builders for workload xDS resources used across the xds tests (real protobuf messages)."""

from __future__ import annotations

import ipaddress

from daemon.state import State
from daemon.xds.gen.istio.workload import workload_pb2 as wl
from daemon.xds.resources import ADDRESS_TYPE, decode_address


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def service(name: str, ns: str = "default", vip: str | None = "10.96.0.1",
            ports: list[tuple[int, int]] | None = None, mode: int = 0, routing: list[int] | None = None,
            health: int = 0) -> wl.Address:
    svc = wl.Service(name=name, namespace=ns, hostname=f"{name}.{ns}.svc.cluster.local")
    if vip:
        svc.addresses.add(network="", address=ip(vip))
    for sp, tp in ports if ports is not None else [(80, 8080)]:
        svc.ports.add(service_port=sp, target_port=tp)
    if mode or routing or health:
        svc.load_balancing.mode = mode
        svc.load_balancing.routing_preference.extend(routing or [])
        svc.load_balancing.health_policy = health
    return wl.Address(service=svc)


def svc_key(name: str, ns: str = "default") -> str:
    return f"{ns}/{name}.{ns}.svc.cluster.local"


def workload(name: str, addr: str | None = "10.1.0.1", ns: str = "default",
             services: dict[str, list[tuple[int, int]]] | None = None, healthy: bool = True,
             node: str = "", locality: tuple[str, str, str] | None = None, capacity: int | None = None,
             cluster: str = "Kubernetes", app_tunnel_port: int = 0) -> wl.Address:
    w = wl.Workload(uid=f"{cluster}//Pod/{ns}/{name}", name=name, namespace=ns, node=node,
                    status=wl.HEALTHY if healthy else wl.UNHEALTHY, cluster_id=cluster)
    if addr:
        w.addresses.append(ip(addr))
    for key, plist in (services or {}).items():
        pl = w.services[key]
        for sp, tp in plist:
            pl.ports.add(service_port=sp, target_port=tp)
    if locality:
        w.locality.region, w.locality.zone, w.locality.subzone = locality
    if capacity is not None:
        w.capacity.value = capacity
    if app_tunnel_port:
        w.application_tunnel.port = app_tunnel_port
    return wl.Address(workload=w)


def name_of(a: wl.Address) -> str:
    if a.WhichOneof("type") == "workload":
        return a.workload.uid
    return f"{a.service.namespace}/{a.service.hostname}"


def apply(state: State, *addrs: wl.Address, removed: tuple[str, ...] = ()) -> None:
    recs = [decode_address(name_of(a), ADDRESS_TYPE, a.SerializeToString()) for a in addrs]
    state.apply_addresses(recs, removed)


def projection_of(resources: dict[str, bytes], node_name: str = "") -> object:
    """The projection a fresh State computes from exactly these Address resources."""
    st = State(node_name=node_name)
    st.apply_addresses([decode_address(n, ADDRESS_TYPE, v) for n, v in resources.items()])
    return st.projection()
