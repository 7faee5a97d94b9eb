"""Render ``State`` as ztunnel's /config_dump objects, the shapes ``istioctl zc -o json`` reads.

Kept apart from state.py because it needs the protobuf modules (records hold the raw bytes
of each service and policy, and a workload's shared profile holds its serialized remainder;
they are decoded here, only when someone asks for a dump).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from daemon.xds.gen.istio.security import authorization_pb2 as az
from daemon.xds.gen.istio.workload import workload_pb2 as wl

if TYPE_CHECKING:
    from daemon.state import State, WorkloadRecord

_PROTOCOL = {0: "TCP", 1: "HBONE", 2: "LegacyIstioMtls"}
_WL_TYPE = {0: "deployment", 1: "cronjob", 2: "pod", 3: "job"}
_LB_MODE = {0: "Standard", 1: "Strict", 2: "Failover", 3: "Passthrough"}
_SCOPES = {0: "Unspecified", 1: "Region", 2: "Zone", 3: "Subzone", 4: "Node", 5: "Cluster", 6: "Network"}
_HEALTH = {0: "OnlyHealthy", 1: "AllowAll"}
_IP_FAMILIES = {1: "IPv4", 2: "IPv6", 3: "Dual"}
_POL_SCOPE = {0: "Global", 1: "Namespace", 2: "WorkloadSelector"}
_POL_ACTION = {0: "Allow", 1: "Deny"}


def ip(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def _gateway(g: wl.GatewayAddress) -> dict[str, Any]:
    kind = g.WhichOneof("destination")
    if kind == "hostname":
        dest = f"{g.hostname.namespace}/{g.hostname.hostname}"
    else:
        dest = f"{g.address.network}/{ip(g.address.address)}"
    return {"destination": dest, "hboneMtlsPort": g.hbone_mtls_port}


def workload_message(rec: WorkloadRecord) -> wl.Workload:
    """The full Workload of a record: its profile's remainder plus uid, name and addresses."""
    w = wl.Workload.FromString(rec.profile.rest)
    w.uid = rec.uid
    w.name = rec.name
    w.addresses.extend(rec.addresses)
    return w


def workload_address_bytes(rec: WorkloadRecord) -> bytes:
    """The record as a serialized ``istio.workload.Address`` (what ``WorkloadRecord.raw`` returns)."""
    return wl.Address(workload=workload_message(rec)).SerializeToString()


def workload_json(w: wl.Workload) -> dict[str, Any]:
    out: dict[str, Any] = {
        "uid": w.uid,
        "workloadIps": [ip(a) for a in w.addresses],
        "protocol": _PROTOCOL.get(w.tunnel_protocol, "TCP"),
        "status": "Healthy" if w.status == 0 else "Unhealthy",
        "name": w.name,
        "namespace": w.namespace,
        "serviceAccount": w.service_account,
        "trustDomain": w.trust_domain or "cluster.local",
        "workloadName": w.workload_name,
        "workloadType": _WL_TYPE.get(w.workload_type, "deployment"),
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "clusterId": w.cluster_id,
        "node": w.node,
        "network": w.network,
        "capacity": w.capacity.value if w.HasField("capacity") else 1,
        "nativeTunnel": w.native_tunnel,
        "authorizationPolicies": list(w.authorization_policies),
        "services": {k: {str(p.service_port): p.target_port for p in v.ports}
                     for k, v in w.services.items()},
    }
    if w.hostname:
        out["hostname"] = w.hostname
    if w.HasField("waypoint"):
        out["waypoint"] = _gateway(w.waypoint)
    if w.HasField("network_gateway"):
        out["networkGateway"] = _gateway(w.network_gateway)
    if w.HasField("locality"):
        loc = w.locality
        out["locality"] = {"region": loc.region, "zone": loc.zone, "subzone": loc.subzone}
    if w.HasField("application_tunnel"):
        out["applicationTunnel"] = {"protocol": "PROXY" if w.application_tunnel.protocol == 1 else "NONE",
                                    "port": w.application_tunnel.port}
    return out


