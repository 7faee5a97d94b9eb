"""The sandbox node against the real API server, driven with kubectl and kmeshctl as a user would."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, cgroups, mounts)")

FORTIO = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, version: v7}}
    spec:
      containers:
      - name: fortio
        image: fortio/fortio:latest_release
        args: ["server"]
        ports: [{containerPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: default}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      containers:
      - name: client
        image: nicolaka/netshoot:v0.13
        command: ["sleep", "infinity"]
"""


def pods(sb, selector: str, ns: str = "default") -> list[dict]:
    return sb.get("pods", "-n", ns, "-l", selector)["items"]


def running_ready(items: list[dict], n: int) -> list[dict]:
    ok = [
        p
        for p in items
        if p["status"].get("phase") == "Running"
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]
    return ok if len(ok) == n and len(items) == n else []


def pod_info(sb, name: str) -> dict:
    for f in (sb.dir / "kubelet" / "pods").glob("*/pod.json"):
        info = json.loads(f.read_text())
        if info["name"] == name:
            return info
    raise KeyError(name)


@pytest.fixture(scope="module")
def workloads(sandbox):
    sandbox.apply(FORTIO)
    web = sandbox.wait(lambda: running_ready(pods(sandbox, "app=web"), 2), 30, "2 web pods ready")
    client = sandbox.wait(lambda: running_ready(pods(sandbox, "app=client"), 1), 30, "client pod ready")
    return {"web": web, "client": client[0]}


def test_deployment_pods_names_addresses_and_traffic(sandbox, workloads) -> None:
    web = workloads["web"]
    rs = sandbox.get("replicasets", "-n", "default")["items"]
    rs_name = next(r["metadata"]["name"] for r in rs if r["metadata"]["name"].startswith("web-"))
    ips = set()
    for p in web:
        assert re.fullmatch(rf"{rs_name}-[a-z0-9]{{5}}", p["metadata"]["name"])
        assert re.fullmatch(r"web-[a-z0-9]{10}", rs_name)
        ip = p["status"]["podIP"]
        assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.0.0/24")
        ips.add(ip)
        info = pod_info(sandbox, p["metadata"]["name"])
        pid = next(iter(info["containers"].values()))["pid"]
        assert f"pod{p['metadata']['uid']}" in Path(f"/proc/{pid}/cgroup").read_text()
    assert len(ips) == 2
    dep = sandbox.get("deployment", "web", "-n", "default")
    assert dep["status"]["readyReplicas"] == 2 and dep["status"]["availableReplicas"] == 2
    # Real TCP between pod netns: the client reaches each fortio stand-in, which names its version.
    client = workloads["client"]["metadata"]["name"]
    for ip in ips:
        r = sandbox.kmeshctl(
            "sandbox", "exec", client, "--", "curl", "-s", "-m", "3", "-I", f"http://{ip}:8080/"
        )
        assert r.returncode == 0, r.stderr
        assert "Server: fortio-v7" in r.stdout


def test_kubectl_get_describe_logs(sandbox, workloads) -> None:
    name = workloads["web"][0]["metadata"]["name"]
    listing = sandbox.kubectl("get", "pods", "-A").stdout
    assert name in listing and "Running" in listing
    describe = sandbox.kubectl("describe", "pod", name).stdout
    assert "Started" in describe and workloads["web"][0]["status"]["podIP"] in describe
    logs = sandbox.kubectl("logs", name).stdout
    assert "listening on 0.0.0.0:8080" in logs


def test_exec_returns_exit_code_and_runs_in_pod(sandbox, workloads) -> None:
    client = workloads["client"]
    r = sandbox.kmeshctl("sandbox", "exec", "client", "--", "sh", "-c", "hostname; exit 7")
    assert r.returncode == 7 and r.stdout.strip() == client["metadata"]["name"]
    assert sandbox.kmeshctl("sandbox", "exec", "deploy/client", "--", "true").returncode == 0
    r = sandbox.kmeshctl("sandbox", "exec", "nosuchpod", "--", "true")
    assert r.returncode == 1 and "no running pod 'nosuchpod'" in r.stderr


def test_scale_down_stops_the_process(sandbox, workloads) -> None:
    before = pods(sandbox, "app=web")
    infos = {p["metadata"]["name"]: pod_info(sandbox, p["metadata"]["name"]) for p in before}
    sandbox.kubectl("scale", "deployment", "web", "--replicas=1")
    after = sandbox.wait(lambda: running_ready(pods(sandbox, "app=web"), 1), 20, "scale down to 1")
    gone = [n for n in infos if n != after[0]["metadata"]["name"]]
    assert len(gone) == 1
    info = infos[gone[0]]
    pid = next(iter(info["containers"].values()))["pid"]
    sandbox.wait(lambda: not Path(f"/proc/{pid}").exists(), 10, "the scaled-down pod's process to exit")
    assert not Path(info["netns"]).exists() and not Path(info["cgroup"]).exists()


