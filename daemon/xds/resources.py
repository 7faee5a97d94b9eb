"""Decode and validate workload xDS resources into the typed records of ``daemon.state``.

Validation is per resource so a response with one bad resource can still apply the others
(ztunnel does the same): each failure is returned as ``(name, reason)`` and the client names
them in the NACK's error_detail as ``name: reason; ...``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from daemon.state import PolicyRecord, ServiceRecord, WorkloadRecord
from daemon.xds.gen.istio.security import authorization_pb2
from daemon.xds.gen.istio.workload import workload_pb2

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"

_ADDRESS_FROM = workload_pb2.Address.FromString
_AUTHZ_FROM = authorization_pb2.Authorization.FromString


class Invalid(ValueError):
    """A resource that must be rejected; the message is the NACK reason."""


def _check_ip(raw: bytes, what: str) -> bytes:
    if len(raw) not in (4, 16):
        raise Invalid(f"{what} has {len(raw)} bytes, want 4 or 16")
    return raw


def _check_ports(ports: Iterable, what: str) -> tuple[tuple[int, int], ...]:
    out = []
    for p in ports:
        sp, tp = p.service_port, p.target_port
        if not 1 <= sp <= 65535:
            raise Invalid(f"{what} service_port {sp} out of range 1-65535")
        if tp > 65535:
            raise Invalid(f"{what} target_port {tp} out of range 0-65535")
        out.append((sp, tp))
    return tuple(out)


def service_record(name: str, svc: workload_pb2.Service, raw: bytes, version: str) -> ServiceRecord:
    expected = f"{svc.namespace}/{svc.hostname}"
    if not svc.hostname or not svc.namespace:
        raise Invalid("service without namespace or hostname")
    if name and name != expected:
        raise Invalid(f"resource name does not match service {expected}")
    vips = tuple(_check_ip(a.address, "service address") for a in svc.addresses)
    ports = _check_ports(svc.ports, "service port")
    lb = svc.load_balancing
    return ServiceRecord(
        name=expected, namespace=svc.namespace, hostname=svc.hostname, vips=vips, ports=ports,
        lb_mode=lb.mode, routing=tuple(lb.routing_preference), health_policy=lb.health_policy,
        raw=raw, version=version,
    )


_NO_LOCALITY = ("", "", "")
_intern = sys.intern
_PORTS: dict[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]] = {}  # shared port lists


def _shared_ports(ports: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """Most workloads of a service carry the same PortList: keep one copy (memory at 100k)."""
    got = _PORTS.get(ports)
    if got is None:
        if len(_PORTS) > 65536:
            _PORTS.clear()
        _PORTS[ports] = got = ports
    return got


def workload_record(name: str, w: workload_pb2.Workload, raw: bytes, version: str) -> WorkloadRecord:
    """Hot path (100k workloads per initial push): plain loops, positional construction."""
    uid = w.uid
    if not uid:
        raise Invalid("workload without uid")
    if name and name != uid:
        raise Invalid(f"resource name does not match workload uid {uid}")
    addrs = tuple(w.addresses)
    for a in addrs:
        if len(a) != 4 and len(a) != 16:
            raise Invalid(f"workload address has {len(a)} bytes, want 4 or 16")
    services: dict[str, tuple[tuple[int, int], ...]] = {}
    svcs = w.services
    if svcs:
        for key in svcs:  # not .items(): that is a Python-level view over the upb map
            plist = svcs[key]
            if "/" not in key:
                raise Invalid(f"service key {key!r} is not namespace/hostname")
            ports = tuple([(p.service_port, p.target_port) for p in plist.ports])
            for sp, tp in ports:
                if not 0 < sp < 65536 or tp > 65535:
                    raise Invalid(f"port of {key} {sp}->{tp} out of range")
            services[_intern(key)] = _shared_ports(ports)
    has = w.HasField
    if has("locality"):
        loc = w.locality
        locality = (_intern(loc.region), _intern(loc.zone), _intern(loc.subzone))
    else:
        locality = _NO_LOCALITY
    capacity = w.capacity.value if has("capacity") else 1
    app_port = w.application_tunnel.port if has("application_tunnel") else 0
    return WorkloadRecord(uid, w.name, _intern(w.namespace), addrs, w.status, _intern(w.node),
                          _intern(w.cluster_id), _intern(w.network), locality, capacity, app_port, services,
                          raw, version)


def decode_address(
    name: str, type_url: str, value: bytes, version: str = ""
) -> ServiceRecord | WorkloadRecord:
    """One ``Resource`` of type Address -> record, or raise ``Invalid``."""
    if type_url != ADDRESS_TYPE:
        raise Invalid(f"resource type {type_url!r} is not {ADDRESS_TYPE}")
    try:
        addr = _ADDRESS_FROM(value)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError or others
        raise Invalid(f"cannot decode Address: {e}") from None
    kind = addr.WhichOneof("type")
    if kind == "workload":
        return workload_record(name, addr.workload, value, version)
    if kind == "service":
        return service_record(name, addr.service, value, version)
    raise Invalid("Address has neither workload nor service")


def decode_authorization(name: str, type_url: str, value: bytes, version: str = "") -> PolicyRecord:
    if type_url != AUTHORIZATION_TYPE:
        raise Invalid(f"resource type {type_url!r} is not {AUTHORIZATION_TYPE}")
    try:
        pol = _AUTHZ_FROM(value)
    except Exception as e:  # noqa: BLE001
        raise Invalid(f"cannot decode Authorization: {e}") from None
    if not pol.name:
        raise Invalid("authorization policy without name")
    full = f"{pol.namespace}/{pol.name}"
    if name and name != full:
        raise Invalid(f"resource name does not match policy {full}")
    for rule in pol.rules:
        for clause in rule.clauses:
            for m in clause.matches:
                for a in (*m.source_ips, *m.not_source_ips, *m.destination_ips, *m.not_destination_ips):
                    _check_ip(a.address, "policy address")
    return PolicyRecord(name=full, namespace=pol.namespace, scope=pol.scope, action=pol.action,
                        raw=value, version=version)
