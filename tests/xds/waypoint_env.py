"""A real waypoint Envoy in a network namespace, fed by the sandbox pilot over its unix socket.

The pieces are the real ones: the sandbox API server (objects created with the official
client), ``python -m sandbox.pilot`` as a subprocess, Envoy 1.40 started with the bootstrap of
``sandbox.images.waypoint`` inside a private netns (so its fixed ports, :15019 and the PROXY
binding port, collide with nothing), and fortio stand-ins at 127.0.0.2/127.0.0.3 in that netns
as the "pods". Clients run in the netns too (``ip netns exec``), so nothing touches the
machine's own network.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.xds.sandbox_env import PilotProcess, set_pod_status

REPO = Path(__file__).resolve().parents[2]
VIP = "10.96.0.10"
PODS = {"v1": "127.0.0.2", "v2": "127.0.0.3"}
BACKEND_PORT = 8080
PROXY_PORT = 15088
ADMIN_PORT = 15000
WAYPOINT_LABELS = {
    "gateway.istio.io/managed": "istio.io-mesh-controller",
    "gateway.networking.k8s.io/gateway-name": "waypoint",
}

# The "pods": a minimal HTTP/1.1 server answering `Server: <name>` (independent of the fortio stand-in).
BACKEND = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
ip, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def version_string(self):
        return name
    def log_message(self, *a):
        pass
    def do_GET(self):
        body = (name + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer((ip, port), H).serve_forever()
"""

