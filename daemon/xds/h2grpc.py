"""A gRPC bidirectional-streaming client over HTTP/2 in Python (the ``h2`` state machine).

Why not grpcio in the daemon: its C core is ~17 MiB of the daemon's resident memory (a third of
its base) for one stream to istiod. The daemon needs one call shape, a bidi stream of protobuf
messages with metadata, TLS with a custom root and name, a message size limit and the gRPC
status in the trailers; this module provides exactly that with grpcio's call surface
(``channel.stream_stream(method, request_serializer, response_deserializer)(requests,
metadata=...)`` returning an iterator with ``cancel()``; errors carry ``code().name`` and
``details()``), so the xDS client is unchanged. grpcio stays available behind
``KMESH_XDS_TRANSPORT=grpcio`` (daemon/xds/client.py).

Threads: the caller iterates the call and is the only thread that touches the socket (an
SSL object must not be read and written from two threads): it waits in select() on the socket
and a wake-up pipe, reads and parses frames, yields responses and sends whatever h2 has queued.
A sender thread drains the request iterator into the h2 connection (under its lock) and pokes
the pipe; ``cancel()`` pokes it too. Flow
control: 1 GiB receive windows (a full push is tens of MB in one message) and received data is
acknowledged as it is consumed; the sender waits for window when a request is larger than the
server's window (a reconnect's initial versions can be MBs).
"""

from __future__ import annotations

import enum
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

WINDOW = 1 << 30
READ_CHUNK = 1 << 20
MAX_FRAME = 1 << 20  # we accept 1 MiB DATA frames: 64x fewer frames to parse than the 16 KiB default


