"""Gateway API kinds on the sandbox API server: Gateway and GatewayClass (cluster-scoped), their
status subresources, the CRD printer columns, and the CRD schema (422 / strict 400 / pruning)."""

from __future__ import annotations

import json

import pytest

from tests.apiserver.conftest import Cluster

GROUP, VERSION = "gateway.networking.k8s.io", "v1"


def gateway(name: str, **spec_extra: object) -> dict:
    spec = {"gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}], **spec_extra}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Gateway", "metadata": {"name": name}, "spec": spec}


def test_gatewayclass_is_cluster_scoped_with_status(cluster: Cluster) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(cluster.api_client())
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GatewayClass", "metadata": {"name": "gc-test"},
            "spec": {"controllerName": "istio.io/mesh-controller", "description": "Istio waypoint"}}
    created = custom.create_cluster_custom_object(GROUP, VERSION, "gatewayclasses", body)
    assert "namespace" not in created["metadata"]
    # The CRD's status default until a controller writes one.
    assert [(c["type"], c["status"], c["reason"]) for c in created["status"]["conditions"]] == [
        ("Accepted", "Unknown", "Pending")]
    cond = {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "Handled by Istio",
            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}
    custom.patch_cluster_custom_object_status(GROUP, VERSION, "gatewayclasses", "gc-test",
                                              {"status": {"conditions": [cond]}})
    # A main-resource write cannot change the status.
    custom.patch_cluster_custom_object(GROUP, VERSION, "gatewayclasses", "gc-test",
                                       {"status": {"conditions": []}, "spec": {"description": "changed"}})
    got = custom.get_cluster_custom_object(GROUP, VERSION, "gatewayclasses", "gc-test")
    assert got["status"]["conditions"][0]["status"] == "True"
    assert got["spec"]["description"] == "changed" and got["metadata"]["generation"] == 2
    out = cluster.kubectl("get", "gatewayclass", "gc-test").stdout.splitlines()
    assert out[0].split() == ["NAME", "CONTROLLER", "ACCEPTED", "AGE"]
    assert out[1].split()[:3] == ["gc-test", "istio.io/mesh-controller", "True"]
    wide = cluster.kubectl("get", "gc", "gc-test", "-o", "wide").stdout
    assert "DESCRIPTION" in wide and "changed" in wide
    bad = cluster.kubectl("apply", "--server-side", "-f", "-", check=False, stdin=json.dumps(
        {**body, "metadata": {"name": "gc-bad"}, "spec": {"controllerName": "no-slash"}}))
    assert bad.returncode != 0 and "spec.controllerName" in bad.stderr


def test_gateway_columns_and_status(cluster: Cluster) -> None:
    from kubernetes import client

    ns = cluster.new_namespace("gw")
    custom = client.CustomObjectsApi(cluster.api_client())
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, "gateways", gateway("waypoint"))
    out = cluster.kubectl("get", "gateway", "-n", ns).stdout.splitlines()
    assert out[0].split() == ["NAME", "CLASS", "ADDRESS", "PROGRAMMED", "AGE"]
    assert out[1].split()[:3] == ["waypoint", "istio-waypoint", "Unknown"]  # no address yet
    status = {"addresses": [{"type": "IPAddress", "value": "10.96.0.42"}],
              "conditions": [{"type": "Programmed", "status": "True", "reason": "Programmed", "message": "ok",
                              "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "gateways", "waypoint",
                                                 {"status": status})
    out = cluster.kubectl("get", "gtw", "-n", ns).stdout.splitlines()
    assert out[1].split()[:4] == ["waypoint", "istio-waypoint", "10.96.0.42", "True"]
    # kubectl wait understands the condition
    w = cluster.kubectl("wait", "-n", ns, "gateway/waypoint", "--for=condition=Programmed", "--timeout=5s")
    assert "condition met" in w.stdout
    listing = json.loads(cluster.kubectl("get", "gateways", "-A", "-o", "json").stdout)
    assert any(i["metadata"]["name"] == "waypoint" for i in listing["items"])


@pytest.mark.parametrize(("change", "field"), [
    ({"listeners": [{"name": "mesh", "port": 0, "protocol": "HBONE"}]}, "spec.listeners[0].port"),
    ({"listeners": [{"name": "Mesh_1", "port": 15008, "protocol": "HBONE"}]}, "spec.listeners[0].name"),
    ({"listeners": [{"name": "mesh", "port": 15008, "protocol": "HB ONE"}]}, "spec.listeners[0].protocol"),
    ({"listeners": []}, "spec.listeners"),
    ({"listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"},
                    {"name": "mesh", "port": 15009, "protocol": "HBONE"}]}, "spec.listeners[1]"),
    ({"gatewayClassName": ""}, "spec.gatewayClassName"),
])
def test_gateway_schema_rejects_what_the_crd_rejects(cluster: Cluster, change: dict, field: str) -> None:
    ns = cluster.new_namespace("gwbad")
    obj = gateway("bad")
    obj["spec"].update(change)
    r = cluster.kubectl("apply", "--server-side", "-n", ns, "-f", "-", check=False, stdin=json.dumps(obj))
    assert r.returncode != 0 and "is invalid" in r.stderr and field in r.stderr, r.stderr
    assert cluster.kubectl("get", "gateway", "-n", ns, "bad", check=False).returncode != 0


