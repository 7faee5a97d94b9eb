"""Workload xDS with waypoints, read by a real XdsClient + State over gRPC from the sandbox pilot.

Services and pods that use a waypoint (istio.io/use-waypoint on the Service / pod, or on the
namespace; ``none`` opts out; per the waypoint's istio.io/waypoint-for) carry the waypoint's
GatewayAddress (its Service's ClusterIP, HBONE port 15008). The waypoint's own pods carry none,
and carry application_tunnel PROXY when the Gateway or its class has an inbound binding.
"""

from __future__ import annotations

from typing import Any

from tests.gateway.conftest import GROUP, VERSION, Cluster
from tests.support.procs import wait_for

WP_POD_LABELS = {"gateway.istio.io/managed": "istio.io-mesh-controller",
                 "gateway.networking.k8s.io/gateway-name": "waypoint", "istio.io/dataplane-mode": "none"}


def services(state: Any, ns: str) -> dict[str, dict]:
    return {s["name"]: s for s in state.config_dump()["services"] if s["namespace"] == ns}


def workloads(state: Any, ns: str) -> dict[str, dict]:
    return {w["name"]: w for w in state.config_dump()["workloads"] if w["namespace"] == ns}


def _waypoint_ip(cluster: Cluster, ns: str, name: str = "waypoint") -> str:
    svc = wait_for(lambda: _svc(cluster, ns, name), 10, f"waypoint service {ns}/{name}")
    return svc.spec.cluster_ip


def _svc(cluster: Cluster, ns: str, name: str) -> Any:
    from kubernetes.client.rest import ApiException

    try:
        return cluster.core.read_namespaced_service(name, ns)
    except ApiException:
        return None


def test_namespace_enrolled_service_carries_the_waypoint(cluster: Cluster, xds: Any) -> None:
    ns = cluster.namespace("wpx-ns", {"istio.io/use-waypoint": "waypoint"})
    cluster.service(ns, "fortio", {"app": "fortio"})
    cluster.service(ns, "kernel-only", {"app": "other"}, labels={"istio.io/use-waypoint": "none"})
    cluster.pod(ns, "fortio-v1", {"app": "fortio", "version": "v1"}, "10.77.0.11")
    client, state = xds()
    wait_for(lambda: "fortio" in services(state, ns), 10, "service")
    assert "waypoint" not in services(state, ns)["fortio"]  # no Gateway yet: no waypoint
    cluster.gateway(ns)
    ip = _waypoint_ip(cluster, ns)
    want = {"destination": f"/{ip}", "hboneMtlsPort": 15008}
    wait_for(lambda: services(state, ns)["fortio"].get("waypoint") == want, 10, "service waypoint")
    svcs = services(state, ns)
    assert "waypoint" not in svcs["kernel-only"]  # use-waypoint=none on the Service
    assert "waypoint" not in svcs["waypoint"]  # the waypoint's own Service has none
    # A service waypoint (the default waypoint-for) is not a workload waypoint.
    assert "waypoint" not in workloads(state, ns)["fortio-v1"]
    # The waypoint's own pod: no waypoint, no application tunnel without a binding.
    cluster.pod(ns, "waypoint-abc", WP_POD_LABELS, "10.77.0.12")
    wait_for(lambda: "waypoint-abc" in workloads(state, ns), 10, "waypoint pod")
    wp = workloads(state, ns)["waypoint-abc"]
    assert "waypoint" not in wp and "applicationTunnel" not in wp

    # Namespace label removed -> the service is back to kernel-only.
    cluster.kubectl("label", "ns", ns, "istio.io/use-waypoint-")
    wait_for(lambda: "waypoint" not in services(state, ns)["fortio"], 10, "waypoint removed")
    # Label on the Service itself.
    cluster.kubectl("label", "svc", "-n", ns, "fortio", "istio.io/use-waypoint=waypoint")
    wait_for(lambda: services(state, ns)["fortio"].get("waypoint") == want, 10, "service label")
    # Gateway deleted -> no waypoint any more.
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "gateways", "waypoint")
    wait_for(lambda: "waypoint" not in services(state, ns)["fortio"], 10, "gateway deleted")
    assert client.status()["nacks"] == 0


