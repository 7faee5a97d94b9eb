"""A BPF ring buffer consumer in plain Python (mmap + poll), so the daemon needs no libbcc/libbpf.

The kernel exposes a ``BPF_MAP_TYPE_RINGBUF`` map as: page 0, the consumer position (read-write
for us); from page 1, the producer position page followed by the data area mapped twice in a
row, so a record that wraps around the end is still contiguous in our mapping. Each record has
an 8-byte header: u32 length with BUSY (bit 31: still being written) and DISCARD (bit 30) flags,
u32 page offset (kernel-internal). Records are 8-byte aligned. This is what libbpf's
``ring_buffer__consume`` does; x86-64 and arm64 loads of aligned u64 are single-copy atomic and
Python's struct reads go through memory, so reading the positions this way is safe.
"""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Callable

from daemon.dataplane import bpfsys

_BUSY = 1 << 31
_DISCARD = 1 << 30
_U64 = struct.Struct("=Q")
_U32 = struct.Struct("=I")


class RingBuffer:
    """Consumer side of one ring buffer map fd (the fd stays owned by the caller)."""

    def __init__(self, fd: int) -> None:
        size = bpfsys.map_info(fd)["max_entries"]  # data size in bytes, a power of 2 pages
        self._page = mmap.PAGESIZE
        self._mask = size - 1
        self._cons = mmap.mmap(fd, self._page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(fd, self._page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=self._page)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def consume(self, callback: Callable[[bytes], None]) -> int:
        """Hand every complete record to callback (as bytes); returns how many."""
        cons = _U64.unpack_from(self._cons, 0)[0]
        n = 0
        while True:
            prod = _U64.unpack_from(self._prod, 0)[0]
            if cons >= prod:
                return n
            while cons < prod:
                off = self._page + (cons & self._mask)
                hdr = _U32.unpack_from(self._prod, off)[0]
                if hdr & _BUSY:
                    return n
                length = hdr & ~(_BUSY | _DISCARD)
                data = None if hdr & _DISCARD else self._prod[off + 8:off + 8 + length]
                cons += (length + 8 + 7) & ~7
                _U64.pack_into(self._cons, 0, cons)  # release the space before the callback runs
                if data is not None:
                    n += 1
                    callback(data)

    def poll(self, callback: Callable[[bytes], None], timeout_ms: int) -> int:
        """Consume what is there; if nothing, wait up to timeout_ms for data, then consume."""
        n = self.consume(callback)
        if n:
            return n
        self._poll.poll(timeout_ms)
        return self.consume(callback)

    def close(self) -> None:
        self._cons.close()
        self._prod.close()
