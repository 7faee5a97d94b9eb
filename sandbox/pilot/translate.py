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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
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


def service_resource(svc: Mapping[str, Any]) -> wl.Service | None:
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
