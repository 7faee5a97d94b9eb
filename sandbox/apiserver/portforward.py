"""The pods/portforward subresource, as kube-apiserver + kubelet serve it.

Three ways in, one way out:

- WebSocket ``v4.channel.k8s.io`` / ``portforward.k8s.io`` (the official Python client's
  ``kubernetes.stream.portforward``, which kmeshctl uses): ``?ports=A,B``; port i gets channels
  2i (data) and 2i+1 (error), each opened by a 3-byte frame ``[channel, port lo, port hi]``; one
  connection per port; the WebSocket closes when the connections end.
- WebSocket ``SPDY/3.1+portforward.k8s.io`` (kubectl 1.31 and later): SPDY inside the WebSocket.
- HTTP ``Upgrade: SPDY/3.1`` with ``X-Stream-Protocol-Version: portforward.k8s.io`` (older
  kubectl, and newer kubectl's fallback): SPDY on the socket. See spdy.py.

Every forwarded connection is a TCP connection to 127.0.0.1:PORT inside the pod's network
namespace (the kubelet dials localhost there too); hostNetwork pods: the machine's loopback.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from . import errors, podruntime, spdy, websocket
from .exec import audit, query_all
from .model import Request, Response, Target
from .store import Store

log = logging.getLogger("sandbox.apiserver.portforward")

WS_PROTOCOLS = ["SPDY/3.1+portforward.k8s.io", "v4.channel.k8s.io", "portforward.k8s.io"]
SPDY_PROTOCOL = "portforward.k8s.io"
CHUNK = 256 * 1024
CONNECT_TIMEOUT = 5.0


def dial(netns: str | None, port: int, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A TCP connection to localhost:port in network namespace ``netns`` (None: this machine's).

    The namespace is joined by a short-lived thread (setns changes only the calling thread), whose
    socket stays in the namespace it was made in.
    """
    if netns is None:
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)
    result: list[Any] = []

    def inside() -> None:
        try:
            from sandbox.kubelet.launch import CLONE_NEWNET, setns

            setns(netns, CLONE_NEWNET)
            result.append(socket.create_connection(("127.0.0.1", port), timeout=timeout))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result.append(e)

    th = threading.Thread(target=inside, name=f"dial-{port}", daemon=True)
    th.start()
    th.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def parse_ports(req: Request) -> list[int]:
    ports = []
    for k, v in query_all(req):
        if k != "ports":
            continue
        for p in v.split(","):
            p = p.strip()
            if not p.isdigit() or not 0 < int(p) < 65536:
                raise errors.bad_request(f'invalid port "{p}"')
            ports.append(int(p))
    return ports


def _dial_error(pod: str, uid: str, port: int, exc: BaseException) -> str:
    refused = isinstance(exc, ConnectionRefusedError)
    why = "connection refused" if refused else (str(exc) or type(exc).__name__)
    return (f"error forwarding port {port} to pod {pod}, uid {uid}: failed to connect to localhost:{port} "
            f"inside the pod's network namespace: {why}")


class PortForwardEndpoints:
    """GET/POST pods/NAME/portforward (see module doc)."""

    store: Store
    stream_counts: dict[str, int]
    _require: Callable[[Target], dict[str, Any]]

    def _portforward(self, req: Request, t: Target) -> Response:
        if req.method not in ("GET", "POST"):
            raise errors.method_not_allowed()
        pod = self._require(t)
        name = t.name or ""
        runtime = podruntime.resolve(pod)
        netns = None if runtime.host_network else runtime.netns
        uid = (pod.get("metadata") or {}).get("uid", "")
        target = _Target(name, uid, netns)
        h = req.headers
        self.stream_counts["portforward"] = self.stream_counts.get("portforward", 0) + 1
        if websocket.is_websocket(h):
            proto = websocket.choose_protocol(h, WS_PROTOCOLS)
            if proto is None and not websocket.offered_protocols(h):
                proto = "v4.channel.k8s.io"  # the kubelet's default for a client that names none
            if proto is None:
                raise errors.bad_request(
                    f"unable to upgrade connection: subprotocols {websocket.offered_protocols(h)} "
                    "not supported; "
                    f"supported: {', '.join(WS_PROTOCOLS)}")
            ports = parse_ports(req)
            if proto.startswith("SPDY/"):
                audit.info("portforward %s/%s user=%s via SPDY over WebSocket", t.namespace, name, req.user)
            else:
                if not ports:
                    raise errors.bad_request("query parameter \"port\" is required")
                audit.info("portforward %s/%s user=%s ports=%s via WebSocket", t.namespace, name, req.user,
                           ",".join(map(str, ports)))

            def serve_ws(handler: Any) -> None:
                ws = websocket.WebSocket.accept(handler.connection, handler.rfile, h, proto)
                if proto.startswith("SPDY/"):
                    _serve_spdy(target, _ws_reader(ws), lambda b: _ws_write(ws, b), ws.shutdown)
                else:
                    _serve_channels(target, ws, ports)

            return Response(101, upgrade=serve_ws)
        if "spdy/3.1" in h.get("upgrade", "").lower():
            offered = [p.strip() for p in h.get("x-stream-protocol-version", "").split(",")]
            if SPDY_PROTOCOL not in offered:
                raise errors.bad_request(
                    f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                    f"server supports [{SPDY_PROTOCOL}]")
            audit.info("portforward %s/%s user=%s via SPDY", t.namespace, name, req.user)

            def serve_spdy(handler: Any) -> None:
                sock = handler.connection
                sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n")
                rfile = handler.rfile

                def close() -> None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

                _serve_spdy(target, rfile.read, sock.sendall, close)

            return Response(101, upgrade=serve_spdy)
        raise errors.bad_request("Upgrade request required")