def test_gateway_unknown_fields_strict_or_pruned(cluster: Cluster) -> None:
    from kubernetes import client

    ns = cluster.new_namespace("gwunk")
    obj = gateway("extra")
    obj["spec"]["listeners"][0]["bogus"] = 1
    r = cluster.kubectl("create", "-n", ns, "-f", "-", check=False, stdin=json.dumps(obj))
    assert r.returncode != 0 and 'unknown field "spec.listeners[0].bogus"' in r.stderr
    custom = client.CustomObjectsApi(cluster.api_client())  # the client sends no fieldValidation: pruned
    created = custom.create_namespaced_custom_object(GROUP, VERSION, ns, "gateways", obj)
    assert "bogus" not in created["spec"]["listeners"][0]


def test_deleting_a_gateway_deletes_what_it_owns(cluster: Cluster) -> None:
    from kubernetes import client

    ns = cluster.new_namespace("gwown")
    api = cluster.api_client()
    gw = client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, ns, "gateways",
                                                                       gateway("owner"))
    ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Gateway", "name": "owner",
           "uid": gw["metadata"]["uid"], "controller": True}
    core = client.CoreV1Api(api)
    core.create_namespaced_service(ns, {"metadata": {"name": "owner", "ownerReferences": [ref]},
                                        "spec": {"ports": [{"name": "mesh", "port": 15008}]}})
    client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, ns, "gateways", "owner")

    def gone() -> bool:
        return not core.list_namespaced_service(ns).items

    from tests.apiserver.conftest import wait_until

    wait_until(gone, 10, "the owned Service to be collected")


def test_status_writes_keep_the_appliers_managed_fields(cluster: Cluster) -> None:
    """A controller's /status update must not drop kmeshctl's Apply entry (nor the reverse)."""
    ns = cluster.new_namespace("gwmf")
    obj = gateway("mf")
    obj["metadata"]["namespace"] = ns
    cluster.kubectl("apply", "--server-side", "--field-manager", "kmeshctl", "-f", "-", stdin=json.dumps(obj))
    status = {"status": {"addresses": [{"type": "IPAddress", "value": "10.96.0.9"}]}}
    cluster.kubectl("patch", "gateway", "mf", "-n", ns, "--subresource", "status", "--type", "merge",
                    "--field-manager", "pilot", "-p", json.dumps(status))
    cluster.kubectl("label", "gateway", "mf", "-n", ns, "team=a")

    got = json.loads(cluster.kubectl("get", "gateway", "mf", "-n", ns, "-o", "json",
                                     "--show-managed-fields").stdout)
    managers = {(m["manager"], m["operation"], m.get("subresource", ""))
                for m in got["metadata"]["managedFields"]}
    assert ("kmeshctl", "Apply", "") in managers and ("pilot", "Update", "status") in managers
    assert any(m[0] == "kubectl-label" for m in managers)
