"""Endpoint derivation and change events of daemon.state (workload-xds.md section 1 rules)."""

from __future__ import annotations

from xds_helpers import apply, ip, service, svc_key, workload

from daemon.dataplane.model import LbMode
from daemon.state import Change, State
from daemon.xds.gen.istio.workload import workload_pb2 as wl

LB = wl.LoadBalancing
A = svc_key("a")


def endpoints(st: State, name: str = A, port: int = 80) -> list[tuple[str, int, int, int]]:
    svc = st.projection().services[name]
    sp = next(p for p in svc.ports if p.port == port)
    return [(e.backend_uid.rsplit("/", 1)[1], e.target_port, e.weight, e.priority) for e in sp.endpoints]


def test_target_port_resolution_order() -> None:
    st = State()
    apply(st, service("a", ports=[(80, 8080), (81, 0), (82, 0)]),
          workload("w1", "10.1.0.1", services={A: [(80, 9090)]}),  # 1. workload PortList wins
          workload("w2", "10.1.0.2", services={A: []}),  # 2. Service target_port
          workload("w3", "10.1.0.3", services={A: []}, app_tunnel_port=15008))  # 3. app tunnel -> svc port
    assert endpoints(st, port=80) == [("w1", 9090, 1, 0), ("w2", 8080, 1, 0), ("w3", 8080, 1, 0)]
    assert endpoints(st, port=81) == [("w3", 81, 1, 0)]  # 4. no target anywhere -> dropped (w1, w2)


def test_workload_port_for_unknown_service_port_is_ignored() -> None:
    st = State()
    apply(st, service("a", ports=[(80, 8080)]), workload("w1", services={A: [(80, 1000), (99, 2000)]}))
    svc = st.projection().services[A]
    assert [p.port for p in svc.ports] == [80]


def test_health_policy() -> None:
    st = State()
    apply(st, service("a"), workload("up", "10.1.0.1", services={A: []}),
          workload("down", "10.1.0.2", services={A: []}, healthy=False))
    assert [e[0] for e in endpoints(st)] == ["up"]
    assert set(st.projection().backends) == {"Kubernetes//Pod/default/up", "Kubernetes//Pod/default/down"}
    apply(st, service("a", health=LB.ALLOW_ALL))
    assert [e[0] for e in endpoints(st)] == ["down", "up"]


def test_resent_service_keeps_endpoints_and_removed_service_disappears() -> None:
    st = State()
    apply(st, service("a"), workload("w1", services={A: []}))
    apply(st, service("a", vip="10.96.0.9"))
    svc = st.projection().services[A]
    assert svc.vips == (ip("10.96.0.9"),) and endpoints(st) == [("w1", 8080, 1, 0)]
    apply(st, removed=(A,))
    assert A not in st.projection().services
    apply(st, service("a"))  # back again: the workloads still name it
    assert endpoints(st) == [("w1", 8080, 1, 0)]


def test_workload_update_replaces_old_entry() -> None:
    st = State()
    b = svc_key("b")
    apply(st, service("a"), service("b", vip="10.96.0.2"), workload("w1", "10.1.0.1", services={A: []}))
    apply(st, workload("w1", "10.1.0.7", services={b: [(80, 7070)]}))
    p = st.projection()
    assert p.services[A].ports[0].endpoints == ()
    assert [(e.backend_uid, e.target_port) for e in p.services[b].ports[0].endpoints] == [
        ("Kubernetes//Pod/default/w1", 7070)]
    assert p.backends["Kubernetes//Pod/default/w1"].ipv4 == ip("10.1.0.7")
    apply(st, removed=("Kubernetes//Pod/default/w1", "never/seen"))
    p = st.projection()
    assert p.backends == {} and p.services[b].ports[0].endpoints == ()


def test_capacity_is_weight_and_ipv6_backend() -> None:
    st = State()
    apply(st, service("a"), workload("w1", "fd00::1", services={A: []}, capacity=5))
    assert endpoints(st) == [("w1", 8080, 5, 0)]
    be = st.projection().backends["Kubernetes//Pod/default/w1"]
    assert be.ipv6 == ip("fd00::1") and be.ipv4 is None


