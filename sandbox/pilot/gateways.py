"""istiod's gateway deployment controller, for waypoints: Gateway -> ServiceAccount, Deployment, Service.

A Gateway of class ``istio-waypoint`` handled by this revision (label ``istio.io/rev`` absent
or ours) gets, named after it and owned by it (ownerReferences, so they go with it):

- ServiceAccount ``<name>``;
- Deployment ``<name>``: one ``istio-proxy`` container running ``proxy waypoint`` with the env
  of istiod's waypoint template (``waypoint_pod_template``), image
  ``docker.io/istio/proxyv2:<revision as version>`` unless the Gateway's
  ``sidecar.istio.io/proxyImage`` annotation names another (kmeshctl's ``--image``);
- Service ``<name>``: ports 15021 status-port, 15008 mesh (HBONE), 15019 (Kmesh's TLV port).

Objects are written with server-side apply (field manager ``istio.io/gateway-controller``,
forced, as istiod does). The Gateway's status: Accepted once handled; Programmed follows the
Deployment's readiness (True when a replica is ready and the Service has its ClusterIP), with
``addresses`` = the Service's ClusterIP. The GatewayClass ``istio-waypoint`` is created at start,
as istiod creates its built-in classes, and marked Accepted.
"""

from __future__ import annotations

import copy
import json
import logging
import queue
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("sandbox.pilot.gateways")

GROUP, VERSION = "gateway.networking.k8s.io", "v1"
WAYPOINT_CLASS = "istio-waypoint"
MESH_CONTROLLER = "istio.io/mesh-controller"
FIELD_MANAGER = "istio.io/gateway-controller"
MANAGED_LABEL = "gateway.istio.io/managed"
MANAGED_VALUE = "istio.io-mesh-controller"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
REV_LABEL = "istio.io/rev"
PROXY_IMAGE_ANNOTATION = "sidecar.istio.io/proxyImage"
DEFAULT_ISTIO_VERSION = "1.22.6"
HBONE_PORT, KMESH_TLV_PORT, STATUS_PORT = 15008, 15019, 15021

Obj = dict[str, Any]


def istio_version(revision: str) -> str:
    """``1-22-6`` -> ``1.22.6`` (istiod's revision naming); anything else -> the default version."""
    m = re.fullmatch(r"(\d+)-(\d+)(?:-(\d+))?(?:-.*)?", revision or "")
    if not m:
        return DEFAULT_ISTIO_VERSION
    return ".".join(g for g in m.groups() if g is not None)


def istiod_service(revision: str) -> str:
    return "istiod" if revision in ("", "default") else f"istiod-{revision}"


def is_waypoint_class(gw: Obj, gateway_class: Obj | None = None) -> bool:
    class_name = (gw.get("spec") or {}).get("gatewayClassName")
    if class_name == WAYPOINT_CLASS:
        return True
    return bool(gateway_class) and (gateway_class.get("spec") or {}).get("controllerName") == MESH_CONTROLLER


def handled_by(gw: Obj, revision: str) -> bool:
    """Gateways without a revision label belong to the default revision, as istiod decides."""
    rev = (gw["metadata"].get("labels") or {}).get(REV_LABEL)
    if rev is None:
        return True
    return rev == revision or (rev == "default" and revision in ("", "default"))


