"""The daemon's single source of truth: typed stores of what workload xDS delivered.

Services, workloads and authorization policies are kept keyed exactly as their xDS resource
names (``ns/hostname``, workload uid, ``ns/name``). Everything downstream is derived:
``projection()`` turns the stores into a ``daemon.dataplane.model.Projection`` (health
filtering, target-port resolution and locality ranking happen here, per the ztunnel rules in
shared/reference/workload-xds.md section 1), and listeners get a ``Change`` naming which
services and backends may differ after each applied batch.

Why incremental: at 10,000 services x 10 endpoints a full rebuild costs far more than the
update budget (10 ms), so the projection is cached per service and only the services touched
by a batch are rebuilt; a rebuilt service equal to the cached one keeps the cached object, so
the reconciler's unchanged-input check is an identity hit.

Why a workload is split into a per-pod part and a shared ``WorkloadProfile``: at 100,000
workloads memory is the budget. Only ``uid``, ``name`` and the addresses are unique to a pod;
everything else (namespace, node, locality, status, ports per service, service account,
canonical names, ...) is identical for the replicas of a deployment on a node. That remainder
is kept once, as its serialized bytes (for the config dump) plus the few decoded fields the
projection needs, and shared by every replica. A record is then ~4 pointers, its ``Backend``
(which the projection needs anyway) and a content digest (for the "re-sent unchanged" check)
packed with the xDS version. With the C helper a record is one untracked 64-byte object holding
digest and version inline (``_untracked``): ~112 bytes a workload less than the Python class.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from operator import attrgetter
from typing import NamedTuple

from daemon.dataplane.model import (
    MAX_PRIORITY,
    Backend,
    LbMode,
    Projection,
    Service,
    ServicePort,
    Waypoint,
)

# istio.workload.LoadBalancing enums (numbers fixed by the wire format)
SCOPE_REGION, SCOPE_ZONE, SCOPE_SUBZONE, SCOPE_NODE, SCOPE_CLUSTER, SCOPE_NETWORK = 1, 2, 3, 4, 5, 6
MODE_UNSPECIFIED, MODE_STRICT, MODE_FAILOVER, MODE_PASSTHROUGH = 0, 1, 2, 3
HEALTH_ONLY_HEALTHY, HEALTH_ALLOW_ALL = 0, 1
STATUS_HEALTHY, STATUS_UNHEALTHY = 0, 1

Ports = tuple[tuple[int, int], ...]  # (service_port, target_port) pairs


class GatewayRef(NamedTuple):
    """A GatewayAddress as received (a waypoint): resolved to a ``Waypoint`` at projection time,
    because a hostname names a Service that may arrive, move or go later."""

    kind: str  # "addr" (target: ip bytes) or "host" (target: "ns/hostname")
    target: bytes | str
    hbone_port: int

STATUS_PORT = 15021  # a service with this port is (part of) a waypoint: never sent to a waypoint


DIGEST_MASK = (1 << 55) - 1  # a content digest: the low 55 bits of hash(Any.value)
_PACKED = 1 << 55  # flag in the digest's 7 bytes: the version is stored as 8 binary bytes


def fold(h: int) -> int:
    """The content digest of a resource whose ``hash(Any.value)`` is ``h`` (see ``_pack``)."""
    return h & DIGEST_MASK


def _pack(digest: int, version: str) -> bytes:
    """Content digest + xDS version, one small object instead of an int and a str: 7 bytes of
    digest (55 bits, the top bit flags a packed version), then the version in UTF-8, or, when it
    is 16 lowercase hex digits (a content hash, as the sandbox's pilot sends), as its 8 bytes:
    15 bytes then, a 48-byte object instead of 64 (~1.5 MiB at 100k workloads)."""
    d = digest & DIGEST_MASK
    if len(version) == 16:
        try:
            b = bytes.fromhex(version)
        except ValueError:
            b = b""
        if len(b) == 8 and b.hex() == version:  # exactly round-trips (lowercase, no spaces)
            return (d | _PACKED).to_bytes(7, "little") + b
    return d.to_bytes(7, "little") + version.encode()


def _vd_digest(vd: bytes) -> int:
    return int.from_bytes(vd[:7], "little") & DIGEST_MASK


def _vd_version(vd: bytes) -> str:
    return vd[7:].hex() if vd[6] & 0x80 else vd[7:].decode()


@dataclass(slots=True)
class ServiceRecord:
    """A Service resource, reduced to what the data plane derives from it (+ raw bytes)."""

    name: str  # "ns/hostname"
    namespace: str
    hostname: str
    vips: tuple[bytes, ...]
    ports: Ports  # (service_port, target_port) in Service order
    lb_mode: int = MODE_UNSPECIFIED
    routing: tuple[int, ...] = ()
    health_policy: int = HEALTH_ONLY_HEALTHY
    raw: bytes = b""  # serialized istio.workload.Address, for config dumps
    version: str = ""
    waypoint: GatewayRef | None = None

    @property
    def digest(self) -> int:
        return hash(self.raw) & DIGEST_MASK  # bytes cache their hash: free after the first call

    def set_version(self, value: str) -> None:
        self.version = value


class WorkloadProfile:
    """Everything of a Workload except uid, name and addresses; shared by identical replicas.

    Immutable once built (many records point at one). ``rest`` is the serialized Workload with
    uid, name and addresses cleared: the dump merges them back in (daemon.xds.dump).
    """

    __slots__ = ("namespace", "node", "cluster_id", "network", "locality", "status", "capacity",
                 "app_tunnel_port", "services", "rest", "waypoint", "proxy_port")

    def __init__(self, namespace: str, node: str = "", cluster_id: str = "", network: str = "",
                 locality: tuple[str, str, str] = ("", "", ""), status: int = STATUS_HEALTHY,
                 capacity: int = 1, app_tunnel_port: int = 0, services: tuple[tuple[str, Ports], ...] = (),
                 rest: bytes = b"", waypoint: GatewayRef | None = None, proxy_port: int = 0) -> None:
        self.namespace = namespace
        self.node = node
        self.cluster_id = cluster_id
        self.network = network
        self.locality = locality
        self.status = status
        self.capacity = capacity
        self.app_tunnel_port = app_tunnel_port
        self.services = services  # ((service key "ns/hostname", ports), ...) in Workload order
        self.rest = rest
        self.waypoint = waypoint  # this pod's own waypoint (connections straight to its IP)
        self.proxy_port = proxy_port  # application_tunnel {protocol: PROXY, port}: PROXY v2 hand-off

    def ports_of(self, service: str) -> Ports | None:
        """This workload's PortList for ``service`` (None: the workload does not name it)."""
        for key, ports in self.services:
            if key == service:
                return ports
        return None


class WorkloadRecord:
    """A Workload resource, and also the workload's ``Backend`` as the data plane sees it.

    It offers every ``Backend`` field (uid, name, namespace, ipv4, ipv6, handoff_port, waypoint)
    and Backend's equality over them, so the projection hands records to the reconciler as they
    are; it is not a Backend subclass because that would carry Backend's seven slots, most of
    which a record derives: at 100k workloads every slot is 0.8 MB. Four slots: the uid, the
    address (the one address as bytes, or a tuple when there are none or several), the shared
    profile, and the content digest packed with the xDS version; the name is the uid's last
    segment, and only a name that is not is kept, paired with that packed digest in a tuple.
    (This is the pure-Python form; ``_untracked`` moves it onto the C helper's ``Record``.)

    The attribute names of the earlier dataclass (uid, name, namespace, addresses, status, node,
    cluster_id, network, locality, capacity, app_tunnel_port, services, raw, version) stay
    readable. Immutable in everything the projection reads; only ``version`` is ever reassigned.
    """

    __slots__ = ("uid", "_addr", "profile", "_vd")

    def __init__(self, uid: str, name: str, addresses: tuple[bytes, ...], profile: WorkloadProfile,
                 digest: int = 0, version: str = "") -> None:
        self.uid = uid
        self._addr = addresses[0] if len(addresses) == 1 else tuple(addresses)
        self.profile = profile
        self._vd = _with_name(uid, name, _pack(digest, version))

    # -- the Backend view ------------------------------------------------------------------
    @property
    def name(self) -> str:
        vd = self._vd
        if vd.__class__ is tuple:
            return vd[1]  # type: ignore[return-value]
        uid = self.uid
        return uid[uid.rfind("/") + 1:]

    @property
    def _name(self) -> str | None:
        """The name when it is not the uid's last segment, else None."""
        vd = self._vd
        return vd[1] if vd.__class__ is tuple else None  # type: ignore[return-value]

    @property
    def namespace(self) -> str:
        return self.profile.namespace

    @property
    def ipv4(self) -> bytes | None:
        a = self._addr
        if a.__class__ is bytes:
            return a if len(a) == 4 else None
        return next((x for x in a if len(x) == 4), None)

    @property
    def ipv6(self) -> bytes | None:
        a = self._addr
        if a.__class__ is bytes:
            return a if len(a) == 16 else None
        return next((x for x in a if len(x) == 16), None)

    @property
    def handoff_port(self) -> int:
        return self.profile.proxy_port

    @property
    def waypoint(self) -> Waypoint | None:
        """An address waypoint as is; a hostname one needs the services (State.projection()
        hands such workloads on as resolved Backend copies), so here only a placeholder."""
        ref = self.profile.waypoint
        if ref is None:
            return None
        return Waypoint(ref[1], ref[2]) if ref[0] == "addr" else Waypoint(b"", ref[2], str(ref[1]))

    def _key(self) -> tuple:
        return (self.uid, self.name, self.profile.namespace, self.ipv4, self.ipv6, self.profile.proxy_port,
                self.waypoint)

    def __eq__(self, other: object) -> bool:
        """Backend equality: over the Backend fields only (not the profile's other fields)."""
        if other.__class__ is not WorkloadRecord:
            return NotImplemented
        if other is self:
            return True
        o: WorkloadRecord = other  # type: ignore[assignment]
        if self.uid != o.uid or self._addr != o._addr or self._name != o._name:
            # several addresses may differ beyond the first v4/v6: compare those alone
            return (self._addr.__class__ is tuple or o._addr.__class__ is tuple) and self._key() == o._key()
        p, q = self.profile, o.profile
        return p is q or (p.namespace == q.namespace and p.proxy_port == q.proxy_port
                          and p.waypoint == q.waypoint)

    def __hash__(self) -> int:
        return hash(self.uid)

    @property
    def backend(self) -> WorkloadRecord:
        return self

    @property
    def addresses(self) -> tuple[bytes, ...]:
        a = self._addr
        return (a,) if a.__class__ is bytes else a  # type: ignore[return-value]

    @property
    def has_address(self) -> bool:
        return self._addr.__class__ is bytes or bool(self._addr)

    # -- profile fields ------------------------------------------------------------------------
    @property
    def status(self) -> int:
        return self.profile.status

    @property
    def node(self) -> str:
        return self.profile.node

    @property
    def cluster_id(self) -> str:
        return self.profile.cluster_id

    @property
    def network(self) -> str:
        return self.profile.network

    @property
    def locality(self) -> tuple[str, str, str]:
        return self.profile.locality

    @property
    def capacity(self) -> int:
        return self.profile.capacity

    @property
    def app_tunnel_port(self) -> int:
        return self.profile.app_tunnel_port

    @property
    def services(self) -> dict[str, Ports]:
        return dict(self.profile.services)

    # -- xDS bookkeeping -----------------------------------------------------------------------
    @property
    def digest(self) -> int:
        vd = self._vd
        return int.from_bytes((vd[0] if vd.__class__ is tuple else vd)[:7], "little") & DIGEST_MASK

    @property
    def version(self) -> str:
        vd = self._vd
        return _vd_version(vd[0] if vd.__class__ is tuple else vd)

    def set_version(self, value: str) -> None:
        vd = self._vd
        if vd.__class__ is tuple:
            self._vd = (_pack(_vd_digest(vd[0]), value), vd[1])
        else:
            self._vd = _pack(_vd_digest(vd), value)

    @property
    def raw(self) -> bytes:
        """The serialized ``istio.workload.Address`` (rebuilt from the profile; cached per record)."""
        hit = _RAW_CACHE.get(self.uid)
        if hit is not None and hit[0] is self:
            return hit[1]
        from daemon.xds import dump  # lazy: pulls the protobuf modules in

        raw = dump.workload_address_bytes(self)
        if len(_RAW_CACHE) >= 1024:
            try:  # drop the oldest entry; another thread may be doing the same
                del _RAW_CACHE[next(iter(_RAW_CACHE))]
            except (KeyError, RuntimeError, StopIteration):
                pass
        _RAW_CACHE[self.uid] = (self, raw)
        return raw

    def __repr__(self) -> str:
        return f"WorkloadRecord(uid={self.uid!r}, addresses={self.addresses!r}, node={self.node!r})"


def _untracked(cls: type) -> type:
    """``cls`` rebuilt on the C helper's ``Record`` storage (digest and version inline, not
    tracked by the cyclic GC: 64 bytes a record where the Python class takes 64 + 48, see
    daemon/xds/wiresplit.c), with the same methods; ``cls`` itself when the helper cannot be
    built (the daemon then runs its Python paths anyway)."""
    from daemon.xds import native

    mod = native.load()
    if mod is None:
        return cls
    rec = mod.Record
    for key, value in cls.__dict__.items():
        if key in ("__slots__", "__dict__", "__weakref__") or key in rec.__dict__:
            continue  # the storage (uid, _addr, profile, _vd) and its accessors are Record's own
        setattr(rec, key, value)
    rec.__name__ = cls.__name__
    rec.__qualname__ = cls.__qualname__
    rec.__module__ = cls.__module__
    rec.__doc__ = cls.__doc__
    return rec


_PyWorkloadRecord = WorkloadRecord
WorkloadRecord = _untracked(WorkloadRecord)  # type: ignore[misc]


def make_workload_record(uid: str, name: str, address: bytes | tuple[bytes, ...], profile: WorkloadProfile,
                         vd: bytes) -> WorkloadRecord:
    """The decoder's constructor (hot path): ``address`` is the one address (validated) or a
    tuple of all of them, ``vd`` = ``_pack(digest, version)``. Same as ``WorkloadRecord(...)``
    without its argument handling."""
    rec = _NEW(WorkloadRecord)
    rec.uid = uid
    rec._addr = address
    rec.profile = profile
    n = len(name)
    rec._vd = vd if n and len(uid) > n and uid[-n - 1] == "/" and uid.endswith(name) else (vd, name)
    return rec


def _with_name(uid: str, name: str, vd: bytes) -> bytes | tuple[bytes, str]:
    """``vd`` alone when ``name`` is the uid's last segment (nearly always), else (vd, name)."""
    n = len(name)
    return vd if n and len(uid) > n and uid[-n - 1] == "/" and uid.endswith(name) else (vd, name)


_NEW = WorkloadRecord.__new__

# recently rebuilt raw bytes, so repeated ``rec.raw`` of a hot record returns the same object
_RAW_CACHE: dict[str, tuple[WorkloadRecord, bytes]] = {}


@dataclass(slots=True)
class PolicyRecord:
    """An Authorization resource; stored and dumped (enforcement is a later issue)."""

    name: str  # "ns/name"
    namespace: str
    scope: int
    action: int
    raw: bytes = b""  # serialized istio.security.Authorization
    version: str = ""

    @property
    def digest(self) -> int:
        return hash(self.raw)

    def set_version(self, value: str) -> None:
        self.version = value


@dataclass(slots=True)
class Change:
    """What a batch touched. ``full`` means: resynchronise everything (new stream synced)."""

    services: set[str] = field(default_factory=set)
    backends: set[str] = field(default_factory=set)
    policies: set[str] = field(default_factory=set)
    full: bool = False
    # uids of workloads added, removed or changed in any field (authorization needs identity
    # and authorization_policies changes that leave the Backend equal)
    workloads: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.services or self.backends or self.policies or self.full or self.workloads)


