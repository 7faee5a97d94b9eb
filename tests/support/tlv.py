"""Kmesh's hand-off header, encoded for tests independently of the C module and the BPF program:
``0x01 | u32 BE length | address | port | 0xfe | u32 0`` (length 6 for IPv4, 18 for IPv6).

Why separate: a test that feeds Envoy or checks the kernel's output must not share code with
the thing under test, or a shared misunderstanding of the format would pass unnoticed.
"""

from __future__ import annotations

import ipaddress
import struct

TYPE_ORIG_DST = 0x01
TYPE_END = 0xFE


def encode(ip: str, port: int) -> bytes:
    """The header for original destination ip:port (16 bytes for IPv4, 28 for IPv6)."""
    addr = ipaddress.ip_address(ip)
    value = addr.packed + struct.pack("!H", port)
    return struct.pack("!BI", TYPE_ORIG_DST, len(value)) + value + struct.pack("!BI", TYPE_END, 0)


def decode(data: bytes) -> tuple[str, int, int]:
    """(ip, port, header length) of a header at the start of `data`; ValueError when malformed."""
    if len(data) < 5:
        raise ValueError("short header")
    kind, length = struct.unpack_from("!BI", data)
    if kind != TYPE_ORIG_DST or length not in (6, 18):
        raise ValueError(f"bad type/length {kind:#x}/{length}")
    total = 5 + length + 5
    if len(data) < total:
        raise ValueError("short header")
    raw = data[5:5 + length - 2]
    (port,) = struct.unpack_from("!H", data, 5 + length - 2)
    end, zero = struct.unpack_from("!BI", data, 5 + length)
    if end != TYPE_END or zero != 0:
        raise ValueError("bad end marker")
    return str(ipaddress.ip_address(raw)), port, total
