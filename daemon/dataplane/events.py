"""Decoding of ring-buffer records into ConnEvent."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import sys
from collections.abc import Callable

from daemon.dataplane import layout as L
from daemon.dataplane.types import ConnEvent


def ip_text(raw: bytes, family: int) -> str:
    if family == L.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def port_of(net16: int) -> int:
    """A network-order u16 read as a native integer -> the port number."""
    return int.from_bytes(net16.to_bytes(2, sys.byteorder), "big")


def decode(data: bytes, service_name: Callable[[int], str], backend_uid: Callable[[int], str]) -> ConnEvent:
    """data is one ring-buffer record (struct km_event)."""
    ev = L.Event.from_buffer_copy(data[:ct.sizeof(L.Event)])
    return ConnEvent(
        ts_ns=ev.ts_ns,
        kind=L.EVENT_KINDS.get(ev.kind, str(ev.kind)),
        verdict=L.VERDICTS.get(ev.verdict, str(ev.verdict)),
        netns_cookie=ev.netns_cookie,
        sock_cookie=ev.sock_cookie,
        orig_ip=ip_text(bytes(ev.orig_addr), ev.family),
        orig_port=port_of(ev.orig_port),
        backend_ip=ip_text(bytes(ev.backend_addr), ev.family),
        backend_port=port_of(ev.backend_port),
        service=service_name(ev.service_id) if ev.service_id else "",
        backend_uid=backend_uid(ev.backend_id) if ev.backend_id else "",
        bytes_sent=ev.bytes_sent,
        bytes_received=ev.bytes_received,
        srtt_us=ev.srtt_us,
        duration_ns=ev.duration_ns,
    )
