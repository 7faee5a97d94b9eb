"""Dataplane: load, pin, attach, reconcile, read back, stream events.

Pin layout (everything under ``pin_dir``)::

    <pin_dir>/v<LAYOUT_VERSION>-<capacity digest>/   one "generation" of maps
        frontend service endpoint backend    reconciled maps (see bpf/include/km_maps.h)
        names                                ids -> names, so any process can decode the maps
        manage                               enrolled netns cookies (written by the programs)
        sock                                 array: slot (socket cookie % size) -> original destination
        layout                               array[1]: the layout version these maps are for
        config                               array[1]: runtime switches (monitoring, trace consumers)
        conn_stats                           LRU: connection counters (connection metrics)

Attachments are plain BPF_PROG_ATTACH (flags 0) on the cgroup: they outlive the process, and a
new process attaching the same types replaces each program atomically, so a restart over the
same generation never leaves a connect untranslated. A different generation (layout version or
capacity changed) gets new maps, filled by the first sync() *before* the new programs are
attached; the manage map and the monitoring switch are carried over and the old generation's
pins are removed after. Connection counters are not carried over (the scraper's totals are
per process anyway).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from daemon.dataplane import bpfsys, events, layout, readback, socks
from daemon.dataplane.loader import ATTACH_TYPES, Programs, check_cgroup, load_in_child
from daemon.dataplane.mapio import MapIO
from daemon.dataplane.model import Projection
from daemon.dataplane.reconciler import Reconciler, decode_name
from daemon.dataplane.ringbuf import RingBuffer
from daemon.dataplane.types import Capacity, ConnEvent, ReconcileResult

log = logging.getLogger(__name__)
GEN_RE = re.compile(r"^v\d+-[0-9a-f]{8}$")


def generation_name(capacity: Capacity) -> str:
    return f"v{layout.LAYOUT_VERSION}-{capacity.digest()}"


def _check_pin_dir(pin_dir: Path) -> Path:
    pin_dir = Path(pin_dir).absolute()
    probe = pin_dir
    while not probe.exists():
        probe = probe.parent
    if not bpfsys.is_bpffs(str(probe)):
        raise ValueError(f"{pin_dir} is not on a bpf filesystem; mount one first "
                         f"(mount -t bpf bpf /sys/fs/bpf) or pick a pin directory under one")
    pin_dir.mkdir(parents=True, exist_ok=True)
    return pin_dir


def _remove_generation(gen_dir: Path) -> None:
    for f in gen_dir.iterdir():
        f.unlink()
    gen_dir.rmdir()


class Dataplane:
    """See daemon/dataplane/__init__.py for the contract."""

    def __init__(self, cgroup: Path, pin_dir: Path, capacity: Capacity, loaded: Programs,
                 gen_dir: Path, old_generations: list[Path]) -> None:
        self.cgroup = cgroup
        self.pin_dir = pin_dir
        self.capacity = capacity
        self.gen_dir = gen_dir
        self._loaded = loaded
        self._old = old_generations
        self._lock = threading.RLock()
        self._cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        self.reconciler = Reconciler(loaded.maps, capacity)
        self.reconciler.load()
        self.attached = False
        self._config_set = False  # set_monitoring() ran: carry-over must not undo it
        self._ring: RingBuffer | None = None
        self._callback: Callable[[ConnEvent], None] | None = None
        self.mon_off = self._read_mon_off()  # cached KM_MON_* bits: the event hub reads it per event
        # sockops is attached only while something needs it (see _sockops_wanted). None: not
        # known yet (an earlier process may have left it attached).
        self.sockops_attached: bool | None = None
        # services ("s", name) and pods ("b", uid) with a waypoint; None until the first sync
        self._waypoint_owners: set[tuple[str, str]] | None = None

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, cgroup: Path, pin_dir: Path, capacity: Capacity | None = None, *,
             allow_root: bool = False) -> Dataplane:
        """Compile, reuse or create the maps, attach (see module docstring).

        allow_root: permit a cgroup v2 hierarchy root (only for a node agent on its own cgroup2
        mount; never on a shared machine's root)."""
        cap = capacity or Capacity()
        cap.validate()
        cg = check_cgroup(cgroup, allow_root=allow_root)
        pins = _check_pin_dir(pin_dir)
        gen_dir = pins / generation_name(cap)
        if gen_dir.exists() and _layout_version(gen_dir) != layout.LAYOUT_VERSION:
            log.warning("pin generation %s is incomplete or foreign; recreating it", gen_dir)
            _remove_generation(gen_dir)
        old = sorted(d for d in pins.iterdir() if d.is_dir() and GEN_RE.match(d.name) and d != gen_dir)
        loaded = load_in_child(gen_dir, cap)  # compiles in a child; writes the layout version
        try:
            dp = cls(cg, pins, cap, loaded, gen_dir, old)
        except BaseException:
            loaded.cleanup()
            raise
        if old:
            # Another generation exists: it may be what is attached now. Carry enrolment over,
            # and attach only once the first sync() has filled the new maps.
            dp._carry_over()
        else:
            dp._attach()
        return dp

    def _carry_over(self) -> None:
        """Copy enrolled netns cookies, the monitoring switch and (when km_sock still means the
        same) the socket records getpeername needs from older generations into ours."""
        for name, sizes in (("manage", (8, 4)), ("sock", (4, ctypes.sizeof(layout.SockVal))),
                            ("config", (4, ctypes.sizeof(layout.ConfigVal)))):
            keys, vals = [], []
            for gen in self._old:
                if name == "sock" and _gen_version(gen) < layout.SOCK_SAME_SINCE:
                    continue
                try:
                    m = MapIO.open_pinned(name, str(gen / name))
                except OSError:
                    continue
                try:
                    if (m.key_size, m.value_size) != sizes:
                        continue
                    if name == "sock":  # slots move: the index is the cookie modulo the size
                        n = self._loaded.maps["sock"].max_entries
                        for cookie, v in socks.live_records(m):
                            keys.append(socks.slot_key(cookie, n))
                            vals.append(v)
                    else:
                        for k, v in m.dump():
                            keys.append(k)
                            vals.append(v)
                finally:
                    m.close()
            target = self._loaded.maps[name]
            if name == "config":
                if vals and not self._config_set:  # the newest old generation's switch wins
                    with self._lock:  # only the switch: trace_on is this process's own
                        old_off = layout.U32.unpack(vals[-1][:4])[0] & layout.MON_ALL
                        self._write_config(mon_off=old_off)
                    self.mon_off = self._read_mon_off()
                continue
            if keys:
                target.update_batch(keys[: target.max_entries], vals[: target.max_entries])

    def _attach(self) -> None:
        wanted = self._sockops_wanted()
        self._loaded.attach(self._cgroup_fd, sockops=wanted)
        self.attached = True
        if wanted:
            self.sockops_attached = True
        else:
            self._set_sockops(False)  # an earlier process's sockops may still be attached
        if self._old:
            self._carry_over()  # control connects the old programs took since open()
            for gen in self._old:
                _remove_generation(gen)
            self._old = []

    # ------------------------------------------------------------- reconcile
    def sync(self, projection: Projection) -> ReconcileResult:
        with self._lock:
            owners = _waypoint_owners(projection)
            if owners and self.attached:
                self._set_sockops(True)  # before any waypoint frontend is written
            res = self.reconciler.sync(projection)
            self._waypoint_owners = owners
            if not self.attached:
                self._attach()
            else:
                self._refresh_sockops()
            return res

    def update(self, projection: Projection, services: Iterable[str], backends: Iterable[str]
               ) -> ReconcileResult:
        with self._lock:
            services, backends = list(services), list(backends)
            changes = [((kind, name), item is not None and item.waypoint is not None)
                       for kind, names, table in (("s", services, projection.services),
                                                  ("b", backends, projection.backends))
                       for name in names for item in (table.get(name),)]
            if self.attached and any(w for _, w in changes):
                self._set_sockops(True)  # before any waypoint frontend is written
            res = self.reconciler.update(projection, services, backends)
            owners = self._waypoint_owners
            if owners is not None:
                for key, w in changes:
                    if w:
                        owners.add(key)
                    else:
                        owners.discard(key)
            if self.attached:
                self._refresh_sockops()
            return res

    # ------------------------------------------------------- sockops on demand
    def _sockops_wanted(self) -> bool:
        """Why on demand: an attached sockops program costs every connection of the cgroup
        ~1.4 us (about 1 % of a new HTTP connection here) even when it returns at once, because
        the kernel calls it 5-6 times per connection (timeout/rwnd init, ECN, connect,
        established). Only connection metrics and access logs (established/close) and the
        waypoint hand-off (sockets into km_wpsock at established) need it."""
        return ((self.mon_off & layout.MON_ALL) != layout.MON_ALL or self._waypoint_owners is None
                or bool(self._waypoint_owners))

    def _refresh_sockops(self) -> None:
        self._set_sockops(self._sockops_wanted())

    def _set_sockops(self, on: bool) -> None:
        """Attach ours, or detach whatever sockops program of ours is attached (callers hold
        self._lock). Sockets connected while it was detached get no established/close
        callbacks: with monitoring off there is nothing to count for them."""
        if on == self.sockops_attached or self._cgroup_fd < 0:
            return
        if on:
            self._loaded.attach_one(self._cgroup_fd, "sockops")
        else:
            _detach_ours(self._cgroup_fd, ("sockops",))
        self.sockops_attached = on

    # --------------------------------------------------------------- inspect
    def read_back(self) -> dict:
        return readback.decode(self._loaded.maps)

    def raw_maps(self) -> dict[str, list[tuple[str, str]]]:
        """Every map's (key, value) in hex; km_sock only its slots that hold a record."""
        return {name: sorted((k.hex(), v.hex()) for k, v in m.dump()
                             if name != "sock" or v[:8] != bytes(8))
                for name, m in self._loaded.maps.items()}

    def map_pressure(self) -> dict[str, dict]:
        counts = self.reconciler.counts()  # no lock: a metrics scrape must not wait for a sync
        counts["manage"] = self._loaded.maps["manage"].count()
        counts["sock"] = socks.live_count(self._loaded.maps["sock"])
        out = {}
        for name, n in counts.items():
            mx = self._loaded.maps[name].max_entries
            out[name] = {"entries": n, "max": mx, "ratio": round(n / mx, 6) if mx else 0.0}
        return out

    def prog_ids(self) -> dict[str, int]:
        return self._loaded.prog_ids()

    # ------------------------------------------------------------ monitoring
    def _read_config(self) -> tuple[int, int]:
        """(mon_off, trace_on) as the kernel reads them."""
        v = self._loaded.maps["config"].lookup(layout.U32.pack(0))
        if not v:
            return 0, 0
        off, trace, _ = layout.CONFIG_VAL.unpack(v)
        return off & layout.MON_ALL, trace

    def _write_config(self, mon_off: int | None = None, trace_on: int | None = None) -> None:
        """Read-modify-write of km_config[0] (callers hold self._lock)."""
        off, trace = self._read_config()
        off = off if mon_off is None else mon_off
        trace = trace if trace_on is None else trace_on
        self._loaded.maps["config"].update(layout.U32.pack(0), layout.CONFIG_VAL.pack(off, trace, b""))

    def _read_mon_off(self) -> int:
        return self._read_config()[0]

    def monitoring(self) -> dict:
        """The switch as the kernel reads it: {"access_log", "metrics", "enabled"} (enabled: the
        programs emit events at all)."""
        off = self.mon_off = self._read_mon_off()
        return {"access_log": not off & layout.MON_ACCESSLOG, "metrics": not off & layout.MON_METRICS,
                "enabled": (off & layout.MON_ALL) != layout.MON_ALL}

    def set_monitoring(self, access_log: bool | None = None, metrics: bool | None = None) -> dict:
        """Switch access logs (connect events, traces) and/or connection metrics (established
        and close events); None leaves that one as it is. One array write: the programs read it
        on every connect. Both off: no ring-buffer events and no sockops state callbacks;
        translation, getpeername and the waypoint hand-off are unaffected. Returns monitoring()."""
        with self._lock:
            off = self._read_mon_off()
            for flag, bit in ((access_log, layout.MON_ACCESSLOG), (metrics, layout.MON_METRICS)):
                if flag is not None:
                    off = (off & ~bit) if flag else (off | bit)
            self._write_config(mon_off=off)
            self._config_set = True
            state = self.monitoring()
            if self.attached:
                self._refresh_sockops()
            return state

    def set_trace(self, on: bool) -> None:
        """Say whether anyone consumes ring-buffer events (a trace stream, the event debug log).
        Without a consumer the programs emit none: a connection then costs the daemon nothing
        (connection metrics are counted in km_conn_stats). Access logs off still means none."""
        with self._lock:
            self._write_config(trace_on=1 if on else 0)

    def tracing(self) -> bool:
        return bool(self._read_config()[1])

    def conn_stats(self) -> list[tuple[tuple, tuple[int, int, int, int]]]:
        """km_conn_stats as [((netns_cookie, service_id, backend_id, verdict, orig_ip, orig_port),
        (opened, closed, bytes_sent, bytes_received))]; orig_ip is "" and orig_port 0 unless the
        connection had no service (direct pod access, passthrough). Read per scrape (metrics.py)."""
        out = []
        for k, v in self._loaded.maps["conn_stats"].dump():
            netns, sid, bid, addr, port, family, verdict, _ = layout.CONN_KEY.unpack(k)
            ip = events.ip_text(addr, family) if family else ""
            out.append(((netns, sid, bid, layout.VERDICTS.get(verdict, str(verdict)), ip,
                         int.from_bytes(port, "big")), layout.CONN_VAL.unpack(v)))
        return out

    def service_name(self, sid: int) -> str:
        """A service-port id -> "ns/host" (the daemon's reconciler, else the names map)."""
        return self._service_name(sid)

    def backend_uid(self, bid: int) -> str:
        return self._backend_uid(bid)

    # ---------------------------------------------------------------- events
    def _service_name(self, sid: int) -> str:
        name = self.reconciler.service_name(sid)
        if name is not None:
            return name
        v = self._loaded.maps["names"].lookup(layout.NAME_KEY.pack(layout.NAME_SERVICE, sid))
        return decode_name(v)[0].rpartition(":")[0] if v else f"#{sid}"

    def _backend_uid(self, bid: int) -> str:
        uid = self.reconciler.backend_uid(bid)
        if uid is not None:
            return uid
        v = self._loaded.maps["names"].lookup(layout.NAME_KEY.pack(layout.NAME_BACKEND, bid))
        return decode_name(v)[0] if v else f"#{bid}"

    def _on_event(self, data: bytes) -> None:
        cb = self._callback
        if cb is not None:
            cb(events.decode(data, self._service_name, self._backend_uid))

    def poll_events(self, callback: Callable[[ConnEvent], None], timeout_ms: int = 100) -> None:
        """Deliver ring-buffer events to callback, waiting up to timeout_ms for the first."""
        self._callback = callback
        if self._ring is None:
            self._ring = RingBuffer(self._loaded.ring_fd)
        self._ring.poll(self._on_event, timeout_ms)

    # ------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release this process's handles; programs stay attached and maps pinned."""
        if self._cgroup_fd < 0:
            return
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._loaded.cleanup()
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1

    def uninstall(self) -> None:
        """Detach our programs from the cgroup and remove every pin under pin_dir."""
        self.close()
        uninstall(self.cgroup, self.pin_dir, allow_root=True)  # the cgroup was checked at open
        self.attached = False


def _waypoint_owners(projection: Projection) -> set[tuple[str, str]]:
    """Services ("s", name) and pods ("b", uid) whose connections go through a waypoint."""
    owners = {("s", n) for n, s in projection.services.items() if s.waypoint is not None}
    owners.update(("b", u) for u, b in projection.backends.items() if b.waypoint is not None)
    return owners


def _detach_ours(fd: int, names: Iterable[str]) -> list[str]:
    """Detach the programs attached to the cgroup `fd` whose names are ours (of `names`)."""
    done = []
    for name in names:
        attach_type = ATTACH_TYPES[name]
        try:
            ids = bpfsys.prog_query(fd, attach_type)
        except OSError:
            continue
        for prog_id in ids:
            try:
                pfd = bpfsys.prog_fd_by_id(prog_id)
            except OSError:
                continue
            try:
                if bpfsys.prog_name(pfd) == name:
                    bpfsys.prog_detach(fd, attach_type, pfd)
                    done.append(name)
            except OSError as exc:
                log.warning("detach %s (id %d): %s", name, prog_id, exc)
            finally:
                os.close(pfd)
    return done


def detach(cgroup: Path) -> list[str]:
    """Detach the programs attached to this cgroup whose names are ours; returns what was detached."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _detach_ours(fd, ATTACH_TYPES)
    finally:
        os.close(fd)


def uninstall(cgroup: Path, pin_dir: Path, allow_root: bool = False) -> None:
    """Without compiling anything: detach our programs (matched by name) from the cgroup and
    remove pin_dir. Safe to repeat."""
    cg = check_cgroup(cgroup, allow_root=allow_root)
    detach(cg)
    shutil.rmtree(pin_dir, ignore_errors=True)


def _gen_version(gen_dir: Path) -> int:
    """The layout version in a generation's name (v<N>-<digest>)."""
    try:
        return int(gen_dir.name[1:].split("-", 1)[0])
    except ValueError:
        return 0


def _layout_version(gen_dir: Path) -> int:
    try:
        m = MapIO.open_pinned("layout", str(gen_dir / "layout"))
    except OSError:
        return 0
    try:
        v = m.lookup(layout.U32.pack(0))
        return layout.U32.unpack(v[:4])[0] if v else 0
    finally:
        m.close()
