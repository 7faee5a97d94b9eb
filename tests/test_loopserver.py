"""tests/support/loopserver.py: stopping leaves no thread that could accept on a reused fd."""

from __future__ import annotations

import socket

from tests.support.loopserver import LoopbackServer


def _hello(conn: socket.socket) -> None:
    conn.sendall(b"hi")


def test_serves_then_stops_without_a_stray_accept() -> None:
    srv = LoopbackServer(_hello)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as c:
        assert c.recv(2) == b"hi"
    fd, thread = srv.sock.fileno(), srv._thread
    srv.stop()
    srv.stop()  # idempotent
    assert not thread.is_alive() and srv.accepted == 1
    # The next listener usually gets the same fd number: it must be the one that accepts.
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            other.settimeout(5)
            conn, _ = other.accept()
            conn.close()
        assert fd >= 0