Listener = Callable[[Change], None]
Record = ServiceRecord | WorkloadRecord | PolicyRecord


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
        self._locality_uid = ""
        self._lock = threading.RLock()
        self.services: dict[str, ServiceRecord] = {}
        self.workloads: dict[str, WorkloadRecord] = {}
        self.policies: dict[str, PolicyRecord] = {}
        # service name -> the workloads naming it: a list of records while small (200 bytes for
        # 10 where a {uid: record} dict takes 350: 10k services x 10 replicas save ~1.5 MiB), a
        # {uid: record} dict from _SMALL_MEMBERS on, so removal stays O(1) in a big service
        self._members: dict[str, Members] = {}
        self._svc_cache: dict[str, Service] = {}
        self._addressless: set[str] = set()  # workloads without an address: not in Projection.backends
        self._dirty: set[str] = set()
        # hostname waypoints: waypoint service key -> services / workload uids naming it, so a
        # change of the waypoint's Service re-resolves them; and every workload with a waypoint
        self._wp_services: dict[str, set[str]] = {}
        self._wp_workloads: dict[str, set[str]] = {}
        self._wp_uids: set[str] = set()
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
        return self.apply_address_batches((upserts,), removed)

    def apply_address_batches(
        self, batches: Iterable[Iterable[ServiceRecord | WorkloadRecord]], removed: Iterable[str] = ()
    ) -> Change:
        """Apply one Address response given as consecutive batches of its records (removals
        first, then each batch's services, then its workloads), as one change.

        Why batches: the xDS client decodes a big response a slice at a time and applies each
        slice while its records are still in the CPU caches; applying 1M records decoded long
        before misses on every uid (workloads.get alone was 0.8 s at 1M, 38x its 100k time).
        A workload may so come before a Service of the same response that a later batch holds;
        the stores do not depend on that order (responses can come in any order too). Whatever
        batches were applied are reported even if producing a later one raises."""
        change = Change()
        try:
            with self._lock:
                # exact: every member list touched is at its exact size (no removal, and every
                # batch of workloads went in bulk, which builds lists exact): no trim pass then
                exact = True
                for name in removed:
                    if name in self.workloads:
                        self._remove_workload(name, change)
                        exact = False
                    elif name in self.services:
                        self._remove_service(name, change)
                    # unknown names are legal (removal of something we never had): ignore
                total = 0
                try:
                    for batch in batches:
                        workloads: list[WorkloadRecord] = []
                        for rec in batch:
                            if isinstance(rec, WorkloadRecord):
                                workloads.append(rec)
                            else:
                                self._put_service(rec, change)
                        if workloads:
                            exact = self._put_workloads(workloads, change) and exact
                        total += len(workloads)
                finally:
                    if total >= _TRIM_FROM and not exact:
                        self._trim_members(change.services)
                    self._dirty |= change.services
        finally:
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

    def held(self, address: bool) -> Callable[[str], Record | None] | None:
        """Lookup of the record held under an xDS name (Address or Authorization type); None when
        nothing of that type is held (the first push skips 100k lookups).

        Lock-free on purpose: only the xDS thread mutates the stores, and it is the caller.
        """
        if not address:
            return self.policies.get if self.policies else None
        workloads, services = self.workloads, self.services
        if not workloads and not services:
            return None

        def get(name: str) -> ServiceRecord | WorkloadRecord | None:
            rec = workloads.get(name)
            return rec if rec is not None else services.get(name)

        return get

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"services": len(self.services), "workloads": len(self.workloads),
                    "policies": len(self.policies)}

    def _put_service(self, rec: ServiceRecord, change: Change) -> None:
        old = self.services.get(rec.name)
        if old is not None and old.waypoint is not None and old.waypoint[0] == "host":
            _unlink(self._wp_services, str(old.waypoint[1]), rec.name)
        if rec.waypoint is not None and rec.waypoint[0] == "host":
            self._wp_services.setdefault(str(rec.waypoint[1]), set()).add(rec.name)
        self.services[rec.name] = rec
        change.services.add(rec.name)
        self._waypoint_changed(rec.name, change)

    def _remove_service(self, name: str, change: Change) -> None:
        old = self.services.pop(name)
        if old.waypoint is not None and old.waypoint[0] == "host":
            _unlink(self._wp_services, str(old.waypoint[1]), name)
        change.services.add(name)
        self._waypoint_changed(name, change)
        # endpoints are kept in _members: a re-added service gets them back (ztunnel does too)

    def _waypoint_changed(self, name: str, change: Change) -> None:
        """``name`` may be a waypoint's Service: whoever names it by hostname re-resolves."""
        users = self._wp_services.get(name)
        if users:
            change.services.update(users)
        uids = self._wp_workloads.get(name)
        if uids:
            change.backends.update(u for u in uids if u not in self._addressless)

    def _link_workload_waypoint(self, uid: str, old: WorkloadRecord | None,
                                rec: WorkloadRecord | None) -> None:
        """Keep the hostname-waypoint index of workloads (only pods with a waypoint get here)."""
        ref = old.profile.waypoint if old is not None else None
        if ref is not None and ref[0] == "host":
            _unlink(self._wp_workloads, str(ref[1]), uid)
        self._wp_uids.discard(uid)
        ref = rec.profile.waypoint if rec is not None else None
        if ref is not None:
            self._wp_uids.add(uid)
            if ref[0] == "host":
                self._wp_workloads.setdefault(str(ref[1]), set()).add(uid)

    def resolve_waypoint(self, ref: GatewayRef | None, own_name: str = "") -> Waypoint | None:
        """A GatewayAddress -> the waypoint frontend the kernel balances on. A hostname names the
        waypoint's Service: its first VIP (IPv4 preferred); a Service that is unknown or has no
        VIP gives an unresolved Waypoint, which the kernel refuses (never a silent bypass)."""
        if ref is None:
            return None
        kind, target, port = ref
        if kind == "addr":
            return Waypoint(target, port)  # type: ignore[arg-type]
        key = str(target)
        if key == own_name:
            return None  # a service cannot be its own waypoint
        wsvc = self.services.get(key)
        if wsvc is None or not wsvc.vips:
            return Waypoint(b"", port, key)
        vip = next((v for v in wsvc.vips if len(v) == 4), wsvc.vips[0])
        return Waypoint(vip, port, key)

    def _service_waypoint(self, rec: ServiceRecord) -> Waypoint | None:
        """Kmesh's loop guards: no waypoint for a service that is its own waypoint's address or
        that has the waypoint status port 15021 (a waypoint's own Service)."""
        if rec.waypoint is None or any(sp == STATUS_PORT for sp, _ in rec.ports):
            return None
        wp = self.resolve_waypoint(rec.waypoint, rec.name)
        if wp is not None and rec.vips and wp.address == rec.vips[0]:
            return None
        return wp

    def _put_workloads(self, recs: list[WorkloadRecord], change: Change) -> bool:
        """Insert or replace workloads. Hot path (100k per initial push): a batch of new
        workloads only (a first push) goes in bulk, anything else through the loop. True when
        it went in bulk (then every member list it touched is at its exact size)."""
        if self._put_new_workloads(recs, change):
            return True
        self._put_each_workload(recs, change)
        return False

    def _put_new_workloads(self, recs: list[WorkloadRecord], change: Change) -> bool:
        """_put_each_workload for a batch whose uids are all distinct and none held, each with
        its one address as bytes (the records of a first push): the stores are updated by
        C-level passes (dict updates, groupby), with Python statements per run of records
        sharing a profile (the replicas of a deployment arrive together), not per record.
        False (nothing done) when the batch is not so."""
        n = len(recs)
        if n < _BULK_FROM:
            return False
        workloads = self.workloads
        uids = list(map(_uid_of, recs))
        new = dict(zip(uids, recs, strict=True))
        if len(new) != n or not workloads.keys().isdisjoint(new):
            return False
        if set(map(type, map(_addr_of, recs))) != {bytes}:
            return False  # an address-less or multi-address workload: the loop's cases
        workloads.update(new)
        del new
        addressless = self._addressless
        if addressless:
            addressless.difference_update(uids)
        members, touched = self._members, change.services
        node_name = self.node_name if not self._explicit_locality else ""
        for prof, run in groupby(recs, _profile_of):  # profiles compare by identity
            group = list(run)
            for svc, _ in prof.services:
                m = members.get(svc)
                if m is None:
                    members[svc] = group[:] if len(group) <= _SMALL_MEMBERS else dict(
                        zip(map(_uid_of, group), group, strict=True))
                elif m.__class__ is not list:
                    m.update(zip(map(_uid_of, group), group, strict=True))  # type: ignore[union-attr]
                elif len(m) + len(group) <= _SMALL_MEMBERS:
                    members[svc] = m + group  # type: ignore[operator]  # a new list, exact size
                else:  # as the loop: a list up to _SMALL_MEMBERS, then a dict in member order
                    big = members[svc] = dict(zip(map(_uid_of, m), m, strict=True))  # type: ignore[arg-type]
                    big.update(zip(map(_uid_of, group), group, strict=True))
                touched.add(svc)
            if prof.waypoint is not None:
                for rec in group:
                    self._link_workload_waypoint(rec.uid, None, rec)
            if node_name and prof.node == node_name:
                for rec in group:
                    if self._locality is None or self._locality_uid == rec.uid:
                        self._set_node_locality(rec, change)
        change.workloads.update(uids)
        change.backends.update(uids)
        return True

    def _put_each_workload(self, recs: list[WorkloadRecord], change: Change) -> None:
        """Insert or replace workloads one by one: locals, few calls per record; a new record
        takes a shorter path than a replacement."""
        workloads, members, addressless = self.workloads, self._members, self._addressless
        touched, touched_backends, touched_workloads = change.services, change.backends, change.workloads
        node_name = self.node_name if not self._explicit_locality else ""
        new_uids: list[str] = []
        new_backends: list[str] = []
        last_prof = None  # replicas of a deployment usually arrive together: touch its services once
        for rec in recs:
            uid = rec.uid
            prof = rec.profile
            old = workloads.get(uid)
            addr = rec._addr
            has_address = addr.__class__ is bytes or bool(addr)
            if old is None:
                new_uids.append(uid)
                if has_address:
                    new_backends.append(uid)
                    if addressless:
                        addressless.discard(uid)
                else:  # hostname only: cannot be written as a backend
                    addressless.add(uid)
            else:  # an update replaces the old entry entirely
                if old.profile is not prof or old != rec:
                    touched_workloads.add(uid)
                for svc, _ in old.profile.services:
                    _drop_member(members, svc, uid)
                    touched.add(svc)
                last_prof = None
                if not has_address:
                    addressless.add(uid)
                    if old.has_address:
                        touched_backends.add(uid)  # it was a backend until now
                else:
                    if old != rec:  # Backend equality: uid, name, namespace, ipv4, ipv6, ...
                        touched_backends.add(uid)
                    if addressless:
                        addressless.discard(uid)
            workloads[uid] = rec
            if prof.waypoint is not None or (old is not None and old.profile.waypoint is not None):
                self._link_workload_waypoint(uid, old, rec)
            for svc, _ in prof.services:
                m = members.get(svc)
                if m is None:
                    members[svc] = [rec]
                elif m.__class__ is not list:
                    m[uid] = rec  # type: ignore[call-overload]
                elif len(m) < _SMALL_MEMBERS:
                    m.append(rec)  # type: ignore[union-attr]
                else:
                    big = members[svc] = {r.uid: r for r in m}
                    big[uid] = rec
            if prof is not last_prof:
                for svc, _ in prof.services:
                    touched.add(svc)
                last_prof = prof
            if node_name and prof.node == node_name and (self._locality is None or self._locality_uid == uid):
                self._set_node_locality(rec, change)
        touched_workloads.update(new_uids)
        touched_backends.update(new_backends)

    def _trim_members(self, touched: set[str]) -> None:
        """After a big push (apply_address_batches): member lists grown by append keep up to ~60%
        spare slots (10 in 16): copy them exact (~0.5 MiB at 10k x 10)."""
        members = self._members
        for svc in touched:
            m = members.get(svc)
            if m.__class__ is list and len(m) > 4:  # type: ignore[union-attr]
                members[svc] = m[:]  # type: ignore[index]

    def _set_node_locality(self, rec: WorkloadRecord, change: Change) -> None:
        """Kmesh: the node's locality is that of the first workload seen on NODE_NAME."""
        prof = rec.profile
        new = prof.locality
        self._locality_uid = rec.uid
        if not self.cluster_id:
            self.cluster_id = prof.cluster_id
        if not self.network:
            self.network = prof.network
        if new != self._locality:
            self._locality = new
            change.services.update(n for n, s in self.services.items() if s.routing)

    def _remove_workload(self, uid: str, change: Change) -> None:
        old = self.workloads.pop(uid)
        if old.profile.waypoint is not None:
            self._link_workload_waypoint(uid, old, None)
        change.workloads.add(uid)
        for svc, _ in old.profile.services:
            _drop_member(self._members, svc, uid)
            change.services.add(svc)
        if not old.has_address:
            self._addressless.discard(uid)
        else:
            change.backends.add(uid)

    # ---- projection ------------------------------------------------------------------------
    @property
    def node_locality(self) -> tuple[str, str, str] | None:
        return self._locality

    def projection(self) -> Projection:
        """The full desired data plane. Only services touched since the last call are rebuilt."""
        with self._lock:
            self._refresh()
            backends: dict[str, Backend] = dict(self.workloads)  # records are their Backends
            for uid in self._wp_uids:  # a pod with its own waypoint: a copy with it resolved
                w = self.workloads[uid]
                backends[uid] = Backend(w.uid, w.name, w.namespace, w.ipv4, w.ipv6, w.handoff_port,
                                        self.resolve_waypoint(w.profile.waypoint))
            for uid in self._addressless:
                del backends[uid]
            return Projection(services=dict(self._svc_cache), backends=backends)

    def service_projection(self, name: str) -> Service | None:
        with self._lock:
            self._refresh()
            return self._svc_cache.get(name)

    def _refresh(self) -> None:
        if not self._dirty:
            return
        cache = self._svc_cache
        src = self._source_scopes()
        for name in self._dirty:
            svc = self._build_service(name, src)
            if svc is None:
                cache.pop(name, None)
            else:
                old = cache.get(name)
                if old is None or old != svc:  # equal: keep the old object (identity for the reconciler)
                    cache[name] = svc
        self._dirty.clear()

    def _source_scopes(self) -> dict[int, str]:
        region, zone, subzone = self._locality or ("", "", "")
        return {SCOPE_REGION: region, SCOPE_ZONE: zone, SCOPE_SUBZONE: subzone, SCOPE_NODE: self.node_name,
                SCOPE_CLUSTER: self.cluster_id, SCOPE_NETWORK: self.network}

    def _build_service(self, name: str, src: dict[int, str] | None = None) -> Service | None:
        """One service's projection. Hot path at scale: what depends only on the workload's
        profile (eligibility, priority, target ports) is derived once per profile."""
        rec = self.services.get(name)
        if rec is None or rec.lb_mode == MODE_PASSTHROUGH:
            return None  # PASSTHROUGH: connect to the original destination, nothing to translate
        mode = _LB_MODES.get(rec.lb_mode, LbMode.RANDOM)
        wp = self._service_waypoint(rec) if rec.waypoint is not None else None
        members = self._members.get(name)
        if not members:
            return Service(name, rec.vips, tuple([ServicePort.of(p, (), 0) for p, _ in rec.ports]), mode, wp)
        allow_all = rec.health_policy == HEALTH_ALLOW_ALL
        ranked = rec.lb_mode in (MODE_STRICT, MODE_FAILOVER) and bool(rec.routing)
        strict = rec.lb_mode == MODE_STRICT
        if ranked and src is None:
            src = self._source_scopes()
        sports = rec.ports
        derived: dict[WorkloadProfile, tuple[int, int, tuple[int, ...]] | None] = {}
        addressless = self._addressless
        # Common case: every eligible member derives the same (priority, weight, target ports)
        # (replicas of one deployment, or profiles that differ only where the service does not
        # look): the ports are then just the sorted uids plus shared values, no per-endpoint object.
        uids: list[str] = []
        first = None  # the one derivation seen so far
        mixed: list[tuple[int, str, int, tuple[int, ...]]] | None = None
        for w in (members if members.__class__ is list else members.values()):  # type: ignore[union-attr]
            uid = w.uid
            if addressless and uid in addressless:
                continue  # not a backend: nothing to point an endpoint at
            prof = w.profile
            d = derived.get(prof, False)
            if d is False:
                d = derived[prof] = _derive(prof, name, sports, allow_all, ranked, strict, rec.routing, src)
            if d is None:
                continue
            if mixed is None:
                if d is first or first is None or d == first:
                    first = d
                    uids.append(uid)
                    continue
                mixed = [(first[0], u, first[1], first[2]) for u in uids]  # type: ignore[index]
            mixed.append((d[0], uid, d[1], d[2]))
        if mixed is None:
            uids.sort()
            return Service(name, rec.vips, _uniform_ports(sports, tuple(uids), first), mode, wp)
        mixed.sort()  # (priority, uid, ...): uids are unique, so the tail is never compared
        ports = []
        for i, (sport, _) in enumerate(sports):
            rows = [(uid, tps[i], weight, prio) for prio, uid, weight, tps in mixed if tps[i]]
            ports.append(ServicePort.of(sport, tuple([r[0] for r in rows]), tuple([r[1] for r in rows]),
                                        tuple([r[2] for r in rows]), tuple([r[3] for r in rows])))
        return Service(name, rec.vips, tuple(ports), mode, wp)

    # ---- config dump -----------------------------------------------------------------------
    def config_dump(self) -> dict:
        """``{"workloads", "services", "policies"}`` in the istioctl ztunnel-config json shapes."""
        from daemon.xds import dump  # lazy: pulls the protobuf modules in

        with self._lock:
            return dump.config_dump(self)

    def members(self, service: str) -> list[str]:
        with self._lock:
            return sorted(w.uid for w in _records(self._members.get(service)))

    def member_records(self, service: str) -> Iterator[WorkloadRecord]:
        """The workloads naming ``service``, in uid order (caller holds no lock: a snapshot)."""
        with self._lock:
            items = sorted(_records(self._members.get(service)), key=_uid_of)
        return iter(items)


