"""Deployment, ReplicaSet and DaemonSet controllers plus owner-reference garbage collection.

On a one-node sandbox these are the controller-manager's job folded into the kubelet: every
reconcile compares the workload objects with the Pods they own (by ownerReferences uid) and creates
or deletes Pods, then writes the workload's status. Names follow Kubernetes: a Deployment owns a
ReplicaSet ``<deployment>-<pod-template-hash>`` which owns Pods ``<replicaset>-<5 chars>``; a
DaemonSet owns one Pod ``<daemonset>-<5 chars>`` on the node.
"""

from __future__ import annotations

import copy
import hashlib
import json
import secrets
from collections.abc import Callable
from typing import Any

from sandbox.kubelet.api import Api, ApiError

ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
EventFn = Callable[[dict, str, str, str, str], None]  # (object, type, reason, message, component)


def safe_hash(data: Any, n: int = 10) -> str:
    digest = int.from_bytes(hashlib.sha256(json.dumps(data, sort_keys=True).encode()).digest()[:8], "big")
    out = ""
    for _ in range(n):
        digest, r = divmod(digest, len(ALPHABET))
        out += ALPHABET[r]
    return out


def suffix(n: int = 5) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


def owner_uid(obj: dict) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def owner_ref(obj: dict, kind: str) -> dict:
    m = obj["metadata"]
    return {"apiVersion": "apps/v1", "kind": kind, "name": m["name"], "uid": m["uid"],
            "controller": True, "blockOwnerDeletion": True}