def _owner(gw: Obj) -> dict:
    md = gw["metadata"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Gateway", "name": md["name"], "uid": md["uid"]}


def proxy_image(gw: Obj, revision: str) -> str:
    annotations = gw["metadata"].get("annotations") or {}
    return annotations.get(PROXY_IMAGE_ANNOTATION) or f"docker.io/istio/proxyv2:{istio_version(revision)}"


def waypoint_pod_template(gw: Obj, revision: str, cluster_id: str, istio_namespace: str,
                          mesh_id: str = "cluster.local") -> Obj:
    """The pod template of istiod's waypoint.yaml (1.22), with what the sandbox can run."""
    md = gw["metadata"]
    name, ns = md["name"], md["namespace"]
    discovery = f"{istiod_service(revision)}.{istio_namespace}.svc:15012"
    labels = {
        "sidecar.istio.io/inject": "false",
        "istio.io/dataplane-mode": "none",
        "service.istio.io/canonical-name": name,
        "service.istio.io/canonical-revision": "latest",
        GATEWAY_NAME_LABEL: name,
        MANAGED_LABEL: MANAGED_VALUE,
    }
    if revision and revision != "default":
        labels[REV_LABEL] = revision
    proxy_config = {"discoveryAddress": discovery, "proxyMetadata": {}, "meshId": mesh_id,
                    "statusPort": STATUS_PORT, "image": {"imageType": "distroless"}}

    def field(path: str) -> dict:
        return {"valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    env = [
        {"name": "ISTIO_META_SERVICE_ACCOUNT", **field("spec.serviceAccountName")},
        {"name": "ISTIO_META_NODE_NAME", **field("spec.nodeName")},
        {"name": "PILOT_CERT_PROVIDER", "value": "istiod"},
        {"name": "CA_ADDR", "value": discovery},
        {"name": "POD_NAME", **field("metadata.name")},
        {"name": "POD_NAMESPACE", **field("metadata.namespace")},
        {"name": "INSTANCE_IP", **field("status.podIP")},
        {"name": "SERVICE_ACCOUNT", **field("spec.serviceAccountName")},
        {"name": "HOST_IP", **field("status.hostIP")},
        {"name": "ISTIO_CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        {"name": "PROXY_CONFIG", "value": json.dumps(proxy_config, separators=(",", ":"))},
        {"name": "ISTIO_META_CLUSTER_ID", "value": cluster_id},
        {"name": "ISTIO_META_INTERCEPTION_MODE", "value": "REDIRECT"},
        {"name": "ISTIO_META_WORKLOAD_NAME", "value": name},
        {"name": "ISTIO_META_OWNER", "value": f"kubernetes://apis/apps/v1/namespaces/{ns}/deployments/{name}"},
        {"name": "ISTIO_META_MESH_ID", "value": mesh_id},
    ]
    container = {
        "name": "istio-proxy",
        "image": proxy_image(gw, revision),
        "args": ["proxy", "waypoint", "--domain", "$(POD_NAMESPACE).svc.cluster.local",
                 "--serviceCluster", f"{name}.$(POD_NAMESPACE)", "--proxyLogLevel", "warning",
                 "--proxyComponentLogLevel", "misc:error", "--log_output_level", "default:info"],
        "env": env,
        "ports": [
            {"containerPort": 15020, "name": "metrics", "protocol": "TCP"},
            {"containerPort": STATUS_PORT, "name": "status-port", "protocol": "TCP"},
            {"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": STATUS_PORT, "scheme": "HTTP"},
                           "failureThreshold": 4, "periodSeconds": 15, "successThreshold": 1,
                           "timeoutSeconds": 1},
        "startupProbe": {"httpGet": {"path": "/healthz/ready", "port": STATUS_PORT, "scheme": "HTTP"},
                         "failureThreshold": 30, "initialDelaySeconds": 1, "periodSeconds": 1,
                         "successThreshold": 1, "timeoutSeconds": 1},
        "volumeMounts": [
            {"mountPath": "/var/run/secrets/workload-spiffe-uds", "name": "workload-socket"},
            {"mountPath": "/var/run/secrets/istio", "name": "istiod-ca-cert"},
            {"mountPath": "/var/lib/istio/data", "name": "istio-data"},
            {"mountPath": "/etc/istio/proxy", "name": "istio-envoy"},
            {"mountPath": "/var/run/secrets/tokens", "name": "istio-token"},
            {"mountPath": "/etc/istio/pod", "name": "istio-podinfo"},
        ],
    }
    volumes = [
        {"name": "workload-socket", "emptyDir": {}},
        {"name": "istio-envoy", "emptyDir": {"medium": "Memory"}},
        {"name": "istio-data", "emptyDir": {"medium": "Memory"}},
        {"name": "istio-podinfo", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}},
        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}},
        {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
    ]
    annotations = {"prometheus.io/path": "/stats/prometheus", "prometheus.io/port": "15020",
                   "prometheus.io/scrape": "true"}
    if revision:
        annotations["istio.io/rev"] = revision
    return {"metadata": {"labels": labels, "annotations": annotations},
            "spec": {"terminationGracePeriodSeconds": 2, "serviceAccountName": name,
                     "containers": [container], "volumes": volumes}}


