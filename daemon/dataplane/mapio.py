"""Batched access to one pinned map by fd, through raw bpf(2) calls (bpfsys), never libbcc.

Keys and values travel as packed ``bytes`` (see layout.py packers), so building a 100k-entry
batch is one ``b"".join`` instead of 100k ctypes objects.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os

from daemon.dataplane import bpfsys

_BATCH = 32768


def _view(buf: bytes | bytearray, offset: int, size: int) -> ct.Array:
    """A ctypes array over buf[offset:offset+size]: shared with a bytearray, copied from bytes."""
    if isinstance(buf, bytearray):
        return (ct.c_char * size).from_buffer(buf, offset)
    return ct.create_string_buffer(buf[offset:offset + size], size)


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
        for start in range(0, len(keys), _BATCH):
            ks = keys[start:start + _BATCH]
            self.update_raw(b"".join(ks), b"".join(values[start:start + _BATCH]), len(ks))

    def update_raw(self, keys: bytes | bytearray, values: bytes | bytearray, n: int) -> None:
        """Insert or replace n elements given as packed key and value arrays (a bytearray is
        handed to the kernel in place, without a copy)."""
        ksz, vsz = self.key_size, self.value_size
        if len(keys) != n * ksz or len(values) != n * vsz:
            raise ValueError(f"{self.name}: {n} elements need {n * ksz}/{n * vsz} key/value bytes, "
                             f"got {len(keys)}/{len(values)}")
        for start in range(0, n, _BATCH):
            m = min(_BATCH, n - start)
            kbuf = _view(keys, start * ksz, m * ksz)
            vbuf = _view(values, start * vsz, m * vsz)
            err, _ = bpfsys.map_batch(bpfsys.BPF_MAP_UPDATE_BATCH, self.fd, kbuf, vbuf, m)
            if err:
                raise OSError(err, f"{self.name}: batch update: {os.strerror(err)}")

    def delete_batch(self, keys: list[bytes]) -> None:
        """Delete keys; keys already absent are ignored."""
        for start in range(0, len(keys), _BATCH):
            ks = keys[start:start + _BATCH]
            n = len(ks)
            kbuf = ct.create_string_buffer(b"".join(ks), n * self.key_size)
            err, done = bpfsys.map_batch(bpfsys.BPF_MAP_DELETE_BATCH, self.fd, kbuf, None, n)
            if not err:
                continue
            if err != errno.ENOENT:
                raise OSError(err, f"{self.name}: batch delete: {os.strerror(err)}")
            for k in ks[done:]:  # the batch stopped at a missing key: finish one by one
                kb = ct.create_string_buffer(k, self.key_size)
                e = bpfsys.map_delete(self.fd, kb)
                if e and e != errno.ENOENT:
                    raise OSError(e, f"{self.name}: delete: {os.strerror(e)}")

    def dump(self) -> list[tuple[bytes, bytes]]:
        """Every (key, value) in the map, with batch lookups."""
        chunk = max(1, min(self.max_entries, _BATCH))
        kbuf = ct.create_string_buffer(chunk * self.key_size)
        vbuf = ct.create_string_buffer(chunk * self.value_size)
        in_tok = ct.create_string_buffer(8)
        out_tok = ct.create_string_buffer(8)
        out: list[tuple[bytes, bytes]] = []
        first = True
        ks, vs = self.key_size, self.value_size
        while True:
            err, cnt = bpfsys.map_batch(bpfsys.BPF_MAP_LOOKUP_BATCH, self.fd, kbuf, vbuf, chunk,
                                        None if first else in_tok, out_tok)
            if err and err != errno.ENOENT:
                raise OSError(err, f"{self.name}: batch lookup: {os.strerror(err)}")
            kraw, vraw = kbuf.raw, vbuf.raw
            out.extend((kraw[i * ks:(i + 1) * ks], vraw[i * vs:(i + 1) * vs]) for i in range(cnt))
            if err:
                return out
            ct.memmove(in_tok, out_tok, 8)
            first = False

    def count(self) -> int:
        """Number of elements, by batch lookups into one reused buffer: no per-element Python
        objects (a 65k-entry map costs a few kernel copies, not 65k tuples)."""
        chunk = max(1, min(self.max_entries, _BATCH))
        kbuf = ct.create_string_buffer(chunk * self.key_size)
        vbuf = ct.create_string_buffer(chunk * self.value_size)
        in_tok = ct.create_string_buffer(8)
        out_tok = ct.create_string_buffer(8)
        total, first = 0, True
        while True:
            err, cnt = bpfsys.map_batch(bpfsys.BPF_MAP_LOOKUP_BATCH, self.fd, kbuf, vbuf, chunk,
                                        None if first else in_tok, out_tok)
            if err and err != errno.ENOENT:
                raise OSError(err, f"{self.name}: batch lookup: {os.strerror(err)}")
            total += cnt
            if err:
                return total
            ct.memmove(in_tok, out_tok, 8)
            first = False

    def lookup(self, key: bytes) -> bytes | None:
        kb = ct.create_string_buffer(key, self.key_size)
        vb = ct.create_string_buffer(self.value_size)
        if bpfsys.map_lookup(self.fd, kb, vb) != 0:
            return None
        return vb.raw

    def update(self, key: bytes, value: bytes) -> None:
        self.update_batch([key], [value])