class _Target:
    def __init__(self, pod: str, uid: str, netns: str | None) -> None:
        self.pod, self.uid, self.netns = pod, uid, netns

    def dial(self, port: int) -> socket.socket:
        conn = dial(self.netns, port)
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn


# ------------------------------------------------------------------------- SPDY
def _ws_reader(ws: websocket.WebSocket) -> Callable[[int], bytes]:
    """A read(n) over the WebSocket's binary messages taken as one byte stream."""
    buf = bytearray()

    def read(n: int) -> bytes:
        while len(buf) < n:
            msg = ws.recv()
            if msg is None:
                break
            buf.extend(msg[1])
        out = bytes(buf[:n])
        del buf[:n]
        return out

    return read


def _ws_write(ws: websocket.WebSocket, data: bytes) -> None:
    if not ws.send(data):
        raise OSError("websocket closed")


def _serve_spdy(target: _Target, read: Callable[[int], bytes], write: Callable[[bytes], None],
                close: Callable[[], None]) -> None:
    pumps: list[threading.Thread] = []
    conns: set[socket.socket] = set()
    lock = threading.Lock()

    def on_pair(session: spdy.Session, err: spdy.Stream, data: spdy.Stream) -> None:
        port_text = data.headers.get("port", "")
        if not port_text.isdigit():
            session.send_data(err, f'invalid port "{port_text}"'.encode(), fin=True)
            session.send_data(data, b"", fin=True)
            return
        port = int(port_text)
        try:
            conn = target.dial(port)
        except OSError as e:
            session.send_data(err, _dial_error(target.pod, target.uid, port, e).encode(), fin=True)
            session.send_data(data, b"", fin=True)
            return
        with lock:
            conns.add(conn)
        closed = threading.Event()

        def finish() -> None:
            if not closed.is_set():
                closed.set()
                _close(conn)
                with lock:
                    conns.discard(conn)

        def to_target(chunk: bytes) -> None:
            try:
                conn.sendall(chunk)
            except OSError:
                session.reset(data)
                finish()

        def client_fin() -> None:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        data.on_data, data.on_fin, data.on_reset = to_target, client_fin, finish
        err.on_reset = finish
        for chunk in data.pending:
            to_target(chunk)
        data.pending.clear()
        if data.remote_fin:
            client_fin()

        def pump() -> None:
            try:
                while True:
                    chunk = conn.recv(CHUNK)
                    if not chunk or not session.send_data(data, chunk):
                        break
            except OSError:
                pass
            session.send_data(data, b"", fin=True)
            session.send_data(err, b"", fin=True)
            session.forget(data)
            session.forget(err)
            finish()

        th = threading.Thread(target=pump, name=f"pf-{port}", daemon=True)
        th.start()
        pumps.append(th)

    session = spdy.Session(read, write, on_pair)
    try:
        session.serve()
    finally:
        session.shutdown()
        with lock:
            left = list(conns)
        for c in left:
            _close(c)
        close()
        for th in pumps:
            th.join(5.0)


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        conn.close()
    except OSError:
        pass


# ------------------------------------------------------------------------- v4 channels
def _serve_channels(target: _Target, ws: websocket.WebSocket, ports: list[int]) -> None:
    """One connection per requested port; data channel 2i, error channel 2i+1."""
    conns: list[socket.socket | None] = []
    for i, port in enumerate(ports):
        lo_hi = bytes([port & 0xFF, port >> 8])
        ws.send(bytes([2 * i]) + lo_hi)
        ws.send(bytes([2 * i + 1]) + lo_hi)
        try:
            conns.append(target.dial(port))
        except OSError as e:
            conns.append(None)
            ws.send(bytes([2 * i + 1]) + _dial_error(target.pod, target.uid, port, e).encode())
    live = [c for c in conns if c is not None]
    remaining = [len(live)]
    lock = threading.Lock()

    def pump(i: int, conn: socket.socket) -> None:
        prefix = bytes([2 * i])
        try:
            while True:
                chunk = conn.recv(CHUNK)
                if not chunk or not ws.send(prefix + chunk):
                    break
        except OSError:
            pass
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            ws.close()  # every connection ended: so does the WebSocket (the client closes its side)

    pumps = [threading.Thread(target=pump, args=(i, c), daemon=True, name=f"pf-ws-{ports[i]}")
             for i, c in enumerate(conns) if c is not None]
    for th in pumps:
        th.start()
    if not live:
        ws.close()
    try:
        while True:
            msg = ws.recv()
            if msg is None:
                break
            data = msg[1]
            if not data:
                continue
            ch = data[0]
            if ch % 2 or ch // 2 >= len(conns) or conns[ch // 2] is None or len(data) == 1:
                continue
            try:
                conns[ch // 2].sendall(data[1:])  # type: ignore[union-attr]
            except OSError:
                pass
    finally:
        for c in live:
            _close(c)
        for th in pumps:
            th.join(5.0)
        ws.shutdown()


