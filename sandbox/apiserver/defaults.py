"""Server-side defaulting of the built-in kinds, as the real API server fills them.

Clients (and the official Python client's model classes) rely on these: e.g. a DaemonSet's
status integers are required fields, a Service port always has a protocol and targetPort.
Defaulting is idempotent so repeating an apply does not change anything.
"""

from __future__ import annotations

from typing import Any


def _pod_spec(spec: dict[str, Any]) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    if spec.get("serviceAccountName") and not spec.get("serviceAccount"):
        spec["serviceAccount"] = spec["serviceAccountName"]
    for key in ("containers", "initContainers"):
        for c in spec.get(key) or []:
            if not isinstance(c, dict):
                continue
            image = str(c.get("image", ""))
            tag = image.rsplit("/", 1)[-1]
            latest = "@" not in image and (":" not in tag or tag.endswith(":latest"))
            c.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
            c.setdefault("terminationMessagePath", "/dev/termination-log")
            c.setdefault("terminationMessagePolicy", "File")
            c.setdefault("resources", {})
            for p in c.get("ports") or []:
                if isinstance(p, dict):
                    p.setdefault("protocol", "TCP")
            for e in c.get("env") or []:
                vf = e.get("valueFrom") if isinstance(e, dict) else None
                if isinstance(vf, dict) and isinstance(vf.get("fieldRef"), dict):
                    vf["fieldRef"].setdefault("apiVersion", "v1")
    for v in spec.get("volumes") or []:
        if not isinstance(v, dict):
            continue
        if isinstance(v.get("hostPath"), dict):
            v["hostPath"].setdefault("type", "")
        for src in ("configMap", "secret"):
            if isinstance(v.get(src), dict):
                v[src].setdefault("defaultMode", 420)
        if isinstance(v.get("projected"), dict):
            v["projected"].setdefault("defaultMode", 420)
            for s in v["projected"].get("sources") or []:
                tok = s.get("serviceAccountToken") if isinstance(s, dict) else None
                if isinstance(tok, dict):
                    tok.setdefault("expirationSeconds", 3600)


def _template(obj: dict[str, Any]) -> None:
    tmpl = obj.setdefault("spec", {}).get("template")
    if isinstance(tmpl, dict):
        tmpl.setdefault("metadata", {}).setdefault("creationTimestamp", None)
        _pod_spec(tmpl.setdefault("spec", {}))


def apply_defaults(kind: str, obj: dict[str, Any]) -> None:
    """Fill defaults in place for ``kind``."""
    spec = obj.get("spec")
    if kind == "Pod":
        _pod_spec(obj.setdefault("spec", {}))
        obj["spec"].setdefault("enableServiceLinks", True)
        obj["spec"].setdefault("priority", 0)
        if "serviceAccountName" not in obj["spec"]:
            obj["spec"]["serviceAccountName"] = "default"
            obj["spec"]["serviceAccount"] = "default"
    elif kind == "Service":
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if spec["type"] != "ExternalName":
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
        for p in spec.get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")
                if "targetPort" not in p and "port" in p:
                    p["targetPort"] = p["port"]
    elif kind == "Deployment":
        spec = obj.setdefault("spec", {})
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = spec.setdefault("strategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            ru = strategy.setdefault("rollingUpdate", {})
            ru.setdefault("maxUnavailable", "25%")
            ru.setdefault("maxSurge", "25%")
        _template(obj)
    elif kind in ("DaemonSet", "StatefulSet", "ReplicaSet"):
        spec = obj.setdefault("spec", {})
        spec.setdefault("revisionHistoryLimit", 10)
        if kind == "DaemonSet":
            us = spec.setdefault("updateStrategy", {})
            us.setdefault("type", "RollingUpdate")
            if us["type"] == "RollingUpdate":
                ru = us.setdefault("rollingUpdate", {})
                ru.setdefault("maxUnavailable", 1)
                ru.setdefault("maxSurge", 0)
        else:
            spec.setdefault("replicas", 1)
        _template(obj)
    elif kind == "Secret":
        if not obj.get("type"):
            obj["type"] = "Opaque"
    elif kind in ("ClusterRoleBinding", "RoleBinding"):
        for s in obj.get("subjects") or []:
            if isinstance(s, dict) and s.get("kind") in ("User", "Group"):
                s.setdefault("apiGroup", "rbac.authorization.k8s.io")
    elif kind == "Namespace":
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        name = (obj.get("metadata") or {}).get("name")
        if name:
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
    _ = spec


def qos_class(pod: dict[str, Any]) -> str:
    """Guaranteed (every container: cpu and memory limits equal to requests), Burstable, BestEffort."""
    containers = (pod.get("spec") or {}).get("containers") or []
    any_set = False
    guaranteed = bool(containers)
    for c in containers:
        res = (c or {}).get("resources") or {}
        limits = res.get("limits") or {}
        requests = res.get("requests") or limits  # requests default to limits
        any_set = any_set or bool(limits) or bool(res.get("requests"))
        for r in ("cpu", "memory"):
            if r not in limits or str(requests.get(r)) != str(limits[r]):
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def initial_status(kind: str, obj: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Status the server sets on create (clients cannot create with a status)."""
    if kind == "Pod":
        return {"phase": "Pending", "qosClass": qos_class(obj or {})}
    if kind == "DaemonSet":
        return {
            "currentNumberScheduled": 0,
            "numberMisscheduled": 0,
            "desiredNumberScheduled": 0,
            "numberReady": 0,
        }
    if kind in ("Deployment", "ReplicaSet", "StatefulSet"):
        return {} if kind == "Deployment" else {"replicas": 0}
    if kind == "Namespace":
        return {"phase": "Active"}
    if kind == "Service":
        return {"loadBalancer": {}}
    if kind == "Node":
        return None
    if kind in ("Gateway", "GatewayClass"):  # the Gateway API CRDs' status default
        types = ("Accepted", "Programmed") if kind == "Gateway" else ("Accepted",)
        return {"conditions": [{"type": t, "status": "Unknown", "reason": "Pending",
                                "message": "Waiting for controller",
                                "lastTransitionTime": "1970-01-01T00:00:00Z"} for t in types]}
    return None


# Kinds whose status is only writable through /status (main-resource writes keep the old status).
STATUS_SUBRESOURCE_KINDS = {
    "Pod",
    "Service",
    "Deployment",
    "DaemonSet",
    "ReplicaSet",
    "StatefulSet",
    "Namespace",
    "Node",
    "Gateway",
    "GatewayClass",
}
# Kinds whose metadata.generation tracks spec changes.
GENERATION_KINDS = {  # not Pod: pods have no generation before Kubernetes 1.33
    "Deployment",
    "DaemonSet",
    "ReplicaSet",
    "StatefulSet",
    "EnvoyFilter",
    "VirtualService",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "DestinationRule",
    "Gateway",
    "GatewayClass",
}
