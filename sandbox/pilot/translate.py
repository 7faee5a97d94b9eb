"""Kubernetes objects (plain JSON dicts) -> istio.workload resources, the way istiod builds them.

Pure functions, so they are testable without any server. Rules (istio pilot/pkg/serviceregistry/
ambient, summarised in shared/reference/workload-xds.md):

- Workload uid ``<cluster>//Pod/<ns>/<name>``; HEALTHY only when the pod is Ready and not
  being deleted; node = spec.nodeName; locality from topology labels (pod, else node).
- ``services`` maps ``ns/hostname`` of every Service whose selector matches the pod to a
  PortList: numeric targetPort as is, a named one resolved from the pod's container ports
  (dropped when unresolvable), a missing one = the service port.
- Service resource ``ns/<name>.<ns>.svc.cluster.local``: VIPs from spec.clusterIPs (none for a
  headless service), ports with numeric target ports (0 when named), trafficDistribution
  PreferClose -> FAILOVER over network/region/zone/subzone, internalTrafficPolicy Local ->
  STRICT on node.
- Waypoints (bottom of this file): a Service or pod that uses a waypoint Gateway carries its
  GatewayAddress (the waypoint Service's ClusterIP, HBONE port 15008); a waypoint's own pods
  carry ``application_tunnel`` PROXY when the Gateway (or class) has an inbound binding.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from daemon.xds.gen.istio.workload import workload_pb2 as wl

DOMAIN = "cluster.local"
REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"
DATAPLANE_MODE = "istio.io/dataplane-mode"
TRAFFIC_DISTRIBUTION = "networking.istio.io/traffic-distribution"


def hostname(svc: Mapping[str, Any]) -> str:
    md = svc["metadata"]
    return f"{md['name']}.{md['namespace']}.svc.{DOMAIN}"


def service_key(svc: Mapping[str, Any]) -> str:
    return f"{svc['metadata']['namespace']}/{hostname(svc)}"


def workload_uid(cluster_id: str, namespace: str, name: str) -> str:
    return f"{cluster_id}//Pod/{namespace}/{name}"


def _ip_bytes(text: str) -> bytes | None:
    try:
        return ipaddress.ip_address(text).packed
    except ValueError:
        return None


def selects(svc: Mapping[str, Any], pod: Mapping[str, Any]) -> bool:
    spec = svc.get("spec") or {}
    selector = spec.get("selector") or {}
    if not selector or spec.get("type") == "ExternalName":
        return False
    if svc["metadata"]["namespace"] != pod["metadata"]["namespace"]:
        return False
    labels = pod["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _target(port: Mapping[str, Any]) -> int | str:
    tp = port.get("targetPort")
    if tp is None or tp == "":
        return int(port["port"])
    if isinstance(tp, int):
        return tp
    return int(tp) if str(tp).isdigit() else str(tp)


def _container_ports(pod: Mapping[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name"):
                out.setdefault(p["name"], int(p["containerPort"]))
    return out


def service_resource(svc: Mapping[str, Any], waypoint: wl.GatewayAddress | None = None) -> wl.Service | None:
    spec = svc.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return None
    md = svc["metadata"]
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    raw = [_ip_bytes(i) for i in ips if i != "None"]
    addrs = [wl.NetworkAddress(network="", address=b) for b in raw if b]
    out = wl.Service(name=md["name"], namespace=md["namespace"], hostname=hostname(svc), addresses=addrs)
    for p in spec.get("ports") or []:
        if (p.get("protocol") or "TCP") != "TCP":
            continue
        t = _target(p)
        out.ports.add(service_port=int(p["port"]), target_port=t if isinstance(t, int) else 0)
    annotations = md.get("annotations") or {}
    distribution = spec.get("trafficDistribution") or annotations.get(TRAFFIC_DISTRIBUTION)
    lb = wl.LoadBalancing
    if distribution == "PreferClose":
        out.load_balancing.mode = lb.FAILOVER
        out.load_balancing.routing_preference.extend([lb.NETWORK, lb.REGION, lb.ZONE, lb.SUBZONE])
    elif spec.get("internalTrafficPolicy") == "Local":
        out.load_balancing.mode = lb.STRICT
        out.load_balancing.routing_preference.append(lb.NODE)
    if spec.get("publishNotReadyAddresses"):
        out.load_balancing.health_policy = lb.ALLOW_ALL
    if waypoint is not None:
        out.waypoint.CopyFrom(waypoint)
    return out


def pod_ready(pod: Mapping[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def _workload_meta(pod: Mapping[str, Any]) -> tuple[int, str]:
    md = pod["metadata"]
    for ref in md.get("ownerReferences") or []:
        kind, name = ref.get("kind"), ref.get("name", "")
        if kind == "ReplicaSet":
            return wl.DEPLOYMENT, name.rsplit("-", 1)[0] if "-" in name else name
        if kind == "Job":
            return wl.JOB, name
        if kind in ("DaemonSet", "StatefulSet", "Deployment"):
            return wl.DEPLOYMENT, name
    return wl.POD, md["name"]


def pod_workload(
    pod: Mapping[str, Any],
    services: Iterable[Mapping[str, Any]],
    cluster_id: str,
    namespace_labels: Mapping[str, str] | None = None,
    node_labels: Mapping[str, str] | None = None,
    waypoint: wl.GatewayAddress | None = None,
    app_tunnel: wl.ApplicationTunnel | None = None,
) -> wl.Workload | None:
    """The Workload for a pod, or None when istiod would not publish it (no IP, finished)."""
    md = pod["metadata"]
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    ips = [i.get("ip") for i in status.get("podIPs") or [] if i.get("ip")] or (
        [status["podIP"]] if status.get("podIP") else [])
    addrs = [b for b in (_ip_bytes(i) for i in ips) if b]
    if not addrs:
        return None
    labels = md.get("labels") or {}
    ns_labels = namespace_labels or {}
    mode = labels.get(DATAPLANE_MODE) or ns_labels.get(DATAPLANE_MODE) or ""
    wtype, wname = _workload_meta(pod)
    out = wl.Workload(
        uid=workload_uid(cluster_id, md["namespace"], md["name"]),
        name=md["name"],
        namespace=md["namespace"],
        addresses=addrs,
        network="",
        tunnel_protocol=wl.HBONE if mode.lower() == "ambient" else wl.NONE,
        trust_domain=DOMAIN,
        service_account=spec.get("serviceAccountName") or "default",
        node=spec.get("nodeName") or "",
        canonical_name=labels.get("service.istio.io/canonical-name") or labels.get("app.kubernetes.io/name")
        or labels.get("app") or wname,
        canonical_revision=labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version") or labels.get("version") or "latest",
        workload_type=wtype,
        workload_name=wname,
        status=wl.HEALTHY if pod_ready(pod) else wl.UNHEALTHY,
        cluster_id=cluster_id,
        network_mode=wl.HOST_NETWORK if spec.get("hostNetwork") else wl.STANDARD,
    )
    if waypoint is not None:
        out.waypoint.CopyFrom(waypoint)
    if app_tunnel is not None:
        out.application_tunnel.CopyFrom(app_tunnel)
    nl = node_labels or {}
    region = labels.get(REGION_LABEL) or nl.get(REGION_LABEL) or ""
    zone = labels.get(ZONE_LABEL) or nl.get(ZONE_LABEL) or ""
    subzone = labels.get(SUBZONE_LABEL) or nl.get(SUBZONE_LABEL) or ""
    if region or zone or subzone:
        out.locality.region, out.locality.zone, out.locality.subzone = region, zone, subzone
    named = _container_ports(pod)
    for svc in services:
        if not selects(svc, pod):
            continue
        plist = out.services[service_key(svc)]
        for p in (svc.get("spec") or {}).get("ports") or []:
            if (p.get("protocol") or "TCP") != "TCP":
                continue
            t = _target(p)
            target = t if isinstance(t, int) else named.get(t)
            if target:
                plist.ports.add(service_port=int(p["port"]), target_port=target)
    return out


# ---- waypoints (istio pilot/pkg/serviceregistry/kube/controller/ambient/waypoints.go) ----------

USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR = "istio.io/waypoint-for"
INBOUND_BINDING = "ambient.istio.io/waypoint-inbound-binding"
MANAGED_GATEWAY = "gateway.istio.io/managed"
MESH_CONTROLLER_VALUE = "istio.io-mesh-controller"
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_CLASS = "istio-waypoint"
MESH_CONTROLLER = "istio.io/mesh-controller"
HBONE_MTLS_PORT = 15008
TRAFFIC_TYPES = ("service", "workload", "all", "none")


@dataclass(frozen=True)
class Waypoint:
    """A waypoint Gateway that has an address: what services and workloads that use it carry."""

    namespace: str
    name: str
    address: bytes  # its Service's ClusterIP (packed)
    traffic_type: str  # service | workload | all | none
    binding_port: int | None = None  # inbound binding PROXY/<port> (0: PROXY without a port)

    def gateway_address(self) -> wl.GatewayAddress:
        return wl.GatewayAddress(address=wl.NetworkAddress(network="", address=self.address),
                                 hbone_mtls_port=HBONE_MTLS_PORT)


def _labels(obj: Mapping[str, Any] | None) -> Mapping[str, str]:
    return ((obj or {}).get("metadata") or {}).get("labels") or {}


def _parse_binding(value: str | None) -> int | None:
    """``PROXY`` -> 0, ``PROXY/15088`` -> 15088; anything else -> None (no binding)."""
    if not value:
        return None
    proto, _, port = value.strip().partition("/")
    if proto != "PROXY":
        return None
    if not port:
        return 0
    return int(port) if port.isdigit() and 0 < int(port) < 65536 else None


def is_waypoint_gateway(gw: Mapping[str, Any], gateway_class: Mapping[str, Any] | None) -> bool:
    if (gw.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS:
        return True
    return (((gateway_class or {}).get("spec") or {}).get("controllerName")) == MESH_CONTROLLER


def waypoints(gateways: Iterable[Mapping[str, Any]], classes: Mapping[str, Mapping[str, Any]],
              services: Mapping[tuple[str, str], Mapping[str, Any]]) -> dict[tuple[str, str], Waypoint]:
    """(namespace, name) -> Waypoint for every waypoint Gateway with an address.

    The address is the Gateway's status IPAddress (written by the gateway controller), else its
    Service's ClusterIP; a Gateway with neither is not (yet) a waypoint, as in istiod.
    waypoint-for comes from the Gateway's label, else its GatewayClass's, default ``service``.
    """
    out: dict[tuple[str, str], Waypoint] = {}
    for gw in gateways:
        md = gw["metadata"]
        if md.get("deletionTimestamp"):
            continue
        gclass = classes.get((gw.get("spec") or {}).get("gatewayClassName") or "")
        if not is_waypoint_gateway(gw, gclass):
            continue
        ns, name = md["namespace"], md["name"]
        addr: bytes | None = None
        for a in (gw.get("status") or {}).get("addresses") or []:
            if a.get("type", "IPAddress") == "IPAddress" and a.get("value"):
                addr = _ip_bytes(str(a["value"]))
                if addr:
                    break
        if addr is None:
            svc = services.get((ns, name))
            ip = ((svc or {}).get("spec") or {}).get("clusterIP")
            addr = _ip_bytes(ip) if ip and ip != "None" else None
        if addr is None:
            continue
        traffic = _labels(gw).get(WAYPOINT_FOR) or _labels(gclass).get(WAYPOINT_FOR) or "service"
        if traffic not in TRAFFIC_TYPES:
            traffic = "service"
        annotations = md.get("annotations") or {}
        class_annotations = ((gclass or {}).get("metadata") or {}).get("annotations") or {}
        binding = _parse_binding(annotations.get(INBOUND_BINDING) or class_annotations.get(INBOUND_BINDING))
        out[(ns, name)] = Waypoint(ns, name, addr, traffic, binding)
    return out


def _use_waypoint(labels: Mapping[str, str], fallback_namespace: str) -> tuple[tuple[str, str] | None, bool]:
    """(waypoint key, opted out) from istio.io/use-waypoint[-namespace] labels."""
    value = labels.get(USE_WAYPOINT)
    if value is None:
        return None, False
    if value == "none":
        return None, True
    return (labels.get(USE_WAYPOINT_NAMESPACE) or fallback_namespace, value), False


def _waypoint_for_target(obj: Mapping[str, Any], namespace_labels: Mapping[str, str],
                         index: Mapping[tuple[str, str], Waypoint],
                         accepts: tuple[str, ...]) -> Waypoint | None:
    md = obj["metadata"]
    if (md.get("labels") or {}).get(MANAGED_GATEWAY) == MESH_CONTROLLER_VALUE:
        return None  # a waypoint (or its Service) has no waypoint
    key, opted_out = _use_waypoint(md.get("labels") or {}, md["namespace"])
    if opted_out:
        return None
    if key is None:
        key, _ = _use_waypoint(namespace_labels, md["namespace"])
    found = index.get(key) if key else None
    return found if found is not None and found.traffic_type in accepts else None


def service_waypoint(svc: Mapping[str, Any], namespace_labels: Mapping[str, str],
                     index: Mapping[tuple[str, str], Waypoint]) -> wl.GatewayAddress | None:
    """The Service's waypoint: its own use-waypoint label, else its namespace's (``none`` opts out);
    only a waypoint for ``service`` or ``all`` traffic."""
    found = _waypoint_for_target(svc, namespace_labels, index, ("service", "all"))
    return found.gateway_address() if found else None


def workload_waypoint(pod: Mapping[str, Any], namespace_labels: Mapping[str, str],
                      index: Mapping[tuple[str, str], Waypoint]) -> wl.GatewayAddress | None:
    """The pod's waypoint (same rules, for ``workload`` or ``all`` waypoints)."""
    found = _waypoint_for_target(pod, namespace_labels, index, ("workload", "all"))
    return found.gateway_address() if found else None


def application_tunnel(pod: Mapping[str, Any],
                       index: Mapping[tuple[str, str], Waypoint]) -> wl.ApplicationTunnel | None:
    """PROXY {port} for the pods of a waypoint bound with waypoint-inbound-binding, else None."""
    labels = _labels(pod)
    if labels.get(MANAGED_GATEWAY) != MESH_CONTROLLER_VALUE or not labels.get(GATEWAY_NAME):
        return None
    found = index.get((pod["metadata"]["namespace"], labels[GATEWAY_NAME]))
    if found is None or found.binding_port is None:
        return None
    return wl.ApplicationTunnel(protocol=wl.ApplicationTunnel.PROXY, port=found.binding_port)