def is_ready(pod: dict) -> bool:
    for c in pod.get("status", {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def alive(pod: dict) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and pod.get("status", {}).get("phase") not in (
        "Succeeded", "Failed")


def _path(kind: str, ns: str, name: str = "") -> str:
    base = {"Pod": "/api/v1", "Deployment": "/apis/apps/v1", "ReplicaSet": "/apis/apps/v1",
            "DaemonSet": "/apis/apps/v1"}[kind]
    plural = {"Pod": "pods", "Deployment": "deployments", "ReplicaSet": "replicasets",
              "DaemonSet": "daemonsets"}[kind]
    return f"{base}/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")


class Controllers:
    def __init__(self, api: Api, node: str, event: EventFn) -> None:
        self.api = api
        self.node = node
        self.event = event
        self._status_sent: dict[str, dict] = {}

    def reconcile(self, pods: list[dict]) -> bool:
        """One pass over all workloads; True if any Pod was created or deleted."""
        changed = False
        deployments = self.api.list("/apis/apps/v1/deployments")
        replicasets = self.api.list("/apis/apps/v1/replicasets")
        daemonsets = self.api.list("/apis/apps/v1/daemonsets")
        changed |= self._deployments(deployments, replicasets, pods)
        if changed:
            replicasets = self.api.list("/apis/apps/v1/replicasets")
        changed |= self._replicasets(replicasets, pods)
        changed |= self._daemonsets(daemonsets, pods)
        changed |= self._collect_garbage(pods, {o["metadata"]["uid"] for o in replicasets + daemonsets})
        return changed

    # --- Deployments -> ReplicaSets ---------------------------------------------------------
    def _deployments(self, deployments: list[dict], replicasets: list[dict], pods: list[dict]) -> bool:
        changed = False
        uids = {d["metadata"]["uid"] for d in deployments}
        for rs in replicasets:
            owner = owner_uid(rs)
            if owner and owner not in uids and _owner_kind(rs) == "Deployment":
                self.api.delete(_path("ReplicaSet", rs["metadata"]["namespace"], rs["metadata"]["name"]))
                changed = True
        for d in deployments:
            if d["metadata"].get("deletionTimestamp"):
                continue
            owned = [r for r in replicasets if owner_uid(r) == d["metadata"]["uid"]]
            changed |= self._deployment(d, owned, pods)
        return changed

    def _deployment(self, d: dict, owned: list[dict], pods: list[dict]) -> bool:
        meta, spec = d["metadata"], d.get("spec", {})
        ns = meta["namespace"]
        replicas = int(spec.get("replicas", 1) if spec.get("replicas") is not None else 1)
        template = copy.deepcopy(spec.get("template") or {})
        h = safe_hash(template)
        name = f"{meta['name']}-{h}"
        template.setdefault("metadata", {}).setdefault("labels", {})["pod-template-hash"] = h
        changed = False
        current = next((r for r in owned if r["metadata"]["name"] == name), None)
        if current is None:
            selector = copy.deepcopy(spec.get("selector") or {"matchLabels": {}})
            selector.setdefault("matchLabels", {})["pod-template-hash"] = h
            body = {
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {"name": name, "namespace": ns, "labels": template["metadata"]["labels"],
                             "ownerReferences": [owner_ref(d, "Deployment")],
                             "annotations": {"deployment.kubernetes.io/desired-replicas": str(replicas)}},
                "spec": {"replicas": replicas, "selector": selector, "template": template},
            }
            try:
                self.api.create(_path("ReplicaSet", ns), body)
                self.event(d, "Normal", "ScalingReplicaSet",
                           f"Scaled up replica set {name} to {replicas}", "deployment-controller")
            except ApiError as e:
                if e.status != 409:
                    raise
            changed = True
        elif int(current.get("spec", {}).get("replicas", 1)) != replicas:
            self.api.merge_patch(_path("ReplicaSet", ns, name), {"spec": {"replicas": replicas}})
            self.event(d, "Normal", "ScalingReplicaSet",
                       f"Scaled replica set {name} to {replicas}", "deployment-controller")
            changed = True
        for old in owned:
            if old["metadata"]["name"] == name:
                continue
            old_uid = old["metadata"]["uid"]
            if any(owner_uid(p) == old_uid for p in pods):
                if int(old.get("spec", {}).get("replicas", 0)) != 0:
                    old_path = _path("ReplicaSet", ns, old["metadata"]["name"])
                    self.api.merge_patch(old_path, {"spec": {"replicas": 0}})
                    changed = True
            else:
                self.api.delete(_path("ReplicaSet", ns, old["metadata"]["name"]))
                changed = True
        rs_uids = {r["metadata"]["uid"] for r in owned}
        mine = [p for p in pods if owner_uid(p) in rs_uids and alive(p)]
        updated = [p for p in mine if p["metadata"].get("labels", {}).get("pod-template-hash") == h]
        ready = [p for p in mine if is_ready(p)]
        available = len(ready) >= replicas
        status = {
            "observedGeneration": meta.get("generation", 1), "replicas": len(mine),
            "updatedReplicas": len(updated), "readyReplicas": len(ready), "availableReplicas": len(ready),
            "unavailableReplicas": max(0, replicas - len(ready)),
            "conditions": [
                {"type": "Available", "status": "True" if available else "False",
                 "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                 "message": "Deployment has minimum availability." if available
                 else "Deployment does not have minimum availability."},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"
                 if len(updated) == replicas else "ReplicaSetUpdated",
                 "message": f'ReplicaSet "{name}" is progressing.'},
            ],
        }
        self._write_status("Deployment", d, status)
        return changed

    # --- ReplicaSets -> Pods -----------------------------------------------------------------
    def _replicasets(self, replicasets: list[dict], pods: list[dict]) -> bool:
        changed = False
        for rs in replicasets:
            if rs["metadata"].get("deletionTimestamp"):
                continue
            uid = rs["metadata"]["uid"]
            # A Failed pod keeps its slot: the sandbox fails pods for reasons that do not heal by
            # themselves (image outside the catalog), and replacing them would create one per second.
            # Fixing the template makes a new ReplicaSet, which removes these with the old one.
            mine = [p for p in pods if owner_uid(p) == uid and not p["metadata"].get("deletionTimestamp")]
            want = int(rs.get("spec", {}).get("replicas", 1))
            for _ in range(want - len(mine)):
                self._create_pod(rs, "ReplicaSet", rs.get("spec", {}).get("template") or {}, {})
                changed = True
            if len(mine) > want:
                # Not-ready first, then the newest, as the ReplicaSet controller prefers.
                newest_first = sorted(mine, key=lambda p: p["metadata"].get("creationTimestamp", ""),
                                      reverse=True)
                victims = sorted(newest_first, key=is_ready)[: len(mine) - want]
                for p in victims:
                    self.api.delete(_path("Pod", p["metadata"]["namespace"], p["metadata"]["name"]))
                    self.event(rs, "Normal", "SuccessfulDelete", f"Deleted pod: {p['metadata']['name']}",
                               "replicaset-controller")
                changed = True
            ready = [p for p in mine if is_ready(p)]
            self._write_status("ReplicaSet", rs, {
                "replicas": len(mine), "readyReplicas": len(ready), "availableReplicas": len(ready),
                "fullyLabeledReplicas": len(mine), "observedGeneration": rs["metadata"].get("generation", 1)})
        return changed

    # --- DaemonSets -> one Pod on this node -----------------------------------------------------
    def _daemonsets(self, daemonsets: list[dict], pods: list[dict]) -> bool:
        changed = False
        for ds in daemonsets:
            if ds["metadata"].get("deletionTimestamp"):
                continue
            template = ds.get("spec", {}).get("template") or {}
            h = safe_hash(template)
            uid = ds["metadata"]["uid"]
            mine = [p for p in pods if owner_uid(p) == uid and not p["metadata"].get("deletionTimestamp")]
            stale = [p for p in mine if p["metadata"].get("labels", {}).get("controller-revision-hash") != h]
            for p in stale + sorted(set_minus(mine, stale), key=lambda p: p["metadata"]["name"])[1:]:
                self.api.delete(_path("Pod", p["metadata"]["namespace"], p["metadata"]["name"]))
                self.event(ds, "Normal", "SuccessfulDelete", f"Deleted pod: {p['metadata']['name']}",
                           "daemonset-controller")
                changed = True
            current = [p for p in mine if p not in stale]
            if not current:
                self._create_pod(ds, "DaemonSet", template, {"controller-revision-hash": h})
                changed = True
            ready = [p for p in current if is_ready(p)]
            updated = [p for p in current if alive(p)]
            self._write_status("DaemonSet", ds, {
                "desiredNumberScheduled": 1, "currentNumberScheduled": min(1, len(current)),
                "numberMisscheduled": 0, "numberReady": len(ready),
                "updatedNumberScheduled": min(1, len(updated)),
                "numberAvailable": len(ready), "numberUnavailable": 1 - min(1, len(ready)),
                "observedGeneration": ds["metadata"].get("generation", 1)})
        return changed

    def _create_pod(self, owner: dict, kind: str, template: dict, extra_labels: dict[str, str]) -> None:
        ns = owner["metadata"]["namespace"]
        tmeta = template.get("metadata") or {}
        labels = {**(tmeta.get("labels") or {}), **extra_labels}
        name = f"{owner['metadata']['name']}-{suffix()}"
        spec = copy.deepcopy(template.get("spec") or {})
        spec["nodeName"] = self.node
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels,
                             "annotations": dict(tmeta.get("annotations") or {}),
                             "ownerReferences": [owner_ref(owner, kind)]},
                "spec": spec}
        component = "daemonset-controller" if kind == "DaemonSet" else "replicaset-controller"
        try:
            self.api.create(_path("Pod", ns), body)
            self.event(owner, "Normal", "SuccessfulCreate", f"Created pod: {name}", component)
        except ApiError as e:
            self.event(owner, "Warning", "FailedCreate", f"Error creating: {e}", component)

    def _collect_garbage(self, pods: list[dict], owners: set[str]) -> bool:
        changed = False
        for p in pods:
            kind = _owner_kind(p)
            if kind in ("ReplicaSet", "DaemonSet") and owner_uid(p) not in owners:
                self.api.delete(_path("Pod", p["metadata"]["namespace"], p["metadata"]["name"]))
                changed = True
        return changed

    def _write_status(self, kind: str, obj: dict, status: dict) -> None:
        key = obj["metadata"]["uid"]
        current = {k: obj.get("status", {}).get(k) for k in status}
        if self._status_sent.get(key) == status and _same(current, status):
            return
        path = _path(kind, obj["metadata"]["namespace"], obj["metadata"]["name"]) + "/status"
        try:
            self.api.merge_patch(path, {"status": status})
            self._status_sent[key] = status
        except ApiError as e:
            if e.status != 404:
                raise


def _same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def set_minus(a: list[dict], b: list[dict]) -> list[dict]:
    ids = {id(x) for x in b}
    return [x for x in a if id(x) not in ids]


def _owner_kind(obj: dict) -> str | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("kind")
    return None
