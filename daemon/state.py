"""The daemon's single source of truth: typed stores of what workload xDS delivered.

Services, workloads and authorization policies are kept keyed exactly as their xDS resource
names (``ns/hostname``, workload uid, ``ns/name``). Everything downstream is derived:
``projection()`` turns the stores into a ``daemon.dataplane.model.Projection`` (health
filtering, target-port resolution and locality ranking happen here, per the ztunnel rules in
shared/reference/workload-xds.md section 1), and listeners get a ``Change`` naming which
services and backends may differ after each applied batch.

Why incremental: at 10,000 services x 10 endpoints a full rebuild costs far more than the
update budget (10 ms), so the projection is cached per service and per backend and only the
entries touched by a batch are rebuilt. Records keep the resource's serialized bytes so the
config dump can show every field without holding 100k protobuf objects in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from daemon.dataplane.model import MAX_PRIORITY, Backend, Endpoint, LbMode, Projection, Service, ServicePort

# istio.workload.LoadBalancing enums (numbers fixed by the wire format)
SCOPE_REGION, SCOPE_ZONE, SCOPE_SUBZONE, SCOPE_NODE, SCOPE_CLUSTER, SCOPE_NETWORK = 1, 2, 3, 4, 5, 6
MODE_UNSPECIFIED, MODE_STRICT, MODE_FAILOVER, MODE_PASSTHROUGH = 0, 1, 2, 3
HEALTH_ONLY_HEALTHY, HEALTH_ALLOW_ALL = 0, 1
STATUS_HEALTHY, STATUS_UNHEALTHY = 0, 1


@dataclass(slots=True)
class ServiceRecord:
    """A Service resource, reduced to what the data plane derives from it (+ raw bytes)."""

    name: str  # "ns/hostname"
    namespace: str
    hostname: str
    vips: tuple[bytes, ...]
    ports: tuple[tuple[int, int], ...]  # (service_port, target_port) in Service order
    lb_mode: int = MODE_UNSPECIFIED
    routing: tuple[int, ...] = ()
    health_policy: int = HEALTH_ONLY_HEALTHY
    raw: bytes = b""  # serialized istio.workload.Address, for config dumps
    version: str = ""


@dataclass(slots=True)
class WorkloadRecord:
    """A Workload resource, reduced to what endpoint derivation needs (+ raw bytes)."""

    uid: str
    name: str
    namespace: str
    addresses: tuple[bytes, ...]
    status: int = STATUS_HEALTHY
    node: str = ""
    cluster_id: str = ""
    network: str = ""
    locality: tuple[str, str, str] = ("", "", "")
    capacity: int = 1
    app_tunnel_port: int = 0
    services: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    raw: bytes = b""
    version: str = ""


@dataclass(slots=True)
class PolicyRecord:
    """An Authorization resource; stored and dumped (enforcement is a later issue)."""

    name: str  # "ns/name"
    namespace: str
    scope: int
    action: int
    raw: bytes = b""  # serialized istio.security.Authorization
    version: str = ""


@dataclass(slots=True)
class Change:
    """What a batch touched. ``full`` means: resynchronise everything (new stream synced)."""

    services: set[str] = field(default_factory=set)
    backends: set[str] = field(default_factory=set)
    policies: set[str] = field(default_factory=set)
    full: bool = False

    def __bool__(self) -> bool:
        return bool(self.services or self.backends or self.policies or self.full)


Listener = Callable[[Change], None]


class State:
    """Typed stores + incremental projection. Thread-safe: one lock guards everything."""

    def __init__(
        self,
        node_name: str = "",
        locality: tuple[str, str, str] | None = None,
        cluster_id: str = "",
        network: str = "",
    ) -> None:
        self.node_name = node_name
        self.cluster_id = cluster_id
        self.network = network
        self._explicit_locality = locality is not None
        self._locality: tuple[str, str, str] | None = locality
        self._lock = threading.RLock()
        self.services: dict[str, ServiceRecord] = {}
        self.workloads: dict[str, WorkloadRecord] = {}
        self.policies: dict[str, PolicyRecord] = {}
        self._members: dict[str, set[str]] = {}  # service name -> workload uids naming it
        self._svc_cache: dict[str, Service] = {}
        self._backend_cache: dict[str, Backend] = {}
        self._dirty: set[str] = set()
        self._listeners: list[Listener] = []
        self.synced = False

    # ---- subscriptions -------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(change)`` after every applied batch (in the applying thread)."""
        self._listeners.append(listener)

    def _emit(self, change: Change) -> None:
        if not change:
            return
        for listener in list(self._listeners):
            listener(change)

    # ---- applying xDS --------------------------------------------------------------------
    def apply_addresses(
        self, upserts: Iterable[ServiceRecord | WorkloadRecord], removed: Iterable[str] = ()
    ) -> Change:
        """Apply one Address response: removals first, then services, then workloads."""
        change = Change()
        with self._lock:
            for name in removed:
                if name in self.workloads:
                    self._remove_workload(name, change)
                elif name in self.services:
                    self._remove_service(name, change)
                # unknown names are legal (removal of something we never had): ignore
            workloads: list[WorkloadRecord] = []
            for rec in upserts:
                if isinstance(rec, ServiceRecord):
                    self._put_service(rec, change)
                else:
                    workloads.append(rec)
            for w in workloads:
                self._put_workload(w, change)
            self._dirty |= change.services
        self._emit(change)
        return change

    def apply_policies(self, upserts: Iterable[PolicyRecord], removed: Iterable[str] = ()) -> Change:
        change = Change()
        with self._lock:
            for name in removed:
                if self.policies.pop(name, None) is not None:
                    change.policies.add(name)
            for p in upserts:
                self.policies[p.name] = p
                change.policies.add(p.name)
        self._emit(change)
        return change

    def mark_synced(self) -> None:
        """The current stream has delivered every type: downstream should resync fully."""
        with self._lock:
            self.synced = True
        self._emit(Change(full=True))

    def resource_versions(self, kind: str) -> dict[str, str]:
        """``{name: version}`` of everything held, for initial_resource_versions."""
        with self._lock:
            if kind == "address":
                out = {n: s.version for n, s in self.services.items()}
                out.update((u, w.version) for u, w in self.workloads.items())
                return out
            return {n: p.version for n, p in self.policies.items()}

    def held(self, address: bool) -> Callable[[str], ServiceRecord | WorkloadRecord | PolicyRecord | None]:
        """Lookup of the record held under an xDS name (Address or Authorization type).

        Lock-free on purpose: only the xDS thread mutates the stores, and it is the caller.
        """
        if not address:
            return self.policies.get
        workloads, services = self.workloads, self.services

        def get(name: str) -> ServiceRecord | WorkloadRecord | None:
            rec = workloads.get(name)
            return rec if rec is not None else services.get(name)

        return get

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"services": len(self.services), "workloads": len(self.workloads),
                    "policies": len(self.policies)}

    def _put_service(self, rec: ServiceRecord, change: Change) -> None:
        self.services[rec.name] = rec
        change.services.add(rec.name)

    def _remove_service(self, name: str, change: Change) -> None:
        del self.services[name]
        change.services.add(name)
        # endpoints are kept in _members: a re-added service gets them back (ztunnel does too)

    def _put_workload(self, rec: WorkloadRecord, change: Change) -> None:
        uid = rec.uid
        old = self.workloads.get(uid)
        touched = change.services
        members = self._members
        if old is not None:  # an update replaces the old entry entirely
            for svc in old.services:
                self._unlink(svc, uid)
                touched.add(svc)
        self.workloads[uid] = rec
        for svc in rec.services:
            m = members.get(svc)
            if m is None:
                members[svc] = {uid}
            else:
                m.add(uid)
            touched.add(svc)
        if (
            self.node_name
            and rec.node == self.node_name
            and not self._explicit_locality
            and (self._locality is None or self._locality_uid == uid)
        ):
            self._set_node_locality(rec, change)
        v4 = v6 = None
        for a in rec.addresses:
            if len(a) == 4:
                if v4 is None:
                    v4 = a
            elif v6 is None:
                v6 = a
        cached = self._backend_cache.get(uid)
        if v4 is None and v6 is None:  # hostname-only workloads cannot be written as a backend
            if cached is not None:
                del self._backend_cache[uid]
                change.backends.add(uid)
        elif (cached is None or cached.ipv4 != v4 or cached.ipv6 != v6 or cached.name != rec.name
              or cached.namespace != rec.namespace):
            self._backend_cache[uid] = Backend(uid, rec.name, rec.namespace, v4, v6)
            change.backends.add(uid)

    _locality_uid: str = ""

    def _set_node_locality(self, rec: WorkloadRecord, change: Change) -> None:
        """Kmesh: the node's locality is that of the first workload seen on NODE_NAME."""
        new = rec.locality
        self._locality_uid = rec.uid
        if not self.cluster_id:
            self.cluster_id = rec.cluster_id
        if not self.network:
            self.network = rec.network
        if new != self._locality:
            self._locality = new
            change.services.update(n for n, s in self.services.items() if s.routing)

    def _remove_workload(self, uid: str, change: Change) -> None:
        old = self.workloads.pop(uid)
        for svc in old.services:
            self._unlink(svc, uid)
            change.services.add(svc)
        if self._backend_cache.pop(uid, None) is not None:
            change.backends.add(uid)

    def _unlink(self, svc: str, uid: str) -> None:
        members = self._members.get(svc)
        if members is not None:
            members.discard(uid)
            if not members:
                del self._members[svc]

    # ---- projection ------------------------------------------------------------------------
    @property
    def node_locality(self) -> tuple[str, str, str] | None:
        return self._locality

    def projection(self) -> Projection:
        """The full desired data plane. Only services touched since the last call are rebuilt."""
        with self._lock:
            self._refresh()
            return Projection(services=dict(self._svc_cache), backends=dict(self._backend_cache))

    def service_projection(self, name: str) -> Service | None:
        with self._lock:
            self._refresh()
            return self._svc_cache.get(name)

    def _refresh(self) -> None:
        if not self._dirty:
            return
        for name in self._dirty:
            svc = self._build_service(name)
            if svc is None:
                self._svc_cache.pop(name, None)
            else:
                self._svc_cache[name] = svc
        self._dirty.clear()

    def _source_scopes(self) -> dict[int, str]:
        region, zone, subzone = self._locality or ("", "", "")
        return {SCOPE_REGION: region, SCOPE_ZONE: zone, SCOPE_SUBZONE: subzone, SCOPE_NODE: self.node_name,
                SCOPE_CLUSTER: self.cluster_id, SCOPE_NETWORK: self.network}

    def _build_service(self, name: str) -> Service | None:
        """One service's projection. Hot path at scale: plain loops, positional construction."""
        rec = self.services.get(name)
        if rec is None or rec.lb_mode == MODE_PASSTHROUGH:
            return None  # PASSTHROUGH: connect to the original destination, nothing to translate
        uids = self._members.get(name, ())
        allow_all = rec.health_policy == HEALTH_ALLOW_ALL
        ranked = rec.lb_mode in (MODE_STRICT, MODE_FAILOVER) and bool(rec.routing)
        strict = rec.lb_mode == MODE_STRICT
        src = self._source_scopes() if ranked else {}
        workloads = self.workloads
        backends = self._backend_cache
        members: list[tuple[int, str, WorkloadRecord]] = []
        for uid in uids:
            w = workloads.get(uid)
            if w is None or w.capacity <= 0 or uid not in backends:
                continue
            if w.status != STATUS_HEALTHY and not allow_all:
                continue
            prio = 0
            if ranked:
                prio = _priority(rec.routing, src, w)
                if strict and prio != 0:
                    continue  # STRICT: every scope must match
            members.append((prio, uid, w))
        members.sort(key=_first_two)
        ports: list[ServicePort] = []
        for sport, starget in rec.ports:
            eps: list[Endpoint] = []
            for prio, uid, w in members:
                tp = 0
                own = w.services.get(name)
                if own:
                    for p_sport, p_target in own:
                        if p_sport == sport and p_target:
                            tp = p_target
                            break
                if not tp:
                    tp = starget if starget > 0 else (sport if w.app_tunnel_port else 0)
                if tp:
                    eps.append(Endpoint(uid, tp, w.capacity, prio))
            ports.append(ServicePort(sport, tuple(eps)))
        mode = _LB_MODES.get(rec.lb_mode, LbMode.RANDOM)
        return Service(name, rec.vips, tuple(ports), mode)

    # ---- config dump -----------------------------------------------------------------------
    def config_dump(self) -> dict:
        """``{"workloads", "services", "policies"}`` in the istioctl ztunnel-config json shapes."""
        from daemon.xds import dump  # lazy: pulls the protobuf modules in

        with self._lock:
            return dump.config_dump(self)

    def members(self, service: str) -> list[str]:
        with self._lock:
            return sorted(self._members.get(service, ()))


