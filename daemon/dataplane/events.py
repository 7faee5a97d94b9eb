"""Decoding of ring-buffer records into ConnEvent.

Why struct and inet_ntop: this runs once per event on the daemon's reader thread while a trace
is attached; one ``unpack_from`` and two ``inet_ntop`` calls cost a few microseconds, where a
ctypes copy plus ``ipaddress`` objects cost several times that.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Callable

from daemon.dataplane import layout as L
from daemon.dataplane.types import ConnEvent

_EVENT = L.EVENT
_KINDS = L.EVENT_KINDS
_VERDICTS = L.VERDICTS


def ip_text(raw: bytes, family: int) -> str:
    if family == L.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    text = socket.inet_ntop(socket.AF_INET6, raw)
    if "." in text:  # v4-mapped: spell it as ipaddress does (the resolver's indexes use that)
        return str(ipaddress.IPv6Address(raw))
    return text


def port_of(net16: int) -> int:
    """A network-order u16 read as a native integer -> the port number."""
    return int.from_bytes(net16.to_bytes(2, sys.byteorder), "big")


def decode(data: bytes, service_name: Callable[[int], str], backend_uid: Callable[[int], str]) -> ConnEvent:
    """data is one ring-buffer record (struct km_event)."""
    (ts, netns, sock, sent, received, duration, orig, backend, sid, bid, srtt, oport, bport, kind,
     verdict, family, _pad) = _EVENT.unpack_from(data)
    return ConnEvent(
        ts_ns=ts,
        kind=_KINDS.get(kind) or str(kind),
        verdict=_VERDICTS.get(verdict) or str(verdict),
        netns_cookie=netns,
        sock_cookie=sock,
        orig_ip=ip_text(orig, family),
        orig_port=(oport[0] << 8) | oport[1],
        backend_ip=ip_text(backend, family),
        backend_port=(bport[0] << 8) | bport[1],
        service=service_name(sid) if sid else "",
        backend_uid=backend_uid(bid) if bid else "",
        bytes_sent=sent,
        bytes_received=received,
        srtt_us=srtt,
        duration_ns=duration,
    )
