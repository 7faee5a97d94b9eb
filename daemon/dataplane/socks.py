"""km_sock's slots (layout 6+): an array indexed by socket cookie % size whose live records carry
their cookie (bpf/include/km_maps.h explains why an array and not a hash)."""

from __future__ import annotations

import ctypes as ct
import errno
import os
from collections.abc import Iterator

from daemon.dataplane import bpfsys, layout
from daemon.dataplane.mapio import MapIO

_FREE = bytes(8)


def _value_chunks(m: MapIO) -> Iterator[memoryview]:
    """The map's values, a batch at a time, as views of one reused buffer."""
    chunk = max(1, min(m.max_entries, 32768))
    kbuf = ct.create_string_buffer(chunk * m.key_size)
    vbuf = ct.create_string_buffer(chunk * m.value_size)
    in_tok, out_tok = ct.create_string_buffer(8), ct.create_string_buffer(8)
    first = True
    while True:
        err, cnt = bpfsys.map_batch(bpfsys.BPF_MAP_LOOKUP_BATCH, m.fd, kbuf, vbuf, chunk,
                                    None if first else in_tok, out_tok)
        if err and err != errno.ENOENT:
            raise OSError(err, f"{m.name}: batch lookup: {os.strerror(err)}")
        yield memoryview(vbuf).cast("B")[: cnt * m.value_size]
        if err:
            return
        ct.memmove(in_tok, out_tok, 8)
        first = False


def live_records(m: MapIO) -> list[tuple[int, bytes]]:
    """(cookie, value) of every slot that holds a socket's record (cookie != 0)."""
    out = []
    vs = m.value_size
    for view in _value_chunks(m):
        raw = view.tobytes()
        out.extend((layout.U64.unpack_from(raw, i)[0], raw[i:i + vs])
                   for i in range(0, len(raw), vs) if raw[i:i + 8] != _FREE)
    return out


def live_count(m: MapIO) -> int:
    """Slots holding a record: what "entries" means for km_sock (an array has all of them).
    Counted on the raw buffers (no per-slot Python objects: a scrape reads 65k slots)."""
    step = m.value_size // 8
    total = 0
    for view in _value_chunks(m):
        cookies = view.cast("Q")[::step]
        total += len(cookies) - cookies.tolist().count(0)
    return total


def slot_key(cookie: int, max_entries: int) -> bytes:
    """The km_sock key (slot) of a socket cookie, as the programs compute it."""
    return layout.U32.pack(cookie % max_entries)