def test_waypoint_for_selects_services_workloads_or_both(cluster: Cluster, xds: Any) -> None:
    ns = cluster.namespace("wpx-for", {"istio.io/use-waypoint": "waypoint"})
    cluster.service(ns, "web", {"app": "web"})
    cluster.pod(ns, "web-1", {"app": "web"}, "10.77.1.11")
    cluster.pod(ns, "opted-out", {"app": "web", "istio.io/use-waypoint": "none"}, "10.77.1.12")
    cluster.gateway(ns, labels={"istio.io/waypoint-for": "workload"})
    ip = _waypoint_ip(cluster, ns)
    want = {"destination": f"/{ip}", "hboneMtlsPort": 15008}
    client, state = xds()
    wait_for(lambda: workloads(state, ns).get("web-1", {}).get("waypoint") == want, 10, "workload waypoint")
    assert "waypoint" not in services(state, ns)["web"]
    assert "waypoint" not in workloads(state, ns)["opted-out"]

    cluster.kubectl("label", "gateway", "-n", ns, "waypoint", "istio.io/waypoint-for=all", "--overwrite")
    wait_for(lambda: services(state, ns)["web"].get("waypoint") == want, 10, "all: service too")
    assert workloads(state, ns)["web-1"].get("waypoint") == want

    cluster.kubectl("label", "gateway", "-n", ns, "waypoint", "istio.io/waypoint-for=none", "--overwrite")
    wait_for(lambda: "waypoint" not in services(state, ns)["web"]
             and "waypoint" not in workloads(state, ns)["web-1"], 10, "none: nothing")

    # A waypoint in another namespace, chosen with istio.io/use-waypoint-namespace on the pod.
    other = cluster.namespace("wpx-shared")
    cluster.gateway(other, "shared", labels={"istio.io/waypoint-for": "all"})
    shared_ip = _waypoint_ip(cluster, other, "shared")
    cluster.kubectl("label", "pod", "-n", ns, "web-1", "istio.io/use-waypoint=shared",
                    f"istio.io/use-waypoint-namespace={other}")
    wait_for(lambda: workloads(state, ns)["web-1"].get("waypoint", {}).get("destination") == f"/{shared_ip}",
             10, "cross-namespace waypoint")
    assert client.status()["nacks"] == 0


def test_inbound_binding_gives_the_waypoint_pods_an_application_tunnel(cluster: Cluster, xds: Any) -> None:
    ns = cluster.namespace("wpx-bind")
    cluster.gateway(ns, annotations={"ambient.istio.io/waypoint-inbound-binding": "PROXY/15088"})
    _waypoint_ip(cluster, ns)
    cluster.pod(ns, "waypoint-xyz", WP_POD_LABELS, "10.77.2.11")
    cluster.pod(ns, "app", {"app": "x"}, "10.77.2.12")
    client, state = xds()
    wait_for(lambda: workloads(state, ns).get("waypoint-xyz", {}).get("applicationTunnel")
             == {"protocol": "PROXY", "port": 15088}, 10, "application tunnel")
    assert "waypoint" not in workloads(state, ns)["waypoint-xyz"]
    assert "applicationTunnel" not in workloads(state, ns)["app"]
    # Binding removed from the Gateway, then set on the GatewayClass instead.
    cluster.kubectl("annotate", "gateway", "-n", ns, "waypoint", "ambient.istio.io/waypoint-inbound-binding-")
    wait_for(lambda: "applicationTunnel" not in workloads(state, ns)["waypoint-xyz"], 10, "tunnel removed")
    cluster.kubectl("annotate", "gatewayclass", "istio-waypoint",
                    "ambient.istio.io/waypoint-inbound-binding=PROXY/15099")
    try:
        wait_for(lambda: workloads(state, ns)["waypoint-xyz"].get("applicationTunnel")
                 == {"protocol": "PROXY", "port": 15099}, 10, "class binding")
    finally:
        cluster.kubectl("annotate", "gatewayclass", "istio-waypoint",
                        "ambient.istio.io/waypoint-inbound-binding-")
    assert client.status()["nacks"] == 0


def test_inbound_binding_values() -> None:
    from sandbox.pilot.translate import _parse_binding

    assert _parse_binding("PROXY/15088") == 15088
    assert _parse_binding("PROXY") == 0  # PROXY on the original port
    for bad in ("", None, "HBONE", "PROXY/0", "PROXY/70000", "PROXY/x", "proxy/15088"):
        assert _parse_binding(bad) is None