def service_json(s: wl.Service, state: State) -> dict[str, Any]:
    from daemon.state import resolve_target_port

    name = f"{s.namespace}/{s.hostname}"
    vips, cidrs = [], []
    for a in s.addresses:
        text = f"{a.network}/{ip(a.address)}"
        if a.HasField("length"):
            cidrs.append(f"{text}/{a.length}")
        else:
            vips.append(text)
    endpoints: dict[str, Any] = {}
    for w in state.member_records(name):
        uid = w.uid
        addr = f"{w.network}/{ip(w.addresses[0])}" if w.addresses else ""
        ports = {}
        for sp, tp in ((p.service_port, p.target_port) for p in s.ports):
            target = resolve_target_port(name, sp, tp, w)
            if target:
                ports[str(sp)] = target
        endpoints[f"{uid}:{addr}"] = {"workloadUid": uid, "service": name, "address": addr, "port": ports,
                                      "status": "Healthy" if w.status == 0 else "Unhealthy"}
    out: dict[str, Any] = {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": vips,
        "ports": {str(p.service_port): p.target_port for p in s.ports},
        "endpoints": endpoints,
        "subjectAltNames": list(s.subject_alt_names),
        "canonical": s.canonical,
    }
    if cidrs:
        out["cidrVips"] = cidrs
    if s.HasField("load_balancing"):
        lb = s.load_balancing
        out["loadBalancer"] = {"mode": _LB_MODE.get(lb.mode, "Standard"),
                               "routingPreferences": [_SCOPES.get(x, str(x)) for x in lb.routing_preference],
                               "healthPolicy": _HEALTH.get(lb.health_policy, "OnlyHealthy")}
    if s.HasField("waypoint"):
        out["waypoint"] = _gateway(s.waypoint)
    if s.ip_families in _IP_FAMILIES:
        out["ipFamilies"] = _IP_FAMILIES[s.ip_families]
    if s.visibility:
        out["visibility"] = "Namespace"
    return out


def _string_match(m: az.StringMatch) -> dict[str, Any]:
    kind = m.WhichOneof("match_type")
    if kind == "presence":
        return {"Presence": {}}
    return {(kind or "exact").capitalize(): getattr(m, kind) if kind else ""}


def _match_json(m: az.Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field_name, key in (("namespaces", "namespaces"), ("not_namespaces", "notNamespaces"),
                            ("principals", "principals"), ("not_principals", "notPrincipals")):
        vals = getattr(m, field_name)
        if vals:
            out[key] = [_string_match(v) for v in vals]
    for field_name, key in (("source_ips", "sourceIps"), ("not_source_ips", "notSourceIps"),
                            ("destination_ips", "destinationIps"),
                            ("not_destination_ips", "notDestinationIps")):
        vals = getattr(m, field_name)
        if vals:
            out[key] = [f"{ip(a.address)}/{a.length}" for a in vals]
    if m.destination_ports:
        out["destinationPorts"] = list(m.destination_ports)
    if m.not_destination_ports:
        out["notDestinationPorts"] = list(m.not_destination_ports)
    for field_name, key in (("service_accounts", "serviceAccounts"),
                            ("not_service_accounts", "notServiceAccounts")):
        vals = getattr(m, field_name)
        if vals:
            out[key] = [{"namespace": v.namespace, "serviceAccount": v.serviceAccount} for v in vals]
    return out


def policy_json(p: az.Authorization) -> dict[str, Any]:
    return {
        "name": p.name,
        "namespace": p.namespace,
        "scope": _POL_SCOPE.get(p.scope, "Global"),
        "action": _POL_ACTION.get(p.action, "Allow"),
        "rules": [[[_match_json(m) for m in c.matches] for c in r.clauses] for r in p.rules],
        "dryRun": p.dry_run,
    }


def config_dump(state: State) -> dict[str, list[dict[str, Any]]]:
    """Caller holds the state lock."""
    workloads = [workload_json(workload_message(w)) for w in state.workloads.values()]
    services = [service_json(wl.Address.FromString(s.raw).service, state) for s in state.services.values()]
    policies = [policy_json(az.Authorization.FromString(p.raw)) for p in state.policies.values()]
    workloads.sort(key=lambda w: (w["namespace"], w["name"], w["node"]))
    services.sort(key=lambda s: (s["namespace"], s["hostname"]))
    policies.sort(key=lambda p: (p["namespace"], p["name"]))
    return {"workloads": workloads, "services": services, "policies": policies}
