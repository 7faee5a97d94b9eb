"""Watch: resume from a resourceVersion, selector transitions, the legacy /watch/ path, 410 Gone."""

from __future__ import annotations

import json
import threading
import urllib.request
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from .conftest import Cluster


def _collect(stream: Any, n: int) -> list[tuple[str, str, str]]:
    """(type, name, data['k']) of the first n events."""
    out = []
    for ev in stream:
        obj = ev["object"]
        out.append((ev["type"], obj.metadata.name, (obj.data or {}).get("k", "")))
        if len(out) == n:
            break
    return out


def test_watch_resumes_after_resource_version(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_config_map(ns, {"metadata": {"name": "before"}, "data": {"k": "0"}})
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    core.create_namespaced_config_map(ns, {"metadata": {"name": "a"}, "data": {"k": "1"}})
    core.patch_namespaced_config_map("a", ns, {"data": {"k": "2"}})
    core.delete_namespaced_config_map("a", ns)

    w = watch.Watch()
    events = _collect(
        w.stream(core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=5), 3
    )
    w.stop()
    assert events == [("ADDED", "a", "1"), ("MODIFIED", "a", "2"), ("DELETED", "a", "2")]


def test_watch_without_resource_version_lists_then_streams(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_config_map(ns, {"metadata": {"name": "old"}, "data": {"k": "x"}})
    w = watch.Watch()
    stream = w.stream(core.list_namespaced_config_map, ns, timeout_seconds=5)

    def later() -> None:
        client.CoreV1Api(cluster.api_client()).create_namespaced_config_map(
            ns, {"metadata": {"name": "new"}, "data": {"k": "y"}}
        )

    timer = threading.Timer(0.3, later)
    timer.start()
    events = _collect(stream, 2)
    w.stop()
    timer.join()
    assert events == [("ADDED", "old", "x"), ("ADDED", "new", "y")]


def test_watch_label_selector_transitions(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    core.create_namespaced_config_map(
        ns, {"metadata": {"name": "c", "labels": {"sel": "no"}}, "data": {"k": "1"}}
    )
    core.patch_namespaced_config_map("c", ns, {"metadata": {"labels": {"sel": "yes"}}, "data": {"k": "2"}})
    core.patch_namespaced_config_map("c", ns, {"data": {"k": "3"}})
    core.patch_namespaced_config_map("c", ns, {"metadata": {"labels": {"sel": "no"}}, "data": {"k": "4"}})
    w = watch.Watch()
    events = _collect(
        w.stream(
            core.list_namespaced_config_map,
            ns,
            label_selector="sel=yes",
            resource_version=rv,
            timeout_seconds=5,
        ),
        3,
    )
    w.stop()
    # Entering the selection is ADDED, leaving it is DELETED (as the real watch cache reports).
    assert events == [("ADDED", "c", "2"), ("MODIFIED", "c", "3"), ("DELETED", "c", "4")]


def test_legacy_watch_path_and_single_object(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    rv = core.create_namespaced_config_map(ns, {"metadata": {"name": "one"}}).metadata.resource_version
    core.create_namespaced_config_map(ns, {"metadata": {"name": "two"}})
    core.patch_namespaced_config_map("one", ns, {"data": {"k": "v"}})
    url = f"{cluster.server.url}/api/v1/watch/namespaces/{ns}/configmaps/one"
    url += f"?resourceVersion={rv}&timeoutSeconds=1"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {cluster.server.token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        lines = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [("MODIFIED", "one")]
    assert lines[0]["object"]["kind"] == "ConfigMap" and lines[0]["object"]["apiVersion"] == "v1"


def test_too_old_resource_version_is_410(small_history_cluster: Cluster) -> None:
    cluster = small_history_cluster
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    rv = core.create_namespaced_config_map(
        ns, {"metadata": {"name": "cm"}, "data": {"k": "0"}}
    ).metadata.resource_version
    for i in range(30):
        core.patch_namespaced_config_map("cm", ns, {"data": {"k": str(i + 1)}})
    w = watch.Watch()
    with pytest.raises(ApiException) as e:
        for _ in w.stream(core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=5):
            pass
    assert e.value.status == 410
    # A recent resourceVersion still works.
    recent = core.list_namespaced_config_map(ns).metadata.resource_version
    core.patch_namespaced_config_map("cm", ns, {"data": {"k": "last"}})
    events = _collect(
        w.stream(core.list_namespaced_config_map, ns, resource_version=recent, timeout_seconds=5), 1
    )
    w.stop()
    assert events == [("MODIFIED", "cm", "last")]


def test_watch_ends_at_timeout(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    w = watch.Watch()
    events = list(
        w.stream(
            core.list_namespaced_config_map,
            ns,
            timeout_seconds=1,
            resource_version=core.list_namespaced_config_map(ns).metadata.resource_version,
        )
    )
    assert events == []


def test_bookmarks_when_allowed(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    # Something changes elsewhere, so the store moves past rv without an event for this watch.
    client.CoreV1Api(cluster.api_client()).create_namespaced_config_map(
        "default", {"metadata": {"generateName": "x-"}}
    )
    url = f"{cluster.server.url}/api/v1/namespaces/{ns}/configmaps?watch=1&allowWatchBookmarks=true"
    url += f"&resourceVersion={rv}&timeoutSeconds=2"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {cluster.server.token}"})
    old = cluster.server.api.bookmark_interval
    cluster.server.api.bookmark_interval = 0.5
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            lines = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    finally:
        cluster.server.api.bookmark_interval = old
    assert lines and all(e["type"] == "BOOKMARK" for e in lines)
    assert int(lines[-1]["object"]["metadata"]["resourceVersion"]) > int(rv)
