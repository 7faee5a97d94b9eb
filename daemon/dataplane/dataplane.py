"""Dataplane: load, pin, attach, reconcile, read back, stream events.

Pin layout (everything under ``pin_dir``)::

    <pin_dir>/v<LAYOUT_VERSION>-<capacity digest>/   one "generation" of maps
        frontend service endpoint backend    reconciled maps (see bpf/include/km_maps.h)
        names                                ids -> names, so any process can decode the maps
        manage                               enrolled netns cookies (written by the programs)
        sock                                 LRU: socket cookie -> original destination
        layout                               array[1]: the layout version these maps are for
        config                               array[1]: runtime switches (monitoring)

Attachments are plain BPF_PROG_ATTACH (flags 0) on the cgroup: they outlive the process, and a
new process attaching the same types replaces each program atomically, so a restart over the
same generation never leaves a connect untranslated. A different generation (layout version or
capacity changed) gets new maps, filled by the first sync() *before* the new programs are
attached; the manage map and the monitoring switch are carried over and the old generation's
pins are removed after.
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

from daemon.dataplane import bpfsys, events, layout, readback
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
        for name, sizes in (("manage", (8, 4)), ("sock", (8, ctypes.sizeof(layout.SockVal))),
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
                    if (m.key_size, m.value_size) == sizes:
                        for k, v in m.dump():
                            keys.append(k)
                            vals.append(v)
                finally:
                    m.close()
            target = self._loaded.maps[name]
            if name == "config":
                if vals and not self._config_set:  # the newest old generation's switch wins
                    target.update(keys[-1], vals[-1])
                    self.mon_off = self._read_mon_off()
                continue
            if keys:
                target.update_batch(keys[: target.max_entries], vals[: target.max_entries])

    def _attach(self) -> None:
        self._loaded.attach(self._cgroup_fd)
        self.attached = True
        if self._old:
            self._carry_over()  # control connects the old programs took since open()
            for gen in self._old:
                _remove_generation(gen)
            self._old = []

    # ------------------------------------------------------------- reconcile
    def sync(self, projection: Projection) -> ReconcileResult:
        with self._lock:
            res = self.reconciler.sync(projection)
            if not self.attached:
                self._attach()
            return res

    def update(self, projection: Projection, services: Iterable[str], backends: Iterable[str]
               ) -> ReconcileResult:
        with self._lock:
            return self.reconciler.update(projection, services, backends)

    # --------------------------------------------------------------- inspect
    def read_back(self) -> dict:
        return readback.decode(self._loaded.maps)

    def raw_maps(self) -> dict[str, list[tuple[str, str]]]:
        return {name: sorted((k.hex(), v.hex()) for k, v in m.dump())
                for name, m in self._loaded.maps.items()}

    def map_pressure(self) -> dict[str, dict]:
        counts = self.reconciler.counts()  # no lock: a metrics scrape must not wait for a sync
        for name in ("manage", "sock"):
            counts[name] = self._loaded.maps[name].count()
        out = {}
        for name, n in counts.items():
            mx = self._loaded.maps[name].max_entries
            out[name] = {"entries": n, "max": mx, "ratio": round(n / mx, 6) if mx else 0.0}
        return out

    def prog_ids(self) -> dict[str, int]:
        return self._loaded.prog_ids()

    # ------------------------------------------------------------ monitoring
    def _read_mon_off(self) -> int:
        v = self._loaded.maps["config"].lookup(layout.U32.pack(0))
        return layout.U32.unpack(v[:4])[0] & layout.MON_ALL if v else 0

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
            cfg = layout.ConfigVal(off)
            self._loaded.maps["config"].update(layout.U32.pack(0), bytes(cfg))
            self._config_set = True
            return self.monitoring()

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


def detach(cgroup: Path) -> list[str]:
    """Detach the programs attached to this cgroup whose names are ours; returns what was detached."""
    done = []
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, attach_type in ATTACH_TYPES.items():
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
    finally:
        os.close(fd)
    return done


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
