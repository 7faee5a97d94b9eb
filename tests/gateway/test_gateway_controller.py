"""The pilot's gateway deployment controller: a waypoint Gateway becomes a ServiceAccount,
Deployment and Service named after it, owned by it; its status follows the Deployment."""

from __future__ import annotations

import json

from kubernetes.client.rest import ApiException

from tests.gateway.conftest import GROUP, VERSION, Cluster
from tests.support.procs import wait_for


def _condition(gw: dict, kind: str) -> dict:
    return next((c for c in (gw.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def _exists(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def test_waypoint_gatewayclass_exists_and_is_accepted(cluster: Cluster) -> None:
    gc = cluster.custom.get_cluster_custom_object(GROUP, VERSION, "gatewayclasses", "istio-waypoint")
    assert gc["spec"]["controllerName"] == "istio.io/mesh-controller"
    assert _condition(gc, "Accepted")["status"] == "True"
    out = cluster.kubectl("get", "gatewayclass").stdout
    assert "istio-waypoint" in out and "istio.io/mesh-controller" in out


def test_gateway_becomes_deployment_and_service_with_status(cluster: Cluster) -> None:
    ns = cluster.namespace("gwc-basic")
    gw = cluster.gateway(ns, labels={"istio.io/waypoint-for": "service"})
    dep = wait_for(lambda: _get(cluster.apps.read_namespaced_deployment, "waypoint", ns), 10, "deployment")
    svc = wait_for(lambda: _get(cluster.core.read_namespaced_service, "waypoint", ns), 10, "service")
    assert _exists(cluster.core.read_namespaced_service_account, "waypoint", ns)
    for obj in (dep, svc):
        refs = obj.metadata.owner_references
        assert [(r.kind, r.name, r.uid) for r in refs] == [("Gateway", "waypoint", gw["metadata"]["uid"])]
    tpl = dep.spec.template
    labels = tpl.metadata.labels
    assert labels["gateway.istio.io/managed"] == "istio.io-mesh-controller"
    assert labels["gateway.networking.k8s.io/gateway-name"] == "waypoint"
    (c,) = tpl.spec.containers
    assert c.name == "istio-proxy" and c.image == "docker.io/istio/proxyv2:1.22.6"
    assert c.args[:2] == ["proxy", "waypoint"]
    env = {e.name: e for e in c.env}
    for name, path in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
                       ("INSTANCE_IP", "status.podIP"), ("SERVICE_ACCOUNT", "spec.serviceAccountName")]:
        assert env[name].value_from.field_ref.field_path == path
    assert env["ISTIO_META_CLUSTER_ID"].value == "Kubernetes"
    assert env["ISTIO_META_MESH_ID"].value == "cluster.local"
    assert env["ISTIO_META_WORKLOAD_NAME"].value == "waypoint"
    assert env["CA_ADDR"].value == "istiod-1-22-6.istio-system.svc:15012"
    assert json.loads(env["PROXY_CONFIG"].value)["discoveryAddress"] == "istiod-1-22-6.istio-system.svc:15012"
    assert tpl.spec.service_account_name == "waypoint"
    assert c.readiness_probe.http_get.port == 15021
    assert {(p.name, p.port) for p in svc.spec.ports} == {("mesh", 15008), ("kmesh-tlv", 15019),
                                                          ("status-port", 15021)}
    assert svc.spec.selector == {"gateway.networking.k8s.io/gateway-name": "waypoint"}

    # Not ready yet (no pod is Ready): Accepted, not Programmed, with the reason.
    wait_for(lambda: _condition(cluster.get_gateway(ns), "Programmed").get("status") == "False", 10,
             "Programmed=False")
    got = cluster.get_gateway(ns)
    assert _condition(got, "Accepted")["status"] == "True"
    assert _condition(got, "Programmed")["reason"] == "Pending"
    assert "0/1 replicas ready" in _condition(got, "Programmed")["message"]

    # The waypoint pod cannot run: the reason shows in the Programmed message (kmeshctl --wait prints it).
    pod = {"metadata": {"name": "waypoint-abc12", "labels": dict(labels)},
           "spec": {"containers": [{"name": "istio-proxy", "image": c.image}]}}
    cluster.core.create_namespaced_pod(ns, pod)
    cluster.core.patch_namespaced_pod_status("waypoint-abc12", ns, {"status": {
        "phase": "Failed", "reason": "ImageNotInCatalog", "message": "not in the sandbox image catalog"}})
    wait_for(lambda: "ImageNotInCatalog" in _condition(cluster.get_gateway(ns), "Programmed")
             .get("message", ""), 10, "the pod's problem in the message")
    assert _condition(cluster.get_gateway(ns), "Programmed")["message"] == (
        f"deployment {ns}/waypoint is not ready: 0/1 replicas ready "
        "(pod waypoint-abc12: ImageNotInCatalog: not in the sandbox image catalog)")

    cluster.deployment_ready(ns, "waypoint", 1)
    wait_for(lambda: _condition(cluster.get_gateway(ns), "Programmed").get("status") == "True", 10,
             "Programmed=True")
    got = cluster.get_gateway(ns)
    assert got["status"]["addresses"] == [{"type": "IPAddress", "value": svc.spec.cluster_ip}]
    row = cluster.kubectl("get", "gateway", "-n", ns, "waypoint", "--no-headers").stdout.split()
    assert row[:4] == ["waypoint", "istio-waypoint", svc.spec.cluster_ip, "True"]

    cluster.deployment_ready(ns, "waypoint", 0)  # the pod went away: no longer programmed
    wait_for(lambda: _condition(cluster.get_gateway(ns), "Programmed").get("status") == "False", 10,
             "Programmed=False again")

    # Owned objects go with the Gateway.
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "gateways", "waypoint")
    wait_for(lambda: not _exists(cluster.apps.read_namespaced_deployment, "waypoint", ns)
             and not _exists(cluster.core.read_namespaced_service, "waypoint", ns), 10, "owned objects gone")


def test_proxy_image_annotation_and_foreign_gateways(cluster: Cluster) -> None:
    ns = cluster.namespace("gwc-image")
    image = "ghcr.io/kmesh-net/waypoint:v0.5.0"
    cluster.gateway(ns, "kmesh-wp", annotations={"sidecar.istio.io/proxyImage": image})
    dep = wait_for(lambda: _get(cluster.apps.read_namespaced_deployment, "kmesh-wp", ns), 10, "deployment")
    assert dep.spec.template.spec.containers[0].image == image
    # Edited image: the Deployment follows.
    annotation = {"sidecar.istio.io/proxyImage": "fortio/fortio:1"}
    cluster.patch_gateway(ns, {"metadata": {"annotations": annotation}}, "kmesh-wp")
    wait_for(lambda: cluster.apps.read_namespaced_deployment("kmesh-wp", ns).spec.template.spec.containers[0]
             .image == "fortio/fortio:1", 10, "image updated")
    # Another revision's Gateway and a non-waypoint class: not ours, nothing deployed, no status.
    cluster.gateway(ns, "other-rev", labels={"istio.io/rev": "1-23-0"})
    cluster.gateway(ns, "ingress", klass="istio")
    cluster.gateway(ns, "marker")  # reconciled after the two above: they have been seen by then
    wait_for(lambda: _exists(cluster.apps.read_namespaced_deployment, "marker", ns), 10, "marker deployment")
    for name in ("other-rev", "ingress"):
        assert not _exists(cluster.apps.read_namespaced_deployment, name, ns)
        assert _condition(cluster.get_gateway(ns, name), "Programmed")["status"] == "Unknown"


def _get(fn, name: str, ns: str):
    try:
        return fn(name, ns)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