class StatusCode(enum.Enum):
    """gRPC status codes (google.rpc.Code); ``.name`` is what errors print."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


_HTTP_TO_GRPC = {400: StatusCode.INTERNAL, 401: StatusCode.UNAUTHENTICATED, 403: StatusCode.PERMISSION_DENIED,
                 404: StatusCode.UNIMPLEMENTED, 429: StatusCode.UNAVAILABLE, 502: StatusCode.UNAVAILABLE,
                 503: StatusCode.UNAVAILABLE, 504: StatusCode.UNAVAILABLE}


class RpcError(Exception):
    """A call that ended with a non-OK status (grpcio's ``RpcError`` surface: code(), details())."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def split_target(target: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); a one-line ValueError otherwise."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"xDS address {target!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class Channel:
    """One target; every call opens its own HTTP/2 connection (the xDS client runs one at a time)."""

    def __init__(self, target: str, tls: ssl.SSLContext | None = None, server_name: str | None = None,
                 max_receive_bytes: int = 4 * 1024 * 1024, connect_timeout_s: float = 10.0) -> None:
        self.target = target
        self.host, self.port = split_target(target)
        self.tls = tls
        self.server_name = server_name
        self.max_receive_bytes = max_receive_bytes
        self.connect_timeout_s = connect_timeout_s
        self._calls: list[StreamCall] = []

    def stream_stream(self, method: str, request_serializer: Callable[[Any], bytes],
                      response_deserializer: Callable[[bytes], Any]) -> Callable[..., StreamCall]:
        def start(requests: Iterator[Any], metadata: list[tuple[str, str]] | None = None) -> StreamCall:
            call = StreamCall(self, method, requests, metadata or [], request_serializer,
                              response_deserializer)
            self._calls.append(call)
            return call

        return start

    def close(self) -> None:
        for call in self._calls:
            call.cancel()
        self._calls = []


def _cheap_data_repr() -> None:
    """h2 logs ``repr(frame)`` for every frame it receives, eagerly, even with logging off, and a
    DATA frame's repr hex-encodes its whole payload: ~0.1 s of CPU per 27 MB push (measured with
    cProfile). This process uses h2 for nothing else, so the repr becomes the payload's length."""
    from hyperframe.frame import DataFrame

    if getattr(DataFrame, "_kmesh_cheap_repr", False):
        return

    def body_repr(self: Any) -> str:
        return f"<{len(self.data)} bytes>"

    DataFrame._body_repr = body_repr  # type: ignore[method-assign]
    DataFrame._kmesh_cheap_repr = True  # type: ignore[attr-defined]


class StreamCall:
    """One bidi stream: iterate for responses; ``cancel()`` from any thread ends the iteration."""

    def __init__(self, channel: Channel, method: str, requests: Iterator[Any],
                 metadata: list[tuple[str, str]], serialize: Callable[[Any], bytes],
                 deserialize: Callable[[bytes], Any]) -> None:
        self._ch = channel
        self._method = method
        self._requests = requests
        self._metadata = metadata
        self._serialize = serialize
        self._deserialize = deserialize
        self._sock: socket.socket | None = None
        self._conn: Any = None
        self._lock = threading.Lock()  # the h2 connection
        self._wake_r, self._wake_w = os.pipe()  # poked when h2 has bytes to send or on cancel
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._window = threading.Condition(self._lock)  # the sender waits here for flow-control window
        self._sid = 1
        self._cancelled = threading.Event()
        self._done = False
        self._sender: threading.Thread | None = None
        self._send_error: BaseException | None = None

    # ----- connection ----------------------------------------------------------------------
    def _connect(self) -> None:
        import h2.config
        import h2.connection
        import h2.settings

        _cheap_data_repr()

        ch = self._ch
        try:
            raw = socket.create_connection((ch.host, ch.port), timeout=ch.connect_timeout_s)
        except OSError as e:
            raise RpcError(StatusCode.UNAVAILABLE, f"failed to connect to {ch.target}: {e}") from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a dead peer ends the stream
            for opt, val in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
                if hasattr(socket, opt):
                    raw.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
            sock: socket.socket = raw
            if ch.tls is not None:
                try:
                    sock = ch.tls.wrap_socket(raw, server_hostname=ch.server_name or ch.host)
                except (ssl.SSLError, OSError) as e:
                    raise RpcError(StatusCode.UNAVAILABLE,
                                   f"TLS handshake with {ch.target} failed: {e}") from None
                if sock.selected_alpn_protocol() not in (None, "h2"):
                    raise RpcError(StatusCode.UNAVAILABLE, f"{ch.target} did not negotiate HTTP/2 (ALPN)")
            sock.settimeout(None)
        except BaseException:
            raw.close()
            raise
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        codes = h2.settings.SettingCodes
        conn.local_settings = h2.settings.Settings(client=True, initial_values={
            codes.ENABLE_PUSH: 0, codes.INITIAL_WINDOW_SIZE: WINDOW, codes.MAX_CONCURRENT_STREAMS: 1,
            codes.MAX_FRAME_SIZE: MAX_FRAME})
        # settings given as initial values count as acknowledged: h2 would not apply the frame size
        conn.max_inbound_frame_size = conn.incoming_buffer.max_frame_size = MAX_FRAME
        conn.initiate_connection()
        conn.increment_flow_control_window(WINDOW - 65535)
        self._sid = conn.get_next_available_stream_id()
        authority = ch.server_name or ch.target
        headers = [(b":method", b"POST"), (b":scheme", b"https" if ch.tls else b"http"),
                   (b":path", self._method.encode()), (b":authority", authority.encode()),
                   (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                   (b"user-agent", b"kmesh-daemon-h2grpc")]
        headers += [(k.lower().encode(), v.encode()) for k, v in self._metadata]
        conn.send_headers(self._sid, headers)
        self._sock, self._conn = sock, conn
        self._flush()

    def _flush(self) -> None:
        """Send what h2 has queued (the I/O thread only)."""
        with self._lock:
            data = self._conn.data_to_send()
        if data and self._sock is not None:
            self._sock.sendall(data)

    def _wake(self) -> None:
        with self._lock:  # _close() closes the pipe under the lock: never write to a reused fd
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:  # full: the I/O thread has wake-ups pending anyway
                pass

    # ----- requests --------------------------------------------------------------------------
    def _send_loop(self) -> None:
        try:
            for req in self._requests:
                if self._cancelled.is_set() or self._done:
                    return
                payload = self._serialize(req)
                self._send_message(len(payload).to_bytes(5, "big") + payload)  # flag 0: uncompressed
            if not self._cancelled.is_set() and not self._done:
                with self._lock:
                    self._conn.end_stream(self._sid)
                self._wake()
        except BaseException as e:  # noqa: BLE001 - ends the call: the reader reports it
            if not self._cancelled.is_set() and not self._done:
                self._send_error = e
                self._wake()

    def _send_message(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            with self._window:
                while True:
                    if self._cancelled.is_set() or self._done:
                        return
                    room = min(self._conn.local_flow_control_window(self._sid),
                               self._conn.max_outbound_frame_size)
                    if room > 0:
                        break
                    self._window.wait(0.5)
                chunk, view = view[:room], view[room:]
                self._conn.send_data(self._sid, chunk.tobytes())
            self._wake()

    # ----- responses -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        return self._responses()

    def _responses(self) -> Iterator[Any]:
        if self._cancelled.is_set():
            raise RpcError(StatusCode.CANCELLED, "cancelled")
        self._connect()
        self._sender = threading.Thread(target=self._send_loop, name="xds-h2-send", daemon=True)
        self._sender.start()
        self._prefix = bytearray()  # the 5-byte prefix of the next message, as it arrives
        self._msg: bytearray | None = None  # the message being read, allocated at its size
        self._pos = 0
        self._headers: dict[bytes, bytes] = {}
        try:
            while True:
                data = self._read()
                if data is None:
                    continue
                with self._lock:
                    events = self._conn.receive_data(data)
                out: list[Any] = []
                ended = False
                for ev in events:
                    if self._on_event(ev, out):
                        ended = True  # what follows (grpcio adds RST_STREAM NO_ERROR) does not matter
                        break
                self._flush()
                yield from out
                if ended:
                    if self._headers.get(b"grpc-status") is None:
                        raise RpcError(StatusCode.INTERNAL, "stream ended without a gRPC status")
                    return  # status OK (a non-OK one raised in _check_headers)
        except RpcError:
            raise
        except Exception as e:  # noqa: BLE001 - h2 protocol errors and the like
            if self._cancelled.is_set():
                raise RpcError(StatusCode.CANCELLED, "cancelled") from None
            raise RpcError(StatusCode.INTERNAL, f"{type(e).__name__}: {e}") from None
        finally:
            self._done = True
            self._close()

    def _read(self) -> bytes | None:
        """Wait for the socket or the wake-up pipe; send what is queued; bytes read, or None."""
        sock = self._sock
        assert sock is not None
        if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):  # TLS may hold decrypted bytes
            ready, _, _ = select.select([sock, self._wake_r], [], [])
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                if self._cancelled.is_set():
                    self._send_cancel()
                    raise RpcError(StatusCode.CANCELLED, "cancelled")
                if self._send_error is not None:
                    raise RpcError(StatusCode.UNAVAILABLE,
                                   f"sending to {self._ch.target}: {self._send_error}")
                self._flush()
                if sock not in ready:
                    return None
        try:
            data = sock.recv(READ_CHUNK)
        except ssl.SSLWantReadError:
            return None
        except OSError as e:
            raise RpcError(StatusCode.UNAVAILABLE, f"connection to {self._ch.target}: {e}") from None
        if not data:
            raise RpcError(StatusCode.UNAVAILABLE, f"connection to {self._ch.target} closed")
        return data

    def _on_event(self, ev: Any, out: list[Any]) -> bool:
        """Handle one h2 event; complete messages go to `out`. True when our stream ended."""
        import h2.events as E  # noqa: N812

        mine = getattr(ev, "stream_id", self._sid) == self._sid
        if isinstance(ev, E.DataReceived) and mine:
            with self._lock:
                self._conn.acknowledge_received_data(ev.flow_controlled_length, self._sid)
            self._messages(ev.data, out)
        elif isinstance(ev, (E.ResponseReceived, E.TrailersReceived)) and mine:
            self._headers.update(dict(ev.headers))
            self._check_headers(self._headers)
        elif isinstance(ev, E.StreamEnded) and mine:
            return True
        elif isinstance(ev, E.StreamReset) and mine:
            if ev.error_code == 0 and b"grpc-status" in self._headers:
                return True  # NO_ERROR after the trailers: the server is done with our half
            code = StatusCode.CANCELLED if ev.error_code == 8 else StatusCode.UNAVAILABLE
            raise RpcError(code, f"stream reset by {self._ch.target} (HTTP/2 error {ev.error_code})")
        elif isinstance(ev, E.ConnectionTerminated):
            extra = (ev.additional_data or b"").decode(errors="replace")
            raise RpcError(StatusCode.UNAVAILABLE, f"{self._ch.target} closed the connection "
                                                   f"(GOAWAY {ev.error_code}{': ' + extra if extra else ''})")
        elif isinstance(ev, (E.WindowUpdated, E.RemoteSettingsChanged)):
            with self._window:
                self._window.notify_all()
        return False

    def _messages(self, data: bytes, out: list[Any]) -> None:
        """Feed DATA bytes; complete length-prefixed messages are decoded into `out`. A message's
        buffer is allocated at its announced size and filled in place (no regrowth copies)."""
        view = memoryview(data)
        i, end = 0, len(data)
        while i < end:
            if self._msg is None:
                take = min(5 - len(self._prefix), end - i)
                self._prefix += view[i:i + take]
                i += take
                if len(self._prefix) < 5:
                    return
                if self._prefix[0] != 0:
                    raise RpcError(StatusCode.INTERNAL, "compressed message received; none was offered")
                need = int.from_bytes(self._prefix[1:5], "big")
                self._prefix.clear()
                if need > self._ch.max_receive_bytes:
                    limit = self._ch.max_receive_bytes
                    raise RpcError(StatusCode.RESOURCE_EXHAUSTED,
                                   f"Received message larger than max ({need} vs. {limit})")
                if need == 0:  # nothing follows the prefix: complete now, not on the next DATA
                    out.append(self._deserialize(b""))
                    continue
                self._msg, self._pos = bytearray(need), 0
            msg, pos = self._msg, self._pos
            take = min(len(msg) - pos, end - i)
            msg[pos:pos + take] = view[i:i + take]
            i += take
            self._pos = pos + take
            if self._pos == len(msg):
                self._msg = None
                out.append(self._deserialize(msg))

    def _check_headers(self, headers: dict[bytes, bytes]) -> None:
        status = headers.get(b":status")
        if status is not None and status != b"200":
            code = _HTTP_TO_GRPC.get(int(status), StatusCode.UNKNOWN)
            raise RpcError(code, f"HTTP status {status.decode()} from {self._ch.target}")
        grpc_status = headers.get(b"grpc-status")
        if grpc_status is not None:
            try:
                code = StatusCode(int(grpc_status))
            except ValueError:
                code = StatusCode.UNKNOWN
            if code is not StatusCode.OK:
                raise RpcError(code, unquote(headers.get(b"grpc-message", b"").decode(errors="replace")))

    # ----- ending ----------------------------------------------------------------------------
    def cancel(self) -> None:
        """End the call from any thread: the I/O thread sends RST_STREAM(CANCEL) and closes."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        with self._window:
            self._window.notify_all()
        if self._sock is None:  # not connected (or already closed): nothing to tell the server
            if self._sender is None:
                self._close()
            return
        self._wake()

    def _send_cancel(self) -> None:
        try:
            with self._lock:
                self._conn.reset_stream(self._sid, error_code=8)
            self._flush()
        except Exception:  # noqa: BLE001 - best effort: the socket closes anyway
            pass

    def _close(self) -> None:
        """Close the socket and the wake-up pipe (the I/O thread, when the call ends)."""
        with self._window:
            self._window.notify_all()
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
