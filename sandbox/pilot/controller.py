"""Watch Namespaces, Pods, Services, AuthorizationPolicies, Gateways (+ Nodes); keep the store current.

List-then-watch per kind, through the official kubernetes client, with raw JSON objects
(``_preload_content=False`` / ``raw_object``) so nothing is lost to model conversion. Each
event recomputes only what it can affect: a pod -> its workload; a service -> the service and
the workloads of its namespace; a namespace -> its workloads and its root-cert ConfigMap; an
AuthorizationPolicy -> its Authorization resource and the workloads it may select (its namespace,
or every namespace from the root namespace), whose ``authorization_policies`` name it. Gateways,
GatewayClasses and waypoint Services change which services and workloads carry a waypoint, so
they recompute everything (a handful of objects in the sandbox); the gateway deployment
controller (gateways.py) is fed from the same caches.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from daemon.xds.gen.istio.workload import workload_pb2 as wl
from sandbox.pilot import authz, gateways, translate
from sandbox.pilot.server import ADDRESS_TYPE, AUTHORIZATION_TYPE, ResourceStore

log = logging.getLogger("sandbox.pilot.controller")
ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CERT_KEY = "root-cert.pem"
SECURITY_GROUP, SECURITY_VERSION, AUTHZ_PLURAL = "security.istio.io", "v1", "authorizationpolicies"
MANAGED_SELECTOR = f"{gateways.MANAGED_LABEL}={gateways.MANAGED_VALUE}"

Obj = dict[str, Any]


def _key(obj: Obj) -> tuple[str, str]:
    md = obj["metadata"]
    return md.get("namespace", ""), md["name"]


class Watcher:
    """List + watch one kind forever; calls ``on_list(items)`` then ``on_event(type, obj)``."""

    def __init__(self, name: str, list_fn: Callable[..., Any], on_list: Callable[[list[Obj]], None],
                 on_event: Callable[[str, Obj], None], stop: threading.Event) -> None:
        self.name = name
        self.list_fn = list_fn
        self.on_list = on_list
        self.on_event = on_event
        self.stop = stop
        self.synced = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            try:
                resp = self.list_fn(_preload_content=False)
                data = json.loads(resp.data)
                rv = data.get("metadata", {}).get("resourceVersion", "")
                self.on_list(data.get("items") or [])
                self.synced.set()
                relist = False
                while not self.stop.is_set() and not relist:
                    w = watch.Watch()
                    for ev in w.stream(self.list_fn, resource_version=rv, timeout_seconds=60,
                                       allow_watch_bookmarks=True):
                        kind, obj = ev.get("type"), ev.get("raw_object") or {}
                        if kind == "ERROR":
                            relist = True
                            break
                        new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                        if new_rv:
                            rv = new_rv
                        if kind != "BOOKMARK":
                            self.on_event(kind, obj)
                        if self.stop.is_set():
                            w.stop()
                            break
            except Exception as e:  # noqa: BLE001 - API server away or 410: relist after a pause
                if self.stop.is_set():
                    return
                log.warning("watch %s: %s; relisting", self.name, e)
                self.stop.wait(1.0)


class Controller:
    """Kubernetes state -> ResourceStore (Address and Authorization types), plus the root-cert ConfigMaps."""

    def __init__(self, api_client: Any, store: ResourceStore, cluster_id: str, root_pem: bytes,
                 root_namespace: str = authz.ROOT_NAMESPACE, revision: str = "default",
                 istio_namespace: str = "istio-system") -> None:
        self.api_client = api_client
        self.store = store
        self.cluster_id = cluster_id
        self.root_pem = root_pem.decode()
        self.root_namespace = root_namespace  # meshConfig.rootNamespace: GLOBAL policies live here
        self._lock = threading.RLock()
        self.pods: dict[tuple[str, str], Obj] = {}
        self.services: dict[tuple[str, str], Obj] = {}
        self.namespaces: dict[str, Obj] = {}
        self.nodes: dict[str, Obj] = {}
        self.policies: dict[tuple[str, str], Obj] = {}  # AuthorizationPolicies that are served
        self.gateways: dict[tuple[str, str], Obj] = {}
        self.gateway_classes: dict[str, Obj] = {}
        self.gateway_deployments: dict[tuple[str, str], Obj] = {}  # managed by the gateway controller
        self.waypoints: dict[tuple[str, str], translate.Waypoint] = {}
        self.deployer = gateways.GatewayDeployer(api_client, self._gateway_snapshot, revision, cluster_id,
                                                 istio_namespace)
        self._stop = threading.Event()
        self._published: set[str] = set()
        self._watchers: list[Watcher] = []

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api_client)
        custom = client.CustomObjectsApi(self.api_client)

        def list_policies(**kw: Any) -> Any:
            return custom.list_cluster_custom_object(SECURITY_GROUP, SECURITY_VERSION, AUTHZ_PLURAL, **kw)

        def list_gateways(**kw: Any) -> Any:
            return custom.list_cluster_custom_object(gateways.GROUP, gateways.VERSION, "gateways", **kw)

        def list_gateway_classes(**kw: Any) -> Any:
            return custom.list_cluster_custom_object(gateways.GROUP, gateways.VERSION, "gatewayclasses", **kw)

        def list_managed_deployments(**kw: Any) -> Any:
            return client.AppsV1Api(self.api_client).list_deployment_for_all_namespaces(
                label_selector=MANAGED_SELECTOR, **kw)

        specs = [
            ("namespaces", core.list_namespace, self._list_namespaces, self._on_namespace),
            ("services", core.list_service_for_all_namespaces, self._list_services, self._on_service),
            ("pods", core.list_pod_for_all_namespaces, self._list_pods, self._on_pod),
            ("nodes", core.list_node, self._list_nodes, self._on_node),
            ("authorizationpolicies", list_policies, self._list_policies, self._on_policy),
        ]
        if self._gateway_api_served():  # as istiod: without the Gateway API CRDs, no waypoints
            specs += [
                ("gatewayclasses", list_gateway_classes, self._list_gateway_classes, self._on_gateway_class),
                ("gateways", list_gateways, self._list_gateways, self._on_gateway),
                ("deployments", list_managed_deployments, self._list_deployments, self._on_deployment),
            ]
            try:
                gateways.ensure_waypoint_class(self.api_client)
            except Exception as e:  # noqa: BLE001 - waypoints are optional; workload xDS still works
                log.warning("cannot create GatewayClass %s: %s", gateways.WAYPOINT_CLASS, e)
            self.deployer.start()
        for name, fn, on_list, on_event in specs:
            w = Watcher(name, fn, on_list, on_event, self._stop)
            self._watchers.append(w)
            w.start()

    def _gateway_api_served(self) -> bool:
        from kubernetes.client.rest import ApiException

        from kmeshctl import kubeapi

        try:
            kubeapi.request(self.api_client, "GET", f"/apis/{gateways.GROUP}/{gateways.VERSION}")
        except ApiException as e:
            if e.status == 404:
                log.warning("the API server does not serve %s/%s: no waypoints", gateways.GROUP,
                            gateways.VERSION)
                return False
        except Exception as e:  # noqa: BLE001 - not reachable yet: assume served, the watches retry
            log.warning("cannot ask the API server for %s: %s", gateways.GROUP, e)
        return True

    def wait_synced(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        for w in self._watchers:
            if w.name == "nodes":  # optional: locality only
                continue
            if not w.synced.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def stop(self) -> None:
        self._stop.set()
        self.deployer.stop()

    # ---- list handlers (replace a whole kind) ----------------------------------------------
    def _list_namespaces(self, items: list[Obj]) -> None:
        with self._lock:
            self.namespaces = {o["metadata"]["name"]: o for o in items}
        for name in list(self.namespaces):
            self.publish_root_cert(name)
        self.rebuild()

    def _list_services(self, items: list[Obj]) -> None:
        with self._lock:
            self.services = {_key(o): o for o in items}
        self.rebuild()

    def _list_pods(self, items: list[Obj]) -> None:
        with self._lock:
            self.pods = {_key(o): o for o in items}
        self.rebuild()

    def _list_nodes(self, items: list[Obj]) -> None:
        with self._lock:
            self.nodes = {o["metadata"]["name"]: o for o in items}
        self.rebuild()

    def _list_policies(self, items: list[Obj]) -> None:
        with self._lock:
            self.policies = {}
            for o in items:
                if self._authorization(o) is not None:
                    self.policies[_key(o)] = o
        self.rebuild()

    def _list_gateways(self, items: list[Obj]) -> None:
        with self._lock:
            self.gateways = {_key(o): o for o in items}
        self.rebuild()
        for key in list(self.gateways):
            self.deployer.enqueue(*key)

    def _list_gateway_classes(self, items: list[Obj]) -> None:
        with self._lock:
            self.gateway_classes = {o["metadata"]["name"]: o for o in items}
        self.rebuild()

    def _list_deployments(self, items: list[Obj]) -> None:
        with self._lock:
            self.gateway_deployments = {_key(o): o for o in items}
        for key in list(self.gateways):
            self.deployer.enqueue(*key)

    # ---- gateways ----------------------------------------------------------------------------
    def _gateway_snapshot(self, namespace: str, name: str) -> Any:
        """(Gateway, its GatewayClass, Deployment, Service, pods) from the caches, for the deployer."""
        with self._lock:
            gw = self.gateways.get((namespace, name))
            gclass = self.gateway_classes.get(((gw or {}).get("spec") or {}).get("gatewayClassName") or "")
            key = (namespace, name)
            pods = [p for (ns, _), p in self.pods.items() if ns == namespace and self._gateway_of(p) == name]
            return gw, gclass, self.gateway_deployments.get(key), self.services.get(key), pods

    @staticmethod
    def _gateway_of(obj: Obj) -> str | None:
        """The Gateway a managed waypoint pod or Service belongs to (None: not a waypoint's)."""
        labels = obj["metadata"].get("labels") or {}
        if labels.get(gateways.MANAGED_LABEL) != gateways.MANAGED_VALUE:
            return None
        return labels.get(gateways.GATEWAY_NAME_LABEL)

    def _on_gateway(self, kind: str, obj: Obj) -> None:
        key = _key(obj)
        with self._lock:
            if kind == "DELETED":
                self.gateways.pop(key, None)
            else:
                self.gateways[key] = obj
        self.deployer.enqueue(*key)
        self.rebuild()

    def _on_gateway_class(self, kind: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        with self._lock:
            if kind == "DELETED":
                self.gateway_classes.pop(name, None)
            else:
                self.gateway_classes[name] = obj
            mine = [k for k, g in self.gateways.items()
                    if (g.get("spec") or {}).get("gatewayClassName") == name]
        for key in mine:
            self.deployer.enqueue(*key)
        self.rebuild()

    def _on_deployment(self, kind: str, obj: Obj) -> None:
        key = _key(obj)
        with self._lock:
            if kind == "DELETED":
                self.gateway_deployments.pop(key, None)
            else:
                self.gateway_deployments[key] = obj
        gw_name = (obj["metadata"].get("labels") or {}).get(gateways.GATEWAY_NAME_LABEL)
        if gw_name:
            self.deployer.enqueue(key[0], gw_name)

    @staticmethod
    def _is_waypoint_service(svc: Obj) -> bool:
        return (svc["metadata"].get("labels") or {}).get(gateways.MANAGED_LABEL) == gateways.MANAGED_VALUE

    def _ns_labels(self, namespace: str) -> dict[str, str]:
        return (self.namespaces.get(namespace, {}).get("metadata") or {}).get("labels") or {}

    def _service(self, svc: Obj) -> Any:
        """The Service resource with its waypoint (None: not published)."""
        ns = svc["metadata"]["namespace"]
        waypoint = translate.service_waypoint(svc, self._ns_labels(ns), self.waypoints)
        return translate.service_resource(svc, waypoint)

    def _recompute_services(self, which: Callable[[Obj], bool]) -> None:
        with self._lock:
            ups: dict[str, bytes] = {}
            removed: list[str] = []
            for svc in self.services.values():
                if not which(svc):
                    continue
                res = self._service(svc)
                if res is None:
                    removed.append(translate.service_key(svc))
                else:
                    ups[translate.service_key(svc)] = wl.Address(service=res).SerializeToString()
            self.store.update(ADDRESS_TYPE, ups, removed)

    # ---- event handlers --------------------------------------------------------------------
    def _on_namespace(self, kind: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        with self._lock:
            if kind == "DELETED":
                self.namespaces.pop(name, None)
                self._published.discard(name)
            else:
                self.namespaces[name] = obj
        if kind != "DELETED":
            self.publish_root_cert(name)
        self._recompute_services(lambda s: s["metadata"]["namespace"] == name)
        self._recompute_pods(lambda p: p["metadata"]["namespace"] == name)

    def _on_service(self, kind: str, obj: Obj) -> None:
        key = _key(obj)
        name = translate.service_key(obj)
        with self._lock:
            if kind == "DELETED":
                self.services.pop(key, None)
                self.store.update(ADDRESS_TYPE, removed=[name])
            else:
                self.services[key] = obj
                res = self._service(obj)
                if res is None:
                    self.store.update(ADDRESS_TYPE, removed=[name])
                else:
                    self.store.update(ADDRESS_TYPE, {name: wl.Address(service=res).SerializeToString()})
        if self._is_waypoint_service(obj):  # its ClusterIP is the address of a waypoint
            gw_name = (obj["metadata"].get("labels") or {}).get(gateways.GATEWAY_NAME_LABEL)
            if gw_name:
                self.deployer.enqueue(key[0], gw_name)
            self.rebuild()
            return
        self._recompute_pods(lambda p: p["metadata"]["namespace"] == key[0])

    def _on_pod(self, kind: str, obj: Obj) -> None:
        key = _key(obj)
        gw_name = self._gateway_of(obj)
        if gw_name:  # a waypoint's pod: its readiness shows in the Gateway's status message
            self.deployer.enqueue(key[0], gw_name)
        with self._lock:
            if kind == "DELETED":
                self.pods.pop(key, None)
                self.store.update(ADDRESS_TYPE, removed=[translate.workload_uid(self.cluster_id, *key)])
                return
            self.pods[key] = obj
        self._recompute_pods(lambda p: _key(p) == key)

    def _on_policy(self, kind: str, obj: Obj) -> None:
        key = _key(obj)
        name = authz.policy_key(obj)
        with self._lock:
            res = None if kind == "DELETED" else self._authorization(obj)
            if res is None:
                self.policies.pop(key, None)
                self.store.update(AUTHORIZATION_TYPE, removed=[name])
            else:
                self.policies[key] = obj
                self.store.update(AUTHORIZATION_TYPE, {name: res.SerializeToString()})
        if key[0] == self.root_namespace:
            self._recompute_pods(lambda p: True)
        else:
            self._recompute_pods(lambda p: p["metadata"]["namespace"] == key[0])

    def _authorization(self, obj: Obj) -> Any:
        """The converted policy (None: not for ztunnel); istiod's warnings go to the log."""
        converted = authz.convert(obj, self.root_namespace)
        for warning in converted.warnings:
            log.warning("AuthorizationPolicy %s: %s", authz.policy_key(obj), warning)
        return converted.policy

    def _on_node(self, kind: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        with self._lock:
            if kind == "DELETED":
                self.nodes.pop(name, None)
            else:
                self.nodes[name] = obj
        self._recompute_pods(lambda p: (p.get("spec") or {}).get("nodeName") == name)

    # ---- translation -------------------------------------------------------------------------
    def _workload(self, pod: Obj) -> wl.Workload | None:
        ns = pod["metadata"]["namespace"]
        ns_labels = (self.namespaces.get(ns, {}).get("metadata") or {}).get("labels") or {}
        node = self.nodes.get((pod.get("spec") or {}).get("nodeName") or "", {})
        node_labels = (node.get("metadata") or {}).get("labels") or {}
        svcs = [s for (sns, _), s in self.services.items() if sns == ns]
        waypoint = translate.workload_waypoint(pod, ns_labels, self.waypoints)
        tunnel = translate.application_tunnel(pod, self.waypoints)
        w = translate.pod_workload(pod, svcs, self.cluster_id, ns_labels, node_labels, waypoint, tunnel)
        if w is not None and self.policies:
            labels = pod["metadata"].get("labels") or {}
            w.authorization_policies.extend(
                authz.selected_policies(self.policies.values(), ns, labels, self.root_namespace))
        return w

    def _recompute_pods(self, which: Callable[[Obj], bool]) -> None:
        with self._lock:
            ups: dict[str, bytes] = {}
            removed: list[str] = []
            for key, pod in self.pods.items():
                if not which(pod):
                    continue
                uid = translate.workload_uid(self.cluster_id, *key)
                w = self._workload(pod)
                if w is None:
                    removed.append(uid)
                else:
                    ups[uid] = wl.Address(workload=w).SerializeToString()
            self.store.update(ADDRESS_TYPE, ups, removed)

    def rebuild(self) -> None:
        """Recompute every resource and make the store exactly that set."""
        with self._lock:
            self.waypoints = translate.waypoints(self.gateways.values(), self.gateway_classes, self.services)
            full: dict[str, bytes] = {}
            for svc in self.services.values():
                res = self._service(svc)
                if res is not None:
                    full[translate.service_key(svc)] = wl.Address(service=res).SerializeToString()
            for key, pod in self.pods.items():
                w = self._workload(pod)
                if w is not None:
                    uid = translate.workload_uid(self.cluster_id, *key)
                    full[uid] = wl.Address(workload=w).SerializeToString()
            self.store.replace(ADDRESS_TYPE, full)
            policies: dict[str, bytes] = {}
            for obj in self.policies.values():
                res = authz.convert(obj, self.root_namespace).policy
                if res is not None:
                    policies[authz.policy_key(obj)] = res.SerializeToString()
            self.store.replace(AUTHORIZATION_TYPE, policies)

    # ---- Kubernetes side effects -------------------------------------------------------------
    def publish_root_cert(self, namespace: str) -> None:
        """ConfigMap istio-ca-root-cert (key root-cert.pem) in the namespace, as istiod does."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        if namespace in self._published:
            return
        core = client.CoreV1Api(self.api_client)
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name=ROOT_CERT_CONFIGMAP, namespace=namespace,
                                         labels={"istio.io/config": "true"}),
            data={ROOT_CERT_KEY: self.root_pem})
        try:
            try:
                core.create_namespaced_config_map(namespace, body)
            except ApiException as e:
                if e.status != 409:
                    raise
                current = core.read_namespaced_config_map(ROOT_CERT_CONFIGMAP, namespace)
                if (current.data or {}).get(ROOT_CERT_KEY) != self.root_pem:
                    core.replace_namespaced_config_map(ROOT_CERT_CONFIGMAP, namespace, body)
            self._published.add(namespace)
        except ApiException as e:
            if e.status != 404:  # namespace gone meanwhile: nothing to publish
                log.warning("cannot publish %s in %s: %s %s", ROOT_CERT_CONFIGMAP, namespace,
                            e.status, e.reason)

    def ensure_istiod_service(self, namespace: str, revision: str, tls_port: int, plain_port: int) -> None:
        """Service istiod-<rev> (istiod's chart), pointing at our real listening ports."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        core = client.CoreV1Api(self.api_client)
        try:
            core.read_namespace(namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        name = "istiod" if revision in ("", "default") else f"istiod-{revision}"
        labels = {"app": "istiod", "istio": "pilot", "istio.io/rev": revision or "default",
                  "app.kubernetes.io/name": "istiod"}
        body = client.V1Service(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=labels),
            spec=client.V1ServiceSpec(
                selector={"app": "istiod", "istio.io/rev": revision or "default"},
                ports=[
                    client.V1ServicePort(name="grpc-xds", port=15010, target_port=plain_port, protocol="TCP"),
                    client.V1ServicePort(name="https-dns", port=15012, target_port=tls_port, protocol="TCP"),
                ],
            ),
        )
        try:
            core.create_namespaced_service(namespace, body)
        except ApiException as e:
            if e.status != 409:
                raise
            core.patch_namespaced_service(name, namespace, body)