CLIENT = r"""
import json, socket, struct, sys
mode, target, n, vip, vport = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
host, _, port = target.rpartition(":") if ":" in target else ("127.0.0.1", "", target)
port = int(port)
headers = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
def hand_off(dst_ip, dst_port):
    src = socket.inet_aton("10.244.0.5"); dst = socket.inet_aton(dst_ip)
    if mode == "proxy":
        body = src + dst + struct.pack("!HH", 40000, dst_port)
        return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body
    tlv = bytes([0x01]) + struct.pack("!I", 6) + dst + struct.pack("!H", dst_port)
    return tlv + bytes([0xfe]) + struct.pack("!I", 0)
counts = {}
for i in range(n):
    try:
        s = socket.create_connection((host, port), timeout=5)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(hand_off(vip, vport) + f"GET / HTTP/1.1\r\nHost: fortio\r\n{extra}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:  # read one response like curl does, then close
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.decode(errors="replace").partition(":")
            if k.lower() == "content-length":
                length = int(v)
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        s.close()
        server = "none"
        status = data.split(b"\r\n", 1)[0].decode(errors="replace")
        for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
            k, _, v = line.decode(errors="replace").partition(":")
            if k.lower() == "server":
                server = v.strip()
        key = server if " 200 " in status + " " else "error:" + status
    except OSError as e:
        key = "error:" + type(e).__name__
    counts[key] = counts.get(key, 0) + 1
print(json.dumps(counts))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class WaypointEnv:
    """API server + pilot + a waypoint Envoy and two backends in netns ``<prefix>-wp``."""

    def __init__(self, root: Path, prefix: str) -> None:
        from kubernetes import client, config

        from sandbox.apiserver import ApiServer

        self.root = root
        self.netns = f"{prefix}-wp"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.api = ApiServer(port=0)
        self.api.start()
        self.kubeconfig = root / "kubeconfig"
        self.api.write_kubeconfig(self.kubeconfig, "sandbox")
        self.kc = config.new_client_from_config(config_file=str(self.kubeconfig))
        self.core = client.CoreV1Api(self.kc)
        self.custom = client.CustomObjectsApi(self.kc)
        self.pilot = PilotProcess(self.kubeconfig, root / "pilot", revision="1-22")
        self.envoy: subprocess.Popen[bytes] | None = None
        _ip("netns", "add", self.netns)
        _ip("-n", self.netns, "link", "set", "lo", "up")

    # ---- objects ----------------------------------------------------------------------------
    def seed(self, envoyfilters: bool = True) -> None:
        from kubernetes.client.rest import ApiException

        self.core.patch_namespace("default", {"metadata": {"labels": {"istio.io/use-waypoint": "waypoint"}}})
        try:
            self.core.create_namespace({"metadata": {"name": "istio-system"}})
        except ApiException as e:
            if e.status != 409:
                raise
        docs = list(yaml.safe_load_all((REPO / "manifests/samples/fortio/fortio-route.yaml").read_text()))
        for d in docs:
            if d["kind"] == "Service":
                d["spec"]["clusterIP"] = VIP
                d["spec"]["ports"][0]["targetPort"] = BACKEND_PORT
                self.core.create_namespaced_service("default", d)
            elif d["kind"] in ("DestinationRule", "VirtualService"):
                self.create_istio("default", d)
        for version, ip in PODS.items():
            self.core.create_namespaced_pod(
                "default",
                {
                    "metadata": {
                        "name": f"fortio-{version}",
                        "labels": {"app": "fortio", "version": version},
                    },
                    "spec": {"containers": [{"name": "fortio", "image": "fortio/fortio"}]},
                },
            )
            set_pod_status(self.core, "default", f"fortio-{version}", ip, True)
        self.core.create_namespaced_pod(
            "default",
            {
                "metadata": {"name": "waypoint-5d8f9c-abcde", "labels": WAYPOINT_LABELS},
                "spec": {"containers": [{"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.22.6"}]},
            },
        )
        set_pod_status(self.core, "default", "waypoint-5d8f9c-abcde", "127.0.0.1", True)
        if envoyfilters:
            for d in yaml.safe_load_all((REPO / "manifests/envoyfilters/waypoint.yaml").read_text()):
                self.create_istio("istio-system", d)

    def create_istio(self, ns: str, body: dict[str, Any]) -> None:
        group, version = body["apiVersion"].split("/")
        plural = {
            "VirtualService": "virtualservices",
            "DestinationRule": "destinationrules",
            "EnvoyFilter": "envoyfilters",
        }[body["kind"]]
        self.custom.create_namespaced_custom_object(group, version, ns, plural, body)

    def patch_istio(self, ns: str, plural: str, name: str, body: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object("networking.istio.io", "v1beta1", ns, plural, name, body)

    # ---- processes ----------------------------------------------------------------------------
    def _in_netns(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        f = (self.root / log).open("ab")
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *argv],
            stdout=f,
            stderr=f,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.procs.append(p)
        return p

    def start_backends(self) -> None:
        for version, ip in PODS.items():
            self._in_netns(
                [sys.executable, "-c", BACKEND, ip, str(BACKEND_PORT), f"fortio-{version}"],
                f"fortio-{version}.log",
            )

    def start_envoy(self) -> None:
        from sandbox.images import waypoint

        env = {
            "POD_NAME": "waypoint-5d8f9c-abcde",
            "POD_NAMESPACE": "default",
            "INSTANCE_IP": "127.0.0.1",
            "SERVICE_ACCOUNT": "waypoint",
            "ISTIO_META_CLUSTER_ID": "Kubernetes",
            "KMESH_WAYPOINT_LABELS": json.dumps(WAYPOINT_LABELS),
        }
        env.update(waypoint.module_env())
        argv = waypoint.argv(env, str(self.pilot.state_dir / "xds.sock"), ADMIN_PORT, 15021, "info")
        f = (self.root / "envoy.log").open("ab")
        self.envoy = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *argv], stdout=f, stderr=f, env={**os.environ, **env}
        )
        self.procs.append(self.envoy)

    def run(self, argv: list[str], timeout: float = 60) -> str:
        r = subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True, timeout=timeout
        )
        if r.returncode != 0:
            raise AssertionError(f"{argv[:3]} failed: {r.stderr[-2000:]}")
        return r.stdout

    def admin(self, path: str) -> str:
        return self.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{ADMIN_PORT}{path}"])

    def config_dump(self) -> dict[str, Any]:
        return json.loads(self.admin("/config_dump?include_eds"))

    def requests(
        self,
        mode: str,
        n: int,
        headers: dict[str, str] | None = None,
        port: int | None = None,
        vip: str = VIP,
        vport: int = 80,
    ) -> dict[str, int]:
        port = port or (PROXY_PORT if mode == "proxy" else 15019)
        out = self.run(
            [
                sys.executable,
                "-c",
                CLIENT,
                mode,
                str(port),
                str(n),
                vip,
                str(vport),
                json.dumps(headers or {}),
            ],
            timeout=120,
        )
        return json.loads(out)

    def wait(self, predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
                if last:
                    return last
            except (AssertionError, ValueError, KeyError) as e:
                last = e
            time.sleep(0.1)
        raise AssertionError(
            f"timed out waiting for {what}: {last!r}; envoy log tail: "
            f"{(self.root / 'envoy.log').read_text(errors='replace')[-3000:]}"
        )

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.pilot.stop()
        self.api.stop()
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
