"""Waypoints in daemon.state: GatewayAddress decoding, hostname resolution (and re-resolution
when the waypoint's Service changes), Kmesh's loop guards, the PROXY application tunnel."""

from __future__ import annotations

import pytest
from xds_helpers import apply, ip, service, svc_key, workload

from daemon.dataplane.model import Waypoint
from daemon.state import Change, State
from daemon.xds.gen.istio.workload import workload_pb2 as wl
from daemon.xds.resources import ADDRESS_TYPE, Invalid, decode_address

WP = svc_key("waypoint")
WEB = svc_key("web")


def waypoint_service(vip: str | None = "10.96.0.30") -> wl.Address:
    return service("waypoint", vip=vip, ports=[(15021, 15021), (15008, 15008)])


def put(st: State, a: wl.Address) -> Change:
    return st.apply_addresses([decode_address(WP, ADDRESS_TYPE, a.SerializeToString())])


def by_host(a: wl.Address, ns: str = "default", host: str = "waypoint.default.svc.cluster.local",
            port: int = 0) -> wl.Address:
    g = a.service.waypoint if a.WhichOneof("type") == "service" else a.workload.waypoint
    g.hostname.namespace, g.hostname.hostname = ns, host
    g.hbone_mtls_port = port
    return a


def by_addr(a: wl.Address, addr: str, port: int = 15008) -> wl.Address:
    g = a.service.waypoint if a.WhichOneof("type") == "service" else a.workload.waypoint
    g.address.address = ip(addr)
    g.hbone_mtls_port = port
    return a


def test_hostname_waypoint_resolves_to_the_waypoint_service_vip() -> None:
    st = State()
    apply(st, waypoint_service(), by_host(service("web", vip="10.96.0.20")))
    assert st.projection().services[WEB].waypoint == Waypoint(ip("10.96.0.30"), 15008, WP)


def test_hostname_waypoint_re_resolved_when_its_service_changes() -> None:
    st = State()
    apply(st, by_host(service("web", vip="10.96.0.20")))
    assert st.projection().services[WEB].waypoint == Waypoint(b"", 15008, WP)  # unknown: refuse, not bypass
    ch = put(st, waypoint_service())
    assert WEB in ch.services
    assert st.projection().services[WEB].waypoint == Waypoint(ip("10.96.0.30"), 15008, WP)
    ch = put(st, waypoint_service("10.96.0.31"))
    assert WEB in ch.services and st.projection().services[WEB].waypoint.address == ip("10.96.0.31")
    apply(st, removed=(WP,))
    assert st.projection().services[WEB].waypoint == Waypoint(b"", 15008, WP)
    apply(st, service("web", vip="10.96.0.20"))  # the waypoint is dropped from the service
    assert st.projection().services[WEB].waypoint is None
    ch = put(st, waypoint_service())
    assert WEB not in ch.services  # no longer linked


def test_address_waypoint_and_hbone_port() -> None:
    st = State()
    apply(st, by_addr(service("web", vip="10.96.0.20"), "10.96.0.30", 15009))
    assert st.projection().services[WEB].waypoint == Waypoint(ip("10.96.0.30"), 15009)


def test_loop_guards() -> None:
    st = State()
    # a service whose first VIP is its own waypoint's address, one with port 15021, one naming itself
    apply(st, by_addr(service("self", vip="10.96.0.30"), "10.96.0.30"),
          by_addr(service("status", vip="10.96.0.40", ports=[(80, 8080), (15021, 15021)]), "10.96.0.30"),
          by_host(waypoint_service()))
    p = st.projection()
    assert p.services[svc_key("self")].waypoint is None
    assert p.services[svc_key("status")].waypoint is None
    assert p.services[WP].waypoint is None


def test_workload_waypoint_and_proxy_tunnel() -> None:
    st = State()
    w = by_host(workload("pod", "10.1.0.1"))
    wp_pod = workload("waypoint-0", "10.1.0.9")
    wp_pod.workload.application_tunnel.protocol = wl.ApplicationTunnel.PROXY
    wp_pod.workload.application_tunnel.port = 15088
    none_pod = workload("tunnel-none", "10.1.0.8", app_tunnel_port=15008)  # protocol NONE: not PROXY
    apply(st, waypoint_service(), w, wp_pod, none_pod)
    be = st.projection().backends
    assert be["Kubernetes//Pod/default/pod"].waypoint == Waypoint(ip("10.96.0.30"), 15008, WP)
    assert be["Kubernetes//Pod/default/waypoint-0"].handoff_port == 15088
    assert be["Kubernetes//Pod/default/tunnel-none"].handoff_port == 0
    assert be["Kubernetes//Pod/default/waypoint-0"].waypoint is None
    # the waypoint service moves: the pod's resolved waypoint follows
    ch = put(st, waypoint_service("10.96.0.33"))
    assert "Kubernetes//Pod/default/pod" in ch.backends
    assert st.projection().backends["Kubernetes//Pod/default/pod"].waypoint.address == ip("10.96.0.33")
    apply(st, workload("pod", "10.1.0.1"))  # waypoint removed from the workload
    assert st.projection().backends["Kubernetes//Pod/default/pod"].waypoint is None
    apply(st, removed=("Kubernetes//Pod/default/pod",))
    assert "Kubernetes//Pod/default/pod" not in st.projection().backends


@pytest.mark.parametrize("bad", ["port", "hostname"])
def test_bad_gateway_address_is_rejected(bad: str) -> None:
    a = service("web")
    if bad == "port":
        a.service.waypoint.address.address = ip("10.96.0.30")
        a.service.waypoint.hbone_mtls_port = 70000
    else:
        a.service.waypoint.hostname.hostname = "waypoint"
    with pytest.raises(Invalid):
        decode_address(svc_key("web"), ADDRESS_TYPE, a.SerializeToString())


def test_dump_services_and_workloads_fill_the_waypoint_column() -> None:
    """The daemon's config dump -> kmeshctl's tables: WAYPOINT names the waypoint Service."""
    from kmeshctl.dump import service_rows, workload_rows

    st = State()
    apply(st, waypoint_service(), by_host(service("web", vip="10.96.0.20")),
          by_addr(service("api", vip="10.96.0.21"), "10.96.0.30"), service("plain", vip="10.96.0.22"),
          by_host(workload("pod", "10.1.0.1")))
    dump = st.config_dump()
    rows = {r[1]: r[3] for r in service_rows(dump)}
    assert rows == {"api": "waypoint", "plain": "None", "waypoint": "None", "web": "waypoint"}, rows
    assert {r[1]: r[4] for r in workload_rows(dump)} == {"pod": "waypoint"}
