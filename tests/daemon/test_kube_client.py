"""daemon.kube (the daemon's stdlib Kubernetes client) against the sandbox API server over real
HTTP(S): list, watch from a resourceVersion, 410 Gone, merge patch, kubeconfig and in-cluster
connection settings; and proof that the daemon's modules no longer import ``kubernetes``.

Objects the daemon client writes are read back with the official client (and the other way
round), so both sides of each check are independent of the code under test.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.kube import ApiError, KubeClient, KubeConfigError, pod_path
from sandbox.apiserver.server import ApiServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, Path]]:
    """An HTTP server with a short watch history (resourceVersions expire after 5 writes)."""
    tmp = tmp_path_factory.mktemp("kube-plain")
    server = ApiServer(watch_history=5)
    server.start()
    kc = server.write_kubeconfig(tmp / "kubeconfig", "sandbox")
    try:
        yield server, kc
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, Path]]:
    """An HTTPS server that refuses anonymous requests (a wrong token is a 401)."""
    tmp = tmp_path_factory.mktemp("kube-tls")
    server = ApiServer(tls=True, anonymous=False, state_dir=tmp / "state")
    server.start()
    kc = server.write_kubeconfig(tmp / "kubeconfig", "sandbox")
    try:
        yield server, kc
    finally:
        server.stop()


def _official(kc: Path) -> Any:
    from kubernetes import client, config

    return client.CoreV1Api(config.new_client_from_config(config_file=str(kc)))


def _pod(name: str, node: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}}


def _edit(kc: Path, dest: Path, cluster: dict[str, Any] | None = None, user: dict[str, Any] | None = None,
          drop_cluster: tuple[str, ...] = (), drop_user: tuple[str, ...] = ()) -> Path:
    doc = yaml.safe_load(kc.read_text())
    c, u = doc["clusters"][0]["cluster"], doc["users"][0]["user"]
    for k in drop_cluster:
        c.pop(k, None)
    for k in drop_user:
        u.pop(k, None)
    c.update(cluster or {})
    u.update(user or {})
    dest.write_text(yaml.safe_dump(doc))
    return dest


# ----- requests ----------------------------------------------------------------------------
def test_list_get_and_merge_patch_agree_with_the_official_client(plain: tuple[ApiServer, Path]) -> None:
    server, kc = plain
    core = _official(kc)
    core.create_namespace({"metadata": {"name": "kc-a"}})
    core.create_namespaced_pod("kc-a", _pod("p1", "node-a"))
    core.create_namespaced_pod("kc-a", _pod("p2", "node-b"))
    api = KubeClient.from_kubeconfig(kc)
    names = {n["metadata"]["name"] for n in api.list("/api/v1/namespaces")["items"]}
    assert "kc-a" in names
    on_a = api.list("/api/v1/pods", fieldSelector="spec.nodeName=node-a")
    assert [p["metadata"]["name"] for p in on_a["items"]] == ["p1"]
    assert on_a["metadata"]["resourceVersion"]
    assert api.get(pod_path("kc-a", "p1"))["spec"]["nodeName"] == "node-a"
    # Merge patch: set an annotation, then remove it with null.
    ann = "kmesh.net/redirection"
    api.merge_patch(pod_path("kc-a", "p1"), {"metadata": {"annotations": {ann: "enabled"}}})
    assert core.read_namespaced_pod("p1", "kc-a").metadata.annotations == {ann: "enabled"}
    api.merge_patch(pod_path("kc-a", "p1"), {"metadata": {"annotations": {ann: None}}})
    assert not core.read_namespaced_pod("p1", "kc-a").metadata.annotations
    with pytest.raises(ApiError) as err:
        api.get(pod_path("kc-a", "nope"))
    assert err.value.status == 404 and err.value.reason == "NotFound"
    with pytest.raises(ApiError) as err:
        api.merge_patch(pod_path("kc-a", "nope"), {"metadata": {"labels": {"a": "b"}}})
    assert err.value.status == 404


def test_watch_from_resource_version_sees_later_changes_only(plain: tuple[ApiServer, Path]) -> None:
    server, kc = plain
    core = _official(kc)
    core.create_namespace({"metadata": {"name": "kc-w"}})
    core.create_namespaced_pod("kc-w", _pod("before", "node-w"))
    api = KubeClient.from_kubeconfig(kc)
    rv = api.list("/api/v1/pods", fieldSelector="spec.nodeName=node-w")["metadata"]["resourceVersion"]
    seen: list[tuple[str, str, str]] = []
    watch = api.watch("/api/v1/pods", rv, 3, fieldSelector="spec.nodeName=node-w")

    def follow() -> None:
        for kind, obj in watch:
            if kind != "BOOKMARK":
                seen.append((kind, obj["metadata"]["name"], obj["spec"]["nodeName"]))

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    core.create_namespaced_pod("kc-w", _pod("other-node", "node-x"))
    core.create_namespaced_pod("kc-w", _pod("after", "node-w"))
    core.patch_namespaced_pod("after", "kc-w", {"metadata": {"labels": {"v": "2"}}})
    core.delete_namespaced_pod("after", "kc-w", grace_period_seconds=0)
    t.join(timeout=20)  # the server ends the watch after timeoutSeconds=3
    assert not t.is_alive(), "watch did not end at its timeoutSeconds"
    assert [(k, n) for k, n, _ in seen] == [("ADDED", "after"), ("MODIFIED", "after"), ("DELETED", "after")]


def test_expired_resource_version_raises_410(plain: tuple[ApiServer, Path]) -> None:
    server, kc = plain
    core = _official(kc)
    api = KubeClient.from_kubeconfig(kc)
    rv = api.list("/api/v1/namespaces")["metadata"]["resourceVersion"]
    for i in range(8):  # more writes than the server's watch history (5)
        core.create_namespace({"metadata": {"name": f"kc-gone-{i}"}})
    with pytest.raises(ApiError) as err:
        for _ in api.watch("/api/v1/namespaces", rv, 5):
            pass
    assert err.value.status == 410


def test_watch_stop_ends_a_blocked_reader_at_once(plain: tuple[ApiServer, Path]) -> None:
    _, kc = plain
    api = KubeClient.from_kubeconfig(kc)
    rv = api.list("/api/v1/namespaces")["metadata"]["resourceVersion"]
    watch = api.watch("/api/v1/namespaces", rv, 120)
    done = threading.Event()

    def follow() -> None:
        for _ in watch:
            pass
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(0.3)
    assert not done.is_set()
    t0 = time.monotonic()
    watch.stop()
    assert done.wait(10), "stop() did not end the watch"
    assert time.monotonic() - t0 < 5


def test_unreachable_server_is_status_0(tmp_path: Path) -> None:
    from tests.support.procs import free_port

    api = KubeClient(f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(ApiError) as err:
        api.list("/api/v1/namespaces")
    assert err.value.status == 0 and "cannot reach the API server" in str(err.value)


# ----- connection settings -----------------------------------------------------------------
def test_kubeconfig_token_and_ca_variants(tls: tuple[ApiServer, Path], tmp_path: Path) -> None:
    server, kc = tls
    assert server.ca_pem is not None
    # As written: certificate-authority-data + token.
    assert KubeClient.from_kubeconfig(kc).list("/api/v1/namespaces")["items"]
    # certificate-authority as a path relative to the kubeconfig's directory + tokenFile.
    (tmp_path / "ca.crt").write_bytes(server.ca_pem)
    (tmp_path / "tok").write_text(server.token + "\n")
    rel = _edit(kc, tmp_path / "rel.yaml", cluster={"certificate-authority": "ca.crt"},
                user={"tokenFile": "tok"}, drop_cluster=("certificate-authority-data",), drop_user=("token",))
    assert KubeClient.from_kubeconfig(rel).list("/api/v1/namespaces")["items"]
    # A wrong token reaches the server and is refused.
    bad = _edit(kc, tmp_path / "bad-token.yaml", user={"token": "not-a-token"})
    with pytest.raises(ApiError) as err:
        KubeClient.from_kubeconfig(bad).list("/api/v1/namespaces")
    assert err.value.status == 401
    # No CA: the system store does not know the sandbox CA -> verification fails ...
    no_ca = _edit(kc, tmp_path / "no-ca.yaml", drop_cluster=("certificate-authority-data",))
    with pytest.raises(ApiError) as err:
        KubeClient.from_kubeconfig(no_ca).list("/api/v1/namespaces")
    assert err.value.status == 0 and "CERTIFICATE_VERIFY_FAILED" in str(err.value)
    # ... unless verification is switched off.
    insecure = _edit(kc, tmp_path / "insecure.yaml", cluster={"insecure-skip-tls-verify": True},
                     drop_cluster=("certificate-authority-data",))
    assert KubeClient.from_kubeconfig(insecure).list("/api/v1/namespaces")["items"]
    # tls-server-name: a name in the serving certificate passes, another one does not.
    named = _edit(kc, tmp_path / "named.yaml", cluster={"tls-server-name": "kubernetes.default.svc"})
    assert KubeClient.from_kubeconfig(named).list("/api/v1/namespaces")["items"]
    wrong = _edit(kc, tmp_path / "wrong.yaml", cluster={"tls-server-name": "not-the-server.example"})
    with pytest.raises(ApiError) as err:
        KubeClient.from_kubeconfig(wrong).list("/api/v1/namespaces")
    assert err.value.status == 0


def test_kubeconfig_client_certificate(tls: tuple[ApiServer, Path], tmp_path: Path) -> None:
    """Inline and file client certificates are loaded and presented; a key that does not match
    the certificate is a one-line configuration error, not a failure at the first request."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    server, kc = tls
    state = server.state_dir
    assert state is not None
    crt, key = next(state.rglob("serving.crt")), next(state.rglob("serving.key"))
    inline = _edit(kc, tmp_path / "inline.yaml", user={
        "client-certificate-data": base64.b64encode(crt.read_bytes()).decode(),
        "client-key-data": base64.b64encode(key.read_bytes()).decode()})
    assert KubeClient.from_kubeconfig(inline).list("/api/v1/namespaces")["items"]
    files = _edit(kc, tmp_path / "files.yaml", user={"client-certificate": str(crt), "client-key": str(key)})
    assert KubeClient.from_kubeconfig(files).list("/api/v1/namespaces")["items"]
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    mismatch = _edit(kc, tmp_path / "mismatch.yaml", user={
        "client-certificate-data": base64.b64encode(crt.read_bytes()).decode(),
        "client-key-data": base64.b64encode(other).decode()})
    with pytest.raises(KubeConfigError, match="cannot load the CA or client certificate"):
        KubeClient.from_kubeconfig(mismatch)
    no_key = _edit(kc, tmp_path / "nokey.yaml", user={"client-certificate": str(crt)})
    with pytest.raises(KubeConfigError, match="without a client key"):
        KubeClient.from_kubeconfig(no_key)


