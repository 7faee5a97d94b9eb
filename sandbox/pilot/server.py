"""A delta ADS server with istiod's push semantics, independent of where resources come from.

``ResourceStore`` holds the current resources per type URL (serialized, with a content-hash
version, like istiod master). ``DeltaAdsServer`` serves them on
``AggregatedDiscoveryService/DeltaAggregatedResources``:

- a new subscription (first request of a type, no nonce) gets the full set, minus resources
  whose version equals what the client claimed in ``initial_resource_versions``, plus
  ``removed_resources`` for claimed names that no longer exist;
- afterwards only changes are pushed (upserts and removals);
- every response carries a nonce; ACKs/NACKs are recorded, never answered (istiod does not
  resend on NACK);
- resources are wrapped in ``Any`` with the type URL set (Kmesh checks it).

The sandbox pilot feeds it from the Kubernetes API; tests and the benchmark feed it directly.
Per stream, a ``router`` may hand a node its own store (waypoint proxies get Envoy LDS/CDS/EDS
built for them, ztunnel-type nodes the shared workload store). Types subscribed with names
(EDS) only receive those names; a name subscribed again is sent again (Envoy forgets what it
unsubscribed); subscription changes are honoured even on an ACK, as Envoy combines them.
Authentication is pluggable (``Authenticator``) so the TLS port can require it and the
plaintext port not, as istiod does.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("sandbox.pilot")

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"
ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"


def version_of(value: bytes) -> str:
    return hashlib.blake2b(value, digest_size=8).hexdigest()


class _Subscriber:
    def __init__(self) -> None:
        self.pending: dict[str, set[str]] = {}
        self.event = threading.Event()


class ResourceStore:
    """Current resources: type URL -> name -> (version, Any.value bytes). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resources: dict[str, dict[str, tuple[str, bytes]]] = {}
        self._subs: list[_Subscriber] = []
        self._type_urls: dict[str, dict[str, str]] = {}  # per-resource Any type URL override (tests)

    def update(
        self,
        type_url: str,
        upserts: Mapping[str, bytes] | None = None,
        removed: Iterable[str] = (),
        any_type_url: Mapping[str, str] | None = None,
    ) -> None:
        """Upsert serialized resources and remove names; pushes to every open stream."""
        with self._lock:
            current = self._resources.setdefault(type_url, {})
            overrides = self._type_urls.setdefault(type_url, {})
            changed: set[str] = set()
            for name, value in (upserts or {}).items():
                ver = version_of(value)
                old = current.get(name)
                if old is None or old[0] != ver:
                    current[name] = (ver, value)
                    changed.add(name)
                if any_type_url and name in any_type_url:
                    overrides[name] = any_type_url[name]
                    changed.add(name)
            for name in removed:
                if current.pop(name, None) is not None:
                    overrides.pop(name, None)
                    changed.add(name)
            if changed:
                for sub in self._subs:
                    sub.pending.setdefault(type_url, set()).update(changed)
                    sub.event.set()

    def replace(self, type_url: str, resources: Mapping[str, bytes]) -> None:
        """Make the set of ``type_url`` exactly ``resources`` (removing everything else)."""
        with self._lock:
            stale = set(self._resources.get(type_url, {})) - set(resources)
        self.update(type_url, resources, stale)

    def snapshot(self, type_url: str) -> dict[str, tuple[str, bytes]]:
        with self._lock:
            return dict(self._resources.get(type_url, {}))

    def get(self, type_url: str, names: Iterable[str]) -> dict[str, tuple[str, bytes, str]]:
        with self._lock:
            cur = self._resources.get(type_url, {})
            ov = self._type_urls.get(type_url, {})
            return {n: (*cur[n], ov.get(n, type_url)) for n in names if n in cur}

    def subscribe(self) -> _Subscriber:
        sub = _Subscriber()
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def take(self, sub: _Subscriber) -> dict[str, set[str]]:
        with self._lock:
            pending, sub.pending = sub.pending, {}
            sub.event.clear()
            return pending


class AuthError(Exception):
    """Rejects a stream with a gRPC status (UNAUTHENTICATED / PERMISSION_DENIED)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Authenticator:
    """Hook: ``authenticate`` sees the call metadata, ``authorize`` the first request's node."""

    def authenticate(self, metadata: Mapping[str, str]) -> Any:
        return None

    def authorize(self, identity: Any, node: Any) -> None:
        return None


@dataclass
class StreamRecord:
    """What one stream did, for tests: peer, node id, ACK/NACK log."""

    peer: str
    node_id: str = ""
    node_metadata: dict[str, Any] = field(default_factory=dict)
    subscriptions: list[tuple[str, list[str], bool]] = field(default_factory=list)  # (type, names, has node)
    initial_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    acks: list[tuple[str, str, str]] = field(default_factory=list)  # (type, nonce, error message)
    sent: int = 0
    closed: bool = False