def test_restart_policy_always_counts_restarts(sandbox) -> None:
    sandbox.apply("""
apiVersion: v1
kind: Pod
metadata: {name: crasher, namespace: default}
spec:
  containers:
  - {name: main, image: busybox:1.36, command: ["sh", "-c", "echo crash-$$; exit 3"]}
""")

    def restarted() -> dict | None:
        st = sandbox.get("pod", "crasher")["status"]["containerStatuses"][0]
        return st if st["restartCount"] >= 2 else None

    st = sandbox.wait(restarted, 20, "two restarts")
    assert st["lastState"]["terminated"]["exitCode"] == 3
    assert st["lastState"]["terminated"]["reason"] == "Error"
    assert "crash-" in sandbox.kubectl("logs", "crasher").stdout
    events = sandbox.kubectl("get", "events", "--field-selector", "involvedObject.name=crasher").stdout
    assert "BackOff" in events
    sandbox.kubectl("delete", "pod", "crasher")


def test_unknown_image_fails_with_catalog_reason(sandbox) -> None:
    sandbox.apply("""
apiVersion: v1
kind: Pod
metadata: {name: nginx, namespace: default}
spec:
  containers: [{name: nginx, image: nginx:1.25}]
""")
    status = sandbox.wait(
        lambda: (s := sandbox.get("pod", "nginx")["status"]).get("phase") == "Failed" and s,
        15,
        "phase Failed",
    )
    assert status["reason"] == "ImageNotInCatalog"
    assert "sandbox image catalog" in status["message"] and "fortio" in status["message"]
    assert "not in the sandbox image catalog" in sandbox.kubectl("describe", "pod", "nginx").stdout
    # Owned by a Deployment, the failed pod keeps its slot: no replacement storm.
    sandbox.apply("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: badweb, namespace: default}
spec:
  selector: {matchLabels: {app: badweb}}
  template:
    metadata: {labels: {app: badweb}}
    spec:
      containers: [{name: nginx, image: nginx:1.25}]
""")
    sandbox.wait(
        lambda: [p for p in pods(sandbox, "app=badweb") if p["status"].get("phase") == "Failed"],
        15,
        "the Deployment's pod Failed",
    )
    import time

    time.sleep(2.5)
    assert len(pods(sandbox, "app=badweb")) == 1
    sandbox.kubectl("delete", "deployment", "badweb")
    sandbox.wait(lambda: not pods(sandbox, "app=badweb"), 15, "garbage collection of the failed pod")


def test_daemonset_one_pod_with_volumes_and_status(sandbox) -> None:
    sandbox.kubectl("create", "namespace", "agents")
    sandbox.kubectl("create", "configmap", "agent-cfg", "-n", "agents", "--from-literal=mode=fast")
    sandbox.apply("""
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: agents}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      hostNetwork: true
      containers:
      - name: agent
        image: busybox:1.36
        command: ["sleep", "infinity"]
        env:
        - {name: MY_POD, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        volumeMounts:
        - {name: cfg, mountPath: /etc/agent, readOnly: true}
        - {name: token, mountPath: /var/run/secrets/tokens, readOnly: true}
      volumes:
      - {name: cfg, configMap: {name: agent-cfg}}
      - name: token
        projected:
          sources:
          - serviceAccountToken: {audience: istio-ca, expirationSeconds: 43200, path: istio-token}
""")

    def ds_ready() -> dict | None:
        st = sandbox.get("daemonset", "agent", "-n", "agents").get("status", {})
        return st if st.get("numberReady") == 1 else None

    st = sandbox.wait(ds_ready, 20, "DaemonSet ready")
    assert st["desiredNumberScheduled"] == 1 and st["updatedNumberScheduled"] == 1
    assert st["numberAvailable"] == 1 and st["observedGeneration"] >= 1
    items = pods(sandbox, "app=agent", "agents")
    assert len(items) == 1 and re.fullmatch(r"agent-[a-z0-9]{5}", items[0]["metadata"]["name"])
    assert items[0]["status"]["podIP"] == "127.0.0.1"  # hostNetwork: the node's (loopback) address
    name = items[0]["metadata"]["name"]
    r = sandbox.kmeshctl(
        "sandbox",
        "exec",
        "-n",
        "agents",
        name,
        "--",
        "sh",
        "-c",
        "cat /etc/agent/mode; echo; echo $MY_POD; cat /var/run/secrets/tokens/istio-token",
    )
    assert r.returncode == 0, r.stderr
    mode, pod_name, token = r.stdout.splitlines()
    assert mode == "fast" and pod_name == name and token.count(".") == 2  # a signed JWT
    assert not Path("/run/secrets").exists()  # mounts stay in the pod's mount namespace


def test_init_containers_run_first_and_share_volumes(sandbox) -> None:
    sandbox.apply("""
apiVersion: v1
kind: Pod
metadata: {name: initdemo, namespace: default}
spec:
  initContainers:
  - {name: first, image: busybox, command: ["sh", "-c", "echo one > /work/log"],
     volumeMounts: [{name: work, mountPath: /work}]}
  - {name: second, image: busybox, command: ["sh", "-c", "echo two >> /work/log"],
     volumeMounts: [{name: work, mountPath: /work}]}
  containers:
  - {name: main, image: busybox, command: ["sh", "-c", "cat /work/log; exec sleep infinity"],
     volumeMounts: [{name: work, mountPath: /work}]}
  volumes: [{name: work, emptyDir: {}}]
""")
    status = sandbox.wait(
        lambda: (s := sandbox.get("pod", "initdemo")["status"]).get("phase") == "Running" and s,
        20,
        "initdemo running",
    )
    inits = status["initContainerStatuses"]
    assert [i["state"]["terminated"]["exitCode"] for i in inits] == [0, 0]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Initialized"] == "True"
    sandbox.wait(lambda: sandbox.kubectl("logs", "initdemo", "-c", "main").stdout == "one\ntwo\n", 10, "logs")
    sandbox.kubectl("delete", "pod", "initdemo")


def test_readiness_probes_run_inside_the_pod_netns(sandbox) -> None:
    sandbox.apply("""
apiVersion: v1
kind: Pod
metadata: {name: probed, namespace: default, labels: {version: p1}}
spec:
  containers:
  - name: web
    image: fortio/fortio
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {path: /, port: http}}
---
apiVersion: v1
kind: Pod
metadata: {name: unready, namespace: default}
spec:
  containers:
  - name: idle
    image: busybox
    command: ["sleep", "infinity"]
    readinessProbe: {tcpSocket: {port: 9999}}
