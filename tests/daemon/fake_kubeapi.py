"""A stand-in for the two Kubernetes API calls kmeshctl's port-forward path makes.

The sandbox API server has no pods/portforward yet, so this serves exactly: GET pods in
kmesh-system (a fixed PodList) and the portforward websocket upgrade (channel protocol
v4.channel.k8s.io: per port a data and an error channel, each opened by a frame carrying the
port number little-endian), relaying the data channel to a local TCP port per pod. It lets the
test run the real kubernetes.stream.portforward client end to end.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import socketserver
import struct
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _read_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    def need(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    try:
        b0, b1 = need(2)
        length = b1 & 0x7F
        if length == 126:
            length = struct.unpack("!H", need(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", need(8))[0]
        mask = need(4) if b1 & 0x80 else b""
        data = need(length)
        if mask:
            data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
        return b0 & 0x0F, data
    except (ConnectionError, OSError):
        return None


def _frame(payload: bytes, opcode: int = 2) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


class _Handler(socketserver.StreamRequestHandler):
    server: FakeKubeApi

    def handle(self) -> None:
        request_line = self.rfile.readline().decode()
        headers: dict[str, str] = {}
        while True:
            line = self.rfile.readline().decode().strip()
            if not line:
                break
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        _method, target, _ = request_line.split(" ", 2)
        url = urlsplit(target)
        parts = url.path.strip("/").split("/")
        if headers.get("upgrade", "").lower() == "websocket" and parts[-1] == "portforward":
            self._portforward(parts[5], int(parse_qs(url.query)["ports"][0]), headers)
        elif url.path == "/api/v1/namespaces/kmesh-system/pods":
            body = json.dumps(self.server.pod_list()).encode()
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        else:
            self.wfile.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def _portforward(self, pod: str, port: int, headers: dict[str, str]) -> None:
        self.server.requests.append((pod, port, headers.get("authorization", "")))
        accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + GUID).encode()).digest())
        self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n"
                         b"Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n")
        ws = self.connection
        port_bytes = struct.pack("<H", port)
        ws.sendall(_frame(b"\x00" + port_bytes) + _frame(b"\x01" + port_bytes))
        target = socket.create_connection(("127.0.0.1", self.server.targets[pod]))
        lock = threading.Lock()

        def pump_back() -> None:
            while True:
                data = target.recv(65536)
                if not data:
                    break
                with lock:
                    ws.sendall(_frame(b"\x00" + data))
            with lock:
                try:
                    ws.sendall(_frame(struct.pack("!H", 1000), opcode=8))
                except OSError:
                    pass

        t = threading.Thread(target=pump_back, daemon=True)
        t.start()
        while True:
            frame = _read_frame(ws)
            if frame is None or frame[0] == 8:
                break
            opcode, data = frame
            if opcode == 2 and data and data[0] == 0:
                target.sendall(data[1:])
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        t.join(timeout=5)
        target.close()


class FakeKubeApi(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, pods: dict[str, tuple[str, int, bool]]) -> None:
        """pods: name -> (node, local admin port, ready)."""
        super().__init__(("127.0.0.1", 0), _Handler)
        self.pods = pods
        self.targets = {name: port for name, (_, port, _) in pods.items()}
        self.requests: list[tuple[str, int, str]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def pod_list(self) -> dict:
        items = [{"metadata": {"name": name, "namespace": "kmesh-system", "labels": {"app": "kmesh"}},
                  "spec": {"nodeName": node, "containers": [{"name": "kmesh", "image": "kmesh"}]},
                  "status": {"phase": "Running",
                             "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}
                 for name, (node, _, ready) in self.pods.items()]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}

    def write_kubeconfig(self, path: Path) -> None:
        host, port = self.server_address[:2]
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://{host}:{port}"}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