def test_in_cluster_config_rereads_a_rotated_token(tls: tuple[ApiServer, Path], tmp_path: Path) -> None:
    server, _ = tls
    assert server.ca_pem is not None
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "ca.crt").write_bytes(server.ca_pem)
    (sa / "token").write_text("expired-token")
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)}
    api = KubeClient.in_cluster(sa_dir=sa, environ=env)
    assert api.server == f"https://127.0.0.1:{server.port}"
    with pytest.raises(ApiError) as err:
        api.list("/api/v1/namespaces")
    assert err.value.status == 401
    # The kubelet rotates the projected token in place: the next request uses the new one.
    tmp = sa / "token.new"
    tmp.write_text(server.token)
    tmp.replace(sa / "token")
    assert api.list("/api/v1/namespaces")["items"]
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST/PORT unset"):
        KubeClient.in_cluster(sa_dir=sa, environ={})
    with pytest.raises(KubeConfigError, match="token is missing"):
        KubeClient.in_cluster(sa_dir=tmp_path / "nothing", environ=env)


@pytest.mark.parametrize(("text", "message"), [
    ("clusters: [\n", "is not valid YAML (line 2)"),
    ("- a list\n", "is not a kubeconfig"),
    ("apiVersion: v1\nkind: Config\n", "has no current-context"),
    ("current-context: x\ncontexts: []\n", "no context named 'x'"),
    ("current-context: x\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
     "clusters: [{name: c, cluster: {server: 'ftp://h'}}]\nusers: [{name: u, user: {token: t}}]\n",
     "is not an http(s) URL"),
    ("current-context: x\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
     "clusters: [{name: c, cluster: {server: 'https://h:6443'}}]\n"
     "users: [{name: u, user: {exec: {command: aws}}}]\n", "exec/auth-provider plugin"),
    ("current-context: x\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
     "clusters: [{name: c, cluster: {server: 'https://h:6443', certificate-authority-data: '%%%'}}]\n"
     "users: [{name: u, user: {token: t}}]\n", "certificate-authority-data is not base64"),
])
def test_bad_kubeconfig_is_a_one_line_error(tmp_path: Path, text: str, message: str) -> None:
    kc = tmp_path / "kc"
    kc.write_text(text)
    with pytest.raises(KubeConfigError) as err:
        KubeClient.from_kubeconfig(kc)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_kubeconfig_file(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="cannot read kubeconfig .*missing"):
        KubeClient.from_kubeconfig(tmp_path / "missing")


