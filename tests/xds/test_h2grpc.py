"""daemon/xds/h2grpc.py against a real grpcio server: big messages both ways (flow control),
the receive limit, gRPC status codes and messages, server-side close, cancel from another
thread (no fd left open), connection refused, and the grpcio fallback switch."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from daemon.xds import h2grpc

METHOD = "/kmesh.test.Echo/Chat"
MiB = 1 << 20


def _handler(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    """Requests: b"S<n>" -> n bytes back; b"H<...>" -> sha256 of the request; b"E<msg>" -> abort
    UNAUTHENTICATED with msg; b"C" -> end the stream OK; b"W" -> nothing."""
    for req in requests:
        op, arg = req[:1], req[1:]
        if op == b"S":
            n = int(arg)
            yield (os.urandom(1024) * (n // 1024 + 1))[:n]
        elif op == b"H":
            yield hashlib.sha256(req).digest() + len(req).to_bytes(8, "big")
        elif op == b"E":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, arg.decode())
        elif op == b"M":  # many small messages at once: several per DATA frame, prefixes split
            for i in range(int(arg)):
                yield i.to_bytes(4, "big") * (i % 7)
        elif op == b"C":
            return


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                      options=[("grpc.max_receive_message_length", 64 * MiB),
                               ("grpc.max_send_message_length", 64 * MiB)])
    handler = grpc.stream_stream_rpc_method_handler(_handler)
    generic = grpc.method_handlers_generic_handler("kmesh.test.Echo", {"Chat": handler})
    srv.add_generic_rpc_handlers((generic,))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield port
    srv.stop(0).wait(5)


class Session:
    """A call whose requests are fed from the test and whose responses arrive on a queue."""

    def __init__(self, port: int, max_receive: int = 16 * MiB) -> None:
        self.channel = h2grpc.Channel(f"127.0.0.1:{port}", max_receive_bytes=max_receive)
        self.requests: queue.Queue[bytes | None] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()

        def reqs() -> Iterator[bytes]:
            while (item := self.requests.get()) is not None:
                yield item

        start = self.channel.stream_stream(METHOD, request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)
        self.call = start(reqs(), metadata=[("x-k", "v")])
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.responses.put(msg)
            self.responses.put("END")
        except h2grpc.RpcError as e:
            self.responses.put(e)

    def ask(self, req: bytes, timeout: float = 30) -> Any:
        self.requests.put(req)
        return self.responses.get(timeout=timeout)

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_big_messages_both_ways_and_the_receive_limit(server: int) -> None:
    s = Session(server, max_receive=12 * MiB)
    try:
        assert len(s.ask(b"S5242880")) == 5 * MiB  # 5 MiB back: hundreds of DATA frames
        big = b"H" + os.urandom(6 * MiB)  # 6 MiB out: far beyond the server's initial 64 KiB window
        got = s.ask(big)
        assert got == hashlib.sha256(big).digest() + len(big).to_bytes(8, "big")
        err = s.ask(b"S13000000")
        assert isinstance(err, h2grpc.RpcError) and err.code().name == "RESOURCE_EXHAUSTED"
        assert "larger than max (13000000 vs. 12582912)" in err.details()
    finally:
        s.close()


def test_many_small_messages_in_few_frames(server: int) -> None:
    s = Session(server)
    try:
        s.requests.put(b"M500")
        got = [s.responses.get(timeout=30) for _ in range(500)]
        assert got == [i.to_bytes(4, "big") * (i % 7) for i in range(500)]  # empty ones included
    finally:
        s.close()


def test_status_code_and_message_reach_the_caller(server: int) -> None:
    s = Session(server)
    try:
        assert len(s.ask(b"S10")) == 10
        err = s.ask("Eauthentication failure: token expired – ünïcode".encode())
        assert isinstance(err, h2grpc.RpcError) and err.code() is h2grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == "authentication failure: token expired – ünïcode"
        assert str(err) == f"UNAUTHENTICATED: {err.details()}"
    finally:
        s.close()


def test_server_ending_the_stream_ends_the_iteration(server: int) -> None:
    s = Session(server)
    try:
        assert len(s.ask(b"S3")) == 3
        assert s.ask(b"C") == "END"
    finally:
        s.close()


def test_cancel_from_another_thread_unblocks_and_leaves_no_fd(server: int) -> None:
    before = _fds()
    s = Session(server)
    assert len(s.ask(b"S1")) == 1
    s.requests.put(b"W")  # the server answers nothing: the reader blocks in select()
    time.sleep(0.2)
    t0 = time.monotonic()
    s.call.cancel()
    err = s.responses.get(timeout=5)
    assert isinstance(err, h2grpc.RpcError) and err.code().name == "CANCELLED"
    assert time.monotonic() - t0 < 2
    s.close()
    deadline = time.monotonic() + 5
    while _fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fds() <= before


def test_connection_refused_is_unavailable() -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    call = h2grpc.Channel(f"127.0.0.1:{port}").stream_stream(METHOD, lambda b: b, lambda b: b)(iter(()))
    with pytest.raises(h2grpc.RpcError) as info:
        next(iter(call))
    assert info.value.code().name == "UNAVAILABLE" and "failed to connect" in info.value.details()


def test_bad_target_and_grpcio_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        h2grpc.Channel("istiod.istio-system.svc")
    assert h2grpc.split_target("[::1]:15012") == ("::1", 15012)
    from daemon.state import State
    from daemon.xds.client import XdsClient, XdsConfig

    client = XdsClient(XdsConfig(address="127.0.0.1:1", plaintext=True), State())
    assert isinstance(client._channel(), h2grpc.Channel)
    monkeypatch.setenv("KMESH_XDS_TRANSPORT", "grpcio")
    ch = client._channel()
    assert isinstance(ch, grpc.Channel)
    ch.close()
