"""The thin half of a reconcile pass: run a Plan's map operations, in order, against MapLike maps.

Every operation is one batched syscall per map and up to 32768 elements (mapio.py); ctypes
releases the GIL for the syscall, so a writer thread runs in the kernel while the caller keeps
packing the next batch or committing the mirror.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

from daemon.dataplane.mirror import MapLike
from daemon.dataplane.plan import Plan, Writes
from daemon.dataplane.types import ReconcileResult


def write(maps: Mapping[str, MapLike], batches: list[tuple[str, Writes]], res: ReconcileResult) -> None:
    for name, wr in batches:
        if wr.n:
            maps[name].update_raw(wr.keys, wr.vals, wr.n)
            res.written += wr.n


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


class Writer(threading.Thread):
    """Applies on its own thread: first a batch of early writes (handed over while the rest of
    the plan is still being made), then, once given, the plan. join_plan() re-raises errors."""

    def __init__(self, maps: Mapping[str, MapLike], early: list[tuple[str, Writes]] | None = None) -> None:
        super().__init__(name="reconcile-write", daemon=True)
        self.maps = maps
        self.early = early or []
        self.plan: Plan | None = None
        self.res = ReconcileResult()
        self.error: BaseException | None = None
        self._go = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            if self.early:
                t = time.perf_counter()
                try:
                    write(self.maps, self.early, self.res)
                finally:
                    self.early = []
                    self.res.write_seconds += time.perf_counter() - t
            self._go.wait()
            if self.plan is not None:
                apply(self.maps, self.plan, self.res)
        except BaseException as exc:  # noqa: BLE001 - re-raised by join_plan
            self.error = exc
        finally:
            self.plan = None

    def submit(self, plan: Plan | None) -> None:
        """Apply this plan after the early writes (None: stop after them)."""
        self.plan = plan
        self._go.set()

    def finish(self, res: ReconcileResult) -> None:
        """Wait, add the counts to res, re-raise what failed."""
        self._go.set()
        self.join()
        res.written += self.res.written
        res.deleted += self.res.deleted
        res.write_seconds += self.res.write_seconds
        if self.error is not None:
            raise self.error
