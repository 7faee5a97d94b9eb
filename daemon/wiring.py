"""State -> data plane: the one place that turns ``Change`` events into reconciler calls.

A worker thread coalesces changes so a burst of xDS responses becomes one reconcile, and so
the xDS thread never waits for map writes (ACKs stay prompt). Until the first full sync
(``Change.full``, emitted when a stream has delivered every type) nothing is written: a
partial view must not garbage-collect the maps a restarted daemon inherited. Every later full
signal (a reconnect resynced) runs ``Dataplane.sync`` again, which also repairs drift; other
changes run ``Dataplane.update`` on just the named services and backends.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from daemon.dataplane.model import Projection
from daemon.state import Change, State
from daemon.xds.client import malloc_trim

log = logging.getLogger("kmesh.wiring")


class DataplaneLike(Protocol):
    """The part of ``daemon.dataplane.Dataplane`` this module calls."""

    def sync(self, projection: Projection) -> Any: ...

    def update(self, projection: Projection, services: Any, backends: Any) -> Any: ...


class DataplaneSync:
    """Subscribes to ``state`` and keeps ``dataplane`` equal to ``state.projection()``."""

    def __init__(self, state: State, dataplane: DataplaneLike,
                 on_applied: Callable[[str, Any, float], None] | None = None,
                 retry_s: float = 1.0) -> None:
        self.state = state
        self.dataplane = dataplane
        self.on_applied = on_applied  # (kind "sync"|"update", ReconcileResult, monotonic end time)
        self.retry_s = retry_s
        self._cond = threading.Condition()
        self._full = False
        self._services: set[str] = set()
        self._backends: set[str] = set()
        self._busy = False
        self._synced_once = False
        self._stop = False
        self.syncs = 0
        self.first_sync_done_monotonic = 0.0
        self.updates = 0
        self.last_error = ""
        self.last_result: Any = None
        self.last_seconds = 0.0
        # CLOCK_MONOTONIC (shared by the processes of one machine) of the last pass's start and
        # end, and of the last full sync's: read-only, so a benchmark can time "response sent ->
        # maps written" on the real daemon from its admin /status
        self.last_started_monotonic = 0.0
        self.last_done_monotonic = 0.0
        self.last_sync_started_monotonic = 0.0
        self.last_sync_done_monotonic = 0.0
        self._thread = threading.Thread(target=self._run, name="dataplane-sync", daemon=True)
        self._thread.start()
        state.subscribe(self._on_change)
        if state.synced:
            self._on_change(Change(full=True))

    def _on_change(self, change: Change) -> None:
        with self._cond:
            if change.full:
                self._full = True
            self._services |= change.services
            self._backends |= change.backends
            self._cond.notify_all()

    def _pending(self) -> bool:
        return self._full or (self._synced_once and bool(self._services or self._backends))

    def _run(self) -> None:
        services: set[str] = set()
        backends: set[str] = set()
        while True:
            # drop the last pass's sets before waiting: after a full push they hold every uid
            # (~4.5 MiB at 100k workloads) until the next change otherwise
            del services, backends
            with self._cond:
                while not self._stop and not self._pending():
                    if not self._synced_once:  # before the first sync, changes are covered by it
                        self._services.clear()
                        self._backends.clear()
                    self._cond.wait()
                if self._stop:
                    return
                full, self._full = self._full, False
                services, self._services = self._services, set()
                backends, self._backends = self._backends, set()
                self._busy = True
            try:
                self._apply(full, services, backends)
            except Exception as e:  # noqa: BLE001 - report, then retry with a full sync
                self.last_error = f"{type(e).__name__}: {e}"
                log.error("data plane reconcile failed: %s; full resync in %.1fs",
                          self.last_error, self.retry_s)
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait(self.retry_s)
                    self._full = True
                continue
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _apply(self, full: bool, services: set[str], backends: set[str]) -> None:
        started = time.monotonic()
        t0 = time.perf_counter()
        if full:  # builds and writes ~100k objects at scale: no cyclic GC passes meanwhile
            gc.disable()
            try:
                result = self.dataplane.sync(self.state.projection())
                written = _written_at(result)  # the maps hold everything from here on
            finally:
                gc.enable()
            malloc_trim()  # the pass freed tens of MiB of transient objects: give the pages back
            self.syncs += 1
            if not self._synced_once:
                self.first_sync_done_monotonic = written
            self._synced_once = True
            kind = "sync"
        else:
            result = self.dataplane.update(self.state.projection(), services, backends)
            written = _written_at(result)
            self.updates += 1
            kind = "update"
        self.last_seconds = time.perf_counter() - t0
        done = written  # "maps written", not the bookkeeping after it (malloc_trim)
        self.last_started_monotonic, self.last_done_monotonic = started, done
        if full:
            self.last_sync_started_monotonic, self.last_sync_done_monotonic = started, done
        self.last_result = result
        self.last_error = ""
        rejected = getattr(result, "rejected", None)
        if rejected:
            log.warning("data plane rejected %d entries: %s", len(rejected), dict(list(rejected.items())[:5]))
        if self.on_applied is not None:
            self.on_applied(kind, result, time.monotonic())

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every change so far is written (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy or self._pending():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def status(self) -> dict[str, Any]:
        res = self.last_result
        return {
            "synced": self._synced_once, "syncs": self.syncs, "updates": self.updates,
            "last_error": self.last_error, "last_seconds": round(self.last_seconds, 4),
            "last_started_monotonic": self.last_started_monotonic,
            "last_done_monotonic": self.last_done_monotonic,
            "last_sync_started_monotonic": self.last_sync_started_monotonic,
            "last_sync_done_monotonic": self.last_sync_done_monotonic,
            "first_sync_done_monotonic": self.first_sync_done_monotonic,
            "last_result": None if res is None else {
                "written": getattr(res, "written", None), "deleted": getattr(res, "deleted", None),
                "seconds": getattr(res, "seconds", None),
                "write_seconds": getattr(res, "write_seconds", None),
                "rejected": dict(getattr(res, "rejected", {}) or {})},
        }


def _written_at(result: object) -> float:
    """When the pass's last map write returned (the reconciler stamps it), else now: a pass is
    "done" for the converge and update figures once the kernel holds it, not after the mirror's
    bookkeeping and the malloc_trim that follow."""
    t = getattr(result, "maps_written_monotonic", 0.0)
    return t if t else time.monotonic()
