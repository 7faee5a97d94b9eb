"""Server-side apply: creation, ownership, conflicts, force, removal of dropped fields, idempotence."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from .conftest import Cluster

APPLY = "application/apply-patch+yaml"


def _cm(ns: str, data: dict[str, str], labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "cfg", "namespace": ns}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _apply(
    core: client.CoreV1Api,
    ns: str,
    body: dict[str, Any],
    manager: str,
    force: bool = False,
    dry_run: str | None = None,
) -> Any:
    return core.patch_namespaced_config_map(
        "cfg", ns, body, field_manager=manager, force=force, dry_run=dry_run, _content_type=APPLY
    )


def _managers(obj: Any) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for e in obj.metadata.managed_fields or []:
        data = (e.fields_v1 or {}).get("f:data", {})
        out[f"{e.manager}/{e.operation}"] = {k[2:] for k in data}
    return out


def test_apply_creates_and_records_ownership(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    created = _apply(core, ns, _cm(ns, {"a": "1", "b": "2"}), "alice")
    assert created.data == {"a": "1", "b": "2"}
    assert _managers(created) == {"alice/Apply": {"a", "b"}}

    # Same config again: nothing changes, not even the resourceVersion.
    again = _apply(core, ns, _cm(ns, {"a": "1", "b": "2"}), "alice")
    assert again.metadata.resource_version == created.metadata.resource_version

    # A second manager co-owns a field it sets to the same value, and owns a new one.
    shared = _apply(core, ns, _cm(ns, {"a": "1", "c": "3"}), "bob")
    assert shared.data == {"a": "1", "b": "2", "c": "3"}
    assert _managers(shared) == {"alice/Apply": {"a", "b"}, "bob/Apply": {"a", "c"}}

    # alice drops "b" (hers only) and "a" (shared with bob): b is removed, a stays.
    dropped = _apply(core, ns, _cm(ns, {}), "alice")
    assert dropped.data == {"a": "1", "c": "3"}


def test_apply_conflict_and_force(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    _apply(core, ns, _cm(ns, {"a": "1"}, {"team": "x"}), "alice")
    with pytest.raises(ApiException) as e:
        _apply(core, ns, _cm(ns, {"a": "2"}, {"team": "y"}), "bob")
    body = json.loads(e.value.body)
    assert e.value.status == 409 and body["reason"] == "Conflict"
    assert body["message"].startswith("Apply failed with 2 conflicts")
    assert {c["field"] for c in body["details"]["causes"]} == {".data.a", ".metadata.labels.team"}
    assert core.read_namespaced_config_map("cfg", ns).data == {"a": "1"}

    forced = _apply(core, ns, _cm(ns, {"a": "2"}, {"team": "y"}), "bob", force=True)
    assert forced.data == {"a": "2"} and forced.metadata.labels["team"] == "y"
    managers = _managers(forced)
    assert managers["bob/Apply"] == {"a"} and "alice/Apply" not in managers  # alice lost everything


def test_update_takes_ownership_from_apply(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    _apply(core, ns, _cm(ns, {"a": "1", "b": "1"}), "alice")
    core.patch_namespaced_config_map(
        "cfg",
        ns,
        {"data": {"a": "edited"}},
        field_manager="editor",
        _content_type="application/merge-patch+json",
    )
    obj = core.read_namespaced_config_map("cfg", ns)
    assert _managers(obj) == {"alice/Apply": {"b"}, "editor/Update": {"a"}}
    # alice re-applying her old value now conflicts with the editor.
    with pytest.raises(ApiException) as e:
        _apply(core, ns, _cm(ns, {"a": "1", "b": "1"}), "alice")
    assert e.value.status == 409 and 'conflict with "editor"' in json.loads(e.value.body)["message"]


def test_apply_dry_run_stores_nothing(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    out = _apply(core, ns, _cm(ns, {"a": "1"}), "alice", dry_run="All")
    assert out.data == {"a": "1"}
    with pytest.raises(ApiException) as e:
        core.read_namespaced_config_map("cfg", ns)
    assert e.value.status == 404
    real = _apply(core, ns, _cm(ns, {"a": "1"}), "alice")
    _apply(core, ns, _cm(ns, {"a": "2"}), "alice", dry_run="All")
    got = core.read_namespaced_config_map("cfg", ns)
    assert got.data == {"a": "1"} and got.metadata.resource_version == real.metadata.resource_version


def test_apply_merges_containers_by_name(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    apps = client.AppsV1Api(cluster.api_client())

    def dep(containers: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d", "namespace": ns},
            "spec": {
                "selector": {"matchLabels": {"app": "d"}},
                "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": containers}},
            },
        }

    apps.patch_namespaced_deployment(
        "d", ns, dep([{"name": "main", "image": "a:1"}]), field_manager="owner", _content_type=APPLY
    )
    apps.patch_namespaced_deployment(
        "d", ns, dep([{"name": "side", "image": "s:1"}]), field_manager="injector", _content_type=APPLY
    )
    d = apps.read_namespaced_deployment("d", ns)
    assert [c.name for c in d.spec.template.spec.containers] == ["main", "side"]
    # The owner drops nothing of the injector's when re-applying its own container.
    apps.patch_namespaced_deployment(
        "d", ns, dep([{"name": "main", "image": "a:2"}]), field_manager="owner", _content_type=APPLY
    )
    d = apps.read_namespaced_deployment("d", ns)
    assert {c.name: c.image for c in d.spec.template.spec.containers} == {"main": "a:2", "side": "s:1"}
    assert d.metadata.generation == 3
    # The injector dropping its container removes it (and nothing of the owner's).
    apps.patch_namespaced_deployment("d", ns, dep([]), field_manager="injector", _content_type=APPLY)
    d = apps.read_namespaced_deployment("d", ns)
    assert [c.name for c in d.spec.template.spec.containers] == ["main"]
    assert d.metadata.generation == 4
    # Invalid apply is rejected with 422 and changes nothing.
    with pytest.raises(ApiException) as e:
        apps.patch_namespaced_deployment(
            "d", ns, dep([{"name": "main", "image": ""}]), field_manager="owner", _content_type=APPLY
        )
    assert e.value.status == 422
    assert apps.read_namespaced_deployment("d", ns).metadata.generation == 4


def test_apply_requires_field_manager(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    api = cluster.api_client()
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(api).patch_namespaced_config_map("cfg", ns, _cm(ns, {"a": "1"}), _content_type=APPLY)
    assert e.value.status == 400


def test_apply_yaml_body_keeps_json_semantics(cluster: Cluster) -> None:
    import urllib.request

    ns = cluster.new_namespace()
    body = (
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\n  namespace: {ns}\n"
        "  annotations:\n    released: 2026-01-01\ndata:\n  when: 2026-01-01\n  '1': one\n"
    ).encode()
    url = f"{cluster.server.url}/api/v1/namespaces/{ns}/configmaps/cfg?fieldManager=yaml-user"
    req = urllib.request.Request(
        url,
        data=body,
        method="PATCH",
        headers={"Content-Type": APPLY, "Authorization": f"Bearer {cluster.server.token}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 201
        obj = json.load(resp)
    assert obj["data"] == {"when": "2026-01-01", "1": "one"}
    assert obj["metadata"]["annotations"] == {"released": "2026-01-01"}
