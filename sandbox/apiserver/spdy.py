"""A small SPDY/3.1 server session: what ``kubectl port-forward`` speaks.

kubectl (client-go's spdystream) opens two streams per forwarded connection, an error stream and a
data stream whose headers carry ``streamtype``, ``port`` and ``requestid``; the server answers each
SYN_STREAM with a SYN_REPLY, joins the pair on ``requestid`` and calls ``on_pair``. Only the parts
of SPDY that client uses are here: SYN_STREAM/SYN_REPLY, DATA (with FIN), RST_STREAM, PING, GOAWAY;
SETTINGS, WINDOW_UPDATE and HEADERS are read and ignored (spdystream does no flow control).

Header blocks are zlib streams primed with the SPDY/3 dictionary (one compression context per
direction for the whole connection, each block ended by a sync flush): built below from the
spec's word list (its length checked at import).

The transport is any byte stream: the raw socket after an HTTP ``Upgrade: SPDY/3.1`` (kubectl
before 1.31, and its fallback), or the payload of a WebSocket negotiated as
``SPDY/3.1+portforward.k8s.io`` (kubectl 1.31 and later).
"""

from __future__ import annotations

import logging
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("sandbox.apiserver.spdy")

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
RST_CANCEL, RST_PROTOCOL_ERROR = 5, 1

_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language "
    "accept-ranges age allow authorization cache-control connection content-base content-encoding "
    "content-language content-length content-location content-md5 content-range content-type date "
    "etag expect expires from host if-match if-modified-since if-none-match if-range "
    "if-unmodified-since last-modified location max-forwards pragma proxy-authenticate "
    "proxy-authorization range referer retry-after server te trailer transfer-encoding upgrade "
    "user-agent vary via warning www-authenticate method get status"
).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _WORDS) + _TAIL.encode()
assert len(DICTIONARY) == 1423, len(DICTIONARY)


class SpdyError(Exception):
    """The peer broke the protocol or the transport ended."""


Reader = Callable[[int], bytes]  # exactly n bytes, or fewer at end of stream
Writer = Callable[[bytes], None]


def encode_headers(headers: dict[str, str]) -> bytes:
    out = [struct.pack(">I", len(headers))]
    for k, v in headers.items():
        kb, vb = k.lower().encode(), v.encode()
        out += [struct.pack(">I", len(kb)), kb, struct.pack(">I", len(vb)), vb]
    return b"".join(out)


def decode_headers(raw: bytes) -> dict[str, str]:
    (n,) = struct.unpack_from(">I", raw, 0)
    pos, out = 4, {}
    for _ in range(n):
        (klen,) = struct.unpack_from(">I", raw, pos)
        key = raw[pos + 4 : pos + 4 + klen].decode()
        pos += 4 + klen
        (vlen,) = struct.unpack_from(">I", raw, pos)
        value = raw[pos + 4 : pos + 4 + vlen].decode()
        pos += 4 + vlen
        out[key.lower()] = value.split("\0")[0]  # several values are NUL-separated; one is enough here
    return out


@dataclass
class Stream:
    """One client-opened stream."""

    id: int
    headers: dict[str, str]
    on_data: Callable[[bytes], None] | None = None  # set once the pair is connected
    on_fin: Callable[[], None] | None = None
    on_reset: Callable[[], None] | None = None
    pending: list[bytes] = field(default_factory=list)  # DATA that came before on_data was set
    remote_fin: bool = False
    local_fin: bool = False


