"""Offline checks of the rendered install manifests (no API server needed).

Kubernetes kinds validate against the official OpenAPI schemas (kubernetes-validate, strict:
unknown fields are errors); the Istio EnvoyFilters are not in those schemas, so their
structure is checked here against the EnvoyFilter API's enums.
"""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from kmeshctl.render import InstallValues, render

XDS = "istiod-1-22.istio-system.svc:15012"
CID = "c0123456789abcdef"


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render(InstallValues(xds_address=XDS, cluster_id=CID, image="example.com/kmesh:1"))


def _by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _ds(objects: list[dict]) -> dict:
    (ds,) = _by_kind(objects, "DaemonSet")
    return ds


def _walk(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,), k, v
            yield from _walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, path + (i,))


def test_kinds_and_order(objects: list[dict]) -> None:
    kinds = [o["kind"] for o in objects]
    assert kinds == ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet",
                     "EnvoyFilter", "EnvoyFilter", "EnvoyFilter"]
    names = {o["metadata"]["name"] for o in _by_kind(objects, "EnvoyFilter")}
    assert names == {"add-listener-filter", "skip-tunneling", "add-original-dst-cluster"}
    assert all(o["metadata"]["namespace"] == "istio-system" for o in _by_kind(objects, "EnvoyFilter"))


def test_no_envoyfilters_flag() -> None:
    objs = render(InstallValues(xds_address=XDS, cluster_id=CID, image="i:1"), envoyfilters=False)
    assert "EnvoyFilter" not in {o["kind"] for o in objs}


@pytest.mark.parametrize("version", ["1.28", "1.30", "1.32"])
def test_kubernetes_objects_validate_strictly(objects: list[dict], version: str) -> None:
    for obj in objects:
        if obj["kind"] == "EnvoyFilter":
            continue
        kubernetes_validate.validate(obj, version, strict=True)


def test_validator_catches_env_under_volumes(objects: list[dict]) -> None:
    """The seed's mistake (XDS_ADDRESS under volumes) must not pass validation: guards the test."""
    bad = copy.deepcopy(_ds(objects))
    bad["spec"]["template"]["spec"]["volumes"].append({"name": "XDS_ADDRESS", "value": XDS})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30", strict=True)


def test_every_object_is_labelled_managed_by_kmeshctl(objects: list[dict]) -> None:
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kmeshctl", obj["kind"]


def test_xds_address_and_cluster_id_exactly_once_in_container_env(objects: list[dict]) -> None:
    ds = _ds(objects)
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    env = container["env"]
    assert [e["value"] for e in env if e["name"] == "XDS_ADDRESS"] == [XDS]
    assert [e["value"] for e in env if e["name"] == "CLUSTER_ID"] == [CID]
    # nowhere else in any object (not under volumes, not a second env entry)
    for obj in objects:
        names = ("XDS_ADDRESS", "CLUSTER_ID")
        hits = [p for p, k, v in _walk(obj) if v in names or k in names]
        expected = 2 if obj is ds else 0
        assert len(hits) == expected, (obj["kind"], hits)
        for p in hits:
            assert "volumes" not in p and p[:6] == ("spec", "template", "spec", "containers", 0, "env")


def test_downward_api_env(objects: list[dict]) -> None:
    (container,) = _ds(objects)["spec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
    assert refs == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                    "INSTANCE_IP": "status.podIP", "SERVICE_ACCOUNT": "spec.serviceAccountName",
                    "NODE_NAME": "spec.nodeName"}
    assert len({e["name"] for e in container["env"]}) == len(container["env"])


def test_every_volume_mount_has_a_volume_and_every_volume_is_mounted(objects: list[dict]) -> None:
    spec = _ds(objects)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert len(volumes) == len(spec["volumes"])
    mounts = {m["name"]: m["mountPath"] for c in spec["containers"] for m in c["volumeMounts"]}
    assert set(mounts) == set(volumes)
    host = {mounts[n]: v["hostPath"]["path"] for n, v in volumes.items() if "hostPath" in v}
    assert host == {"/mnt": "/mnt", "/sys/fs/bpf": "/sys/fs/bpf", "/lib/modules": "/lib/modules",
                    "/etc/cni/net.d": "/etc/cni/net.d", "/opt/cni/bin": "/opt/cni/bin", "/host/proc": "/proc"}
    by_path = {mounts[n]: v for n, v in volumes.items()}
    assert by_path["/var/run/secrets/istio"]["configMap"]["name"] == "istio-ca-root-cert"
    (src,) = by_path["/var/run/secrets/tokens"]["projected"]["sources"]
    assert src["serviceAccountToken"] == {"audience": "istio-ca", "expirationSeconds": 43200,
                                          "path": "istio-token"}


