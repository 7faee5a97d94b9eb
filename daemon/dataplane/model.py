"""The desired data-plane projection: what the BPF maps should hold, expressed in names.

This is the contract between ``daemon.state`` (which derives it from workload xDS) and the
reconciler in ``daemon.dataplane`` (which writes it into the kernel). Everything here is
already resolved: health filtering, target-port resolution and locality ranking happen
before a ``Projection`` is built, so the reconciler only has to diff and write.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


class ServicePort:
    """One port of a service: the unit the connect program load-balances.

    Stored by columns, not as ``Endpoint`` objects: at 100,000 workloads the projection holds
    ~120,000 endpoints and an Endpoint costs 64 bytes (+ its tuple slot), while nearly every port
    gives all its endpoints the same target port, weight and priority. So a port keeps the
    backend uids (the State's own str objects, in endpoint order) and, per column, one int shared
    by every endpoint or a tuple aligned with ``uids``. ``endpoints`` materializes Endpoint
    objects on demand; readers on the hot path (the planner) use ``uids`` / ``uniform`` /
    ``rows()`` / ``render_port`` instead and never build them.

    Behaves as the frozen dataclass it replaces: ``ServicePort(port, endpoints)``, equality and
    hash over (port, endpoints), immutable by convention (nothing assigns to it after building).
    """

    __slots__ = ("port", "uids", "_tp", "_w", "_prio")

    def __init__(self, port: int, endpoints: Iterable[Endpoint] = ()) -> None:
        eps = tuple(endpoints)
        self.port = port
        self.uids = tuple([e.backend_uid for e in eps])
        self._tp = _column([e.target_port for e in eps], 0)
        self._w = _column([e.weight for e in eps], 1)
        self._prio = _column([e.priority for e in eps], 0)

    @classmethod
    def of(cls, port: int, uids: tuple[str, ...], target_port: int | tuple[int, ...],
           weight: int | tuple[int, ...] = 1, priority: int | tuple[int, ...] = 0) -> ServicePort:
        """Build from columns (the State's hot path). Each column is an int shared by every
        endpoint or a tuple aligned with ``uids``; tuples are folded to an int when uniform, so
        equal ports always compare equal."""
        sp = _NEW_SP(cls)
        sp.port = port
        sp.uids = uids
        if uids:
            sp._tp = target_port if target_port.__class__ is int else _column(target_port, 0)
            sp._w = weight if weight.__class__ is int else _column(weight, 1)
            sp._prio = priority if priority.__class__ is int else _column(priority, 0)
        else:
            sp._tp, sp._w, sp._prio = 0, 1, 0
        return sp

    @property
    def uniform(self) -> tuple[int, int, int] | None:
        """(target_port, weight, priority) shared by every endpoint, or None when they differ."""
        tp, w, prio = self._tp, self._w, self._prio
        if tp.__class__ is int and w.__class__ is int and prio.__class__ is int:
            return tp, w, prio  # type: ignore[return-value]
        return None

    def column(self, name: str) -> tuple[int, ...]:
        """One column ("target_port", "weight" or "priority") aligned with ``uids``."""
        v = {"target_port": self._tp, "weight": self._w, "priority": self._prio}[name]
        return (v,) * len(self.uids) if v.__class__ is int else v  # type: ignore[return-value]

    def rows(self) -> list[tuple[str, int, int, int]]:
        """(backend_uid, target_port, weight, priority) per endpoint, in order."""
        uids = self.uids
        u = self.uniform
        if u is not None:
            tp, w, prio = u
            return [(uid, tp, w, prio) for uid in uids]
        return list(zip(uids, self.column("target_port"), self.column("weight"), self.column("priority"),
                        strict=True))

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints as objects, built on demand (see the class docstring). The last few
        ports' are kept aside (a reader touches one port's endpoints several times in a row),
        never on the port itself: that would bring back the memory the columns save."""
        hit = _EPS_CACHE.get(id(self))
        if hit is not None and hit[0] is self:
            return hit[1]
        eps = tuple([Endpoint(*r) for r in self.rows()])
        if len(_EPS_CACHE) >= 256:
            try:  # drop the oldest entry; another thread may be doing the same
                del _EPS_CACHE[next(iter(_EPS_CACHE))]
            except (KeyError, RuntimeError, StopIteration):
                pass
        _EPS_CACHE[id(self)] = (self, eps)
        return eps

    def _key(self) -> tuple:
        return (self.port, self.uids, self._tp, self._w, self._prio)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not ServicePort:
            return NotImplemented
        if other is self:
            return True
        o: ServicePort = other  # type: ignore[assignment]
        return (self.port == o.port and self.uids == o.uids and self._tp == o._tp and self._w == o._w
                and self._prio == o._prio)

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"ServicePort(port={self.port!r}, endpoints={self.endpoints!r})"

    def __reduce__(self) -> tuple:
        return (ServicePort, (self.port, self.endpoints))


_NEW_SP = object.__new__
# id(port) -> (port, its Endpoint objects) for the last ports whose ``endpoints`` were read
_EPS_CACHE: dict[int, tuple[ServicePort, tuple[Endpoint, ...]]] = {}


def _column(values: Sequence[int], empty: int) -> int | tuple[int, ...]:
    """A column's canonical form: one int when every value is that int (or none at all)."""
    if not values:
        return empty
    first = values[0]
    for v in values:
        if v != first:
            return tuple(values)
    return first


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
