"""The Kubernetes objects a waypoint's Envoy config is computed from, and who the proxy is.

``Snapshot`` is an immutable-by-convention copy of the watched objects (plain JSON dicts keyed
``(namespace, name)``); ``Proxy`` is what the ADS stream's node says about the waypoint. The
helpers here answer the questions istiod's waypoint code asks: which services use this
waypoint, which pods back a service (or a DestinationRule subset), on which target port.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sandbox.pilot.translate import hostname, selects

Obj = dict[str, Any]
Key = tuple[str, str]

USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR = "istio.io/waypoint-for"
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
INBOUND_BINDING = "ambient.istio.io/waypoint-inbound-binding"


@dataclass
class Snapshot:
    namespaces: dict[str, Obj] = field(default_factory=dict)
    services: dict[Key, Obj] = field(default_factory=dict)
    pods: dict[Key, Obj] = field(default_factory=dict)
    virtualservices: dict[Key, Obj] = field(default_factory=dict)
    destinationrules: dict[Key, Obj] = field(default_factory=dict)
    envoyfilters: dict[Key, Obj] = field(default_factory=dict)
    gateways: dict[Key, Obj] = field(default_factory=dict)
    gatewayclasses: dict[str, Obj] = field(default_factory=dict)
    root_namespace: str = "istio-system"


@dataclass
class Proxy:
    """A waypoint proxy as its node announces itself (``waypoint~IP~pod.ns~ns.svc.cluster.local``)."""

    node_id: str
    ip: str
    pod: str
    namespace: str
    labels: dict[str, str]
    istio_version: str = ""

    @property
    def gateway(self) -> str:
        """The Gateway this proxy implements (istiod's pods carry its name as a label)."""
        return self.labels.get(GATEWAY_NAME) or self.pod.rsplit("-", 2)[0]


class NodeIdError(ValueError):
    pass


def parse_proxy(node_id: str, metadata: Mapping[str, Any]) -> Proxy:
    parts = node_id.split("~")
    if len(parts) != 4 or parts[0] != "waypoint":
        raise NodeIdError(f"node id {node_id!r} is not waypoint~IP~POD.NS~NS.svc.cluster.local")
    pod, _, ns = parts[2].rpartition(".")
    if not pod or not ns:
        raise NodeIdError(f"node id {node_id!r}: third part must be POD.NAMESPACE")
    labels = metadata.get("LABELS") or {}
    return Proxy(
        node_id=node_id,
        ip=parts[1],
        pod=pod,
        namespace=str(metadata.get("NAMESPACE") or ns),
        labels={str(k): str(v) for k, v in dict(labels).items()},
        istio_version=str(metadata.get("ISTIO_VERSION") or ""),
    )


def labels_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def annotations_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def waypoint_for(snap: Snapshot, proxy: Proxy) -> str:
    gw = snap.gateways.get((proxy.namespace, proxy.gateway))
    value = labels_of(gw or {}).get(WAYPOINT_FOR) or labels_of(
        snap.services.get((proxy.namespace, proxy.gateway), {})
    ).get(WAYPOINT_FOR)
    return value or "service"


def service_waypoint(snap: Snapshot, svc: Obj) -> tuple[str, str] | None:
    """(namespace, name) of the waypoint a Service uses: its own label, else its namespace's;
    ``none`` on the Service opts out (istiod's rule)."""
    ns = svc["metadata"]["namespace"]
    own = labels_of(svc)
    if own.get(USE_WAYPOINT):
        if own[USE_WAYPOINT] == "none":
            return None
        return own.get(USE_WAYPOINT_NAMESPACE) or ns, own[USE_WAYPOINT]
    ns_labels = labels_of(snap.namespaces.get(ns, {}))
    name = ns_labels.get(USE_WAYPOINT)
    if not name or name == "none":
        return None
    return ns_labels.get(USE_WAYPOINT_NAMESPACE) or ns, name


def bound_services(snap: Snapshot, proxy: Proxy) -> list[Obj]:
    """Services this waypoint serves, sorted by hostname (stable config order)."""
    if waypoint_for(snap, proxy) not in ("service", "all"):
        return []
    me = (proxy.namespace, proxy.gateway)
    out = []
    for (ns, name), svc in snap.services.items():
        if (ns, name) == me or not vips(svc):
            continue
        if service_waypoint(snap, svc) == me:
            out.append(svc)
    return sorted(out, key=hostname)


def vips(svc: Obj) -> list[str]:
    spec = svc.get("spec") or {}
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return [ip for ip in ips if ip and ip != "None"]


def pod_ready(pod: Obj) -> bool:
    md, st = pod.get("metadata") or {}, pod.get("status") or {}
    if md.get("deletionTimestamp") or not st.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


def target_port(port: Mapping[str, Any], pod: Obj) -> int | None:
    tp = port.get("targetPort")
    if tp in (None, ""):
        return int(port["port"])
    if isinstance(tp, int) or str(tp).isdigit():
        return int(tp)
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == tp:
                return int(p["containerPort"])
    return None


def endpoints(
    snap: Snapshot, svc: Obj, port: Mapping[str, Any], subset_labels: Mapping[str, str]
) -> list[tuple[str, int]]:
    """(pod IP, target port) of the ready pods behind ``svc`` whose labels include ``subset_labels``."""
    out = []
    for pod in snap.pods.values():
        if not selects(svc, pod) or not pod_ready(pod):
            continue
        labels = labels_of(pod)
        if any(labels.get(k) != v for k, v in subset_labels.items()):
            continue
        tp = target_port(port, pod)
        if tp is not None:
            out.append((pod["status"]["podIP"], tp))
    return sorted(out)


def port_protocol(port: Mapping[str, Any]) -> str:
    """istiod's protocol selection: appProtocol, else the port name's prefix; unknown -> sniffed."""
    value = str(port.get("appProtocol") or port.get("name") or "").lower()
    head = value.split("-", 1)[0]
    if head in ("http", "http2", "grpc", "grpc-web", "h2c") or value.startswith("kubernetes.io/h2c"):
        return "http"
    if head in ("tcp", "tls", "https", "mongo", "redis", "mysql"):
        return "tcp"
    return "sniff"


def service_by_host(snap: Snapshot, host: str, namespace: str) -> Obj | None:
    """A Service by FQDN, or by short name (``name`` / ``name.ns``) relative to ``namespace``."""
    parts = host.split(".")
    if len(parts) == 1:
        return snap.services.get((namespace, parts[0]))
    if len(parts) == 2 or (len(parts) >= 3 and parts[2] == "svc"):
        return snap.services.get((parts[1], parts[0]))
    return None


def created(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("creationTimestamp") or "")
