"""Write one compiled epoch into the pinned authorization maps, then flip to it.

Order is what keeps a DENY that was and still is in force from ever being skipped:
1. the inactive epoch is emptied (nothing reads it: the program only follows the live epoch);
2. the new tables are written there completely (sets before the entries that name them,
   entries before the dst records that point at them);
3. one array write flips ``km_authz_cfg.epoch``. A SYN is judged wholly by the old tables or
   wholly by the new ones: the program reads the epoch once per packet.
The epoch just left is only cleared at the *next* compile, and never sooner than ``GRACE_S``
after the flip, so a packet that read the old epoch just before the flip still finds every
entry it walks.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import struct
import threading
import time
from pathlib import Path

from daemon.authz import layout as L
from daemon.authz.compiler import Compiled
from daemon.dataplane import bpfsys
from daemon.dataplane.mapio import MapIO

GRACE_S = 0.02
BPF_MAP_GET_NEXT_KEY = 4
_TABLES = ("authz_dst", "authz_ident", "authz_entry", "authz_ipset", "authz_port", "authz_bits")
_WRITE_ORDER = ("authz_ipset", "authz_port", "authz_bits", "authz_entry", "authz_ident", "authz_dst")
_ELEM_FLAGS_ANY = 0


def next_keys(m: MapIO) -> list[bytes]:
    """Every key by BPF_MAP_GET_NEXT_KEY (works for LPM tries, which have no batch ops)."""
    out: list[bytes] = []
    key = ct.create_string_buffer(m.key_size)
    nxt = ct.create_string_buffer(m.key_size)
    attr = ct.create_string_buffer(32)
    first = True
    while True:
        struct.pack_into("=IIQQQ", attr, 0, m.fd, 0, 0 if first else ct.addressof(key), ct.addressof(nxt), 0)
        res = bpfsys._libc.syscall(ct.c_long(bpfsys._NR_BPF), ct.c_int(BPF_MAP_GET_NEXT_KEY), attr,
                                   ct.c_uint(32))
        if res < 0:
            err = ct.get_errno()
            if err == errno.ENOENT:
                return out
            raise OSError(err, f"{m.name}: get_next_key: {os.strerror(err)}")
        out.append(nxt.raw)
        ct.memmove(key, nxt, m.key_size)
        first = False


def _key_epoch(name: str, key: bytes) -> int:
    if name in ("authz_dst", "authz_ident"):
        return L.U32.unpack_from(key, 0)[0]
    if name == "authz_ipset":
        return L.epoch_of_id(L.U32.unpack_from(key, 4)[0])
    return L.epoch_of_id(L.U32.unpack_from(key, 0)[0])


class MapWriter:
    """The pinned authorization maps of one generation directory."""

    def __init__(self, gen_dir: Path) -> None:
        self.gen_dir = Path(gen_dir)
        self.maps: dict[str, MapIO] = {}
        try:
            for name, (ks, vs) in L.MAPS.items():
                m = MapIO.open_pinned(name, str(self.gen_dir / name))
                self.maps[name] = m
                if (m.key_size, m.value_size) != (ks, vs):
                    raise RuntimeError(f"map {name}: kernel layout {m.key_size}/{m.value_size} != "
                                       f"daemon/authz/layout.py {ks}/{vs}")
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()
        self._written: dict[int, dict[str, list[bytes]]] = {}
        self._flipped_at = 0.0

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps = {}

    # ----- cfg ----------------------------------------------------------------------------
    def cfg(self) -> tuple[int, bool]:
        """(live epoch, enabled)."""
        v = self.maps["authz_cfg"].lookup(L.U32.pack(0))
        epoch, disabled = L.CFG.unpack(v) if v else (0, 0)
        return epoch & 1, not disabled

    def set_enabled(self, enabled: bool) -> None:
        with self._lock:
            epoch, _ = self.cfg()
            self.maps["authz_cfg"].update(L.U32.pack(0), L.CFG.pack(epoch, 0 if enabled else 1))

    # ----- tables -------------------------------------------------------------------------
    def _keys_of_epoch(self, epoch: int) -> dict[str, list[bytes]]:
        known = self._written.get(epoch)
        if known is not None:
            return known
        out: dict[str, list[bytes]] = {}
        for name in _TABLES:  # first write of this process: find leftovers in the kernel
            m = self.maps[name]
            keys = next_keys(m) if name == "authz_ipset" else [k for k, _ in m.dump()]
            out[name] = [k for k in keys if _key_epoch(name, k) == epoch]
        return out

    def _delete(self, name: str, keys: list[bytes]) -> None:
        m = self.maps[name]
        if name == "authz_ipset":
            for k in keys:
                e = bpfsys.map_delete(m.fd, ct.create_string_buffer(k, m.key_size))
                if e and e != errno.ENOENT:
                    raise OSError(e, f"{name}: delete: {os.strerror(e)}")
        elif keys:
            m.delete_batch(keys)

    def _write(self, name: str, items: dict[bytes, bytes]) -> None:
        m = self.maps[name]
        if not items:
            return
        if name == "authz_ipset":
            for k, v in items.items():
                _update_one(m, k, v)
        else:
            m.update_batch(list(items), list(items.values()))

    def apply(self, compiled: Compiled) -> int:
        """Write ``compiled`` into the inactive epoch and make it live; returns the new epoch."""
        with self._lock:
            live, enabled = self.cfg()
            target = 1 - live
            if compiled.epoch != target:
                raise ValueError(f"compiled for epoch {compiled.epoch}, but the inactive epoch is {target}")
            wait = self._flipped_at + GRACE_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            stale = self._keys_of_epoch(target)
            for name in reversed(_WRITE_ORDER):
                self._delete(name, stale.get(name, []))
            tables = compiled.maps()
            for name in _WRITE_ORDER:
                self._write(name, tables[name])
            self.maps["authz_cfg"].update(L.U32.pack(0), L.CFG.pack(target, 0 if enabled else 1))
            self._flipped_at = time.monotonic()
            self._written[target] = {name: list(tables[name]) for name in _TABLES}
            return target

    def inactive_epoch(self) -> int:
        return 1 - self.cfg()[0]

    def counts(self) -> dict[str, int]:
        return {name: (len(next_keys(m)) if name == "authz_ipset" else m.count())
                for name, m in self.maps.items()}

    def records(self) -> list[tuple[bytes, bytes]]:
        return self.maps["authz_log"].dump()


def _update_one(m: MapIO, key: bytes, value: bytes) -> None:
    """BPF_MAP_UPDATE_ELEM (LPM tries have no batch update)."""
    kb = ct.create_string_buffer(key, m.key_size)
    vb = ct.create_string_buffer(value, m.value_size)
    attr = ct.create_string_buffer(32)
    struct.pack_into("=IIQQQ", attr, 0, m.fd, 0, ct.addressof(kb), ct.addressof(vb), _ELEM_FLAGS_ANY)
    bpfsys._bpf(bpfsys.BPF_MAP_UPDATE_ELEM, attr)