_LB_MODES = {MODE_STRICT: LbMode.STRICT, MODE_FAILOVER: LbMode.FAILOVER}


def _first_two(m: tuple[int, str, WorkloadRecord]) -> tuple[int, str]:
    return m[0], m[1]


def resolve_target_port(service: str, sport: int, starget: int, w: WorkloadRecord) -> int:
    """ztunnel's order: workload PortList, then Service target_port, then app tunnel; else 0."""
    for p_sport, p_target in w.services.get(service, ()):
        if p_sport == sport and p_target:
            return p_target
    if starget > 0:
        return starget
    if w.app_tunnel_port:
        return sport
    return 0


def _priority(routing: tuple[int, ...], src: dict[int, str], w: WorkloadRecord) -> int:
    """Kmesh: len(routing_preference) - number of leading scopes that match the source."""
    dst = {SCOPE_REGION: w.locality[0], SCOPE_ZONE: w.locality[1], SCOPE_SUBZONE: w.locality[2],
           SCOPE_NODE: w.node, SCOPE_CLUSTER: w.cluster_id, SCOPE_NETWORK: w.network}
    matched = 0
    for scope in routing:
        if scope not in dst or dst[scope] != src.get(scope):
            break
        matched += 1
    return min(len(routing) - matched, MAX_PRIORITY)
