"""The server side of RFC 6455 WebSockets, for the streaming subresources (exec, portforward).

Why our own: the API server is a stdlib HTTP server and kubectl/client-go and the official Python
client only need the basics: the opening handshake with subprotocol negotiation, binary and text
messages (fragmented or not), ping/pong and close. Frames from the client are masked; ours are not.
Sending is thread-safe (one lock per connection); receiving belongs to one thread.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import threading
from typing import Any, BinaryIO

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 64 << 20  # a client message larger than this is a protocol error


class WebSocketError(Exception):
    """The peer broke the protocol, or the connection is gone."""


def is_websocket(headers: dict[str, str]) -> bool:
    """A WebSocket opening handshake (headers with lower-case names)."""
    return "websocket" in headers.get("upgrade", "").lower() and bool(headers.get("sec-websocket-key"))


def offered_protocols(headers: dict[str, str]) -> list[str]:
    return [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]


def choose_protocol(headers: dict[str, str], supported: list[str]) -> str | None:
    """Our most preferred protocol (order of ``supported``) among those the client offered."""
    offered = offered_protocols(headers)
    for p in supported:
        if p in offered:
            return p
    return None


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.strip().encode() + GUID).digest()).decode()


def handshake_response(key: str, protocol: str | None) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class WebSocket:
    """One accepted connection: ``recv()`` whole messages, ``send()`` from any thread."""

    def __init__(self, sock: socket.socket, rfile: BinaryIO, protocol: str | None) -> None:
        self.sock = sock
        self.rfile = rfile  # the HTTP handler's buffered reader: may already hold client bytes
        self.protocol = protocol
        self._send_lock = threading.Lock()
        self.closed = False  # we sent a close frame (or the socket failed)

    @classmethod
    def accept(cls, sock: socket.socket, rfile: BinaryIO, headers: dict[str, str],
               protocol: str | None) -> WebSocket:
        sock.sendall(handshake_response(headers["sec-websocket-key"], protocol))
        return cls(sock, rfile, protocol)

    # ----------------------------------------------------------------- receiving
    def _read(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if data is None or len(data) < n:
            raise WebSocketError("connection closed by the client")
        return data

    def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = self._read(2)
        fin, opcode, masked, length = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", self._read(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", self._read(8))
        if length > MAX_MESSAGE:
            raise WebSocketError(f"frame of {length} bytes is too large")
        mask = self._read(4) if masked else b""
        payload = self._read(length) if length else b""
        if masked and payload:
            payload = _unmask(payload, mask)
        return fin, opcode, payload

    def recv(self) -> tuple[int, bytes] | None:
        """The next data message (opcode, payload); None once the client closed or vanished.

        Pings are answered here; a close frame is answered and ends the stream.
        """
        parts: list[bytes] = []
        first_op = 0
        try:
            while True:
                fin, op, payload = self._frame()
                if op == OP_PING:
                    self._send_frame(OP_PONG, payload)
                    continue
                if op == OP_PONG:
                    continue
                if op == OP_CLOSE:
                    self.close(struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1000)
                    return None
                if op != OP_CONT:
                    first_op, parts = op, []
                parts.append(payload)
                if fin:
                    return first_op, b"".join(parts)
        except (WebSocketError, OSError, ValueError):
            self.closed = True
            return None

    # ----------------------------------------------------------------- sending
    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, n)
        elif n < 1 << 16:
            head = struct.pack(">BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 127, n)
        with self._send_lock:
            if self.closed and opcode != OP_CLOSE:
                raise WebSocketError("connection is closed")
            self.sock.sendall(head + payload)

    def send(self, payload: bytes, opcode: int = OP_BINARY) -> bool:
        """Send one message; False when the connection is gone."""
        try:
            self._send_frame(opcode, payload)
            return True
        except (WebSocketError, OSError):
            self.closed = True
            return False

    def close(self, code: int = 1000) -> None:
        """Send our close frame once (the peer's answer, if any, is not waited for)."""
        with self._send_lock:
            if self.closed:
                return
            self.closed = True
        try:
            n = struct.pack(">H", code)
            self.sock.sendall(struct.pack(">BB", 0x80 | OP_CLOSE, len(n)) + n)
        except OSError:
            pass

    def shutdown(self) -> None:
        """Close and end the TCP connection (wakes a thread blocked in ``recv``)."""
        self.close()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _unmask(payload: bytes, mask: bytes) -> bytes:
    # XOR as one big integer: fast enough for 100 MiB through port-forward in pure Python.
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def socket_of(handler: Any) -> socket.socket:
    """The raw connection of a BaseHTTPRequestHandler."""
    return handler.connection