#: ``router(node) -> (store, release)`` or None for the default store; may raise AuthError
Router = Callable[[Any], "tuple[ResourceStore, Callable[[], None]] | None"]


class DeltaAdsServer:
    """The servicer. ``add_to(server)`` registers it on a grpc.Server."""

    def __init__(self, store: ResourceStore, authenticator: Authenticator | None = None,
                 on_send: Callable[[str, int], None] | None = None, honor_versions: bool = True,
                 router: Router | None = None) -> None:
        self.store = store
        self.router = router
        self.authenticator = authenticator
        self.on_send = on_send  # (type_url, resource count) just before a response is handed to gRPC
        # True: skip resources whose version the client already has (istiod master); False: resend
        # everything on a new stream (istiod <= 1.30); removals are computed either way
        self.honor_versions = honor_versions
        self.streams: list[StreamRecord] = []
        self._nonce = itertools.count(1)
        self._lock = threading.Lock()

    def handler(self) -> Any:
        import grpc
        from envoy.service.discovery.v3 import discovery_pb2

        method = grpc.stream_stream_rpc_method_handler(
            self._delta,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=None,  # responses are serialized by us (bytes)
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"DeltaAggregatedResources": method})

    def add_to(self, server: Any) -> None:
        server.add_generic_rpc_handlers((self.handler(),))

    def _abort(self, context: Any, code_name: str, message: str) -> None:
        import grpc

        context.abort(getattr(grpc.StatusCode, code_name), message)

    def _delta(self, request_iterator: Iterator[Any], context: Any) -> Iterator[bytes]:
        from envoy.service.discovery.v3 import discovery_pb2

        record = StreamRecord(peer=context.peer())
        with self._lock:
            self.streams.append(record)
        identity = None
        if self.authenticator is not None:
            md = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
            try:
                identity = self.authenticator.authenticate(md)
            except AuthError as e:
                record.closed = True
                self._abort(context, e.code, e.message)
        try:
            first = next(request_iterator)
        except StopIteration:
            record.closed = True
            return
        if not first.node.id:
            record.closed = True
            self._abort(context, "INVALID_ARGUMENT", "missing node information")
        record.node_id = first.node.id
        record.node_metadata = {k: v.string_value for k, v in first.node.metadata.fields.items()}
        if self.authenticator is not None:
            try:
                self.authenticator.authorize(identity, first.node)
            except AuthError as e:
                record.closed = True
                self._abort(context, e.code, e.message)

        store, release = self.store, None
        if self.router is not None:
            try:
                routed = self.router(first.node)
            except AuthError as e:
                record.closed = True
                self._abort(context, e.code, e.message)
            if routed is not None:
                store, release = routed
        sub = store.subscribe()
        lock = threading.Lock()
        initial: dict[str, dict[str, str]] = {}  # type -> claimed versions, pending full push
        subscribed: set[str] = set()
        names: dict[str, set[str] | None] = {}  # type -> subscribed names (None: wildcard)
        resend: dict[str, set[str]] = {}  # type -> names subscribed again, to send even if unchanged
        sent_by_nonce: dict[str, list[str]] = {}
        closed = threading.Event()

        def on_request(req: Any) -> None:
            if req.response_nonce:
                record.acks.append((req.type_url, req.response_nonce, req.error_detail.message))
                if req.error_detail.message:
                    log.warning("NACK from %s for %s (resources %s): %s", record.node_id, req.type_url,
                                ", ".join(sent_by_nonce.get(req.response_nonce, [])) or "-",
                                req.error_detail.message)
                sent_by_nonce.pop(req.response_nonce, None)
                if not req.resource_names_subscribe and not req.resource_names_unsubscribe:
                    return
            record.subscriptions.append((req.type_url, list(req.resource_names_subscribe), bool(req.node.id)))
            subs = set(req.resource_names_subscribe)
            with lock:
                if req.type_url not in subscribed:
                    subscribed.add(req.type_url)
                    initial[req.type_url] = dict(req.initial_resource_versions)
                    record.initial_versions[req.type_url] = dict(req.initial_resource_versions)
                    names[req.type_url] = None if (not subs or "*" in subs) else set(subs)
                else:
                    current = names.get(req.type_url)
                    if current is not None:
                        current |= subs - {"*"}
                        if "*" in subs:
                            names[req.type_url] = None
                    resend.setdefault(req.type_url, set()).update(subs - {"*"})
                current = names.get(req.type_url)
                if current is not None:
                    current -= set(req.resource_names_unsubscribe)
            sub.event.set()

        def wanted(type_url: str, candidates: Iterable[str]) -> list[str]:
            with lock:
                allowed = names.get(type_url)
            return [n for n in candidates if allowed is None or n in allowed]

        def reader() -> None:
            try:
                for req in request_iterator:
                    on_request(req)
            except Exception:  # noqa: BLE001 - client went away
                pass
            finally:
                closed.set()
                sub.event.set()

        on_request(first)
        threading.Thread(target=reader, name="ads-reader", daemon=True).start()
        sent: dict[str, dict[str, str]] = {}  # type -> name -> version the client has
        try:
            while context.is_active() and not closed.is_set():
                sub.event.wait(timeout=1.0)
                pending = store.take(sub)
                with lock:
                    fresh, initial_now = dict(initial), initial.copy()
                    initial.clear()
                    active = set(subscribed)
                    again = resend.copy()
                    resend.clear()
                for type_url, claimed in initial_now.items():
                    snap = store.snapshot(type_url)
                    skip = claimed if self.honor_versions else {}
                    names_now = wanted(type_url, [n for n, (v, _) in snap.items() if skip.get(n) != v])
                    removed = sorted(set(claimed) - set(snap))
                    have = sent.setdefault(type_url, {})
                    have.update({n: v for n, v in claimed.items() if n in snap})
                    yield self._response(discovery_pb2, store, type_url, names_now, removed, have,
                                         sent_by_nonce)
                    pending.pop(type_url, None)
                    again.pop(type_url, None)
                for type_url, extra in again.items():
                    have = sent.setdefault(type_url, {})
                    for n in extra:
                        have.pop(n, None)
                    pending.setdefault(type_url, set()).update(extra)
                for type_url, changed in pending.items():
                    if type_url not in active or type_url in fresh:
                        continue
                    have = sent.setdefault(type_url, {})
                    current = store.get(type_url, changed)
                    ups = wanted(type_url, [n for n in changed
                                            if n in current and have.get(n) != current[n][0]])
                    gone = sorted(n for n in changed if n not in current and n in have)
                    if ups or gone:
                        yield self._response(discovery_pb2, store, type_url, sorted(ups), gone, have,
                                             sent_by_nonce)
        finally:
            record.closed = True
            store.unsubscribe(sub)
            if release is not None:
                release()

    def _response(self, pb: Any, store: ResourceStore, type_url: str, names: list[str], removed: list[str],
                  have: dict[str, str], sent_by_nonce: dict[str, list[str]]) -> bytes:
        resp = pb.DeltaDiscoveryResponse(type_url=type_url, nonce=f"n{next(self._nonce)}",
                                         system_version_info=f"v{next(self._nonce)}")
        current = store.get(type_url, names)
        add = resp.resources.add
        for name in names:
            item = current.get(name)
            if item is None:
                continue
            ver, value, any_type = item
            r = add(name=name, version=ver)
            r.resource.type_url = any_type
            r.resource.value = value
            have[name] = ver
        for name in removed:
            have.pop(name, None)
        resp.removed_resources.extend(removed)
        sent_by_nonce[resp.nonce] = [r.name for r in resp.resources]
        data = resp.SerializeToString()
        if self.on_send is not None:
            self.on_send(type_url, len(resp.resources))
        return data


