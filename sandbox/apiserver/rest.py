"""REST semantics of the API server, independent of the HTTP transport.

``Api.handle(Request) -> Response`` routes a request to discovery, a verb on a resource, or a
subresource (status, scale, token, log; exec and portforward upgrade the connection) and returns a
JSON body, plain text, or a stream of watch events. All writes go through one path: decode ->
defaults -> validation -> store, with ``dryRun=All`` stopping just before the store.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import yaml

from . import discovery, errors, fieldmanager, kinds, patching, protobuf, schema, tables
from .authn import AuthnEndpoints
from .defaults import GENERATION_KINDS, STATUS_SUBRESOURCE_KINDS, apply_defaults, initial_status
from .deletion import DeleteEndpoints
from .errors import ApiError
from .exec import ExecEndpoints
from .kinds import ResourceType
from .logs import LogEndpoints, LogResolver
from .model import Request, Response, Target, json_response, truthy
from .objects import (
    IpAllocator,
    NodePorts,
    clone,
    generate_name,
    new_uid,
    now_rfc3339,
    strip_for_compare,
)
from .portforward import PortForwardEndpoints
from .selectors import parse_field_selector, parse_label_selector
from .store import Store
from .tokens import TokenIssuer
from .validation import validate

log = logging.getLogger("sandbox.apiserver")
WATCH_DEFAULT_TIMEOUT = 1800.0
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class Api(DeleteEndpoints, AuthnEndpoints, LogEndpoints, ExecEndpoints, PortForwardEndpoints):
    """Routing, discovery and the verbs; token, log, exec and portforward come from the mixins."""

    def __init__(
        self,
        store: Store,
        issuer: TokenIssuer,
        ips: IpAllocator,
        admin_token: str,
        log_resolver: LogResolver | None = None,
        watch_timeout: float = WATCH_DEFAULT_TIMEOUT,
    ) -> None:
        self.store = store
        self.issuer = issuer
        self.ips = ips
        self.admin_token = admin_token
        self.log_resolver = log_resolver
        self.watch_timeout = watch_timeout
        self.stopping = False
        self.namespace_grace = 1.0
        self.graceful_pod_deletion = False
        self.node_ports = NodePorts()
        self.bookmark_interval = 10.0  # seconds between BOOKMARKs on idle watches that allow them
        self.stream_counts: dict[str, int] = {}  # exec / portforward sessions served

    # ---------------------------------------------------------------- bootstrap / auth

    def bootstrap(self) -> None:
        """The namespaces and the ``kubernetes`` Service every cluster starts with."""
        ns_rt = kinds.by_kind("Namespace")
        svc_rt = kinds.by_kind("Service")
        assert ns_rt and svc_rt
        for ns in SYSTEM_NAMESPACES:
            if self.store.get(ns_rt, "", ns) is None:
                self._create(ns_rt, "v1", None, {"metadata": {"name": ns}}, {}, "kube-apiserver")
        if self.store.get(svc_rt, "default", "kubernetes") is None:
            svc = {
                "metadata": {
                    "name": "kubernetes",
                    "labels": {"component": "apiserver", "provider": "kubernetes"},
                },
                "spec": {
                    "clusterIP": self.ips.first(),
                    "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
                },
            }
            self._create(svc_rt, "v1", "default", svc, {}, "kube-apiserver")

    # ---------------------------------------------------------------- routing

    def handle(self, req: Request) -> Response:
        try:
            return self._route(req)
        except ApiError as e:
            return json_response(e.code, e.status())
        except Exception as e:  # noqa: BLE001 - a bug must still answer with a Status, not a dropped socket
            log.exception("internal error serving %s %s", req.method, req.path)
            return json_response(
                500, ApiError(500, "InternalError", f"Internal error occurred: {e}").status()
            )

    def _route(self, req: Request) -> Response:
        path = req.path.rstrip("/") or "/"
        if path in ("/healthz", "/livez", "/readyz"):
            return Response(200, "ok", "text/plain")
        if path == "/version":
            return json_response(200, discovery.VERSION)
        if path == "/.well-known/openid-configuration":
            return json_response(
                200,
                {
                    "issuer": self.issuer.issuer,
                    "jwks_uri": "/openid/v1/jwks",
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                },
            )
        if path == "/openid/v1/jwks":
            return json_response(200, self.issuer.jwks())
        if path == "/api":
            return json_response(200, discovery.api_versions())
        if path == "/apis":
            return json_response(200, discovery.api_group_list())
        if path == "/openapi/v3":
            return json_response(200, discovery.openapi_v3_root())
        if path.startswith("/openapi/v3/"):
            parts = path[len("/openapi/v3/") :].split("/")
            doc = None
            if parts[0] == "api" and len(parts) == 2:
                doc = discovery.openapi_v3_gv("", parts[1])
            elif parts[0] == "apis" and len(parts) == 3:
                doc = discovery.openapi_v3_gv(parts[1], parts[2])
            if doc is None:
                raise errors.path_not_found()
            return json_response(200, doc)
        segs = [s for s in path.split("/") if s]
        if segs[0] == "api" and len(segs) >= 2:
            group, version, rest = "", segs[1], segs[2:]
        elif segs[0] == "apis" and len(segs) >= 2:
            if len(segs) == 2:
                doc = discovery.api_group(segs[1])
                if doc is None:
                    raise errors.path_not_found()
                return json_response(200, doc)
            group, version, rest = segs[1], segs[2], segs[3:]
        else:
            raise errors.path_not_found()
        if not rest:
            doc = discovery.resource_list(group, version)
            if doc is None:
                raise errors.path_not_found()
            return json_response(200, doc)
        watch_prefix = rest[0] == "watch"
        if watch_prefix:
            rest = rest[1:]
        target = self._target(group, version, rest)
        if watch_prefix:
            if req.method != "GET":
                raise errors.method_not_allowed()
            return self._watch(req, target)
        return self._dispatch(req, target)

    def _target(self, group: str, version: str, rest: list[str]) -> Target:
        namespace = None
        if rest and rest[0] == "namespaces" and len(rest) >= 3:
            rt = kinds.lookup(group, version, rest[2])
            if rt is not None and rt.namespaced:
                namespace, rest = rest[1], rest[2:]
        rt = kinds.lookup(group, version, rest[0]) if rest else None
        if rt is None or len(rest) > 3:
            raise errors.path_not_found()
        if rt.namespaced is False and namespace is not None:
            raise errors.path_not_found()
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and sub not in rt.subresources:
            raise errors.path_not_found()
        return Target(rt, version, namespace, name, sub)

    def _dispatch(self, req: Request, t: Target) -> Response:
        m = req.method
        if t.sub == "log":
            if m != "GET":
                raise errors.method_not_allowed()
            return self._log(req, t)
        if t.sub == "exec":
            return self._exec(req, t)
        if t.sub == "portforward":
            return self._portforward(req, t)
        if t.sub == "token":
            if m != "POST":
                raise errors.method_not_allowed()
            return self._token_request(req, t)
        if t.rt.kind == "TokenReview":
            if m != "POST" or t.name:
                raise errors.method_not_allowed()
            return self._token_review(req)
        if t.name is None:
            if m == "GET":
                if truthy(req.query.get("watch")):
                    return self._watch(req, t)
                return self._list(req, t)
            if m == "POST":
                return self._create_request(req, t)
            if m == "DELETE":
                return self._delete_collection(req, t)
            raise errors.method_not_allowed()
        if m == "GET":
            if truthy(req.query.get("watch")):
                return self._watch(req, t)
            return self._get(req, t)
        if m == "PUT":
            return self._update_request(req, t)
        if m == "PATCH":
            return self._patch_request(req, t)
        if m == "DELETE":
            return self._delete_request(req, t)
        raise errors.method_not_allowed()

    # ---------------------------------------------------------------- output helpers

    def _out(self, t: Target, obj: dict[str, Any]) -> dict[str, Any]:
        out = dict(obj)
        out["apiVersion"] = t.rt.api_version(t.version)
        out["kind"] = t.rt.kind
        return out

    def _render(self, req: Request, t: Target, obj: dict[str, Any], code: int = 200) -> Response:
        if t.sub == "scale":
            return json_response(code, self._scale_of(t, obj))
        if tables.wants_table(req.headers.get("accept", "")):
            return json_response(
                code, tables.to_table(t.rt, [self._out(t, obj)], str(self.store.resource_version))
            )
        return json_response(code, self._out(t, obj))

    def _ns(self, t: Target) -> str:
        return t.namespace or ""

    def _require(self, t: Target) -> dict[str, Any]:
        assert t.name is not None
        obj = self.store.get(t.rt, self._ns(t), t.name)
        if obj is None:
            raise errors.not_found(t.rt, t.name)
        return obj

    # ---------------------------------------------------------------- reads

    def _get(self, req: Request, t: Target) -> Response:
        return self._render(req, t, self._require(t))

    def _selected(self, req: Request, t: Target) -> tuple[list[dict[str, Any]], int]:
        label = parse_label_selector(req.query.get("labelSelector"))
        fields = parse_field_selector(req.query.get("fieldSelector"))
        items, rv = self.store.list(t.rt, t.namespace)
        return [o for o in items if label(o) and fields(o)], rv

    def _list(self, req: Request, t: Target) -> Response:
        items, rv = self._selected(req, t)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        cont = req.query.get("continue")
        if cont:
            try:
                after = tuple(json.loads(base64.urlsafe_b64decode(cont.encode())))
            except (ValueError, TypeError) as e:
                raise errors.bad_request("continue key is not valid: " + str(e)) from e
            items = [o for o in items if (o["metadata"].get("namespace", ""), o["metadata"]["name"]) > after]
        limit = int(req.query.get("limit") or 0)
        if limit > 0 and len(items) > limit:
            items = items[:limit]
            last = items[-1]["metadata"]
            key = json.dumps([last.get("namespace", ""), last["name"]]).encode()
            meta["continue"] = base64.urlsafe_b64encode(key).decode()
        if tables.wants_table(req.headers.get("accept", "")):
            table = tables.to_table(t.rt, [self._out(t, o) for o in items], str(rv))
            table["metadata"].update(meta)
            return json_response(200, table)
        return json_response(
            200,
            {
                "kind": f"{t.rt.kind}List",
                "apiVersion": t.rt.api_version(t.version),
                "metadata": meta,
                "items": [self._out(t, o) for o in items],
            },
        )

    def _watch(self, req: Request, t: Target) -> Response:
        label = parse_label_selector(req.query.get("labelSelector"))
        fields = parse_field_selector(req.query.get("fieldSelector"))
        if t.name:
            name = t.name
            fields_base = fields
            fields = lambda o: o["metadata"].get("name") == name and fields_base(o)  # noqa: E731
        rv_text = req.query.get("resourceVersion") or ""
        if rv_text and not rv_text.isdigit():
            raise errors.bad_request(f"invalid resource version: {rv_text!r}")
        since = int(rv_text) if rv_text and rv_text != "0" else None
        timeout = float(req.query.get("timeoutSeconds") or self.watch_timeout)
        table = tables.wants_table(req.headers.get("accept", ""))
        # Watch-list (client-go's WatchListClient, on by default from kubectl 1.35): the current
        # objects as ADDED events, then a BOOKMARK annotated k8s.io/initial-events-end. Without it
        # `kubectl delete -f` of a newer kubectl waits forever for the end of the initial events.
        initial_events = truthy(req.query.get("sendInitialEvents"))
        if initial_events:
            if req.query.get("resourceVersionMatch") != "NotOlderThan":
                raise errors.bad_request("sendInitialEvents requires resourceVersionMatch=NotOlderThan")
            if not truthy(req.query.get("allowWatchBookmarks")):
                raise errors.bad_request("sendInitialEvents requires allowWatchBookmarks=true")
            since = None
        try:
            with self.store.lock:  # the end marker sits right after the initial events, nothing between
                watcher = self.store.watch(t.rt, t.namespace, lambda o: label(o) and fields(o), since)
                if initial_events:
                    end_rv = str(self.store.resource_version)
                    watcher.queue.put(("BOOKMARK", {"metadata": {
                        "resourceVersion": end_rv, "annotations": {"k8s.io/initial-events-end": "true"}}}))
        except ApiError as e:
            # Like the watch cache: a 200 stream whose single event is an ERROR carrying the Status.
            body = json.dumps({"type": "ERROR", "object": e.status()}).encode() + b"\n"
            return Response(200, None, "application/json", iter([body]))

        bookmarks = truthy(req.query.get("allowWatchBookmarks")) and not table

        def bookmark() -> bytes | None:
            """A BOOKMARK at the store's version, only when nothing is queued for this watcher."""
            with self.store.lock:
                if not watcher.queue.empty():
                    return None
                rv = str(self.store.resource_version)
            obj = {
                "kind": t.rt.kind,
                "apiVersion": t.rt.api_version(t.version),
                "metadata": {"resourceVersion": rv},
            }
            return json.dumps({"type": "BOOKMARK", "object": obj}, separators=(",", ":")).encode() + b"\n"

        def events() -> Iterator[bytes]:
            deadline = time.monotonic() + timeout
            next_bookmark = time.monotonic() + self.bookmark_interval
            try:
                while not self.stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    item = watcher.next(min(left, 1.0))
                    if item is None:
                        if watcher.closed:
                            return
                        if bookmarks and time.monotonic() >= next_bookmark:
                            next_bookmark = time.monotonic() + self.bookmark_interval
                            mark = bookmark()
                            if mark:
                                yield mark
                                continue
                        yield b""  # lets the transport notice a closed connection
                        continue
                    typ, obj = item
                    if typ == "BOOKMARK":
                        mark = {"kind": t.rt.kind, "apiVersion": t.rt.api_version(t.version), **obj}
                        line = json.dumps({"type": typ, "object": mark}, separators=(",", ":"))
                        yield line.encode() + b"\n"
                        continue
                    out = self._out(t, obj)
                    if table:
                        out = tables.to_table(t.rt, [out], obj["metadata"].get("resourceVersion", ""))
                    yield json.dumps({"type": typ, "object": out}, separators=(",", ":")).encode() + b"\n"
            finally:
                watcher.close()

        return Response(200, None, "application/json", events())

    # ---------------------------------------------------------------- body decoding

    @staticmethod
    def _decode(req: Request) -> Any:
        ctype = req.headers.get("content-type", "application/json").split(";")[0].strip()
        if not req.body:
            raise errors.bad_request("the body of the request was empty")
        if ctype == "application/vnd.kubernetes.protobuf":
            try:
                obj = protobuf.decode(req.body)
            except (protobuf.ProtobufError, UnicodeDecodeError) as e:
                raise errors.bad_request(f"the object provided is unrecognized: {e}") from e
            if obj is None:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "the sandbox API server decodes protobuf bodies only "
                    "for Namespace, ConfigMap, Secret, ServiceAccount and Deployment; send JSON instead "
                    "(e.g. kubectl apply/create -f)",
                )
            return obj
        if "protobuf" in ctype or "cbor" in ctype:
            raise errors.unsupported_media(ctype)
        try:
            if "yaml" in ctype:
                # JSON semantics like sigs.k8s.io/yaml: timestamps stay strings, keys become strings.
                return json.loads(json.dumps(yaml.safe_load(req.body), default=str))
            return json.loads(req.body)
        except (ValueError, yaml.YAMLError) as e:
            raise errors.bad_request(f"the object provided is unrecognized: {e}") from e

    def _check_type(self, t: Target, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise errors.bad_request("the object provided is unrecognized (must be a JSON object)")
        kind, api_version = body.get("kind"), body.get("apiVersion")
        if kind and kind != t.rt.kind:
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({t.rt.api_version(t.version)})"
                if kind is None
                else f'{kind} in version "{t.version}" cannot be handled as a {t.rt.kind}: '
                f"the object kind does not match"
            )
        if api_version and api_version.rsplit("/", 1)[0] != (t.rt.group or api_version) and t.rt.group:
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({t.rt.api_version(t.version)})"
            )
        meta = body.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        return body

    @staticmethod
    def _manager(req: Request) -> str:
        m = req.query.get("fieldManager")
        if m:
            return m
        return req.headers.get("user-agent", "unknown").split("/")[0] or "unknown"

    @staticmethod
    def _dry_run(req: Request) -> bool:
        v = req.query.get("dryRun")
        if v and v != "All":
            raise errors.bad_request(f'unsupported dry run value "{v}"; supported value is "All"')
        return v == "All"

    # ---------------------------------------------------------------- writes

    def _admit(
        self,
        rt: ResourceType,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        strict: bool,
        decode: bool = True,
    ) -> None:
        """Decoding checks (400), defaults, immutability and validation (422 with all causes)."""
        if decode:
            schema.check(rt, obj, strict)
        apply_defaults(rt.kind, obj)
        name = obj["metadata"].get("name") or obj["metadata"].get("generateName") or ""
        causes = validate(rt.kind, obj, self.ips.contains)
        if old is not None:
            causes += _immutable(rt, old, obj)
        if causes:
            raise errors.invalid(rt, name, causes)

    def _namespace_must_exist(self, ns: str, rt: ResourceType, name: str) -> None:
        ns_rt = kinds.by_kind("Namespace")
        assert ns_rt
        obj = self.store.get(ns_rt, "", ns)
        if obj is None:
            raise errors.not_found(ns_rt, ns)
        if obj["metadata"].get("deletionTimestamp"):
            raise errors.forbidden(
                rt, name, f"unable to create new content in namespace {ns} because it is being terminated"
            )

    def _create_request(self, req: Request, t: Target) -> Response:
        body = self._check_type(t, self._decode(req))
        obj = self._create(
            t.rt, t.version, t.namespace, body, req.query, self._manager(req), self._dry_run(req)
        )
        return self._render(req, t, obj, 201)

    def _create(
        self,
        rt: ResourceType,
        version: str,
        namespace: str | None,
        body: dict[str, Any],
        query: dict[str, str],
        manager: str,
        dry_run: bool = False,
        managed: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        obj = clone(body)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            body_ns = meta.get("namespace")
            if namespace is None:
                raise errors.bad_request(
                    "the server could not find the requested resource (namespace required)"
                )
            if body_ns and body_ns != namespace:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = generate_name(meta["generateName"])
        for k in (
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "selfLink",
            "generation",
        ):
            meta.pop(k, None)
        obj["apiVersion"] = rt.api_version(version)
        obj["kind"] = rt.kind
        # Clients cannot create with a status, except a kubelet registering its Node.
        if rt.kind in STATUS_SUBRESOURCE_KINDS and rt.kind != "Node":
            status = initial_status(rt.kind, obj)
            if status is None:
                obj.pop("status", None)
            else:
                obj["status"] = status
        with self.store.lock:
            self._admit(rt, obj, None, query.get("fieldValidation") == "Strict")
            if rt.namespaced:
                self._namespace_must_exist(namespace or "", rt, meta["name"])
            if self.store.get(rt, namespace or "", meta["name"]) is not None:
                raise errors.already_exists(rt, meta["name"])
            meta["uid"] = new_uid()
            meta["creationTimestamp"] = now_rfc3339()
            if rt.kind in GENERATION_KINDS:
                meta["generation"] = 1
            if managed is not None:
                meta["managedFields"] = managed
            else:
                meta.pop("managedFields", None)
                fieldmanager.record_update(None, obj, manager, rt.builtin, obj["apiVersion"])
            if rt.kind == "Service":
                self._allocate_ip(rt, obj, dry_run)
                self._assign_node_ports(rt, obj, None, dry_run)
            if dry_run:
                return obj
            stored = self.store.put(rt, obj)
            if rt.kind == "Namespace":
                self._namespace_created(meta["name"])
            return stored

    def _namespace_created(self, ns: str) -> None:
        """What the service-account controller does for a new namespace."""
        sa_rt = kinds.by_kind("ServiceAccount")
        assert sa_rt
        if self.store.get(sa_rt, ns, "default") is None:
            self._create(sa_rt, "v1", ns, {"metadata": {"name": "default"}}, {}, "kube-controller-manager")

    def _assign_node_ports(
        self, rt: ResourceType, new: dict[str, Any], old: dict[str, Any] | None, dry_run: bool
    ) -> None:
        """Give NodePort/LoadBalancer ports a nodePort (kept across updates, released when unused)."""
        spec = new.get("spec") or {}
        ports = spec.get("ports") or []
        name = new["metadata"]["name"]

        def key(p: dict[str, Any]) -> tuple[Any, Any]:
            return p.get("port"), p.get("protocol", "TCP")

        before = {key(p): p.get("nodePort") for p in ((old or {}).get("spec") or {}).get("ports") or []}
        held = {n for n in before.values() if n}
        wanted: set[int] = set()
        if spec.get("type") in ("NodePort", "LoadBalancer"):
            for i, p in enumerate(ports):
                port = p.get("nodePort") or before.get(key(p))
                if port:
                    if not self.node_ports.in_range(port) or (
                        port not in held and not self.node_ports.is_free(port)
                    ):
                        why = (
                            "provided port is already allocated"
                            if self.node_ports.in_range(port)
                            else (
                                f"provided port is not in the valid range. The range of valid ports is "
                                f"{self.node_ports.lo}-{self.node_ports.hi}"
                            )
                        )
                        raise errors.invalid(
                            rt,
                            name,
                            [
                                (
                                    f"spec.ports[{i}].nodePort",
                                    "FieldValueInvalid",
                                    f"Invalid value: {port}: {why}",
                                )
                            ],
                        )
                else:
                    port = self.node_ports.allocate(take=not dry_run, exclude=wanted | held)
                p["nodePort"] = port
                wanted.add(port)
        else:
            for i, p in enumerate(ports):
                if p.get("nodePort"):
                    raise errors.invalid(
                        rt,
                        name,
                        [
                            (
                                f"spec.ports[{i}].nodePort",
                                "FieldValueForbidden",
                                f"Forbidden: may not be used when `type` is '{spec.get('type')}'",
                            )
                        ],
                    )
        if not dry_run:
            for port in wanted - held:
                self.node_ports.reserve(port)
            for port in held - wanted:
                self.node_ports.release(port)

    def _allocate_ip(self, rt: ResourceType, obj: dict[str, Any], dry_run: bool) -> None:
        spec = obj["spec"]
        if spec.get("type") == "ExternalName":
            return
        ip = spec.get("clusterIP") or (spec.get("clusterIPs") or [None])[0]
        if ip == "None":
            spec["clusterIP"] = "None"
            spec["clusterIPs"] = ["None"]
            return
        if ip:
            if not self.ips.is_free(ip):
                raise errors.invalid(
                    rt,
                    obj["metadata"]["name"],
                    [
                        (
                            "spec.clusterIPs",
                            "FieldValueInvalid",
                            f'Invalid value: []string{{"{ip}"}}: failed to allocate IP {ip}: '
                            "provided IP is already allocated",
                        )
                    ],
                )
            if not dry_run:
                self.ips.reserve(ip)
        else:
            ip = self.ips.peek() if dry_run else self.ips.allocate()
        spec["clusterIP"] = ip
        spec["clusterIPs"] = [ip]

    def _update_request(self, req: Request, t: Target) -> Response:
        body = self._decode(req)
        if t.sub == "scale":
            return self._scale_update(req, t, body)
        body = self._check_type(t, body)
        name = (body.get("metadata") or {}).get("name")
        if name != t.name:
            raise errors.bad_request(
                f"the name of the object ({name}) does not match the name on the URL ({t.name})"
            )
        obj = self._update(req, t, body)
        return self._render(req, t, obj)

    def _update(
        self,
        req: Request,
        t: Target,
        body: dict[str, Any],
        check_rv: bool = True,
        apply_managed: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Replace the object at ``t`` by ``body`` (status-only for /status)."""
        rt = t.rt
        dry_run = self._dry_run(req)
        with self.store.lock:
            old = self._require(t)
            new = clone(body)
            meta = new.setdefault("metadata", {})
            rv = meta.get("resourceVersion")
            if check_rv and rv and rv != old["metadata"]["resourceVersion"]:
                raise errors.conflict(
                    rt,
                    t.name or "",
                    "the object has been modified; please apply your changes "
                    "to the latest version and try again",
                )
            if rt.kind in STATUS_SUBRESOURCE_KINDS or t.sub == "status":
                if t.sub == "status":
                    status = new.get("status")
                    new = clone(old)
                    if status is None:
                        new.pop("status", None)
                    else:
                        new["status"] = status
                    meta = new["metadata"]
                elif "status" in old:
                    new["status"] = clone(old["status"])
                else:
                    new.pop("status", None)
            for k in ("uid", "creationTimestamp", "deletionTimestamp", "generation", "namespace", "name"):
                if k in old["metadata"]:
                    meta[k] = old["metadata"][k]
                else:
                    meta.pop(k, None)
            new["apiVersion"] = rt.api_version(t.version)
            new["kind"] = rt.kind
            if rt.kind == "Service":
                _keep_cluster_ip(old, new)
            # A /status write changes only the status; the rest was checked when it was written.
            self._admit(rt, new, old, req.query.get("fieldValidation") == "Strict", decode=t.sub != "status")
            if rt.kind == "Service" and t.sub != "status":
                self._assign_node_ports(rt, new, old, dry_run)
            if rt.kind in GENERATION_KINDS and _spec_of(new) != _spec_of(old):
                meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
            if apply_managed is not None:
                meta["managedFields"] = apply_managed
            else:
                meta["managedFields"] = clone(old["metadata"].get("managedFields") or [])
                fieldmanager.record_update(
                    old,
                    new,
                    self._manager(req),
                    rt.builtin,
                    new["apiVersion"],
                    "status" if t.sub == "status" else "",
                )
            if strip_for_compare(new) == strip_for_compare(old):
                if apply_managed is None or _managers_equal(old, new):
                    return old
            if dry_run:
                meta["resourceVersion"] = old["metadata"]["resourceVersion"]
                return new
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                return self._remove(rt, self._ns(t), t.name or "", "Background")
            return self.store.put(rt, new)

    def _patch_request(self, req: Request, t: Target) -> Response:
        ctype = req.headers.get("content-type", "").split(";")[0].strip()
        patch = self._decode(req)
        if ctype == "application/apply-patch+yaml":
            return self._apply(req, t, patch)
        with self.store.lock:
            old = self._require(t)
            base = self._scale_of(t, old) if t.sub == "scale" else self._out(t, old)
            if ctype == "application/merge-patch+json":
                new = patching.json_merge_patch(base, patch)
            elif ctype == "application/json-patch+json":
                try:
                    new = patching.json_patch(base, patch)
                except patching.ApiTestFailed as e:
                    raise ApiError(
                        422,
                        "Invalid",
                        f"the server rejected our request due to an error in our "
                        f"request: testing value {e} failed",
                    ) from e
            elif ctype == "application/strategic-merge-patch+json":
                if not t.rt.builtin:
                    raise errors.unsupported_media(ctype)
                new = patching.strategic_merge_patch(base, patch)
            else:
                raise errors.unsupported_media(ctype)
            if t.sub == "scale":
                return self._scale_update(req, t, new)
            if not isinstance(new, dict):
                raise errors.bad_request("the patch produced a non-object")
            new.setdefault("metadata", {})
            if new["metadata"].get("name") != old["metadata"]["name"]:
                raise errors.bad_request(
                    "metadata.name: the name of the object may not be changed by a patch"
                )
            patch_rv = (
                (patch.get("metadata") or {}).get("resourceVersion") if isinstance(patch, dict) else None
            )
            if patch_rv is None:
                new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            obj = self._update(req, t, new)
        return self._render(req, t, obj)

    def _apply(self, req: Request, t: Target, config: Any) -> Response:
        manager = req.query.get("fieldManager")
        if not manager:
            raise errors.bad_request("PATCH, fieldManager is required for apply requests")
        config = self._check_type(t, config)
        if not config.get("apiVersion") or not config.get("kind"):
            raise errors.bad_request("invalid object type: apiVersion and kind must be set")
        meta = config.setdefault("metadata", {})
        if meta.get("managedFields"):
            raise errors.bad_request("metadata.managedFields must be nil")
        if meta.get("name") != t.name:
            raise errors.bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({t.name})"
            )
        if t.rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != t.namespace:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = t.namespace
        schema.check(t.rt, config, req.query.get("fieldValidation") == "Strict")
        force = truthy(req.query.get("force"))
        sub = "status" if t.sub == "status" else ""
        api_version = t.rt.api_version(t.version)
        with self.store.lock:
            old = self.store.get(t.rt, self._ns(t), t.name or "")
            if old is None:
                if sub:
                    raise errors.not_found(t.rt, t.name or "")
                new = fieldmanager.server_side_apply(None, config, manager, force, t.rt.builtin, api_version)
                managed = new["metadata"].pop("managedFields")
                obj = self._create(
                    t.rt, t.version, t.namespace, new, req.query, manager, self._dry_run(req), managed=managed
                )
                return self._render(req, t, obj, 201)
            current = self._out(t, old)
            new = fieldmanager.server_side_apply(
                current, config, manager, force, t.rt.builtin, api_version, sub
            )
            managed = new["metadata"].pop("managedFields")
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            obj = self._update(req, t, new, apply_managed=managed)
        return self._render(req, t, obj)

    # ---------------------------------------------------------------- scale

    def _scale_of(self, t: Target, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        sel = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
            "status": {
                "replicas": (obj.get("status") or {}).get("replicas", 0),
                "selector": ",".join(f"{k}={v}" for k, v in sel.items()),
            },
        }

    def _scale_update(self, req: Request, t: Target, scale: Any) -> Response:
        if not isinstance(scale, dict) or not isinstance((scale.get("spec") or {}).get("replicas", 0), int):
            raise errors.bad_request("invalid Scale object")
        with self.store.lock:
            old = self._require(t)
            new = clone(old)
            new["spec"]["replicas"] = scale.get("spec", {}).get("replicas", 0)
            rv = (scale.get("metadata") or {}).get("resourceVersion")
            if rv:
                new["metadata"]["resourceVersion"] = rv
            main = Target(t.rt, t.version, t.namespace, t.name, None)
            obj = self._update(req, main, new)
        return json_response(200, self._scale_of(t, obj))


def _spec_of(obj: dict[str, Any]) -> Any:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _managers_equal(old: dict[str, Any], new: dict[str, Any]) -> bool:
    def sets(o: dict[str, Any]) -> list[tuple[Any, ...]]:
        return sorted(
            (e.get("manager"), e.get("operation"), json.dumps(e.get("fieldsV1"), sort_keys=True))
            for e in o["metadata"].get("managedFields") or []
        )

    return sets(old) == sets(new)


def _keep_cluster_ip(old: dict[str, Any], new: dict[str, Any]) -> None:
    """An update that leaves clusterIP empty keeps the allocated one (as the real server does)."""
    ospec, nspec = old.get("spec") or {}, new.setdefault("spec", {})
    if not nspec.get("clusterIP") and ospec.get("clusterIP"):
        nspec["clusterIP"] = ospec["clusterIP"]
    if not nspec.get("clusterIPs") and ospec.get("clusterIPs"):
        nspec["clusterIPs"] = ospec["clusterIPs"]


def _immutable(rt: ResourceType, old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    if rt.kind == "Service":
        o, n = (old.get("spec") or {}).get("clusterIP"), (new.get("spec") or {}).get("clusterIP")
        if o and n != o:
            out.append(
                (
                    "spec.clusterIPs[0]",
                    "FieldValueInvalid",
                    f'Invalid value: []string{{"{n}"}}: may not change once set',
                )
            )
    if rt.kind in ("Deployment", "DaemonSet", "ReplicaSet", "StatefulSet"):
        if (old.get("spec") or {}).get("selector") != (new.get("spec") or {}).get("selector"):
            out.append(
                (
                    "spec.selector",
                    "FieldValueInvalid",
                    f"Invalid value: {json.dumps((new.get('spec') or {}).get('selector'))}: "
                    "field is immutable",
                )
            )
    if rt.kind in ("ClusterRoleBinding", "RoleBinding") and old.get("roleRef") != new.get("roleRef"):
        out.append(
            (
                "roleRef",
                "FieldValueInvalid",
                f"Invalid value: {json.dumps(new.get('roleRef'))}: cannot change roleRef",
            )
        )
    return out