class Session:
    """The server end of one SPDY connection; ``serve()`` reads frames until the transport ends.

    ``on_pair(error_stream, data_stream)`` runs in the reading thread when both streams of one
    ``requestid`` are open; it sets the streams' callbacks (kept short: connect, start a pump).
    """

    def __init__(self, read: Reader, write: Writer,
                 on_pair: Callable[[Session, Stream, Stream], None]) -> None:
        self._read, self._write = read, write
        self.on_pair = on_pair
        self._lock = threading.Lock()  # frame writes and the compressor, in wire order
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                                         zlib.Z_DEFAULT_STRATEGY, DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self.streams: dict[int, Stream] = {}
        self._waiting: dict[tuple[str, str], dict[str, Stream]] = {}
        self.closed = False

    # ---------------------------------------------------------------- writing
    def _send(self, frame: bytes) -> bool:
        with self._lock:
            if self.closed:
                return False
            try:
                self._write(frame)
                return True
            except (OSError, SpdyError):
                self.closed = True
                return False

    def _control(self, ftype: int, flags: int, body: bytes) -> bytes:
        return struct.pack(">HHI", 0x8000 | VERSION, ftype, (flags << 24) | len(body)) + body

    def send_data(self, stream: Stream, data: bytes, fin: bool = False) -> bool:
        if stream.local_fin:
            return False
        if fin:
            stream.local_fin = True
        frames = []
        view = memoryview(data)
        while len(view) > 0xFFFFFF:  # a frame's length is 24 bits
            frames.append(struct.pack(">II", stream.id, 0xFFFFFF) + bytes(view[:0xFFFFFF]))
            view = view[0xFFFFFF:]
        flags = FLAG_FIN if fin else 0
        frames.append(struct.pack(">II", stream.id, (flags << 24) | len(view)) + bytes(view))
        return self._send(b"".join(frames))

    def reset(self, stream: Stream, status: int = RST_CANCEL) -> None:
        stream.local_fin = True
        self._send(self._control(RST_STREAM, 0, struct.pack(">II", stream.id, status)))

    def _reply(self, stream_id: int) -> None:
        with self._lock:
            if self.closed:
                return
            block = self._deflate.compress(encode_headers({})) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
            try:
                self._write(self._control(SYN_REPLY, 0, struct.pack(">I", stream_id) + block))
            except (OSError, SpdyError):
                self.closed = True

    # ---------------------------------------------------------------- reading
    def _exact(self, n: int) -> bytes:
        data = self._read(n) if n else b""
        if len(data) < n:
            raise SpdyError("connection closed")
        return data

    def serve(self) -> None:
        try:
            while not self.closed:
                self._frame()
        except (SpdyError, OSError, zlib.error, struct.error, UnicodeDecodeError) as e:
            log.debug("spdy session ends: %s", e)
        finally:
            self.closed = True
            for s in list(self.streams.values()):
                if s.on_reset is not None:
                    s.on_reset()

    def _frame(self) -> None:
        head = self._exact(8)
        word, flags_len = struct.unpack(">II", head)
        flags, length = flags_len >> 24, flags_len & 0xFFFFFF
        body = self._exact(length)
        if not word & 0x80000000:
            self._data(word & 0x7FFFFFFF, flags, body)
            return
        version, ftype = (word >> 16) & 0x7FFF, word & 0xFFFF
        if version != VERSION:
            raise SpdyError(f"SPDY version {version} is not supported")
        if ftype == SYN_STREAM:
            stream_id = struct.unpack_from(">I", body, 0)[0] & 0x7FFFFFFF
            headers = decode_headers(self._inflate.decompress(body[10:]))
            self._syn(stream_id, headers, bool(flags & FLAG_FIN))
        elif ftype == RST_STREAM:
            stream_id = struct.unpack_from(">I", body, 0)[0] & 0x7FFFFFFF
            s = self.streams.pop(stream_id, None)
            if s is not None:
                s.local_fin = s.remote_fin = True
                if s.on_reset is not None:
                    s.on_reset()
        elif ftype == PING:
            self._send(self._control(PING, 0, body[:4]))
        elif ftype == GOAWAY:
            raise SpdyError("client sent GOAWAY")
        elif ftype == HEADERS:
            self._inflate.decompress(body[4:])  # keep the decompression context in step
        # SETTINGS, WINDOW_UPDATE, others: nothing to do.

    def _syn(self, stream_id: int, headers: dict[str, str], fin: bool) -> None:
        s = Stream(stream_id, headers, remote_fin=fin)
        self.streams[stream_id] = s
        self._reply(stream_id)
        key = (headers.get("requestid", ""), headers.get("port", ""))
        kind = headers.get("streamtype", "")
        if kind not in ("error", "data"):
            self.reset(s, RST_PROTOCOL_ERROR)
            return
        pair = self._waiting.setdefault(key, {})
        pair[kind] = s
        if "error" in pair and "data" in pair:
            del self._waiting[key]
            self.on_pair(self, pair["error"], pair["data"])

    def _data(self, stream_id: int, flags: int, body: bytes) -> None:
        s = self.streams.get(stream_id)
        if s is None:
            return
        if body:
            if s.on_data is not None:
                s.on_data(body)
            else:
                s.pending.append(body)
        if flags & FLAG_FIN:
            s.remote_fin = True
            if s.on_fin is not None:
                s.on_fin()
        if s.remote_fin and s.local_fin:
            self.streams.pop(stream_id, None)

    def forget(self, stream: Stream) -> None:
        if stream.remote_fin and stream.local_fin:
            self.streams.pop(stream.id, None)

    def shutdown(self) -> None:
        with self._lock:
            self.closed = True