def serve(store: ResourceStore, port: int, authenticator: Authenticator | None = None,
          tls: tuple[bytes, bytes] | None = None, host: str = "127.0.0.1",
          on_send: Callable[[str, int], None] | None = None,
          workers: int = 16, honor_versions: bool = True,
          start: bool = True, router: Router | None = None,
          unix_socket: str | None = None) -> tuple[Any, int, DeltaAdsServer]:
    """Bind (and unless ``start=False``, start) a grpc.Server on host:port (0 = pick; -1 = no TCP
    port, only ``unix_socket``), plus, without TLS, on ``unix_socket`` if given (what a pod's
    Envoy reaches the pilot through, as istio-agent's ``XDS`` socket).

    Returns (server, bound port, servicer); a port that cannot be bound raises before anything runs.
    """
    from concurrent import futures

    import grpc

    opts = [("grpc.max_send_message_length", 256 * 1024 * 1024),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=opts)
    servicer = DeltaAdsServer(store, authenticator, on_send, honor_versions, router)
    servicer.add_to(server)
    if unix_socket is not None:
        import os

        if os.path.exists(unix_socket):
            os.unlink(unix_socket)  # a stale socket of a previous run
        if server.add_insecure_port(f"unix:{unix_socket}") == 0:
            raise OSError(f"cannot listen on unix socket {unix_socket}")
        if port < 0:
            if start:
                server.start()
            return server, -1, servicer
    if tls is not None:
        key, chain = tls
        creds = grpc.ssl_server_credentials([(key, chain)])
        bound = server.add_secure_port(f"{host}:{port}", creds)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    if start:
        server.start()
    return server, bound, servicer