_LB_MODES = {MODE_STRICT: LbMode.STRICT, MODE_FAILOVER: LbMode.FAILOVER}

Members = list[WorkloadRecord] | dict[str, WorkloadRecord]
_SMALL_MEMBERS = 32  # a service's members: a list up to this many, then a {uid: record} dict
_TRIM_FROM = 1024  # workloads in one batch from which the touched member lists are trimmed


_BULK_FROM = 64  # new workloads in one batch from which _put_new_workloads takes them
_uid_of = attrgetter("uid")  # C-level getters: map() over 100k records runs no Python frame
_profile_of = attrgetter("profile")
_addr_of = attrgetter("_addr")


def _records(m: Members | None) -> Iterable[WorkloadRecord]:
    if m is None:
        return ()
    return m if m.__class__ is list else m.values()  # type: ignore[union-attr, return-value]


def _drop_member(members: dict[str, Members], svc: str, uid: str) -> None:
    """Remove workload ``uid`` from ``svc``'s members (a list: at most _SMALL_MEMBERS to scan)."""
    m = members.get(svc)
    if m is None:
        return
    if m.__class__ is list:
        for i, w in enumerate(m):  # type: ignore[arg-type]
            if w.uid == uid:
                del m[i]  # type: ignore[arg-type]
                break
    else:
        m.pop(uid, None)  # type: ignore[call-arg]
    if not m:
        del members[svc]


