"""kmesh_tlv → tcp_proxy → ORIGINAL_DST: the backend at the restored original destination gets
exactly the client's bytes, for IPv4 and IPv6 headers, whole or split across reads."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support import tlv
from tests.waypoint.backends import GREETING, Backend, sink_server
from tests.waypoint.client import connect, recv_all, sink_roundtrip
from tests.waypoint.conftest import Waypoint

PAYLOADS = {"1B": b"x", "64KiB": os.urandom(64 << 10), "4MiB": os.urandom(4 << 20)}


@pytest.fixture(scope="module")
def sinks() -> Iterator[dict[str, Backend]]:
    made = {"v4": sink_server("127.0.0.31"), "v6": sink_server("::1")}
    try:
        yield made
    finally:
        for b in made.values():
            b.close()


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("size", list(PAYLOADS))
def test_backend_gets_exact_bytes_at_original_destination(waypoint_envoy: Waypoint, sinks: dict[str, Backend],
                                                          family: str, size: str) -> None:
    sink = sinks[family]
    payload = PAYLOADS[size]
    header = tlv.encode(sink.ip, sink.port)
    assert len(header) == (16 if family == "v4" else 28)
    ok_before = waypoint_envoy.tlv_stat("header_ok")
    sha, n, ip, port = sink_roundtrip(waypoint_envoy.odst_port, [header], payload)
    assert (ip, port) == (sink.ip, sink.port), "upstream host must be the restored original destination"
    assert n == len(payload)
    assert sha == hashlib.sha256(payload).hexdigest()
    assert waypoint_envoy.tlv_stat("header_ok") == ok_before + 1


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_header_split_across_reads(waypoint_envoy: Waypoint, sinks: dict[str, Backend], family: str) -> None:
    """Byte-by-byte header with pauses (each byte is a separate on_data), then the payload."""
    sink = sinks[family]
    header = tlv.encode(sink.ip, sink.port)
    payload = b"after-the-header" * 100
    sha, n, ip, port = sink_roundtrip(waypoint_envoy.odst_port, [bytes([b]) for b in header], payload)
    assert (ip, port, n) == (sink.ip, sink.port, len(payload))
    assert sha == hashlib.sha256(payload).hexdigest()
    # decided in on_data (peeked buffer + drain_buffer), not on the accept-time fast path
    shown = f"[{sink.ip}]" if ":" in sink.ip else sink.ip
    waypoint_envoy.envoy.wait_log(f"original destination {shown}:{sink.port} (data)")


def test_header_and_payload_in_one_segment(waypoint_envoy: Waypoint, sinks: dict[str, Backend]) -> None:
    """What the kernel does: header glued to the first application bytes (more than the peek cap)."""
    sink = sinks["v4"]
    payload = bytes(range(256)) * 4
    sha, n, _, _ = sink_roundtrip(waypoint_envoy.odst_port, [tlv.encode(sink.ip, sink.port) + payload], b"")
    assert n == len(payload) and sha == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3], ids=["at_once", "after_50ms", "after_300ms"])
def test_write_once_then_half_close(waypoint_envoy: Waypoint, sinks: dict[str, Backend],
                                    delay: float) -> None:
    """A client that writes once (header + payload in one segment, as the kernel sends it) and
    shuts its write side at once. Envoy 1.40 drops such a connection if it is still in a
    listener filter when the FIN arrives; the module reads the header at accept time and the
    listener defers accept until data arrived, so the FIN always reaches the connection."""
    sink = sinks["v4"]
    for i in range(10):
        payload = f"one write {i} ".encode() * 300
        with connect(waypoint_envoy.odst_port) as s:
            time.sleep(delay)
            s.sendall(tlv.encode(sink.ip, sink.port) + payload)
            s.shutdown(socket.SHUT_WR)
            reply = recv_all(s)
        assert reply.startswith(GREETING), (i, reply[:80])
        sha, n, ip, port = reply[len(GREETING):].decode().split()
        assert (sha, int(n), ip, int(port)) == (hashlib.sha256(payload).hexdigest(), len(payload), sink.ip,
                                                sink.port)
