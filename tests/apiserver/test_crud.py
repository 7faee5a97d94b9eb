"""CRUD, selectors, patches, dry run, errors and ClusterIP allocation through the official client."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from .conftest import Cluster, wait_until


def _body(exc: ApiException) -> dict[str, Any]:
    return json.loads(exc.body)


def _deployment(name: str, labels: dict[str, str] | None = None, image: str = "nginx:1.25") -> dict[str, Any]:
    labels = labels or {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": image,
                            "env": [{"name": "A", "value": "1"}],
                            "ports": [{"containerPort": 8080, "name": "http"}],
                        }
                    ]
                },
            },
        },
    }


def test_configmap_crud_and_resource_versions(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    created = core.create_namespaced_config_map(ns, {"metadata": {"name": "cm"}, "data": {"k": "v"}})
    assert created.metadata.uid and created.metadata.creation_timestamp
    rv1 = int(created.metadata.resource_version)
    got = core.read_namespaced_config_map("cm", ns)
    assert got.data == {"k": "v"} and got.metadata.uid == created.metadata.uid

    got.data["k"] = "v2"
    updated = core.replace_namespaced_config_map("cm", ns, got)
    assert int(updated.metadata.resource_version) > rv1
    assert core.read_namespaced_config_map("cm", ns).data == {"k": "v2"}

    # A no-op update does not bump the resourceVersion.
    same = core.replace_namespaced_config_map("cm", ns, updated)
    assert same.metadata.resource_version == updated.metadata.resource_version

    listed = core.list_namespaced_config_map(ns)
    assert [c.metadata.name for c in listed.items] == ["cm"]
    assert int(listed.metadata.resource_version) >= int(updated.metadata.resource_version)

    core.delete_namespaced_config_map("cm", ns)
    with pytest.raises(ApiException) as e:
        core.read_namespaced_config_map("cm", ns)
    assert e.value.status == 404
    body = _body(e.value)
    assert body["reason"] == "NotFound" and body["message"] == 'configmaps "cm" not found'
    assert body["details"] == {"name": "cm", "kind": "configmaps"}


def test_generate_name_and_pagination(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    names = {
        core.create_namespaced_secret(ns, {"metadata": {"generateName": "s-"}}).metadata.name
        for _ in range(5)
    }
    assert len(names) == 5 and all(n.startswith("s-") and len(n) == 7 for n in names)
    page = core.list_namespaced_secret(ns, limit=2)
    seen = [s.metadata.name for s in page.items]
    while page.metadata._continue:
        page = core.list_namespaced_secret(ns, limit=2, _continue=page.metadata._continue)
        seen += [s.metadata.name for s in page.items]
    assert sorted(seen) == sorted(names)


def test_deployment_generation_status_and_scale(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    apps = client.AppsV1Api(cluster.api_client())
    d = apps.create_namespaced_deployment(ns, _deployment("web"))
    assert d.metadata.generation == 1 and d.spec.replicas == 1
    assert d.spec.template.spec.containers[0].image_pull_policy == "IfNotPresent"

    # Status is only written through /status and does not bump the generation.
    apps.patch_namespaced_deployment_status("web", ns, {"status": {"replicas": 1, "readyReplicas": 1}})
    d = apps.read_namespaced_deployment("web", ns)
    assert d.status.ready_replicas == 1 and d.metadata.generation == 1
    d.status.ready_replicas = 0
    d.spec.template.spec.containers[0].image = "nginx:1.26"
    d = apps.replace_namespaced_deployment("web", ns, d)
    assert d.metadata.generation == 2 and d.status.ready_replicas == 1

    scale = apps.read_namespaced_deployment_scale("web", ns)
    assert scale.spec.replicas == 1 and scale.status.selector == "app=web"
    apps.patch_namespaced_deployment_scale("web", ns, {"spec": {"replicas": 3}})
    assert apps.read_namespaced_deployment("web", ns).spec.replicas == 3


def test_daemonset_status_defaults_parse_in_client(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    apps = client.AppsV1Api(cluster.api_client())
    ds = _deployment("agent")
    ds["kind"] = "DaemonSet"
    created = apps.create_namespaced_daemon_set(ns, ds)
    assert created.status.desired_number_scheduled == 0
    assert created.spec.update_strategy.type == "RollingUpdate"
    assert [
        d.metadata.name for d in apps.list_daemon_set_for_all_namespaces().items if d.metadata.namespace == ns
    ] == ["agent"]


def test_label_selectors(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    for name, labels in [
        ("a", {"app": "x", "tier": "web"}),
        ("b", {"app": "y", "tier": "db"}),
        ("c", {"app": "z"}),
    ]:
        core.create_namespaced_config_map(ns, {"metadata": {"name": name, "labels": labels}})

    def sel(s: str) -> list[str]:
        return [c.metadata.name for c in core.list_namespaced_config_map(ns, label_selector=s).items]

    assert sel("app=x") == ["a"]
    assert sel("app==y") == ["b"]
    assert sel("app!=x") == ["b", "c"]
    assert sel("app in (x, z)") == ["a", "c"]
    assert sel("app notin (x,z)") == ["b"]
    assert sel("tier") == ["a", "b"]
    assert sel("!tier") == ["c"]
    assert sel("tier,app!=y") == ["a"]
    with pytest.raises(ApiException) as e:
        sel("app in (x")
    assert e.value.status == 400


def test_field_selectors(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    for name, node in [("p1", "node-a"), ("p2", "node-b")]:
        core.create_namespaced_pod(
            ns,
            {
                "metadata": {"name": name},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
            },
        )
    core.patch_namespaced_pod_status("p2", ns, {"status": {"phase": "Running"}})

    def sel(s: str) -> list[str]:
        return [p.metadata.name for p in core.list_namespaced_pod(ns, field_selector=s).items]

    assert sel("spec.nodeName=node-a") == ["p1"]
    assert sel("status.phase=Running") == ["p2"]
    assert sel("status.phase!=Running") == ["p1"]
    assert sel("metadata.name=p2,spec.nodeName=node-b") == ["p2"]
    all_ns = core.list_pod_for_all_namespaces(field_selector=f"metadata.namespace={ns}").items
    assert sorted(p.metadata.name for p in all_ns) == ["p1", "p2"]


def test_patch_types(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    api = cluster.api_client()
    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment(ns, _deployment("web"))

    # Strategic merge: containers and env merge by name.
    smp = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "main", "env": [{"name": "B", "value": "2"}]},
                        {"name": "sidecar", "image": "envoy:1"},
                    ]
                }
            }
        }
    }
    d = apps.patch_namespaced_deployment("web", ns, smp)
    containers = {c.name: c for c in d.spec.template.spec.containers}
    assert set(containers) == {"main", "sidecar"}
    assert [(e.name, e.value) for e in containers["main"].env] == [("A", "1"), ("B", "2")]
    assert containers["main"].image == "nginx:1.25"

    # $patch: delete removes one list item by key.
    d = apps.patch_namespaced_deployment(
        "web", ns, {"spec": {"template": {"spec": {"containers": [{"name": "sidecar", "$patch": "delete"}]}}}}
    )
    assert [c.name for c in d.spec.template.spec.containers] == ["main"]

    # JSON merge patch replaces lists and deletes keys with null.
    apps.patch_namespaced_deployment(
        "web", ns, {"metadata": {"labels": {"extra": "1"}}}, _content_type="application/merge-patch+json"
    )
    d = apps.read_namespaced_deployment("web", ns)
    assert d.metadata.labels == {"app": "web", "extra": "1"}

    # JSON patch.
    apps.patch_namespaced_deployment(
        "web",
        ns,
        [
            {"op": "replace", "path": "/spec/replicas", "value": 2},
            {"op": "remove", "path": "/metadata/labels/extra"},
        ],
        _content_type="application/json-patch+json",
    )
    d = apps.read_namespaced_deployment("web", ns)
    assert d.spec.replicas == 2 and d.metadata.labels == {"app": "web"}


def test_conflicts_and_already_exists(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    cm = core.create_namespaced_config_map(ns, {"metadata": {"name": "cm"}, "data": {"k": "1"}})
    stale = cm.metadata.resource_version
    cm.data["k"] = "2"
    core.replace_namespaced_config_map("cm", ns, cm)
    cm.metadata.resource_version = stale
    cm.data["k"] = "3"
    with pytest.raises(ApiException) as e:
        core.replace_namespaced_config_map("cm", ns, cm)
    assert e.value.status == 409 and _body(e.value)["reason"] == "Conflict"
    assert "the object has been modified" in _body(e.value)["message"]
    assert core.read_namespaced_config_map("cm", ns).data == {"k": "2"}

    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map(ns, {"metadata": {"name": "cm"}})
    assert e.value.status == 409
    assert _body(e.value)["reason"] == "AlreadyExists"
    assert _body(e.value)["message"] == 'configmaps "cm" already exists'


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"metadata": {}, "spec": {"containers": [{"name": "c", "image": "i"}]}}, "metadata.name"),
        (
            {"metadata": {"name": "Bad_Name"}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
            "metadata.name",
        ),
        ({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}, "spec.containers[0].image"),
        (
            {
                "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 70000}]}]},
            },
            "spec.containers[0].ports[0].containerPort",
        ),
        (
            {
                "metadata": {"name": "p"},
                "spec": {
                    "containers": [
                        {"name": "c", "image": "i", "volumeMounts": [{"name": "v", "mountPath": "/x"}]}
                    ]
                },
            },
            "spec.containers[0].volumeMounts[0].name",
        ),
    ],
)
def test_invalid_pods_are_rejected_with_422(cluster: Cluster, obj: dict[str, Any], field: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod("default", obj)
    body = _body(e.value)
    assert e.value.status == 422 and body["reason"] == "Invalid"
    assert field in [c["field"] for c in body["details"]["causes"]]
    assert body["message"].startswith("Pod ") and "is invalid" in body["message"]


def test_invalid_service_and_deployment(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    api = cluster.api_client()
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(api).create_namespaced_service(
            ns, {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 0}]}}
        )
    assert e.value.status == 422
    message = _body(e.value)["message"]
    assert message.startswith('Service "s" is invalid: ')
    assert "spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive" in message
    dep = _deployment("nosel")
    dep["spec"]["selector"] = {}
    with pytest.raises(ApiException) as e:
        client.AppsV1Api(api).create_namespaced_deployment(ns, dep)
    assert e.value.status == 422
    assert "spec.selector: Invalid value" in _body(e.value)["message"]
    assert _body(e.value)["details"]["group"] == "apps"


def test_create_in_missing_namespace_is_404(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api_client())
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map("does-not-exist", {"metadata": {"name": "x"}})
    assert e.value.status == 404
    assert _body(e.value)["message"] == 'namespaces "does-not-exist" not found'


def test_dry_run_stores_nothing(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    rv_before = core.list_namespaced_config_map(ns).metadata.resource_version
    out = core.create_namespaced_config_map(
        ns, {"metadata": {"name": "dry"}, "data": {"a": "b"}}, dry_run="All"
    )
    assert out.metadata.name == "dry" and out.metadata.uid
    with pytest.raises(ApiException):
        core.read_namespaced_config_map("dry", ns)
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod(
            ns, {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}, dry_run="All"
        )
    assert e.value.status == 422

    core.create_namespaced_config_map(ns, {"metadata": {"name": "real"}, "data": {"a": "b"}})
    rv_real = core.read_namespaced_config_map("real", ns).metadata.resource_version
    core.patch_namespaced_config_map("real", ns, {"data": {"a": "changed"}}, dry_run="All")
    core.delete_namespaced_config_map("real", ns, dry_run="All")
    got = core.read_namespaced_config_map("real", ns)
    assert got.data == {"a": "b"} and got.metadata.resource_version == rv_real
    assert int(rv_before) < int(rv_real)

    svc = core.create_namespaced_service(
        ns, {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}, dry_run="All"
    )
    real = core.create_namespaced_service(ns, {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})
    assert real.spec.cluster_ip == svc.spec.cluster_ip  # the dry run did not take the address


def test_cluster_ip_allocation(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())

    def svc(name: str, **spec: Any) -> dict[str, Any]:
        return {
            "metadata": {"name": name},
            "spec": {"ports": [{"port": 80}], "selector": {"app": name}, **spec},
        }

    a = core.create_namespaced_service(ns, svc("a"))
    b = core.create_namespaced_service(ns, svc("b"))
    ips = {a.spec.cluster_ip, b.spec.cluster_ip}
    assert len(ips) == 2 and all(ip.startswith("10.96.") for ip in ips)
    assert a.spec.cluster_ips == [a.spec.cluster_ip] and a.spec.ports[0].target_port == 80
    assert (
        client.CoreV1Api(cluster.api_client())
        .read_namespaced_service("kubernetes", "default")
        .spec.cluster_ip
        == "10.96.0.1"
    )

    # Stable across updates that omit it.
    a.spec.cluster_ip = None
    a.spec.cluster_ips = None
    a.metadata.labels = {"x": "y"}
    assert core.replace_namespaced_service("a", ns, a).spec.cluster_ip in ips

    # Explicit address: taken one -> 422; out of the CIDR -> 422; free one in range -> granted.
    with pytest.raises(ApiException) as e:
        core.create_namespaced_service(ns, svc("c", clusterIP=b.spec.cluster_ip))
    assert e.value.status == 422 and "provided IP is already allocated" in _body(e.value)["message"]
    with pytest.raises(ApiException) as e:
        core.create_namespaced_service(ns, svc("c", clusterIP="192.168.1.1"))
    assert e.value.status == 422
    c = core.create_namespaced_service(ns, svc("c", clusterIP="10.96.200.7"))
    assert c.spec.cluster_ip == "10.96.200.7"
    headless = core.create_namespaced_service(ns, svc("h", clusterIP="None"))
    assert headless.spec.cluster_ip == "None"

    # Released on delete: the address can be requested again.
    core.delete_namespaced_service("b", ns)
    again = core.create_namespaced_service(ns, svc("b2", clusterIP=b.spec.cluster_ip))
    assert again.spec.cluster_ip == b.spec.cluster_ip


def test_namespace_deletion_cascades(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    api = cluster.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cm"}})
    svc = core.create_namespaced_service(ns, {"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})
    apps.create_namespaced_deployment(ns, _deployment("web"))
    core.delete_namespace(ns)
    assert core.read_namespace(ns).status.phase == "Terminating"
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map(ns, {"metadata": {"name": "late"}})
    assert e.value.status == 403 and "because it is being terminated" in _body(e.value)["message"]

    def gone() -> bool:
        try:
            core.read_namespace(ns)
        except ApiException as e:
            return e.status == 404
        return False

    wait_until(gone, what=f"namespace {ns} to go")
    assert not [c for c in core.list_config_map_for_all_namespaces().items if c.metadata.namespace == ns]
    assert not [d for d in apps.list_deployment_for_all_namespaces().items if d.metadata.namespace == ns]
    # The Service's ClusterIP went back to the pool.
    other = cluster.new_namespace()
    reused = core.create_namespaced_service(
        other,
        {"metadata": {"name": "s"}, "spec": {"clusterIP": svc.spec.cluster_ip, "ports": [{"port": 80}]}},
    )
    assert reused.spec.cluster_ip == svc.spec.cluster_ip


def test_owner_references_garbage_collected(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    api = cluster.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    d = apps.create_namespaced_deployment(ns, _deployment("web"))
    owner = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "web",
            "uid": d.metadata.uid,
            "controller": True,
        }
    ]
    for name in ("p1", "p2"):
        core.create_namespaced_pod(
            ns,
            {
                "metadata": {"name": name, "ownerReferences": owner},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
        )
    core.create_namespaced_pod(
        ns, {"metadata": {"name": "free"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
    )
    apps.delete_namespaced_deployment("web", ns, propagation_policy="Background")
    assert [p.metadata.name for p in core.list_namespaced_pod(ns).items] == ["free"]


def test_finalizers_delay_deletion(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_config_map(ns, {"metadata": {"name": "f", "finalizers": ["example.com/hold"]}})
    core.delete_namespaced_config_map("f", ns)
    held = core.read_namespaced_config_map("f", ns)
    assert held.metadata.deletion_timestamp is not None
    core.patch_namespaced_config_map("f", ns, {"metadata": {"finalizers": None}})
    with pytest.raises(ApiException) as e:
        core.read_namespaced_config_map("f", ns)
    assert e.value.status == 404


def test_bad_token_is_401(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api_client(token="not-a-valid-token"))
    with pytest.raises(ApiException) as e:
        core.list_namespace()
    assert e.value.status == 401
    assert client.CoreV1Api(cluster.api_client()).list_namespace().items


def test_cluster_scoped_and_istio_kinds(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    api = cluster.api_client()
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_cluster_role(
        {
            "metadata": {"name": f"{ns}-role"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
        }
    )
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": f"{ns}-binding"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"{ns}-role"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}],
        }
    )
    assert rbac.read_cluster_role(f"{ns}-role").rules[0].verbs == ["get"]
    with pytest.raises(ApiException) as e:
        rbac.create_cluster_role(
            {"metadata": {"name": f"{ns}-bad"}, "rules": [{"apiGroups": [""], "verbs": []}]}
        )
    assert e.value.status == 422

    custom = client.CustomObjectsApi(api)
    ef = {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": "ef"},
        "spec": {"configPatches": []},
    }
    custom.create_namespaced_custom_object("networking.istio.io", "v1alpha3", ns, "envoyfilters", ef)
    # The same object is served in both versions.
    got = custom.get_namespaced_custom_object("networking.istio.io", "v1beta1", ns, "envoyfilters", "ef")
    assert got["apiVersion"] == "networking.istio.io/v1beta1" and got["spec"] == {"configPatches": []}
    gw = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "gw"},
        "spec": {
            "gatewayClassName": "istio",
            "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}],
        },
    }
    custom.create_namespaced_custom_object("gateway.networking.k8s.io", "v1", ns, "gateways", gw)
    assert [
        g["metadata"]["name"]
        for g in custom.list_namespaced_custom_object("gateway.networking.k8s.io", "v1", ns, "gateways")[
            "items"
        ]
    ] == ["gw"]


def test_delete_collection_and_update_dry_run(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    for name, tier in [("a", "web"), ("b", "web"), ("c", "db")]:
        core.create_namespaced_config_map(ns, {"metadata": {"name": name, "labels": {"tier": tier}}})
    core.delete_collection_namespaced_config_map(ns, label_selector="tier=web", dry_run="All")
    assert len(core.list_namespaced_config_map(ns).items) == 3
    core.delete_collection_namespaced_config_map(ns, label_selector="tier=web")
    assert [c.metadata.name for c in core.list_namespaced_config_map(ns).items] == ["c"]

    cm = core.read_namespaced_config_map("c", ns)
    cm.data = {"x": "y"}
    out = core.replace_namespaced_config_map("c", ns, cm, dry_run="All")
    assert out.data == {"x": "y"}
    assert core.read_namespaced_config_map("c", ns).data is None


def test_node_registration_keeps_status_and_pod_create_resets_it(cluster: Cluster) -> None:
    core = client.CoreV1Api(cluster.api_client())
    node = core.create_node(
        {
            "metadata": {"name": "node-reg", "labels": {"kubernetes.io/hostname": "node-reg"}},
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            },
        }
    )
    assert node.status.conditions[0].type == "Ready"
    ns = cluster.new_namespace()
    pod = core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "p"},
            "status": {"phase": "Running"},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
        },
    )
    assert pod.status.phase == "Pending"
    assert "node-reg" in cluster.kubectl("get", "nodes").stdout
    core.delete_node("node-reg")


def test_pod_qos_class(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())

    def qos(resources: dict[str, Any]) -> str:
        name = f"p{len(core.list_namespaced_pod(ns).items)}"
        pod = core.create_namespaced_pod(
            ns,
            {
                "metadata": {"name": name},
                "spec": {"containers": [{"name": "c", "image": "i", "resources": resources}]},
            },
        )
        return pod.status.qos_class

    assert qos({}) == "BestEffort"
    assert qos({"requests": {"cpu": "100m"}}) == "Burstable"
    assert qos({"limits": {"cpu": "1", "memory": "64Mi"}}) == "Guaranteed"
    assert (
        qos({"limits": {"cpu": "1", "memory": "64Mi"}, "requests": {"cpu": "500m", "memory": "64Mi"}})
        == "Burstable"
    )


def test_concurrent_read_modify_write_loses_no_update(cluster: Cluster) -> None:
    """8 writers x 10 increments with optimistic concurrency (retry on 409): the count is exact."""
    import threading

    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_config_map(ns, {"metadata": {"name": "counter"}, "data": {"n": "0"}})
    conflicts = []

    def writer() -> None:
        api = client.CoreV1Api(cluster.api_client())
        for _ in range(10):
            while True:
                cm = api.read_namespaced_config_map("counter", ns)
                cm.data["n"] = str(int(cm.data["n"]) + 1)
                try:
                    api.replace_namespaced_config_map("counter", ns, cm)
                    break
                except ApiException as e:
                    assert e.status == 409
                    conflicts.append(1)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    final = core.read_namespaced_config_map("counter", ns)
    assert final.data["n"] == "80" and int(final.metadata.resource_version) > 80


def test_node_port_allocation(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())

    def svc(name: str, stype: str, **port: Any) -> dict[str, Any]:
        return {"metadata": {"name": name}, "spec": {"type": stype, "ports": [{"port": 80, **port}]}}

    a = core.create_namespaced_service(ns, svc("a", "NodePort"))
    lb = core.create_namespaced_service(ns, svc("lb", "LoadBalancer"))
    pa, plb = a.spec.ports[0].node_port, lb.spec.ports[0].node_port
    assert 30000 <= pa <= 32767 and 30000 <= plb <= 32767 and pa != plb
    # Kept across an update that omits it.
    a.spec.ports[0].node_port = None
    a.metadata.labels = {"x": "1"}
    assert core.replace_namespaced_service("a", ns, a).spec.ports[0].node_port == pa
    with pytest.raises(ApiException) as e:
        core.create_namespaced_service(ns, svc("b", "NodePort", nodePort=pa))
    assert e.value.status == 422 and "provided port is already allocated" in _body(e.value)["message"]
    with pytest.raises(ApiException) as e:
        core.create_namespaced_service(ns, svc("c", "ClusterIP", nodePort=30001))
    assert e.value.status == 422 and "may not be used when `type` is 'ClusterIP'" in _body(e.value)["message"]
    core.delete_namespaced_service("a", ns)
    assert core.create_namespaced_service(ns, svc("b", "NodePort", nodePort=pa)).spec.ports[0].node_port == pa