def test_daemonset_runtime_settings(objects: list[dict]) -> None:
    ds = _ds(objects)
    assert ds["metadata"]["namespace"] == "kmesh-system" and ds["metadata"]["labels"]["app"] == "kmesh"
    tpl = ds["spec"]["template"]
    assert ds["spec"]["selector"]["matchLabels"] == {"app": "kmesh"}
    assert tpl["metadata"]["labels"]["app"] == "kmesh"
    assert tpl["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "15020",
                                              "prometheus.io/path": "/status/metric"}
    spec = tpl["spec"]
    assert spec["priorityClassName"] == "system-node-critical" and spec["serviceAccountName"] == "kmesh"
    (c,) = spec["containers"]
    assert c["command"] == ["kmesh-daemon"] and c["image"] == "example.com/kmesh:1"
    assert c["args"][:3] == ["--mode=dual-engine", "--enable-bypass=false", "--enable-bpf-log=true"]
    assert "--node-wide" in c["args"]  # attach at the node cgroup2 root mounted at KMESH_CGROUP_ROOT
    assert c["securityContext"]["privileged"] is True
    assert c["resources"]["limits"] == {"cpu": "1", "memory": "800Mi"}
    assert c["resources"]["requests"] == {"cpu": "100m", "memory": "200Mi"}


def test_rbac_is_what_the_daemon_needs(objects: list[dict]) -> None:
    (role,) = _by_kind(objects, "ClusterRole")
    perms = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
             for v in rule["verbs"]}
    for needed in [("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"), ("", "pods", "patch"),
                   ("", "namespaces", "watch"), ("", "services", "list"), ("", "events", "create"),
                   ("apps", "daemonsets", "get")]:
        assert needed in perms
    assert not any(v in ("*", "delete", "deletecollection", "escalate", "bind") for _, _, v in perms)
    assert not any("*" in (g, r) or r == "secrets" for g, r, _ in perms)
    (binding,) = _by_kind(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kmesh", "namespace": "kmesh-system"}]


APPLY_TO = {"INVALID", "LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER", "ROUTE_CONFIGURATION",
            "VIRTUAL_HOST", "HTTP_ROUTE", "CLUSTER", "EXTENSION_CONFIG", "BOOTSTRAP", "LISTENER_FILTER"}
OPERATIONS = {"INVALID", "MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST", "REPLACE"}
CONTEXTS = {"ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"}


def test_envoyfilters_structure(objects: list[dict]) -> None:
    efs = {o["metadata"]["name"]: o for o in _by_kind(objects, "EnvoyFilter")}
    for ef in efs.values():
        assert ef["apiVersion"] == "networking.istio.io/v1alpha3"
        assert set(ef) == {"apiVersion", "kind", "metadata", "spec"}
        assert set(ef["spec"]) <= {"workloadSelector", "configPatches", "priority", "targetRefs"}
        for cp in ef["spec"]["configPatches"]:
            assert set(cp) == {"applyTo", "match", "patch"}
            assert cp["applyTo"] in APPLY_TO and cp["match"]["context"] in CONTEXTS
            assert cp["patch"]["operation"] in OPERATIONS and isinstance(cp["patch"]["value"], dict)
    (listener,) = efs["add-listener-filter"]["spec"]["configPatches"]
    value = listener["patch"]["value"]
    assert listener["applyTo"] == "LISTENER" and value["name"] == "kmesh-listener"
    ports = [value["address"]["socket_address"]] + [a["address"]["socket_address"]
                                                    for a in value["additional_addresses"]]
    assert {(p["address"], p["port_value"]) for p in ports} == {("0.0.0.0", 15019), ("::", 15019)}
    assert [f["name"] for f in value["listener_filters"]] == ["envoy.listener.kmesh_tlv",
                                                              "envoy.filters.listener.http_inspector"]
    (cluster,) = efs["add-original-dst-cluster"]["spec"]["configPatches"]
    assert cluster["applyTo"] == "CLUSTER"
    assert cluster["patch"]["value"]["name"] == "kmesh_original_dst_cluster"
    assert cluster["patch"]["value"]["type"] == "ORIGINAL_DST"
    assert cluster["patch"]["value"]["lb_policy"] == "CLUSTER_PROVIDED"
    (skip,) = efs["skip-tunneling"]["spec"]["configPatches"]
    tcp = skip["patch"]["value"]["typed_config"]
    assert skip["applyTo"] == "NETWORK_FILTER" and "tunneling_config" not in tcp
    assert tcp["cluster"] == "kmesh_original_dst_cluster"


def test_values_cannot_change_the_yaml_structure() -> None:
    tricky = 'c-1: {x: y} # "\n- z'
    objs = render(InstallValues(xds_address=XDS, cluster_id=tricky, image="i:1", namespace="other-ns"))
    (container,) = _ds(objs)["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e.get("value") for e in container["env"]}["CLUSTER_ID"] == tricky
    assert all(o["metadata"].get("namespace") in (None, "other-ns", "istio-system") for o in objs)
    assert objs[0]["metadata"]["name"] == "other-ns"
    (binding,) = _by_kind(objs, "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "other-ns"