""")

    def ready(name: str) -> bool:
        conds = sandbox.get("pod", name)["status"].get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    sandbox.wait(lambda: ready("probed"), 15, "the HTTP-probed pod Ready")
    sandbox.wait(lambda: sandbox.get("pod", "unready")["status"].get("phase") == "Running", 15, "running")
    time_limit = 3
    for _ in range(time_limit * 5):
        assert not ready("unready")  # nothing listens on 9999 in that pod's netns
        import time

        time.sleep(0.2)
    sandbox.kubectl("delete", "pod", "probed", "unready")


def test_down_after_a_crash_leaves_nothing(sandbox) -> None:
    """SIGKILL the supervisor and every component (pods keep running, orphaned), then `down`."""
    import signal

    from sandbox import up as sb

    st = sb.State.load(sandbox.dir)
    pids = dict(st.pids)
    pod_pids = [
        c["pid"]
        for f in (sandbox.dir / "kubelet" / "pods").glob("*/pod.json")
        for c in json.loads(f.read_text())["containers"].values()
    ]
    assert pod_pids
    for pid in [st.supervisor_pid, *pids.values()]:
        os.kill(pid, signal.SIGKILL)
    sandbox.wait(lambda: not any(sb.pid_alive(p) for p in [st.supervisor_pid, *pids.values()]), 10, "kill")
    assert any(sb.pid_alive(p) for p in pod_pids)  # what a crash leaves behind
    r = sandbox.kmeshctl("sandbox", "down")
    assert r.returncode == 0 and "removed netns" in r.stderr, r.stderr
    assert not any(sb.pid_alive(p) for p in pod_pids)
    assert not [n for n in os.listdir("/run/netns") if n.startswith(st.prefix + "-")]
    assert not Path(st.cgroup_root).exists()
    assert not st.pin_dir.exists()
    assert not (sandbox.dir / "kubeconfig").exists() and not (sandbox.dir / "kubelet" / "pods").exists()
    assert sb.down(sandbox.dir) == []  # idempotent
    assert sandbox.kmeshctl("sandbox", "down").returncode == 0