def test_daemon_exits_1_with_one_line_on_a_bad_kubeconfig(tmp_path: Path) -> None:
    kc = tmp_path / "kc"
    kc.write_text("clusters: [\n")
    r = subprocess.run(
        [sys.executable, "-m", "daemon", "--kubeconfig", str(kc), "--admin-addr", "127.0.0.1:0",
         "--metrics-addr", "127.0.0.1:0", "--cgroup-root", str(tmp_path / "no-cgroup")],
        cwd=REPO, env={"NODE_NAME": "n1", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=60)
    assert r.returncode == 1, r.stderr
    failed = [line for line in r.stderr.splitlines() if "startup failed" in line]
    assert len(failed) == 1 and f"kubeconfig {kc} is not valid YAML" in failed[0], r.stderr
    assert "Traceback" not in r.stderr


# ----- no official client in the daemon ----------------------------------------------------
def test_daemon_modules_do_not_import_kubernetes(plain: tuple[ApiServer, Path]) -> None:
    """Every daemon module imported, a client built and used as the daemon does: no
    ``kubernetes`` (or its urllib3) in sys.modules."""
    _, kc = plain
    code = (
        "import importlib, pkgutil, sys, daemon\n"
        "from pathlib import Path\n"
        "for m in pkgutil.walk_packages(daemon.__path__, 'daemon.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "from daemon.config import parse_config\n"
        "from daemon.main import load_kube_client, daemonset_still_exists\n"
        "cfg = parse_config(['--kubeconfig', sys.argv[1], '--cgroup-root', '/tmp/kube-no-cgroup'],\n"
        "                   {'NODE_NAME': 'n1', 'POD_NAME': 'kmesh-x'})\n"
        "api = load_kube_client(cfg)\n"
        "api.list('/api/v1/pods', fieldSelector='spec.nodeName=x')\n"
        "assert daemonset_still_exists(api, cfg) is False\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('kubernetes', 'urllib3'))\n"
        "print('LOADED', len(sys.modules), 'BAD', bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(kc)], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={"NODE_NAME": "n1", "POD_NAME": "kmesh-x", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "BAD []" in r.stdout, r.stdout
