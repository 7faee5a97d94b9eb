"""The desired data-plane projection: what the BPF maps should hold, expressed in names.

This is the contract between ``daemon.state`` (which derives it from workload xDS) and the
reconciler in ``daemon.dataplane`` (which writes it into the kernel). Everything here is
already resolved: health filtering, target-port resolution and locality ranking happen
before a ``Projection`` is built, so the reconciler only has to diff and write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class LbMode(IntEnum):
    """How the connect program picks among a service port's endpoints."""

    RANDOM = 0  # weighted random over every endpoint (priority ignored)
    STRICT = 1  # only priority-0 endpoints; none left -> connect is left untranslated
    FAILOVER = 2  # the lowest non-empty priority


MAX_PRIORITY = 6  # priorities 0..6, as Kmesh: len(routing_preference) - leading matches
HBONE_PORT = 15008  # GatewayAddress.hbone_mtls_port when unset


@dataclass(frozen=True, slots=True)
class Waypoint:
    """Where connections to a service (or straight to a pod) with a waypoint go: the frontend
    of the waypoint's own Service, whose endpoints are the waypoint pods. The kernel picks one
    of them and sends the connection to that pod's hand-off port (``Backend.handoff_port``)."""

    address: bytes  # a VIP of the waypoint service (4 or 16 bytes); b"" = unresolved: refuse
    port: int = HBONE_PORT  # the waypoint service port whose endpoints are balanced
    name: str = ""  # "ns/hostname" of the waypoint service when known, for display only


@dataclass(frozen=True, slots=True)
class Backend:
    """One workload as the data plane sees it: where to send a chosen connection."""

    uid: str  # workload uid, the xDS resource name, e.g. "Kubernetes//Pod/default/fortio-v1-abc"
    name: str = ""  # pod name, for read-back display only
    namespace: str = ""
    ipv4: bytes | None = None  # 4 bytes, network order
    ipv6: bytes | None = None  # 16 bytes
    handoff_port: int = 0  # as a waypoint pod: PROXY v2 on this port (application_tunnel); 0 = TLV on 15019
    waypoint: Waypoint | None = None  # connections straight to this pod go to this waypoint


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend behind one service port."""

    backend_uid: str
    target_port: int  # 1..65535, already resolved (workload port list, service target, ...)
    weight: int = 1  # workload capacity; 1 when unset
    priority: int = 0  # 0 = best locality match; 0..MAX_PRIORITY


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a service: the unit the connect program load-balances."""

    port: int  # the service port a client connects to
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class Service:
    """A service and everything needed to translate a connect to one of its VIPs."""

    name: str  # "namespace/hostname", the xDS resource name
    vips: tuple[bytes, ...]  # each 4 or 16 bytes; empty for a headless service (nothing to write)
    ports: tuple[ServicePort, ...] = ()
    lb_mode: LbMode = LbMode.RANDOM
    waypoint: Waypoint | None = None  # set: every connection to a VIP goes to this waypoint


@dataclass(slots=True)
class Projection:
    """The full desired content of the data plane."""

    services: dict[str, Service] = field(default_factory=dict)  # keyed by Service.name
    backends: dict[str, Backend] = field(default_factory=dict)  # keyed by Backend.uid