def desired_objects(gw: Obj, revision: str, cluster_id: str, istio_namespace: str) -> list[Obj]:
    """ServiceAccount, Deployment and Service for a waypoint Gateway (in apply order)."""
    md = gw["metadata"]
    name, ns = md["name"], md["namespace"]
    labels = {GATEWAY_NAME_LABEL: name, MANAGED_LABEL: MANAGED_VALUE}
    meta = {"name": name, "namespace": ns, "labels": labels, "ownerReferences": [_owner(gw)]}
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": copy.deepcopy(meta)}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": copy.deepcopy(meta),
        "spec": {"replicas": 1, "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
                 "template": waypoint_pod_template(gw, revision, cluster_id, istio_namespace)},
    }
    ports = [{"name": "status-port", "port": STATUS_PORT, "protocol": "TCP", "targetPort": STATUS_PORT},
             {"name": "mesh", "port": HBONE_PORT, "protocol": "TCP", "targetPort": HBONE_PORT,
              "appProtocol": "HBONE"},
             {"name": "kmesh-tlv", "port": KMESH_TLV_PORT, "protocol": "TCP", "targetPort": KMESH_TLV_PORT}]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": copy.deepcopy(meta),
               "spec": {"type": "ClusterIP", "selector": {GATEWAY_NAME_LABEL: name}, "ports": ports}}
    return [sa, deployment, service]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_problem(pods: list[Obj]) -> str:
    """Why the waypoint's pod is not ready, in a few words (for the Programmed message)."""
    for pod in pods:
        st = pod.get("status") or {}
        name = pod["metadata"]["name"]
        for cs in st.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason"):
                msg = f": {waiting['message']}" if waiting.get("message") else ""
                return f"pod {name}: {waiting['reason']}{msg}"
        if st.get("reason"):
            msg = f": {st['message']}" if st.get("message") else ""
            return f"pod {name}: {st['reason']}{msg}"
        if st.get("phase") and st.get("phase") != "Running":
            return f"pod {name}: {st['phase']}"
        return f"pod {name}: running, not ready"
    return ""


def gateway_status(gw: Obj, deployment: Obj | None, service: Obj | None,
                   pods: list[Obj] | None = None) -> Obj:
    """Accepted/Programmed and addresses, from the Deployment's readiness and the Service's ClusterIP."""
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    gen = gw["metadata"].get("generation")
    ip = ((service or {}).get("spec") or {}).get("clusterIP")
    ip = ip if ip and ip != "None" else None
    st = (deployment or {}).get("status") or {}
    ready = int(st.get("readyReplicas") or 0)
    want = int(((deployment or {}).get("spec") or {}).get("replicas", 1) or 0)
    if deployment is None or service is None:
        programmed = ("False", "Pending", f"deployment and service {ns}/{name} are being created")
    elif ip is None:
        programmed = ("False", "AddressNotAssigned", f"service {ns}/{name} has no cluster IP yet")
    elif ready < 1:
        problem = pod_problem(pods or [])
        detail = f" ({problem})" if problem else ""
        programmed = ("False", "Pending",
                      f"deployment {ns}/{name} is not ready: {ready}/{want} replicas ready{detail}")
    else:
        host = f"{name}.{ns}.svc.cluster.local:{HBONE_PORT}"
        programmed = ("True", "Programmed", f"Resource programmed, assigned to service(s) {host}")
    conditions = [
        {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "Resource accepted"},
        {"type": "Programmed", "status": programmed[0], "reason": programmed[1], "message": programmed[2]},
    ]
    old = {c.get("type"): c for c in (gw.get("status") or {}).get("conditions") or []}
    for c in conditions:
        if gen is not None:
            c["observedGeneration"] = gen
        prev = old.get(c["type"])
        same = prev is not None and prev.get("status") == c["status"]
        c["lastTransitionTime"] = prev.get("lastTransitionTime") if same and prev else _now()
    out: Obj = {"conditions": conditions}
    out["addresses"] = [{"type": "IPAddress", "value": ip}] if ip else []
    return out


