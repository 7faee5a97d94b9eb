"""Graceful pod deletion (opt-in): a pod bound to a node stays until its kubelet deletes it."""

from __future__ import annotations

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from .conftest import Cluster


def _pod(name: str, node: str | None) -> dict:
    spec: dict = {"containers": [{"name": "c", "image": "i"}], "terminationGracePeriodSeconds": 5}
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": name}, "spec": spec}


def test_bound_pod_waits_for_the_kubelet(graceful_cluster: Cluster) -> None:
    ns = graceful_cluster.new_namespace()
    core = client.CoreV1Api(graceful_cluster.api_client())
    core.create_namespaced_pod(ns, _pod("bound", "node-1"))
    core.delete_namespaced_pod("bound", ns)
    marked = core.read_namespaced_pod("bound", ns)
    assert marked.metadata.deletion_timestamp is not None
    assert marked.metadata.deletion_grace_period_seconds == 5
    # The kubelet, having stopped the containers, deletes with grace 0.
    core.delete_namespaced_pod("bound", ns, grace_period_seconds=0)
    with pytest.raises(ApiException) as e:
        core.read_namespaced_pod("bound", ns)
    assert e.value.status == 404


def test_unbound_pod_and_zero_grace_go_at_once(graceful_cluster: Cluster) -> None:
    ns = graceful_cluster.new_namespace()
    core = client.CoreV1Api(graceful_cluster.api_client())
    core.create_namespaced_pod(ns, _pod("unbound", None))
    core.create_namespaced_pod(ns, _pod("forced", "node-1"))
    core.delete_namespaced_pod("unbound", ns)
    core.delete_namespaced_pod("forced", ns, grace_period_seconds=0)
    assert core.list_namespaced_pod(ns).items == []


def test_default_server_deletes_pods_at_once(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_pod(ns, _pod("p", "node-1"))
    core.delete_namespaced_pod("p", ns)
    assert core.list_namespaced_pod(ns).items == []
