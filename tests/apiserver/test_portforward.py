"""pods/portforward on the sandbox API server: the official Python client's WebSocket protocol
(what kmeshctl uses), kubectl's SPDY/3.1 inside a WebSocket (its default) and plain SPDY/3.1 over
an HTTP upgrade (older kubectl, and newer ones' fallback); 50 concurrent streams and a 100 MiB
transfer (sha256 equal); no fd, thread or process left over afterwards."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.apiserver import spdy
from tests.apiserver.conftest import Cluster
from tests.apiserver.podbox import PodBox, children, fd_count, make_pod_box, settle
from tests.support.kubectl import kubectl_path
from tests.support.loopserver import LoopbackServer

BIG = 100 << 20


@pytest.fixture(scope="module")
def box(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, test_cgroup: Path) -> Iterator[PodBox]:
    yield from make_pod_box(cluster, tmp_path_factory.mktemp("box"), test_cgroup)


class Backend:
    """What listens "in the pod" (hostNetwork: our loopback): echo, or a 100 MiB source."""

    def __init__(self) -> None:
        self.blob = os.urandom(1 << 20) * 100  # 100 MiB, from 1 MiB of random bytes
        self.server = LoopbackServer(self._one, threaded=True)
        self.port = self.server.port

    @property
    def conns(self) -> int:
        return self.server.accepted

    def _one(self, conn: socket.socket) -> None:
        first = conn.recv(65536)
        if first.startswith(b"GET /big"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % BIG)
            conn.sendall(self.blob)
            return
        if first.startswith(b"GET "):
            conn.sendall(b"HTTP/1.1 200 OK\r\nServer: backend\r\nContent-Length: 2\r\n"
                         b"Connection: close\r\n\r\nok")
            return
        data = first
        while data:
            conn.sendall(data)
            data = conn.recv(65536)

    def close(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


def test_spdy_dictionary_and_header_block_round_trip() -> None:
    import zlib

    assert len(spdy.DICTIONARY) == 1423 and spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options")
    headers = {"streamtype": "data", "port": "15200", "requestid": "0"}
    c = zlib.compressobj(zdict=spdy.DICTIONARY)
    block = c.compress(spdy.encode_headers(headers)) + c.flush(zlib.Z_SYNC_FLUSH)
    assert spdy.decode_headers(zlib.decompressobj(zdict=spdy.DICTIONARY).decompress(block)) == headers


def test_official_python_client(box: PodBox, backend: Backend, cluster: Cluster) -> None:
    from kubernetes import client
    from kubernetes.stream import portforward

    core = client.CoreV1Api(cluster.api_client())
    before = cluster.server.api.stream_counts.get("portforward", 0)
    connect = core.connect_get_namespaced_pod_portforward
    pf = portforward(connect, "box", box.namespace, ports=str(backend.port))
    s = pf.socket(backend.port)
    s.settimeout(10)
    s.sendall(b"hello through the API server")
    got = b""
    while len(got) < 28:
        got += s.recv(100)
    assert got == b"hello through the API server"
    s.close()
    pf.close()
    assert cluster.server.api.stream_counts["portforward"] == before + 1
    # A port nobody listens on: the error channel says so and the socket ends.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    pf = portforward(core.connect_get_namespaced_pod_portforward, "box", box.namespace, ports=str(port))
    s = pf.socket(port)
    s.settimeout(10)
    assert s.recv(10) == b""
    assert "connection refused" in (pf.error(port) or "")


class KubectlForward:
    def __init__(self, box: PodBox, remote: int, websockets: bool) -> None:
        env = {**box.env, "KUBECTL_PORT_FORWARD_WEBSOCKETS": "true" if websockets else "false"}
        cmd = [kubectl_path(), "-n", box.namespace, "port-forward", "pod/box", f":{remote}"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # Forwarding from 127.0.0.1:NNNNN -> remote
        assert "Forwarding from 127.0.0.1:" in line, line + self._stderr()
        self.port = int(line.split("127.0.0.1:")[1].split()[0])
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # "Handling connection..."

    def _stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr else ""

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def _http_get(port: int, path: str = "/") -> tuple[int, str | None, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, resp.getheader("Server"), body


@pytest.mark.parametrize("websockets", [True, False], ids=["spdy-in-websocket", "spdy-upgrade"])
def test_kubectl_port_forward(box: PodBox, backend: Backend, websockets: bool) -> None:
    fwd = KubectlForward(box, backend.port, websockets)
    try:
        for _ in range(3):
            assert _http_get(fwd.port)[:2] == (200, "backend")
    finally:
        fwd.stop()


def test_50_concurrent_streams_and_a_100_mib_transfer_leave_nothing_behind(box: PodBox,
                                                                            backend: Backend) -> None:
    kids, fds, threads = children(), fd_count(), threading.active_count()
    fwd = KubectlForward(box, backend.port, websockets=True)
    try:
        results: list[bool] = []
        errors: list[BaseException] = []

        def echo(i: int) -> None:
            try:
                payload = os.urandom(256 << 10)
                with socket.create_connection(("127.0.0.1", fwd.port), timeout=60) as s:
                    threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
                    got = bytearray()
                    while len(got) < len(payload):
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        got += chunk
                results.append(bytes(got) == payload)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        workers = [threading.Thread(target=echo, args=(i,)) for i in range(50)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert not errors, errors[:3]
        assert results.count(True) == 50
        status, _, body = _http_get(fwd.port, "/big")
        assert status == 200 and len(body) == BIG
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(backend.blob).hexdigest()
    finally:
        fwd.stop()
    assert settle(lambda: children() <= kids), f"left over: {children() - kids}"
    assert settle(lambda: fd_count() <= fds), f"fds {fds} -> {fd_count()}"
    assert settle(lambda: threading.active_count() <= threads), (threads, threading.active_count())
