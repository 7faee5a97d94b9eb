"""A loopback TCP server on a thread, in the test process, that stops without a stray accept().

Why this exists: closing a listening socket while another thread loops on ``accept()`` races
with the fd number being reused. The thread reads the fd, the GIL is released, the test closes
the socket and the next test opens a server (say the admin API) that gets the same fd number;
the stale thread then calls ``accept()`` on that new socket and answers the other test's
connection with this server's reply (CI saw ``/debug/ready`` answer ``ok``). ``stop`` therefore
shuts the socket down first (which wakes a blocked ``accept`` with an error), joins the thread
and only then closes the fd.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


class LoopbackServer:
    """Listens on 127.0.0.1:<free port>; calls ``handle(conn)`` for each accepted connection.

    ``handle`` runs on the accept thread unless ``threaded`` (one thread per connection).
    ``accepted`` counts connections. Use as a context manager or call ``stop()``.
    """

    def __init__(self, handle: Callable[[socket.socket], None], threaded: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._handle = handle
        self._threaded = threaded
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"loopserver-{self.port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self._stopping.is_set():
                conn.close()
                return
            self.accepted += 1
            if self._threaded:
                threading.Thread(target=self._one, args=(conn,), daemon=True).start()
            else:
                self._one(conn)

    def _one(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._handle(conn)
            except OSError:
                pass

    def stop(self) -> None:
        """Idempotent: wake the accept thread, wait for it, then release the fd."""
        self._stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            raise RuntimeError(f"loopback server on port {self.port}: accept thread did not stop")
        self.sock.close()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
