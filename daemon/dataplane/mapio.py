"""Batched access to one pinned map by fd (bcc's libbcc wrappers around BPF_MAP_*_BATCH).

Keys and values travel as packed ``bytes`` (see layout.py packers), so building a 100k-entry
batch is one ``b"".join`` instead of 100k ctypes objects.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os

from daemon.dataplane import bpfsys

_BATCH = 32768


def _lib():  # noqa: ANN202 - bcc's CDLL handle
    from bcc.libbcc import lib

    return lib


class MapIO:
    """One map: its fd, element sizes and batch operations."""

    def __init__(self, name: str, fd: int, key_size: int, value_size: int, max_entries: int,
                 own_fd: bool = False) -> None:
        self.name = name
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self._own_fd = own_fd

    @classmethod
    def open_pinned(cls, name: str, path: str) -> MapIO:
        fd = bpfsys.obj_get(path)
        info = bpfsys.map_info(fd)
        return cls(name, fd, info["key_size"], info["value_size"], info["max_entries"], own_fd=True)

    def close(self) -> None:
        if self._own_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def update_batch(self, keys: list[bytes], values: list[bytes]) -> None:
        """Insert or replace; raises OSError (e.g. E2BIG when full)."""
        lib = _lib()
        for start in range(0, len(keys), _BATCH):
            ks = keys[start:start + _BATCH]
            n = len(ks)
            kbuf = ct.create_string_buffer(b"".join(ks), n * self.key_size)
            vbuf = ct.create_string_buffer(b"".join(values[start:start + _BATCH]), n * self.value_size)
            cnt = ct.c_uint32(n)
            if lib.bpf_update_batch(self.fd, ct.byref(kbuf), ct.byref(vbuf), ct.byref(cnt)) != 0:
                err = ct.get_errno()
                raise OSError(err, f"{self.name}: batch update: {os.strerror(err)}")

    def delete_batch(self, keys: list[bytes]) -> None:
        """Delete keys; keys already absent are ignored."""
        lib = _lib()
        for start in range(0, len(keys), _BATCH):
            ks = keys[start:start + _BATCH]
            n = len(ks)
            kbuf = ct.create_string_buffer(b"".join(ks), n * self.key_size)
            cnt = ct.c_uint32(n)
            if lib.bpf_delete_batch(self.fd, ct.byref(kbuf), ct.byref(cnt)) == 0:
                continue
            err = ct.get_errno()
            if err != errno.ENOENT:
                raise OSError(err, f"{self.name}: batch delete: {os.strerror(err)}")
            for k in ks[cnt.value:]:  # the batch stopped at a missing key: finish one by one
                kb = ct.create_string_buffer(k, self.key_size)
                if lib.bpf_delete_elem(self.fd, ct.byref(kb)) != 0:
                    e = ct.get_errno()
                    if e != errno.ENOENT:
                        raise OSError(e, f"{self.name}: delete: {os.strerror(e)}")

    def dump(self) -> list[tuple[bytes, bytes]]:
        """Every (key, value) in the map, with batch lookups."""
        lib = _lib()
        chunk = max(1, min(self.max_entries, _BATCH))
        kbuf = ct.create_string_buffer(chunk * self.key_size)
        vbuf = ct.create_string_buffer(chunk * self.value_size)
        in_tok, out_tok = ct.c_uint32(0), ct.c_uint32(0)
        out: list[tuple[bytes, bytes]] = []
        first = True
        while True:
            cnt = ct.c_uint32(chunk)
            res = lib.bpf_lookup_batch(self.fd, None if first else ct.byref(in_tok), ct.byref(out_tok),
                                       ct.byref(kbuf), ct.byref(vbuf), ct.byref(cnt))
            err = ct.get_errno() if res != 0 else 0
            if res != 0 and err != errno.ENOENT:
                raise OSError(err, f"{self.name}: batch lookup: {os.strerror(err)}")
            kraw, vraw = kbuf.raw, vbuf.raw
            ks, vs = self.key_size, self.value_size
            out.extend((kraw[i * ks:(i + 1) * ks], vraw[i * vs:(i + 1) * vs]) for i in range(cnt.value))
            if res != 0:
                return out
            in_tok.value = out_tok.value
            first = False

    def lookup(self, key: bytes) -> bytes | None:
        lib = _lib()
        kb = ct.create_string_buffer(key, self.key_size)
        vb = ct.create_string_buffer(self.value_size)
        if lib.bpf_lookup_elem(self.fd, ct.byref(kb), ct.byref(vb)) != 0:
            return None
        return vb.raw

    def update(self, key: bytes, value: bytes) -> None:
        self.update_batch([key], [value])
