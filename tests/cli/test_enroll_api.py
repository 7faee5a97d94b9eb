"""`kmeshctl enable|disable ns|pod` against the sandbox API server; labels are read back with
kubectl and the official client."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import ApiServer, run_cli, snapshot

LABEL = "istio.io/dataplane-mode"


@pytest.fixture(scope="module")
def cluster(apiserver: ApiServer) -> ApiServer:
    """Namespaces: plain, sidecar (istio-injection=enabled, one pod with istio-proxy), enrolled-ns
    (already enrolled, lowercase value, as `kubectl label` users write it), pods in each."""
    from kubernetes import client

    core = client.CoreV1Api(apiserver.client())
    for name, labels in [("plain", {}), ("sidecar", {"istio-injection": "enabled"}), ("enrolled-ns", {}),
                         ("untouched", {})]:
        core.create_namespace({"metadata": {"name": name, "labels": labels}})
    apiserver.kubectl("label", "namespace", "enrolled-ns", f"{LABEL}=kmesh")

    def pod(ns: str, name: str, sidecar: bool = False) -> None:
        containers = [{"name": "app", "image": "fortio/fortio"}]
        if sidecar:
            containers.append({"name": "istio-proxy", "image": "istio/proxyv2"})
        core.create_namespaced_pod(ns, {"metadata": {"name": name, "labels": {"app": name}},
                                        "spec": {"containers": containers}})

    pod("plain", "web")
    pod("plain", "db")
    pod("sidecar", "legacy", sidecar=True)
    pod("sidecar", "clean")
    pod("enrolled-ns", "api")
    pod("enrolled-ns", "batch")
    return apiserver


def _labels(srv: ApiServer, *args: str) -> dict:
    return json.loads(srv.kubectl("get", *args, "-o", "json").stdout)["metadata"].get("labels") or {}


def test_enable_and_disable_namespaces(cluster: ApiServer) -> None:
    srv = cluster
    r = run_cli("enable", "ns", "plain", "sidecar", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["namespace/plain enabled", "namespace/sidecar enabled"]
    assert _labels(srv, "namespace", "plain")[LABEL] == "Kmesh"
    assert _labels(srv, "namespace", "sidecar")[LABEL] == "Kmesh"
    warnings = [line for line in r.err_lines if line.startswith("warning: ")]
    assert len(warnings) == 2 and len(r.err_lines) == 2
    assert "namespace sidecar has istio-injection=enabled" in warnings[0]
    assert "1 pod(s) carry an istio-proxy sidecar" in warnings[1] and "legacy" in warnings[1]

    before = snapshot(srv)
    r = run_cli("enable", "ns", "plain", "enrolled-ns", "-o", "json", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert [x["result"] for x in json.loads(r.out)] == ["already enabled", "already enabled"]
    assert snapshot(srv) == before  # idempotent: nothing written

    r = run_cli("disable", "ns", "plain", "sidecar", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["namespace/plain disabled", "namespace/sidecar disabled"]
    assert LABEL not in _labels(srv, "namespace", "plain")
    sidecar_labels = _labels(srv, "namespace", "sidecar")
    assert LABEL not in sidecar_labels and sidecar_labels["istio-injection"] == "enabled"
    r = run_cli("disable", "ns", "plain", kubeconfig=srv.kubeconfig)
    assert r.code == 0 and r.out.strip() == "namespace/plain already disabled"


def test_missing_namespace_changes_nothing(cluster: ApiServer) -> None:
    srv = cluster
    before = snapshot(srv)
    for verb in ("enable", "disable"):
        r = run_cli(verb, "ns", "untouched", "no-such-ns", "plain", kubeconfig=srv.kubeconfig)
        assert r.code == 1, r
        assert r.err_lines == ["error: namespace not found: no-such-ns; nothing was changed"]
        assert r.out == ""
    assert snapshot(srv) == before
    assert LABEL not in _labels(srv, "namespace", "untouched")


def test_ambient_label_is_not_removed_by_disable(cluster: ApiServer) -> None:
    srv = cluster
    # (`kubectl create namespace` sends protobuf, which the sandbox API server does not take)
    from kubernetes import client

    client.CoreV1Api(srv.client()).create_namespace({"metadata": {"name": "ambient-ns"}})
    srv.kubectl("label", "namespace", "ambient-ns", f"{LABEL}=ambient")
    r = run_cli("disable", "ns", "ambient-ns", kubeconfig=srv.kubeconfig)
    assert r.code == 0 and "already disabled" in r.out
    assert _labels(srv, "namespace", "ambient-ns")[LABEL] == "ambient"
    r = run_cli("enable", "ns", "ambient-ns", kubeconfig=srv.kubeconfig)
    assert r.code == 0 and r.out.strip() == f"namespace/ambient-ns enabled (was {LABEL}=ambient)"
    assert _labels(srv, "namespace", "ambient-ns")[LABEL] == "Kmesh"


def test_pods_in_a_plain_namespace(cluster: ApiServer) -> None:
    srv = cluster
    r = run_cli("enable", "pod", "web", "db", "-n", "plain", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert r.out.splitlines() == ["pod/web -n plain enabled", "pod/db -n plain enabled"]
    assert _labels(srv, "pod", "web", "-n", "plain")[LABEL] == "Kmesh"
    r = run_cli("enable", "pod", "web", "-n", "plain", kubeconfig=srv.kubeconfig)
    assert r.out.strip() == "pod/web -n plain already enabled"
    r = run_cli("disable", "pod", "web", "-n", "plain", kubeconfig=srv.kubeconfig)
    assert r.code == 0 and r.out.strip() == "pod/web -n plain disabled"
    assert LABEL not in _labels(srv, "pod", "web", "-n", "plain")
    assert _labels(srv, "pod", "db", "-n", "plain")[LABEL] == "Kmesh"
    r = run_cli("disable", "pod", "web", "-n", "plain", kubeconfig=srv.kubeconfig)
    assert r.out.strip() == "pod/web -n plain already disabled"


def test_pods_in_an_enrolled_namespace_opt_out_with_none(cluster: ApiServer) -> None:
    srv = cluster
    r = run_cli("disable", "pod", "batch", "-n", "enrolled-ns", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    assert "disabled" in r.out and "namespace enrolled-ns is enrolled" in r.out
    assert _labels(srv, "pod", "batch", "-n", "enrolled-ns")[LABEL] == "none"
    r = run_cli("disable", "pod", "batch", "-n", "enrolled-ns", kubeconfig=srv.kubeconfig)
    assert r.out.strip() == "pod/batch -n enrolled-ns already disabled"
    r = run_cli("enable", "pod", "batch", "api", "-n", "enrolled-ns", "-o", "yaml", kubeconfig=srv.kubeconfig)
    assert r.code == 0, r.err
    import yaml

    results = {x["name"]: x["result"] for x in yaml.safe_load(r.out)}
    assert results == {"batch": f"enabled (was {LABEL}=none)",
                       "api": "already enabled (namespace enrolled-ns is enrolled)"}
    assert _labels(srv, "pod", "batch", "-n", "enrolled-ns")[LABEL] == "Kmesh"
    assert LABEL not in _labels(srv, "pod", "api", "-n", "enrolled-ns")


def test_pod_warnings_and_missing_pod(cluster: ApiServer) -> None:
    srv = cluster
    r = run_cli("enable", "pod", "legacy", "-n", "sidecar", kubeconfig=srv.kubeconfig)
    assert r.code == 0
    assert len(r.err_lines) == 1 and "pod sidecar/legacy carries an istio-proxy sidecar" in r.err_lines[0]
    before = snapshot(srv)
    r = run_cli("enable", "pod", "clean", "ghost", "-n", "sidecar", kubeconfig=srv.kubeconfig)
    assert r.code == 1 and r.out == ""
    assert r.err_lines == ["error: pod in namespace sidecar not found: ghost; nothing was changed"]
    r = run_cli("disable", "pod", "x", "-n", "no-such-ns", kubeconfig=srv.kubeconfig)
    assert r.code == 1 and r.err_lines == ["error: namespace not found: no-such-ns; nothing was changed"]
    assert snapshot(srv) == before
