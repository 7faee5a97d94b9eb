"""Thread-safe in-memory object store with a global resourceVersion and watch fan-out.

Stored objects are treated as immutable: every write stores a new dict, so readers may share
references without locking. Every write appends to a bounded event history; a watch from a
resourceVersion replays the history after it (or fails with 410 Gone when the needed events
were evicted) and then receives live events, with no gap between the two because both happen
under the store lock.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import ApiError
from .kinds import ResourceType

Key = tuple[str, str]  # (namespace or "", name)
Predicate = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class Event:
    rv: int
    group: str
    plural: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


class Watcher:
    """One watch stream's queue; ``events()`` yields (type, obj) until closed or timed out."""

    def __init__(self, store: Store, rt: ResourceType, namespace: str | None, pred: Predicate) -> None:
        self.store = store
        self.rt = rt
        self.namespace = namespace
        self.pred = pred
        self.queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self.closed = False

    def offer(self, ev: Event) -> None:
        if ev.group != self.rt.group or ev.plural != self.rt.plural:
            return
        ns = (ev.obj.get("metadata") or {}).get("namespace", "")
        if self.namespace and ns != self.namespace:
            return
        new_ok = self.pred(ev.obj)
        if ev.type == "DELETED":
            if new_ok:
                self.queue.put(("DELETED", ev.obj))
            return
        old_ok = ev.old is not None and self.pred(ev.old)
        if ev.type == "ADDED" or not old_ok:
            if new_ok:
                self.queue.put(("ADDED", ev.obj))
        elif new_ok:
            self.queue.put(("MODIFIED", ev.obj))
        else:
            self.queue.put(("DELETED", ev.obj))

    def next(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        """The next event, or None after ``timeout`` seconds without one."""
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            self.closed = True
        return item

    def close(self) -> None:
        self.store.unwatch(self)
        self.closed = True
        self.queue.put(None)


class Store:
    def __init__(self, history: int = 10000) -> None:
        self.lock = threading.RLock()
        self._rv = 1
        self._objects: dict[tuple[str, str], dict[Key, dict[str, Any]]] = {}
        self._history: deque[Event] = deque()
        self._history_max = history
        self._evicted_upto = 0
        self._watchers: list[Watcher] = []

    @property
    def resource_version(self) -> int:
        return self._rv

    def _bucket(self, rt: ResourceType) -> dict[Key, dict[str, Any]]:
        return self._objects.setdefault((rt.group, rt.plural), {})

    def get(self, rt: ResourceType, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            return self._bucket(rt).get((namespace if rt.namespaced else "", name))

    def list(self, rt: ResourceType, namespace: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Objects sorted by (namespace, name), and the store's resourceVersion at that moment."""
        with self.lock:
            items = [o for (ns, _), o in sorted(self._bucket(rt).items()) if not namespace or ns == namespace]
            return items, self._rv

    def _emit(self, ev: Event) -> None:
        self._history.append(ev)
        while len(self._history) > self._history_max:
            self._evicted_upto = self._history.popleft().rv
        for w in list(self._watchers):
            w.offer(ev)

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def put(self, rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace ``obj`` (caller holds the lock and did all checks); sets its resourceVersion."""
        with self.lock:
            meta = obj["metadata"]
            key = (meta.get("namespace", "") if rt.namespaced else "", meta["name"])
            bucket = self._bucket(rt)
            old = bucket.get(key)
            rv = self._next_rv()
            meta["resourceVersion"] = str(rv)
            bucket[key] = obj
            self._emit(Event(rv, rt.group, rt.plural, "MODIFIED" if old else "ADDED", obj, old))
            return obj

    def remove(self, rt: ResourceType, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            key = (namespace if rt.namespaced else "", name)
            old = self._bucket(rt).pop(key, None)
            if old is None:
                return None
            rv = self._next_rv()
            gone = dict(old)
            gone["metadata"] = dict(old["metadata"], resourceVersion=str(rv))
            self._emit(Event(rv, rt.group, rt.plural, "DELETED", gone, old))
            return gone

    def all_objects(self) -> Iterator[tuple[tuple[str, str], dict[str, Any]]]:
        with self.lock:
            snapshot = [(gp, o) for gp, bucket in self._objects.items() for o in bucket.values()]
        yield from snapshot

    def watch(self, rt: ResourceType, namespace: str | None, pred: Predicate, since: int | None) -> Watcher:
        """Start a watch. ``since`` None: synthetic ADDED for current objects, then live events."""
        w = Watcher(self, rt, namespace, pred)
        with self.lock:
            if since is None:
                for obj in self.list(rt, namespace)[0]:
                    if pred(obj):
                        w.queue.put(("ADDED", obj))
            else:
                if since < self._evicted_upto:
                    raise ApiError(
                        410, "Expired", f"too old resource version: {since} ({self._evicted_upto + 1})"
                    )
                for ev in self._history:
                    if ev.rv > since:
                        w.offer(ev)
            self._watchers.append(w)
        return w

    def unwatch(self, w: Watcher) -> None:
        with self.lock:
            if w in self._watchers:
                self._watchers.remove(w)

    @property
    def dirty(self) -> int:
        """Changes since the last ``snapshot`` (the resourceVersion moves on every write)."""
        return self._rv

    def snapshot(self) -> dict[str, Any]:
        """Every object and the resourceVersion, as one JSON-able document."""
        with self.lock:
            objects = [o for bucket in self._objects.values() for o in bucket.values()]
            return {"resourceVersion": self._rv, "objects": objects}

    def restore(self, snap: dict[str, Any], resolve: Callable[[dict[str, Any]], ResourceType | None]) -> int:
        """Load a snapshot into an empty store; watches from older versions get 410. Returns the count."""
        n = 0
        with self.lock:
            for obj in snap.get("objects") or []:
                rt = resolve(obj)
                if rt is None:
                    continue
                meta = obj["metadata"]
                self._bucket(rt)[(meta.get("namespace", "") if rt.namespaced else "", meta["name"])] = obj
                n += 1
            self._rv = max(self._rv, int(snap.get("resourceVersion") or 1))
            self._evicted_upto = self._rv
            self._history.clear()
        return n

    def close_watchers(self) -> None:
        with self.lock:
            ws = list(self._watchers)
        for w in ws:
            w.close()
