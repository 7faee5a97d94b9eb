"""Desired Projection -> the minimal set of map writes, in an order that is always safe.

The facade over three parts with one job each:

  mirror.py  what this process believes the kernel maps hold (rebuilt from the maps by load())
  plan.py    pure: projection vs mirror -> a Plan (ordered deletes/writes per map in the phases
             free / write / trim, capacity checked before anything is planned, rejections named)
  apply.py   thin: runs a Plan's batched syscalls, on a writer thread for big passes

A pass plans, applies and then commits the plan to the mirror. A big pass commits the mirror
while the writer thread is still in the kernel: if a write fails the mirror is marked dirty and
rebuilt from the maps by the next call, so committing ahead of the kernel is never observable.
Value rendering (slots, weights, names, waypoints) lives in render.py.

A first sync (10k services x 10 endpoints: 430k elements) overlaps the three: the planner hands
the backends (with their pod-IP frontends) to a writer thread as soon as they are packed, then
the new service ports' slots and headers while it plans the rest. Those and the km_names writes
(no program reads that map) go to a second writer: the slots wait for the first writer's first
batch (the backends they name) and the plan's VIP frontends wait for the second writer, so the
maps' invariants hold at every step. The map syscalls release the GIL, so the kernel inserts
on both cores while Python packs.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Iterable, Mapping

from daemon.dataplane.apply import Writer, apply
from daemon.dataplane.mirror import MapLike, Mirror
from daemon.dataplane.model import Projection
from daemon.dataplane.plan import Plan, Writes, make_plan
from daemon.dataplane.render import (  # noqa: F401 - re-exported: the long-standing import path
    MAX_SLOTS_PER_ENDPOINT,
    RECONCILED_MAPS,
    decode_name,
    decode_wp,
    encode_name,
    fe_key,
    render_wp,
    slot_counts,
)
from daemon.dataplane.types import Capacity, ReconcileResult

log = logging.getLogger(__name__)

__all__ = ["MapLike", "Reconciler", "decode_name", "decode_wp", "encode_name", "fe_key", "render_wp",
           "slot_counts"]


class Reconciler:
    """Owns the contents of km_frontend, km_service, km_endpoint, km_backend and km_names."""

    EARLY_WRITE_MIN = 4096  # backends + names in one pass from which they are written concurrently
    WRITER_MIN = 4096  # elements in one pass from which the plan is applied on a writer thread
    TRIM_MIN = 20000  # elements written + deleted in one pass from which freed heap is returned

    def __init__(self, maps: Mapping[str, MapLike], capacity: Capacity) -> None:
        self.maps = maps
        self.cap = capacity
        self.limits = {m: maps[m].max_entries for m in RECONCILED_MAPS}
        self.mirror = Mirror(self.limits)
        self.dirty = False
        self._synced = False  # update() before the first sync() after load() does a full sync

    # ----------------------------------------------------------------- state
    def load(self) -> None:
        """Rebuild the mirror from the live maps; entries nobody can name become orphans."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            self.dirty = False
            self._synced = False
            self.mirror.load(self.maps)
        finally:
            if enabled:
                gc.enable()

    def counts(self) -> dict[str, int]:
        """Entries per reconciled map, as the mirror knows them."""
        return self.mirror.counts()

    def service_name(self, sid: int) -> str | None:
        return self.mirror.service_name(sid)

    def backend_uid(self, bid: int) -> str | None:
        return self.mirror.backend_uid(bid)

    # ------------------------------------------------------------ reconcile
    def sync(self, projection: Projection) -> ReconcileResult:
        if self.dirty:
            self.load()
        m = self.mirror
        removed = [u for u in m.be_id if u not in projection.backends]
        res = self._reconcile(projection, set(projection.services) | set(m.svc_ports),
                              [*projection.backends, *removed], orphans=True)
        self._synced = True
        return res

    def update(self, projection: Projection, services: Iterable[str], backends: Iterable[str]
               ) -> ReconcileResult:
        if self.dirty:
            self.load()
        if not self._synced:
            return self.sync(projection)
        svc_scope = set(services)
        be_scope = set(backends)
        wanted_by = self.mirror.wanted_by
        for uid in be_scope:
            # a backend appearing, going or changing id: re-render every service that names it
            w = wanted_by(uid)
            if isinstance(w, str):
                svc_scope.add(w)
            elif w:
                svc_scope.update(w)
        return self._reconcile(projection, svc_scope, sorted(be_scope), orphans=False)

    def _reconcile(self, proj: Projection, svc_scope: set[str], be_order: list[str], orphans: bool
                   ) -> ReconcileResult:
        # hundreds of thousands of small objects: keep the cyclic GC from rescanning them mid-pass
        enabled = gc.isenabled()
        gc.disable()
        # a writer thread back from a map syscall waits for the GIL until this thread is made to
        # drop it, after the switch interval (5 ms by default): ~50 syscalls in a first sync
        # stalled the writers, the pass's critical path, by up to 0.1-0.2 s. Shorter meanwhile.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, SWITCH_INTERVAL_S))
        t0 = time.perf_counter()
        res = ReconcileResult()
        writer: Writer | None = None
        # early writes on a second thread: km_names (read by no program) and a first sync's new
        # service ports' slots and headers, which name backends (so they wait for the writer's
        # first batch, the pass's backends) and are reached only through VIP frontends (in the
        # plan, which the writer applies once this thread is done: Writer.after)
        namer: Writer | None = None

        def start_early(batches: list[tuple[str, Writes]]) -> None:
            nonlocal writer, namer
            side = [b for b in batches if b[0] in _SIDE]
            rest = [b for b in batches if b[0] not in _SIDE]
            if rest:
                if writer is None:
                    writer = Writer(self.maps, rest)
                else:
                    writer.add(rest)
            if side:
                if namer is None:
                    namer = Writer(self.maps, side, slots_after=writer)
                else:
                    namer.add(side)

        try:
            try:
                plan = make_plan(self.mirror, proj, svc_scope, be_order, orphans,
                                 self.EARLY_WRITE_MIN, start_early)
            except BaseException:
                for w in (writer, namer):
                    if w is not None:  # the early writes ran: what the maps hold is unknown
                        w.submit(None)
                        w.join()
                        self.dirty = True
                raise
            res.rejected = plan.rejected
            for uid in plan.kept_now:
                log.warning("backend %s removed but still used by a rejected service; kept", uid)
            try:
                if namer is not None:
                    namer.submit(None)  # nothing more for it: the plan waits for it
                    if writer is None:
                        writer = Writer(self.maps)
                    writer.after = namer
                self._execute(plan, proj, res, writer)
            finally:
                if namer is not None:
                    try:
                        namer.finish(res)
                    except BaseException:
                        self.dirty = True
                        raise
            big = plan.size() + len(plan.verified) >= self.TRIM_MIN
            del plan, writer, namer  # their buffers go before the trim
            if big:
                t = time.perf_counter()
                _malloc_trim()  # the pass's buffers are free now: hand them back to the OS
                res.seconds += time.perf_counter() - t
        finally:
            sys.setswitchinterval(switch)
            if enabled:
                gc.enable()
        res.seconds += time.perf_counter() - t0
        return res

    def _execute(self, plan: Plan, proj: Projection, res: ReconcileResult, writer: Writer | None) -> None:
        if writer is None and plan.size() >= self.WRITER_MIN:
            writer = Writer(self.maps)
        if writer is None:
            try:
                apply(self.maps, plan, res)
            except BaseException:
                self.dirty = True  # the mirror no longer matches the kernel: reload next time
                raise
            self._commit(plan, proj)
            return
        writer.submit(plan)
        try:
            self._commit(plan, proj)
        finally:
            try:
                writer.finish(res)
            except BaseException:
                self.dirty = True
                raise

    def _commit(self, plan: Plan, proj: Projection) -> None:
        try:
            self.mirror.commit(plan, proj)
        except BaseException:
            self.dirty = True
            raise


SWITCH_INTERVAL_S = 0.0005  # the GIL switch interval during a pass (Python's default: 0.005)
_SIDE = ("names", "endpoint", "service")  # early writes for the second writer thread (_reconcile)


def _malloc_trim() -> None:
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 - glibc only; probe once
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None
