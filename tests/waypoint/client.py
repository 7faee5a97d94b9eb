"""Test clients speaking to the kmesh_tlv listeners over loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

from tests.waypoint.backends import GREETING


def connect(port: int, timeout: float = 30) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def send_pieces(s: socket.socket, pieces: Sequence[bytes], gap: float = 0.05) -> None:
    """Send each piece separately with a pause in between (so Envoy sees several reads)."""
    for i, piece in enumerate(pieces):
        if i:
            time.sleep(gap)
        s.sendall(piece)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_all(s: socket.socket) -> bytes:
    buf = b""
    while chunk := s.recv(1 << 16):
        buf += chunk
    return buf


def sink_roundtrip(port: int, header_pieces: Sequence[bytes], payload: bytes) -> tuple[str, int, str, int]:
    """Header (in pieces), then payload; wait for the sink's greeting (the hand-off is done),
    half-close, and return the sink's (sha256, byte count, local ip, local port)."""
    with connect(port) as s:
        send_pieces(s, header_pieces)
        if payload:
            s.sendall(payload)
        assert recv_exact(s, len(GREETING)) == GREETING
        s.shutdown(socket.SHUT_WR)
        line = recv_all(s).decode()
    sha, n, ip, lport = line.split()
    return sha, int(n), ip, int(lport)


def http_get(port: int, header: bytes, path: str = "/", allow_reset: bool = False) -> bytes:
    """Header + one HTTP/1.1 GET with Connection: close; the whole raw response (with
    `allow_reset`, a reset ends the response like a FIN would)."""
    with connect(port) as s:
        s.sendall(header + f"GET {path} HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        try:
            while chunk := s.recv(1 << 16):
                buf += chunk
        except ConnectionResetError:
            if not allow_reset:
                raise
        return buf


def wait_closed(s: socket.socket, timeout: float) -> tuple[float, bytes | None]:
    """Seconds until the peer closed or reset `s`, and what was read (None for a reset)."""
    start = time.monotonic()
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except ConnectionResetError:
        return time.monotonic() - start, None
    except TimeoutError:
        raise AssertionError(f"connection still open after {timeout}s") from None
    return time.monotonic() - start, data
