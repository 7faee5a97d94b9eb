"""sandbox.pilot.translate: Kubernetes objects -> workload resources, as istiod builds them."""

from __future__ import annotations

from typing import Any

from xds_helpers import ip

from daemon.xds.gen.istio.workload import workload_pb2 as wl
from sandbox.pilot import translate as tr

LB = wl.LoadBalancing


def svc(name: str = "web", ns: str = "shop", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "selector": {"app": "web"},
        "clusterIP": "10.96.0.10",
        "clusterIPs": ["10.96.0.10"],
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
    }
    base.update(spec)
    return {"metadata": {"name": name, "namespace": ns}, "spec": base}


def pod(name: str = "web-1", ns: str = "shop", ready: bool = True, **extra: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
        "spec": {
            "nodeName": "node-1",
            "serviceAccountName": "web-sa",
            "containers": [{"name": "c", "ports": [{"name": "metrics", "containerPort": 9100}]}],
        },
        "status": {
            "phase": "Running",
            "podIP": "10.1.0.5",
            "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }
    for k, v in extra.items():
        p[k].update(v)
    return p


def test_service_resource_fields() -> None:
    s = tr.service_resource(
        svc(
            ports=[
                {"port": 80, "targetPort": 8080},
                {"port": 9100, "targetPort": "metrics"},
                {"port": 53, "protocol": "UDP"},
                {"port": 81},
            ]
        )
    )
    assert s is not None and s.hostname == "web.shop.svc.cluster.local" and s.namespace == "shop"
    assert [a.address for a in s.addresses] == [ip("10.96.0.10")]
    assert [(p.service_port, p.target_port) for p in s.ports] == [(80, 8080), (9100, 0), (81, 81)]
    assert not s.HasField("load_balancing")
    assert tr.service_key(svc()) == "shop/web.shop.svc.cluster.local"


def test_service_headless_externalname_and_traffic_policies() -> None:
    headless = tr.service_resource(svc(clusterIP="None", clusterIPs=["None"]))
    assert headless is not None and list(headless.addresses) == []
    assert tr.service_resource(svc(type="ExternalName", externalName="example.com")) is None
    close = tr.service_resource(svc(trafficDistribution="PreferClose"))
    assert close.load_balancing.mode == LB.FAILOVER
    assert list(close.load_balancing.routing_preference) == [LB.NETWORK, LB.REGION, LB.ZONE, LB.SUBZONE]
    local = tr.service_resource(svc(internalTrafficPolicy="Local"))
    assert local.load_balancing.mode == LB.STRICT and list(local.load_balancing.routing_preference) == [
        LB.NODE
    ]
    assert (
        tr.service_resource(svc(publishNotReadyAddresses=True)).load_balancing.health_policy == LB.ALLOW_ALL
    )


def test_pod_workload_fields_and_ports() -> None:
    services = [
        svc(
            ports=[
                {"port": 80, "targetPort": 8080},
                {"port": 9100, "targetPort": "metrics"},
                {"port": 9200, "targetPort": "nope"},
                {"port": 81},
            ]
        ),
        svc("other", selector={"app": "other"}),
        svc("elsewhere", ns="other-ns"),
    ]
    owner = {"ownerReferences": [{"kind": "ReplicaSet", "name": "web-5d8f9c7b6"}]}
    w = tr.pod_workload(pod(metadata=owner), services, "Kubernetes", node_labels={tr.ZONE_LABEL: "z9"})
    assert w is not None
    assert w.uid == "Kubernetes//Pod/shop/web-1" and w.name == "web-1" and w.namespace == "shop"
    assert list(w.addresses) == [ip("10.1.0.5"), ip("fd00::5")]
    assert w.status == wl.HEALTHY and w.node == "node-1" and w.service_account == "web-sa"
    assert w.cluster_id == "Kubernetes" and w.trust_domain == "cluster.local"
    assert w.workload_type == wl.DEPLOYMENT and w.workload_name == "web" and w.canonical_name == "web"
    assert w.tunnel_protocol == wl.NONE and w.network_mode == wl.STANDARD
    assert (w.locality.region, w.locality.zone) == ("", "z9")
    assert list(w.services) == ["shop/web.shop.svc.cluster.local"]
    ports = [(p.service_port, p.target_port) for p in w.services["shop/web.shop.svc.cluster.local"].ports]
    assert ports == [(80, 8080), (9100, 9100), (81, 81)]  # unresolvable named port dropped


def test_pod_health_mode_and_skips() -> None:
    assert tr.pod_workload(pod(ready=False), [], "c").status == wl.UNHEALTHY
    deleting = pod(metadata={"deletionTimestamp": "2026-01-01T00:00:00Z"})
    assert tr.pod_workload(deleting, [], "c").status == wl.UNHEALTHY
    assert tr.pod_workload(pod(status={"podIP": None, "podIPs": []}), [], "c") is None
    assert tr.pod_workload(pod(status={"phase": "Succeeded"}), [], "c") is None
    ambient = tr.pod_workload(pod(), [], "c", namespace_labels={tr.DATAPLANE_MODE: "ambient"})
    assert ambient.tunnel_protocol == wl.HBONE
    host = tr.pod_workload(pod(spec={"hostNetwork": True}), [], "c")
    assert host.network_mode == wl.HOST_NETWORK
    labelled = pod(metadata={"labels": {"app": "web", tr.REGION_LABEL: "r1", tr.ZONE_LABEL: "z1"}})
    w = tr.pod_workload(labelled, [], "c", node_labels={tr.ZONE_LABEL: "z9"})
    assert (w.locality.region, w.locality.zone) == ("r1", "z1")  # pod labels win over the node's
