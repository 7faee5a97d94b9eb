"""DELETE: single objects (finalizers, graceful pods, namespace termination), collections,
and the garbage collection of dependents (ownerReferences) and of namespace contents.

A mixin of ``rest.Api``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from . import errors, kinds
from .kinds import ResourceType
from .model import Request, Response, Target, json_response
from .objects import IpAllocator, NodePorts, clone, now_rfc3339
from .store import Store


class DeleteEndpoints:
    """Deletion semantics shared by the verbs."""

    # Provided by rest.Api.
    store: Store
    ips: IpAllocator
    node_ports: NodePorts
    stopping: bool
    namespace_grace: float
    graceful_pod_deletion: bool
    _require: Callable[[Target], dict[str, Any]]
    _render: Callable[..., Response]
    _ns: Callable[[Target], str]
    _out: Callable[[Target, dict[str, Any]], dict[str, Any]]
    _selected: Callable[[Request, Target], tuple[list[dict[str, Any]], int]]
    _dry_run: Callable[[Request], bool]

    def _delete_options(self, req: Request) -> dict[str, Any]:
        if not req.body:
            return {}
        try:
            opts = json.loads(req.body)
        except ValueError as e:
            raise errors.bad_request(f"invalid DeleteOptions: {e}") from e
        return opts if isinstance(opts, dict) else {}

    def _delete_request(self, req: Request, t: Target) -> Response:
        if t.sub:
            raise errors.method_not_allowed()
        opts = self._delete_options(req)
        policy = req.query.get("propagationPolicy") or opts.get("propagationPolicy") or "Background"
        if policy not in ("Background", "Foreground", "Orphan"):
            raise errors.bad_request(f'unsupported propagationPolicy "{policy}"')
        dry = self._dry_run(req) or "All" in (opts.get("dryRun") or [])
        with self.store.lock:
            obj = self._require(t)
            pre = opts.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != obj["metadata"].get("uid"):
                raise errors.conflict(
                    t.rt,
                    t.name or "",
                    f"Precondition failed: UID in precondition: {pre['uid']}, "
                    f"UID in object meta: {obj['metadata'].get('uid')}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"]["resourceVersion"]:
                raise errors.conflict(
                    t.rt,
                    t.name or "",
                    "the object has been modified; please apply your changes "
                    "to the latest version and try again",
                )
            if dry:
                return self._render(req, t, obj)
            if t.rt.kind == "Namespace":
                return self._render(req, t, self._terminate_namespace(obj))
            grace = self._pod_grace(req, opts, obj) if t.rt.kind == "Pod" else 0
            if grace > 0:
                if not obj["metadata"].get("deletionTimestamp"):
                    marked = clone(obj)
                    when = time.gmtime(time.time() + grace)
                    marked["metadata"]["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", when)
                    marked["metadata"]["deletionGracePeriodSeconds"] = grace
                    obj = self.store.put(t.rt, marked)
                return self._render(req, t, obj)
            if obj["metadata"].get("finalizers"):
                if not obj["metadata"].get("deletionTimestamp"):
                    marked = clone(obj)
                    marked["metadata"]["deletionTimestamp"] = now_rfc3339()
                    marked["metadata"]["deletionGracePeriodSeconds"] = 0
                    obj = self.store.put(t.rt, marked)
                return self._render(req, t, obj)
            gone = self._remove(t.rt, self._ns(t), t.name or "", policy)
        return self._render(req, t, gone)

    def _pod_grace(self, req: Request, opts: dict[str, Any], pod: dict[str, Any]) -> int:
        """Seconds of graceful deletion for a pod (0: delete now).

        Only with ``graceful_pod_deletion`` (as a real cluster: a pod bound to a node stays,
        with a deletionTimestamp, until its kubelet stopped it and deletes it with grace 0).
        """
        if not self.graceful_pod_deletion or not (pod.get("spec") or {}).get("nodeName"):
            return 0
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return 0
        raw = req.query.get("gracePeriodSeconds", opts.get("gracePeriodSeconds"))
        if raw is None:
            raw = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        try:
            return max(int(raw), 0)
        except (TypeError, ValueError) as e:
            raise errors.bad_request(f"invalid gracePeriodSeconds {raw!r}") from e

    def _terminate_namespace(self, ns_obj: dict[str, Any]) -> dict[str, Any]:
        """Mark a namespace Terminating; its contents and then itself go after ``namespace_grace``.

        Asynchronous like the real namespace controller, so that ``kubectl delete -f`` of a file
        holding a namespace and objects in it can still delete those objects one by one.
        """
        if ns_obj["metadata"].get("deletionTimestamp"):
            return ns_obj
        ns_rt = kinds.by_kind("Namespace")
        assert ns_rt
        marked = clone(ns_obj)
        marked["metadata"]["deletionTimestamp"] = now_rfc3339()
        marked["status"] = {"phase": "Terminating"}
        stored = self.store.put(ns_rt, marked)
        name, uid = marked["metadata"]["name"], marked["metadata"]["uid"]

        def finalize() -> None:
            with self.store.lock:
                current = self.store.get(ns_rt, "", name)
                if current is not None and current["metadata"]["uid"] == uid and not self.stopping:
                    self._remove(ns_rt, "", name, "Background")

        if self.namespace_grace <= 0:
            finalize()
            return stored
        timer = threading.Timer(self.namespace_grace, finalize)
        timer.daemon = True
        timer.start()
        return stored

    def _remove(self, rt: ResourceType, namespace: str, name: str, policy: str) -> dict[str, Any]:
        """Delete one object and what depends on it (namespace contents, owner references)."""
        with self.store.lock:
            gone = self.store.remove(rt, namespace, name)
            if gone is None:
                raise errors.not_found(rt, name)
            if rt.kind == "Service":
                self.ips.release((gone.get("spec") or {}).get("clusterIP"))
                for p in (gone.get("spec") or {}).get("ports") or []:
                    self.node_ports.release(p.get("nodePort"))
            if rt.kind == "Namespace":
                for other in kinds.RESOURCES:
                    if other.namespaced:
                        for o in self.store.list(other, name)[0]:
                            if self.store.get(other, name, o["metadata"]["name"]) is not None:
                                self._remove(other, name, o["metadata"]["name"], "Background")
            uid = gone["metadata"].get("uid")
            for (group, plural), o in list(self.store.all_objects()):
                refs = o["metadata"].get("ownerReferences") or []
                if not any(r.get("uid") == uid for r in refs):
                    continue
                ort = next(r for r in kinds.RESOURCES if r.group == group and r.plural == plural)
                ons = o["metadata"].get("namespace", "")
                if self.store.get(ort, ons, o["metadata"]["name"]) is None:
                    continue
                if policy == "Orphan":
                    orphan = clone(o)
                    orphan["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                    if not orphan["metadata"]["ownerReferences"]:
                        del orphan["metadata"]["ownerReferences"]
                    self.store.put(ort, orphan)
                else:
                    self._remove(ort, ons, o["metadata"]["name"], "Background")
            return gone

    def _delete_collection(self, req: Request, t: Target) -> Response:
        dry = self._dry_run(req)
        with self.store.lock:
            items, _ = self._selected(req, t)
            out = []
            for o in items:
                if dry:
                    out.append(self._out(t, o))
                    continue
                if self.store.get(t.rt, o["metadata"].get("namespace", ""), o["metadata"]["name"]) is None:
                    continue
                out.append(
                    self._out(
                        t,
                        self._remove(
                            t.rt, o["metadata"].get("namespace", ""), o["metadata"]["name"], "Background"
                        ),
                    )
                )
        return json_response(
            200,
            {
                "kind": f"{t.rt.kind}List",
                "apiVersion": t.rt.api_version(t.version),
                "metadata": {"resourceVersion": str(self.store.resource_version)},
                "items": out,
            },
        )