def _unlink(index: dict[str, set[str]], key: str, member: str) -> None:
    users = index.get(key)
    if users is not None:
        users.discard(member)
        if not users:
            del index[key]


def _uniform_ports(sports: Ports, uids: tuple[str, ...],
                   d: tuple[int, int, tuple[int, ...]] | None) -> tuple[ServicePort, ...]:
    """The ports of a service whose endpoints all derived ``d`` (priority, weight, target ports):
    one uids tuple shared by every port the endpoints serve."""
    if d is None:
        return tuple([ServicePort.of(p, (), 0) for p, _ in sports])
    prio, weight, tps = d
    return tuple([ServicePort.of(sport, uids, tp, weight, prio) if tp else ServicePort.of(sport, (), 0)
                  for (sport, _), tp in zip(sports, tps, strict=True)])


def _derive(prof: WorkloadProfile, service: str, sports: Ports, allow_all: bool, ranked: bool,
            strict: bool, routing: tuple[int, ...], src: dict[int, str] | None
            ) -> tuple[int, int, tuple[int, ...]] | None:
    """(priority, weight, target port per service port) of a workload with this profile, or None."""
    if prof.capacity <= 0 or (prof.status != STATUS_HEALTHY and not allow_all):
        return None
    prio = 0
    if ranked:
        prio = _priority(routing, src or {}, prof)
        if strict and prio != 0:
            return None  # STRICT: every scope must match
    own = prof.ports_of(service) or ()
    tps = []
    for sport, starget in sports:
        tp = 0
        for p_sport, p_target in own:
            if p_sport == sport and p_target:
                tp = p_target
                break
        if not tp:
            tp = starget if starget > 0 else (sport if prof.app_tunnel_port else 0)
        tps.append(tp)
    return prio, prof.capacity, tuple(tps)


def resolve_target_port(service: str, sport: int, starget: int, w: WorkloadRecord | WorkloadProfile) -> int:
    """ztunnel's order: workload PortList, then Service target_port, then app tunnel; else 0."""
    prof = w.profile if isinstance(w, WorkloadRecord) else w
    for p_sport, p_target in prof.ports_of(service) or ():
        if p_sport == sport and p_target:
            return p_target
    if starget > 0:
        return starget
    if prof.app_tunnel_port:
        return sport
    return 0


def _priority(routing: tuple[int, ...], src: dict[int, str], w: WorkloadProfile) -> int:
    """Kmesh: len(routing_preference) - number of leading scopes that match the source."""
    dst = {SCOPE_REGION: w.locality[0], SCOPE_ZONE: w.locality[1], SCOPE_SUBZONE: w.locality[2],
           SCOPE_NODE: w.node, SCOPE_CLUSTER: w.cluster_id, SCOPE_NETWORK: w.network}
    matched = 0
    for scope in routing:
        if scope not in dst or dst[scope] != src.get(scope):
            break
        matched += 1
    return min(len(routing) - matched, MAX_PRIORITY)