def test_locality_failover_and_strict() -> None:
    st = State(node_name="node-a")
    routing = [LB.REGION, LB.ZONE, LB.SUBZONE]
    apply(st, workload("me", "10.1.0.100", node="node-a", locality=("r1", "z1", "s1")),
          service("a", mode=LB.FAILOVER, routing=routing),
          workload("same", "10.1.0.1", services={A: []}, locality=("r1", "z1", "s1")),
          workload("zone", "10.1.0.2", services={A: []}, locality=("r1", "z1", "s2")),
          workload("region", "10.1.0.3", services={A: []}, locality=("r1", "z2", "s1")),
          workload("far", "10.1.0.4", services={A: []}, locality=("r2", "z1", "s1")))
    assert st.node_locality == ("r1", "z1", "s1")
    assert st.projection().services[A].lb_mode == LbMode.FAILOVER
    assert endpoints(st) == [("same", 8080, 1, 0), ("zone", 8080, 1, 1), ("region", 8080, 1, 2),
                             ("far", 8080, 1, 3)]
    apply(st, service("a", mode=LB.STRICT, routing=[LB.REGION, LB.ZONE]))
    assert st.projection().services[A].lb_mode == LbMode.STRICT
    assert endpoints(st) == [("same", 8080, 1, 0), ("zone", 8080, 1, 0)]
    apply(st, service("a", mode=LB.STRICT, routing=[LB.NODE]))
    assert endpoints(st) == []


def test_explicit_locality_wins_and_unspecified_mode_is_flat() -> None:
    st = State(node_name="n", locality=("r2", "", ""))
    apply(st, workload("me", node="n", locality=("r1", "", "")), service("a", routing=[LB.REGION]),
          workload("w", "10.1.0.2", services={A: []}, locality=("r1", "", "")))
    assert endpoints(st) == [("w", 8080, 1, 0)]
    apply(st, service("a", mode=LB.FAILOVER, routing=[LB.REGION]))
    assert endpoints(st) == [("w", 8080, 1, 1)]


def test_passthrough_and_headless() -> None:
    st = State()
    apply(st, service("a", mode=LB.PASSTHROUGH), service("h", vip=None), workload("w", services={A: []}))
    p = st.projection()
    assert A not in p.services and p.services[svc_key("h")].vips == ()


def test_change_events_name_touched_services_and_backends() -> None:
    st = State()
    seen: list[Change] = []
    st.subscribe(seen.append)
    apply(st, service("a"), service("b", vip="10.96.0.2"))
    apply(st, workload("w1", services={A: []}))
    assert seen[-1].services == {A} and seen[-1].backends == {"Kubernetes//Pod/default/w1"}
    apply(st, workload("w1", services={A: []}, healthy=False))  # same backend, endpoint gone
    assert seen[-1].services == {A} and seen[-1].backends == set()
    apply(st, removed=("Kubernetes//Pod/default/w1",))
    assert seen[-1].services == {A} and seen[-1].backends == {"Kubernetes//Pod/default/w1"}
    st.mark_synced()
    assert seen[-1].full


def test_config_dump_shapes() -> None:
    st = State()
    apply(st, service("a"), workload("w1", "10.1.0.1", services={A: [(80, 9090)]}, locality=("r", "z", "")),
          workload("w2", "10.1.0.2", services={A: []}, healthy=False))
    dump = st.config_dump()
    w1 = next(w for w in dump["workloads"] if w["name"] == "w1")
    assert w1["uid"] == "Kubernetes//Pod/default/w1" and w1["workloadIps"] == ["10.1.0.1"]
    assert w1["status"] == "Healthy" and w1["protocol"] == "TCP" and w1["trustDomain"] == "cluster.local"
    assert w1["locality"] == {"region": "r", "zone": "z", "subzone": ""}
    (svc,) = dump["services"]
    assert svc["vips"] == ["/10.96.0.1"] and svc["ports"] == {"80": 8080}
    ep = svc["endpoints"]["Kubernetes//Pod/default/w1:/10.1.0.1"]
    assert ep == {"workloadUid": "Kubernetes//Pod/default/w1", "service": A, "address": "/10.1.0.1",
                  "port": {"80": 9090}, "status": "Healthy"}
    assert dump["policies"] == []