def _status_key(status: Obj) -> Any:
    """What matters for "changed?" (lastTransitionTime excluded)."""
    conds = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
             for c in status.get("conditions") or []]
    return json.dumps({"c": sorted(conds, key=lambda c: c.get("type", "")),
                       "a": status.get("addresses") or []}, sort_keys=True)


Snapshot = Callable[[str, str], tuple[Obj | None, Obj | None, Obj | None, Obj | None, list[Obj]]]


class GatewayDeployer:
    """Reconciles waypoint Gateways on a worker thread (a keyed queue: one pass per change burst)."""

    def __init__(self, api_client: Any, snapshot: Snapshot, revision: str, cluster_id: str,
                 istio_namespace: str) -> None:
        self.api_client = api_client
        self.snapshot = snapshot  # (ns, name) -> (gateway, class, deployment, service, pods) from caches
        self.revision = revision
        self.cluster_id = cluster_id
        self.istio_namespace = istio_namespace
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._pending: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._applied: dict[tuple[str, str], str] = {}  # key -> json of the last applied objects
        self._thread = threading.Thread(target=self._run, name="gateway-deployer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)

    def enqueue(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
        self._queue.put(key)

    def forget(self, namespace: str, name: str) -> None:
        self._applied.pop((namespace, name), None)

    def _run(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            with self._lock:
                self._pending.discard(key)
            try:
                self.reconcile(*key)
            except Exception as e:  # noqa: BLE001 - one bad Gateway must not stop the others; retried
                log.warning("gateway %s/%s: %s; retrying in 1s", key[0], key[1], e)
                threading.Timer(1.0, self.enqueue, key).start()

    def reconcile(self, namespace: str, name: str) -> None:
        gw, gwclass, deployment, service, pods = self.snapshot(namespace, name)
        if gw is None or gw["metadata"].get("deletionTimestamp"):
            self.forget(namespace, name)
            # The API server collects the owned objects with the Gateway; this catches one that an
            # apply in flight re-created just after (its owner uid is gone, and the sandbox's garbage
            # collector only runs when an owner is deleted).
            self._collect_orphans(namespace, name)
            return
        if not is_waypoint_class(gw, gwclass) or not handled_by(gw, self.revision):
            return
        objs = desired_objects(gw, self.revision, self.cluster_id, self.istio_namespace)
        fingerprint = json.dumps(objs, sort_keys=True)
        missing = deployment is None or service is None
        if missing or self._applied.get((namespace, name)) != fingerprint:
            for obj in objs:
                self._apply(obj)
            self._applied[(namespace, name)] = fingerprint
            log.info("gateway %s/%s: applied serviceaccount, deployment and service", namespace, name)
            gw, gwclass, deployment, service, pods = self.snapshot(namespace, name)
            if gw is None:
                return
        status = gateway_status(gw, deployment, service, pods)
        if _status_key(status) != _status_key(gw.get("status") or {}):
            self._write_status(gw, status)

    # ---- API writes ------------------------------------------------------------------------
    def _collect_orphans(self, namespace: str, name: str) -> None:
        from kubernetes.client.rest import ApiException

        from kmeshctl import kubeapi

        for prefix, plural in (("/apis/apps/v1", "deployments"), ("/api/v1", "services"),
                               ("/api/v1", "serviceaccounts")):
            path = f"{prefix}/namespaces/{namespace}/{plural}/{name}"
            obj = kubeapi.get(self.api_client, path)
            refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
            if obj and any(r.get("kind") == "Gateway" and r.get("name") == name for r in refs):
                uid = obj["metadata"]["uid"]
                try:
                    self._request("DELETE", path, [], {"preconditions": {"uid": uid}}, "application/json")
                except ApiException as e:
                    if e.status in (404, 409):  # already gone, or replaced meanwhile
                        continue
                    raise
                log.info("gateway %s/%s is gone: deleted its %s left behind", namespace, name, plural)

    def _request(self, method: str, path: str, query: list[tuple[str, str]], body: Any,
                 content_type: str) -> None:
        from kmeshctl import kubeapi

        kubeapi.request(self.api_client, method, path, query, body=body, content_type=content_type)

    def _apply(self, obj: Obj) -> None:
        md = obj["metadata"]
        plural = {"ServiceAccount": "serviceaccounts", "Service": "services", "Deployment": "deployments"}
        prefix = "/apis/apps/v1" if obj["apiVersion"] == "apps/v1" else "/api/v1"
        path = f"{prefix}/namespaces/{md['namespace']}/{plural[obj['kind']]}/{md['name']}"
        self._request("PATCH", path, [("fieldManager", FIELD_MANAGER), ("force", "true")], obj,
                      "application/apply-patch+yaml")

    def _write_status(self, gw: Obj, status: Obj) -> None:
        from kubernetes.client.rest import ApiException

        md = gw["metadata"]
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{md['namespace']}/gateways/{md['name']}/status"
        body = {"metadata": {"resourceVersion": md.get("resourceVersion")}, "status": status}
        try:
            self._request("PATCH", path, [], body, "application/merge-patch+json")
        except ApiException as e:
            if e.status == 409:  # a newer Gateway is on its way through the watch: reconciled again then
                return
            if e.status == 404:
                return
            raise
        prog = next(c for c in status["conditions"] if c["type"] == "Programmed")
        log.info("gateway %s/%s: Programmed=%s (%s)", md["namespace"], md["name"], prog["status"],
                 prog["reason"])


def ensure_waypoint_class(api_client: Any) -> None:
    """GatewayClass ``istio-waypoint`` (controller istio.io/mesh-controller), Accepted, as istiod makes it."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(api_client)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GatewayClass",
            "metadata": {"name": WAYPOINT_CLASS},
            "spec": {"controllerName": MESH_CONTROLLER,
                     "description": "The default Istio waypoint GatewayClass"}}
    try:
        current = custom.create_cluster_custom_object(GROUP, VERSION, "gatewayclasses", body)
    except ApiException as e:
        if e.status == 404:
            log.warning("the API server does not serve %s/%s GatewayClass: no waypoints", GROUP, VERSION)
            return
        if e.status != 409:
            raise
        current = custom.get_cluster_custom_object(GROUP, VERSION, "gatewayclasses", WAYPOINT_CLASS)
    conds = (current.get("status") or {}).get("conditions") or []
    if any(c.get("type") == "Accepted" and c.get("status") == "True" for c in conds):
        return
    accepted = {"type": "Accepted", "status": "True", "reason": "Accepted",
                "message": "Handled by Istio controller",
                "lastTransitionTime": _now(), "observedGeneration": current["metadata"].get("generation", 1)}
    custom.patch_cluster_custom_object_status(GROUP, VERSION, "gatewayclasses", WAYPOINT_CLASS,
                                              {"status": {"conditions": [accepted]}})
