"""Per-waypoint resource stores, kept current from the Kubernetes API, routed to ``waypoint~`` nodes.

``WaypointXds.router`` plugs into the ADS server: a ``waypoint~`` node gets a ResourceStore of
its own (Listener, Cluster, ClusterLoadAssignment), every other node the shared workload store.
Watches (list + watch, the pilot's ``Watcher``) on namespaces, services, pods, VirtualServices,
DestinationRules, EnvoyFilters, Gateways and GatewayClasses mark the config dirty; one worker
thread rebuilds every connected proxy's config (debounced by a few ms) and the store pushes
only what changed. EnvoyFilters that do not parse, or that break the config they patch, are
skipped, logged once per reason and reported in their ``status``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sandbox.pilot.server import AuthError, ResourceStore
from sandbox.pilot.waypointxds import binding, encode, envoyfilter
from sandbox.pilot.waypointxds import build as builder
from sandbox.pilot.waypointxds import inputs as inp

log = logging.getLogger("sandbox.pilot.waypoint")
TYPES = (encode.LISTENER, encode.CLUSTER, encode.ENDPOINT)
DEBOUNCE_S = 0.02


def _key(obj: inp.Obj) -> inp.Key:
    md = obj["metadata"]
    return md.get("namespace", ""), md["name"]


def _struct(value: Any) -> Any:
    """google.protobuf.Value / Struct -> plain Python."""
    from google.protobuf import json_format

    return json_format.MessageToDict(value)


class _Entry:
    def __init__(self, proxy: inp.Proxy) -> None:
        self.proxy = proxy
        self.store = ResourceStore()
        self.refs = 0
        self.labels_from_pod = False  # no LABELS in the node metadata: the pod's labels, as istiod has them


class WaypointXds:
    def __init__(self, api_client: Any, root_namespace: str = "istio-system") -> None:
        self.api_client = api_client
        self.snap = inp.Snapshot(root_namespace=root_namespace)
        self._lock = threading.RLock()
        self._proxies: dict[str, _Entry] = {}
        self._filters: dict[inp.Key, envoyfilter.ParsedFilter] = {}
        self._filter_errors: dict[inp.Key, str] = {}
        self._reported: dict[inp.Key, str] = {}
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._watchers: list[Any] = []
        self.builds = 0

    # ---- ADS routing ---------------------------------------------------------------------------
    def router(self, node: Any) -> tuple[ResourceStore, Callable[[], None]] | None:
        if not node.id.startswith("waypoint~"):
            return None
        md = {k: _struct(v) for k, v in node.metadata.fields.items()}
        try:
            proxy = inp.parse_proxy(node.id, md)
        except inp.NodeIdError as e:
            raise AuthError("INVALID_ARGUMENT", str(e)) from None
        with self._lock:
            entry = self._proxies.get(node.id)
            if entry is None:
                entry = self._proxies[node.id] = _Entry(proxy)
            entry.proxy = proxy
            entry.labels_from_pod = not proxy.labels
            entry.refs += 1
            self._rebuild_one(entry)
        log.info("waypoint %s connected (gateway %s/%s)", node.id, proxy.namespace, proxy.gateway)

        def release() -> None:
            with self._lock:
                entry.refs -= 1
                if entry.refs <= 0 and self._proxies.get(node.id) is entry:
                    del self._proxies[node.id]
            log.info("waypoint %s disconnected", node.id)

        return entry.store, release

    # ---- building ------------------------------------------------------------------------------
    def config_for(self, proxy: inp.Proxy) -> tuple[builder.Config, list[tuple[inp.Key, str]]]:
        cfg = builder.build(self.snap, proxy)
        failures = envoyfilter.apply(cfg, list(self._filters.values()), proxy, self.snap.root_namespace)
        binding.render(cfg, self.snap, proxy)
        return cfg, failures

    def _rebuild_one(self, entry: _Entry) -> None:
        if entry.labels_from_pod:
            pod = self.snap.pods.get((entry.proxy.namespace, entry.proxy.pod))
            entry.proxy.labels = inp.labels_of(pod or {})
        cfg, failures = self.config_for(entry.proxy)
        for key, reason in failures:
            self._report(key, reason)
        for w in cfg.warnings:
            log.debug("waypoint %s: %s", entry.proxy.node_id, w)
        out: dict[str, dict[str, bytes]] = {t: {} for t in TYPES}
        for listener in cfg.listeners:
            self._encode(out, encode.LISTENER, listener["name"], listener)
        for cluster in cfg.clusters:
            self._encode(out, encode.CLUSTER, cluster["name"], cluster)
        for name, cla in cfg.endpoints.items():
            self._encode(out, encode.ENDPOINT, name, cla)
        # clusters before listeners that may name them, endpoints before clusters wait on them
        for t in (encode.ENDPOINT, encode.CLUSTER, encode.LISTENER):
            entry.store.replace(t, out[t])
        self.builds += 1

    @staticmethod
    def _encode(out: dict[str, dict[str, bytes]], type_url: str, name: str, value: dict[str, Any]) -> None:
        try:
            out[type_url][name] = encode.serialize(type_url, value)
        except encode.EncodeError as e:  # a bug of ours: never take the whole push down for it
            log.error("cannot encode %s %s: %s", type_url.rsplit(".", 1)[-1], name, e)

    def rebuild_all(self) -> None:
        with self._lock:
            for entry in list(self._proxies.values()):
                try:
                    self._rebuild_one(entry)
                except Exception:  # noqa: BLE001 - one proxy's failure must not stop the others
                    log.exception("waypoint %s: rebuild failed", entry.proxy.node_id)

    def _worker(self) -> None:
        while not self._stop.is_set():
            if not self._dirty.wait(0.5):
                continue
            time.sleep(DEBOUNCE_S)
            self._dirty.clear()
            self.rebuild_all()

    # ---- EnvoyFilter bookkeeping ---------------------------------------------------------------
    def _set_filter(self, obj: inp.Obj | None, key: inp.Key) -> None:
        self._filters.pop(key, None)
        self._filter_errors.pop(key, None)
        if obj is None:
            self._reported.pop(key, None)
            return
        try:
            self._filters[key] = envoyfilter.parse(obj)
            self._report(key, None, obj)
        except envoyfilter.InvalidFilter as e:
            self._filter_errors[key] = str(e)
            self._report(key, str(e), obj)

    def _report(self, key: inp.Key, reason: str | None, obj: inp.Obj | None = None) -> None:
        """Log (once per reason) and write status.conditions/validationMessages on the EnvoyFilter."""
        if self._reported.get(key) == (reason or ""):
            return
        self._reported[key] = reason or ""
        if reason:
            log.warning("EnvoyFilter %s/%s skipped: %s", key[0], key[1], reason)
        obj = obj if obj is not None else self.snap.envoyfilters.get(key)
        if obj is None:
            return
        status = {
            "conditions": [
                {
                    "type": "Reconciled",
                    "status": "False" if reason else "True",
                    "reason": "Invalid" if reason else "Accepted",
                    "message": reason or "",
                    "observedGeneration": (obj.get("metadata") or {}).get("generation", 0),
                }
            ],
            "validationMessages": [
                {
                    "type": {"code": "IST0151", "name": "EnvoyFilterUsage"},
                    "level": "ERROR",
                    "description": reason,
                }
            ]
            if reason
            else [],
        }
        current = obj.get("status") or {}
        if current == status or (not reason and not current):
            return  # nothing to say about a valid filter that was never reported
        threading.Thread(target=self._write_status, args=(key, status), daemon=True).start()

    def _write_status(self, key: inp.Key, status: dict[str, Any]) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        api = client.CustomObjectsApi(self.api_client)
        try:
            api.patch_namespaced_custom_object(
                "networking.istio.io", "v1alpha3", key[0], "envoyfilters", key[1], {"status": status}
            )
        except ApiException as e:
            if e.status != 404:
                log.warning("cannot write status of EnvoyFilter %s/%s: %s %s", *key, e.status, e.reason)

    # ---- watches -------------------------------------------------------------------------------
    def _table(self, kind: str) -> dict[Any, inp.Obj]:
        return getattr(self.snap, kind)

    def _on_list(self, kind: str) -> Callable[[list[inp.Obj]], None]:
        def handler(items: list[inp.Obj]) -> None:
            with self._lock:
                table = self._table(kind)
                old = dict(table)
                table.clear()
                for o in items:
                    k = o["metadata"]["name"] if kind in ("namespaces", "gatewayclasses") else _key(o)
                    table[k] = o
                if kind == "envoyfilters":
                    for k in set(old) - set(table):
                        self._set_filter(None, k)
                    for k, o in table.items():
                        if (
                            _spec(old.get(k)) != _spec(o)
                            or k not in self._filters
                            and k not in self._filter_errors
                        ):
                            self._set_filter(o, k)
            self._dirty.set()

        return handler

    def _on_event(self, kind: str) -> Callable[[str, inp.Obj], None]:
        def handler(ev: str, obj: inp.Obj) -> None:
            k = obj["metadata"]["name"] if kind in ("namespaces", "gatewayclasses") else _key(obj)
            with self._lock:
                table = self._table(kind)
                old = table.get(k)
                if ev == "DELETED":
                    table.pop(k, None)
                else:
                    table[k] = obj
                if kind == "envoyfilters":
                    if ev == "DELETED":
                        self._set_filter(None, k)
                    elif _spec(old) != _spec(obj):
                        self._set_filter(obj, k)
                    else:
                        return  # a status write of ours: nothing to rebuild
            self._dirty.set()

        return handler

    def start(self) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        from sandbox.pilot.controller import Watcher

        core = client.CoreV1Api(self.api_client)
        custom = client.CustomObjectsApi(self.api_client)

        def lister(group: str, version: str, plural: str) -> Callable[..., Any]:
            def fn(**kw: Any) -> Any:
                return custom.list_cluster_custom_object(group, version, plural, **kw)

            return fn

        specs: list[tuple[str, Callable[..., Any]]] = [
            ("namespaces", core.list_namespace),
            ("services", core.list_service_for_all_namespaces),
            ("pods", core.list_pod_for_all_namespaces),
            ("virtualservices", lister("networking.istio.io", "v1beta1", "virtualservices")),
            ("destinationrules", lister("networking.istio.io", "v1beta1", "destinationrules")),
            ("envoyfilters", lister("networking.istio.io", "v1alpha3", "envoyfilters")),
            ("gateways", lister("gateway.networking.k8s.io", "v1", "gateways")),
            ("gatewayclasses", lister("gateway.networking.k8s.io", "v1", "gatewayclasses")),
        ]
        for kind, fn in specs:
            try:
                fn(limit=1)
            except ApiException as e:
                if e.status == 404:  # the API server does not serve this kind: nothing to watch
                    log.info("waypoint xds: %s not served by the API server; not watched", kind)
                    continue
            w = Watcher(f"waypoint-{kind}", fn, self._on_list(kind), self._on_event(kind), self._stop)
            self._watchers.append(w)
            w.start()
        threading.Thread(target=self._worker, name="waypoint-xds", daemon=True).start()

    def wait_synced(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        return all(w.synced.wait(max(0.0, deadline - time.monotonic())) for w in self._watchers)

    def stop(self) -> None:
        self._stop.set()


def _spec(obj: inp.Obj | None) -> str:
    return json.dumps((obj or {}).get("spec"), sort_keys=True) if obj is not None else ""
