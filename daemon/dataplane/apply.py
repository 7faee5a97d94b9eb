"""The thin half of a reconcile pass: run a Plan's map operations, in order, against MapLike maps.

Every operation is one batched syscall per map and up to 32768 elements (mapio.py); ctypes
releases the GIL for the syscall, so a writer thread runs in the kernel while the caller keeps
packing the next batch or committing the mirror.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping

from daemon.dataplane.mirror import MapLike
from daemon.dataplane.plan import Plan, Writes
from daemon.dataplane.types import ReconcileResult


def write(maps: Mapping[str, MapLike], batches: list[tuple[str, Writes]], res: ReconcileResult) -> None:
    """Write each batch, then drop its buffers (a first sync's km_names alone is 28 MB): the
    plan keeps only the counts, so the pass's peak memory falls as the writer goes."""
    for name, wr in batches:
        if wr.n:
            maps[name].update_raw(wr.keys, wr.vals, wr.n)
            res.written += wr.n
            wr.keys = wr.vals = bytearray()


def delete(maps: Mapping[str, MapLike], batches: list[tuple[str, list[bytes]]], res: ReconcileResult) -> None:
    for name, keys in batches:
        if keys:
            maps[name].delete_batch(keys)
            res.deleted += len(keys)


def apply(maps: Mapping[str, MapLike], plan: Plan, res: ReconcileResult) -> None:
    """Phases free, write, trim (the early writes, if any, are the caller's: see Writer)."""
    t = time.perf_counter()
    try:
        delete(maps, plan.free, res)
        write(maps, plan.write, res)
        delete(maps, plan.trim, res)
    finally:
        res.write_seconds += time.perf_counter() - t
        res.maps_written_monotonic = time.monotonic()


class Writer(threading.Thread):
    """Applies on its own thread, in order: the batches of early writes handed over (add())
    while the rest of the plan is still being made, then the plan (submit()). finish() waits
    and re-raises; after a failure nothing further is written."""

    def __init__(self, maps: Mapping[str, MapLike], early: list[tuple[str, Writes]] | None = None,
                 slots_after: Writer | None = None) -> None:
        super().__init__(name="reconcile-write", daemon=True)
        self.maps = maps
        self.res = ReconcileResult()
        self.error: BaseException | None = None
        # set once the first batch handed over (a pass's new backends) is written, or failed
        self.first_done = threading.Event()
        self.first_ok = False
        self.slots_after = slots_after  # endpoint/service writes wait for its first batch
        self.after: Writer | None = None  # the plan waits for this writer (and not after its failure)
        self._queue: queue.SimpleQueue[list[tuple[str, Writes]] | Plan | None] = queue.SimpleQueue()
        if early:
            self._queue.put(early)
        self._closed = False
        self.start()

    def run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, Plan):
                    after = self.after
                    if after is not None:
                        after.join()
                        if after.error is not None:
                            raise after.error  # its failure is this pass's: the plan is not applied
                    apply(self.maps, item, self.res)
                    return
                dep = self.slots_after
                if dep is not None and any(name in ("endpoint", "service") for name, _wr in item):
                    dep.first_done.wait()  # slots name backends: those are written first
                    if not dep.first_ok:  # the backends' failure is this pass's: no slot is written
                        raise dep.error or RuntimeError("backend writes failed: slots not written")
                t = time.perf_counter()
                try:
                    write(self.maps, item, self.res)
                finally:
                    self.res.write_seconds += time.perf_counter() - t
                    self.res.maps_written_monotonic = time.monotonic()
                if not self.first_done.is_set():
                    self.first_ok = True
                    self.first_done.set()
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish(); nothing queued after runs
            self.error = exc
        finally:
            self.first_done.set()  # (first_ok stays False when it failed or never came)

    def add(self, batches: list[tuple[str, Writes]]) -> None:
        """Write these after everything handed over before."""
        self._queue.put(batches)

    def submit(self, plan: Plan | None) -> None:
        """Apply this plan after the early writes (None: stop after them)."""
        self._closed = True
        self._queue.put(plan)
        if plan is not None:
            self._queue.put(None)

    def finish(self, res: ReconcileResult) -> None:
        """Wait, add the counts to res, re-raise what failed."""
        if not self._closed:
            self.submit(None)
        self.join()
        res.written += self.res.written
        res.deleted += self.res.deleted
        res.write_seconds += self.res.write_seconds
        res.maps_written_monotonic = max(res.maps_written_monotonic, self.res.maps_written_monotonic)
        if self.error is not None:
            raise self.error
