"""The real daemon (python -m daemon) against the sandbox API server and pilot, pods as netns.

Tests run in file order on one module-scoped environment (conftest.env); the restart test is
last because it kills the daemon.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.daemon.conftest import POD_IPS, PY, REPO, Env, wait_for

pytestmark = pytest.mark.kernel


@pytest.fixture
def enrolled(env: Env) -> Env:
    """The namespace enrolled and its pods translated, whatever ran before (tests run alone too)."""
    if not {"cli", "be1", "be2"} <= env.enrolled():
        env.label_namespace("Kmesh")
        wait_for(lambda: {"cli", "be1", "be2"} <= env.enrolled(), 30, "pods enrolled")
    wait_for(lambda: env.connect("cli", f"{env.vip}:80")["ok"] == 1, 30, "VIP translated")
    return env


def test_enrolling_namespace_annotates_pods_and_translates(env: Env) -> None:
    # Not labelled yet: nothing enrolled, the VIP is not translated (no route to it in the pod).
    wait_for(lambda: env.status()["enrollment"]["converged"], 60, "enrollment converged")
    assert env.enrolled() == set()
    r = env.connect("cli", f"{env.vip}:80", timeout=1)
    assert r["ok"] == 0, r
    env.label_namespace("Kmesh")
    wait_for(lambda: {"cli", "be1", "be2"} <= env.enrolled(), 30, "pods enrolled")
    wait_for(lambda: env.annotation("cli") == "enabled", 10, "annotation on cli")
    assert env.annotation("be1") == "enabled"
    # xDS delivered the service: connections to the VIP reach both backends.
    wait_for(lambda: env.connect("cli", f"{env.vip}:80")["ok"] == 1, 30, "VIP translated")
    r = env.connect("cli", f"{env.vip}:80", n=30)
    assert r["ok"] == 30 and set(r["replies"]) == {"be1", "be2"}, r


def test_none_label_pod_left_alone(env: Env) -> None:
    assert "optout" not in env.enrolled()
    assert env.annotation("optout") is None
    r = env.connect("optout", f"{env.vip}:80", timeout=1)
    assert r["ok"] == 0, r
    assert env.connect("optout", "10.66.0.3:8080")["ok"] == 1  # plain traffic still works


def test_unenrolling_reverts_both(env: Env) -> None:
    env.label_namespace(None)
    wait_for(lambda: "cli" not in env.enrolled(), 30, "cli unenrolled")
    wait_for(lambda: env.annotation("cli") is None, 10, "annotation removed")
    r = env.connect("cli", f"{env.vip}:80", timeout=1)
    assert r["ok"] == 0, r
    env.label_namespace("kmesh")  # lower case works too; later tests need it enrolled
    wait_for(lambda: {"cli", "be1", "be2"} <= env.enrolled(), 30, "pods re-enrolled")
    wait_for(lambda: env.connect("cli", f"{env.vip}:80")["ok"] == 1, 30, "VIP translated again")


def _fresh_dump_from_pilot(env: Env) -> dict:
    """An independent subscription to the pilot (same protocol, new client + state)."""
    from daemon.state import State
    from daemon.xds.client import XdsClient, XdsConfig

    state = State(node_name=env.node, cluster_id="Kubernetes")
    client = XdsClient(
        XdsConfig(
            address=f"127.0.0.1:{env.pilot_ports[1]}",
            plaintext=True,
            pod_name="dump-check",
            pod_namespace="kmesh-system",
            node_name=env.node,
        ),
        state,
    )
    client.start()
    try:
        wait_for(lambda: client.status()["ready"], 30, "fresh xDS client ready")
        return state.config_dump()
    finally:
        client.stop()


def test_dump_tables_and_json_agree_with_pilot(enrolled: Env) -> None:
    env = enrolled
    from kmeshctl.dump import json_section

    r = env.kmeshctl("dump", "workloads", "-o", "json", check=True)
    workloads = json.loads(r.stdout)
    services = json.loads(env.kmeshctl("dump", "services", "-o", "json", check=True).stdout)
    pilot = _fresh_dump_from_pilot(env)
    assert workloads == json_section(pilot, "workloads")
    assert services == json_section(pilot, "services")
    ours = {w["name"]: w for w in workloads if w["namespace"] == env.namespace}
    assert set(ours) == {"cli", "optout", "be1", "be2"}
    for pod, i in POD_IPS.items():
        assert ours[pod]["workloadIps"] == [f"10.66.0.{i}"] and ours[pod]["node"] == env.node

    table = env.kmeshctl("dump", "workloads", check=True).stdout.splitlines()
    header = ["NAMESPACE", "POD", "NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL", "STATUS"]
    assert table[0].split() == header
    rows = {line.split()[1]: line.split() for line in table[1:] if line.startswith(env.namespace + " ")}
    assert rows["be1"] == [env.namespace, "be1", "10.66.0.3", env.node, "None", "TCP", "Healthy"]
    assert len(table) == len(workloads) + 1
    svc_table = env.kmeshctl("dump", "services", check=True).stdout.splitlines()
    assert svc_table[0].split() == ["NAMESPACE", "SERVICE", "NAME", "SERVICE", "VIP", "WAYPOINT", "ENDPOINTS"]
    assert [env.namespace, "echo", env.vip, "None", "2/2"] in [line.split() for line in svc_table[1:]]
    pol = env.kmeshctl("dump", "policies", check=True).stdout
    assert pol.splitlines()[0].split() == ["NAMESPACE", "POLICY", "NAME", "ACTION", "SCOPE", "SELECTS"]
    import yaml

    everything = yaml.safe_load(env.kmeshctl("dump", "all", "-o", "yaml", check=True).stdout)
    assert everything["workloads"] == workloads and everything["services"] == services
    assert {"maps", "raw", "pressure", "enrolled"} <= set(everything["bpf"])
    text = env.kmeshctl("dump", "all", check=True).stdout
    for heading in ("WORKLOAD INFO", "SERVICE INFO", "POLICY INFO", "BPF MAPS"):
        assert f"------ {heading}" in text
    bad = env.kmeshctl("dump", "nonsense")
    assert bad.returncode == 2 and "unknown dump kind" in bad.stderr and bad.stdout == ""


def _bpftool_entries(path: Path) -> list[tuple[str, str]]:
    out = subprocess.run(
        ["bpftool", "-j", "map", "dump", "pinned", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    entries = []
    for e in json.loads(out.stdout):
        k = "".join(b[2:] for b in e["key"])
        v = "".join(b[2:] for b in e["value"])
        entries.append((k, v))
    return sorted(entries)


def test_dump_bpf_json_agrees_with_bpftool(enrolled: Env) -> None:
    env = enrolled
    data = json.loads(env.kmeshctl("dump", "bpf", "-o", "json", check=True).stdout)
    gens = [d for d in env.pin_dir.iterdir() if d.is_dir()]
    assert len(gens) == 1, gens
    compared = 0
    for name, entries in data["raw"].items():
        pin = gens[0] / name
        if name == "sock" or not pin.exists():
            continue  # sock: LRU of live sockets, changes with any connection
        assert sorted(tuple(e) for e in entries) == _bpftool_entries(pin), name
        compared += 1
    assert compared >= 5, data["raw"].keys()
    fes = [f for f in data["maps"]["frontends"] if f["address"] == env.vip]
    assert fes and fes[0]["port"] == 80 and fes[0]["service"].startswith(f"{env.namespace}/echo")
    cli_cookie = next(p["netns_cookie"] for p in data["enrolled"] if p["name"] == "cli")
    assert {"netns_cookie": cli_cookie} in data["maps"]["manage"]
    tree = env.kmeshctl("dump", "bpf", check=True).stdout
    assert f"{env.vip}:80" in tree
    assert f"10.66.0.3:8080 ({env.namespace}/be1)" in tree and f"10.66.0.4:8080 ({env.namespace}/be2)" in tree
    assert f"{cli_cookie}" in tree and f"{env.namespace}/cli" in tree


def test_trace_pod_shows_vip_and_backend(enrolled: Env) -> None:
    env = enrolled
    cmd = [
        PY,
        "-m",
        "kmeshctl.main",
        "trace",
        "pod",
        "cli",
        "-n",
        env.namespace,
        "--count",
        "3",
        "--timeout",
        "15",
        "-o",
        "json",
        "--admin-addr",
        env.admin,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: env.status()["events"]["trace_subscribers"] >= 1, 20, "trace subscribed")
        assert env.connect("cli", f"{env.vip}:80")["ok"] == 1
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    recs = [json.loads(x) for x in out.splitlines()]
    assert recs, err
    connect = next(r for r in recs if r["kind"] == "connect")
    assert connect["source"]["pod"] == "cli" and connect["source"]["namespace"] == env.namespace
    assert connect["original"]["ip"] == env.vip and connect["original"]["port"] == 80
    assert connect["original"]["service"].startswith(f"{env.namespace}/echo")
    assert connect["backend"]["pod"] in ("be1", "be2") and connect["backend"]["port"] == 8080
    assert connect["backend"]["ip"] == {"be1": "10.66.0.3", "be2": "10.66.0.4"}[connect["backend"]["pod"]]
    assert connect["verdict"] == "translated"
    # compact form: one hubble-like line
    from kmeshctl.trace import format_event

    line = format_event(connect)
    assert f"{env.namespace}/cli -> {env.vip}:80 ({env.namespace}/echo" in line and "TRANSLATED" in line
    assert f"=> {env.namespace}/{connect['backend']['pod']} " in line


def test_metrics_count_connections_with_istio_labels(enrolled: Env) -> None:
    env = enrolled
    assert env.connect("cli", f"{env.vip}:80", n=3)["ok"] == 3

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/status/metric", timeout=5) as resp:
            return resp.read().decode()

    def closed_line() -> str | None:
        for line in scrape().splitlines():
            if (
                line.startswith("kmesh_tcp_connections_closed_total{")
                and 'destination_service_name="echo"' in line
            ):
                return line
        return None

    line = wait_for(closed_line, 15, "closed-connection counter")
    assert 'source_workload_namespace="' + env.namespace + '"' in line and 'reporter="source"' in line
    assert f'destination_workload_namespace="{env.namespace}"' in line
    # one series per backend pod the load balancer picked: the three are spread over them
    wait_for(lambda: _closed_total(env) >= 3 or None, 15, "three closed connections counted")
    text = scrape()
    assert "kmesh_tcp_connections_opened_total{" in text and "kmesh_tcp_sent_bytes_total{" in text
    # nobody tracing (the default): counted in the kernel, no ring-buffer event reached the daemon
    status = env.status()["events"]
    assert status["trace_subscribers"] == 0, status
    counted = _closed_total(env)
    assert env.connect("cli", f"{env.vip}:80", n=2)["ok"] == 2
    wait_for(lambda: _closed_total(env) >= counted + 2 or None, 15, "counters move")
    assert env.status()["events"]["total"] == status["total"]
    assert "kmesh_xds_connected{" in text and 'kmesh_bpf_map_pressure{map="frontend"}' in text


def _post(env: Env, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{env.admin}{path}", method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _closed_total(env: Env) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{env.metrics_port}/status/metric", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kmesh_tcp_connections_closed_total{")
               and 'destination_service_name="echo"' in line)


def test_monitoring_switch(enrolled: Env) -> None:
    """kmeshctl monitoring / the admin API: off = no events, metrics still, trace says so, the VIP
    still translated (getpeername the VIP); on again = the counters move again."""
    env = enrolled
    state = json.loads(env.kmeshctl("monitoring", "-o", "json", check=True).stdout)
    assert [(r["accesslog"], r["connectionMetrics"]) for r in state] == [(True, True)], state
    try:
        off = json.loads(env.kmeshctl("monitoring", "--all", "disable", "-o", "json", check=True).stdout)
        assert [(r["accesslog"], r["connectionMetrics"]) for r in off] == [(False, False)], off
        assert env.get("/monitoring") == {"access_log": False, "metrics": False, "enabled": False,
                                          "node": env.node}
        closed, events = _closed_total(env), env.status()["events"]["total"]
        r = env.connect("cli", f"{env.vip}:80", n=3)
        assert r["ok"] == 3 and r["peers"] == [f"{env.vip}:80"], r
        time.sleep(1.5)  # what would have arrived by now (events take milliseconds)
        assert (_closed_total(env), env.status()["events"]["total"]) == (closed, events)

        t0 = time.monotonic()
        tr = env.kmeshctl("trace", "pod", "cli", "-n", env.namespace, "--timeout", "20")
        assert tr.returncode == 1 and time.monotonic() - t0 < 15, tr
        assert "monitoring (access logs) is off" in tr.stderr and "kmeshctl monitoring --accesslog enable" \
            in tr.stderr and len(tr.stderr.strip().splitlines()) == 1, tr.stderr

        # bad input: one line, exit 2 / HTTP 400, nothing applied
        bad = env.kmeshctl("monitoring", "--accesslog", "on")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--accesslog enable" in bad.stderr, bad
        both = env.kmeshctl("monitoring", "--all", "enable", "--connectionMetrics", "disable")
        assert both.returncode == 2 and "--all" in both.stderr, both
        for query in ("enable=maybe", "accesslog=true&verbose=1", "", "enable=true&accesslog=false"):
            code, body = _post(env, f"/monitoring?{query}")
            assert code == 400 and body["error"], (query, body)
        assert env.get("/monitoring")["enabled"] is False

        # access log alone: events again while a trace is attached (the reader kept running),
        # counters still frozen
        env.kmeshctl("monitoring", "--accesslog", "enable", check=True)
        proc = subprocess.Popen([PY, "-m", "kmeshctl.main", "trace", "pod", "cli", "-n", env.namespace,
                                 "--count", "6", "--timeout", "20", "-o", "json", "--admin-addr", env.admin],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: env.status()["events"]["trace_subscribers"] >= 1, 20, "trace subscribed")
            assert env.connect("cli", f"{env.vip}:80", n=2)["ok"] == 2
            wait_for(lambda: env.status()["events"]["total"] >= events + 6, 15, "events resume")
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kinds = sorted(json.loads(x)["kind"] for x in out.splitlines() if x.strip())
        assert kinds == ["close"] * 2 + ["connect"] * 2 + ["established"] * 2, (kinds, err)
        assert _closed_total(env) == closed
        code, body = _post(env, "/monitoring?connectionMetrics=true")
        assert code == 200 and (body["access_log"], body["metrics"]) == (True, True), body
        assert env.connect("cli", f"{env.vip}:80", n=2)["ok"] == 2
        wait_for(lambda: _closed_total(env) >= closed + 2, 15, "metrics move again")
    finally:
        _post(env, "/monitoring?enable=true")


def test_log_and_version(env: Env) -> None:
    out = env.kmeshctl("log", "--set", "xds:debug", check=True).stdout
    assert ["xds", "debug"] in [line.split() for line in out.splitlines()]
    out = env.kmeshctl("log", "--set", "xds:info", check=True).stdout
    assert ["xds", "info"] in [line.split() for line in out.splitlines()]
    bad = env.kmeshctl("log", "--set", "xds:loud")
    assert bad.returncode == 1 and "unknown level" in bad.stderr
    v = env.kmeshctl("version", check=True).stdout
    assert v.startswith("client version: v") and "kmesh-daemon version: v" in v and "(1 daemons)" in v


def test_status_fails_while_pilot_down(env: Env) -> None:
    wait_for(lambda: env.kmeshctl("status").returncode == 0, 30, "status healthy")
    ok = env.kmeshctl("status")
    assert "READY" in ok.stdout and f"{env.namespace}/cli" in ok.stdout
    env.pilot.stop(signal.SIGKILL)
    try:
        down = wait_for(lambda: (r := env.kmeshctl("status")).returncode != 0 and r, 30, "status unhealthy")
        assert "NOT connected" in down.stdout and "NOT READY" in down.stdout
        js = json.loads(env.kmeshctl("status", "-o", "json").stdout)
        assert js["healthy"] is False
        # Maps stay as they were while disconnected: traffic still translated.
        assert env.connect("cli", f"{env.vip}:80")["ok"] == 1
    finally:
        env.pilot.start("ready tls=", timeout=60)
    wait_for(lambda: env.kmeshctl("status").returncode == 0, 60, "status healthy again")


def test_tls_xds_with_projected_token(env: Env) -> None:
    """A second daemon in deployment mode: TLS verified against the pilot's root, SA token, server
    name override (its own cgroup and pins, no enrollment)."""
    from kubernetes import client

    from sandbox.cgroups import remove_cgroup_tree
    from tests.daemon.conftest import Proc, free_port

    for body, create in (
        ({"metadata": {"name": "kmesh-system"}}, lambda b: env.core.create_namespace(b)),
        (
            {"metadata": {"name": "kmesh"}},
            lambda b: env.core.create_namespaced_service_account("kmesh-system", b),
        ),
    ):
        try:
            create(body)
        except client.exceptions.ApiException as exc:
            assert exc.status == 409
    token = env.core.create_namespaced_service_account_token(
        "kmesh", "kmesh-system", {"spec": {"audiences": ["istio-ca"], "expirationSeconds": 3600}}
    ).status.token
    token_path = env.work / "istio-token"
    token_path.write_text(token)
    cgroup = env.cgroup.parent / "kmd2"
    cgroup.mkdir(exist_ok=True)
    admin = free_port()
    cmd = [
        PY,
        "-m",
        "daemon",
        "--cgroup-root",
        str(cgroup),
        "--bpf-fs",
        str(env.bpffs),
        "--pin-prefix",
        "kmesh-tls",
        "--admin-addr",
        f"127.0.0.1:{admin}",
        "--metrics-addr",
        f"127.0.0.1:{free_port()}",
        "--no-enroll",
        "--kubeconfig",
        str(env.kubeconfig),
    ]
    daemon_env = {
        **env.daemon_env(),
        "XDS_ADDRESS": f"127.0.0.1:{env.pilot_ports[0]}",
        "XDS_TOKEN_PATH": str(token_path),
        "XDS_ROOT_CA": str(env.work / "pilot" / "root-cert.pem"),
        "XDS_SERVER_NAME": "istiod-1-22-6.istio-system.svc",
        "POD_NAME": "kmesh-tls-abcde",
    }
    proc = Proc("daemon-tls", cmd, env.work / "daemon-tls.log", daemon_env)
    try:
        proc.start("kmesh-daemon started", timeout=120)

        def xds() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as resp:
                return json.loads(resp.read())["xds"]

        st = wait_for(lambda: (x := xds())["ready"] and x, 30, "TLS xDS ready")
        assert st["connected"] and st["address"] == f"127.0.0.1:{env.pilot_ports[0]}"
        assert sum(st["resources"].values()) >= 6, st["resources"]
    finally:
        rc = proc.stop(signal.SIGTERM)
        assert rc == 0, proc.log.read_text()[-3000:]
        assert not (env.bpffs / "kmesh-tls").exists()  # no DaemonSet named kmesh-tls: uninstalled
        remove_cgroup_tree(cgroup)


def test_deleted_pod_is_deregistered_from_the_manage_map(enrolled: Env) -> None:
    env = enrolled
    """The daemon holds each enrolled netns open, so a pod that is gone (process dead, netns
    otherwise destroyed) is still removed from the manage map; no stale cookies pile up."""
    from tests.daemon.conftest import _mk_pod

    POD_IPS["tmp"] = 9
    try:
        _mk_pod(env, "tmp", {"app": "tmp"})
        env.pod_cgroup("tmp").mkdir(exist_ok=True)
        helper = (
            "import os,sys,ctypes,time;open(sys.argv[1]+'/cgroup.procs','w').write(str(os.getpid()));"
            "fd=os.open(sys.argv[2],os.O_RDONLY);ctypes.CDLL(None).setns(fd,0x40000000);"
            "print('ready',flush=True);time.sleep(3600)"
        )
        subprocess.run(["ip", "netns", "add", env.netns("tmp")], check=True)
        proc = subprocess.Popen(
            [PY, "-c", helper, str(env.pod_cgroup("tmp")), env.netns_path("tmp")],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "del", env.netns("tmp")], check=True)  # only the process holds it now
        wait_for(lambda: "tmp" in env.enrolled(), 30, "tmp enrolled")
        cookie = next(p["netns_cookie"] for p in env.status()["enrollment"]["pods"] if p["name"] == "tmp")
        assert {"netns_cookie": cookie} in env.get("/debug/bpf")["maps"]["manage"]
        proc.kill()
        proc.wait()
        env.core.delete_namespaced_pod("tmp", env.namespace, grace_period_seconds=0)
        wait_for(lambda: "tmp" not in env.enrolled(), 30, "tmp gone from enrollment")
        wait_for(
            lambda: {"netns_cookie": cookie} not in env.get("/debug/bpf")["maps"]["manage"],
            10,
            "cookie removed from the manage map",
        )
    finally:
        POD_IPS.pop("tmp", None)


def _maps(env: Env) -> dict:
    raw = env.get("/debug/bpf")["raw"]
    return {k: sorted(map(tuple, v)) for k, v in raw.items() if k != "sock"}


def test_sigkill_and_restart_under_connection_loop(enrolled: Env) -> None:
    env = enrolled
    wait_for(lambda: env.status()["ready"], 30, "daemon ready")
    assert _post(env, "/monitoring?connectionMetrics=false")[0] == 200  # pinned: survives the restart
    before = _maps(env)
    loop = subprocess.Popen(
        env.client_cmd("cli", f"{env.vip}:80", n=150, interval=0.03, timeout=2, max_seconds=90),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        env.daemon.stop(signal.SIGKILL)
        env.start_daemon()
        wait_for(lambda: env.status()["ready"], 60, "restarted daemon ready")
        out, _ = loop.communicate(timeout=120)
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()
    r = json.loads(out)
    assert r["fail"] == 0 and r["ok"] == 150, r
    assert set(r["replies"]) == {"be1", "be2"}
    assert {"cli", "be1", "be2"} <= env.enrolled()
    wait_for(lambda: _maps(env) == before, 20, "maps equal to before the restart")
    after = _maps(env)
    for name, entries in after.items():
        keys = [k for k, _ in entries]
        assert len(keys) == len(set(keys)), name
    # no --monitoring flag: the restarted daemon keeps the switch it found pinned
    assert env.get("/monitoring") == {"access_log": True, "metrics": False, "enabled": True, "node": env.node}
    assert _post(env, "/monitoring?enable=true")[1]["metrics"] is True


def _daemonset(env: Env) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "kmesh", "namespace": "kmesh-system"},
        "spec": {
            "selector": {"matchLabels": {"app": "kmesh"}},
            "template": {
                "metadata": {"labels": {"app": "kmesh"}},
                "spec": {
                    "nodeSelector": {"kmesh-test": "never"},
                    "containers": [{"name": "kmesh", "image": "kmesh"}],
                },
            },
        },
    }


def test_sigterm_keeps_pins_while_daemonset_exists_and_removes_them_after(env: Env) -> None:
    """SIGTERM with the DaemonSet present = restart: pins stay, traffic still translated with no
    daemon; SIGTERM after the DaemonSet is deleted = uninstall: pins gone, traffic untranslated."""
    from kubernetes import client

    apps = client.AppsV1Api(env.api)
    try:
        env.core.create_namespace(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kmesh-system"}}
        )
    except client.exceptions.ApiException as exc:
        assert exc.status == 409
    apps.create_namespaced_daemon_set("kmesh-system", _daemonset(env))
    try:
        wait_for(lambda: env.status()["ready"], 30, "daemon ready")
        assert env.daemon.stop(signal.SIGTERM) == 0
        assert any(env.pin_dir.iterdir())
        r = env.connect("cli", f"{env.vip}:80", n=5)
        assert r["ok"] == 5, r
    finally:
        apps.delete_namespaced_daemon_set("kmesh", "kmesh-system")
    # `kmesh-daemon uninstall` removes what the stopped daemon left behind.
    cmd = [
        PY,
        "-m",
        "daemon",
        "uninstall",
        "--cgroup-root",
        str(env.cgroup),
        "--bpf-fs",
        str(env.bpffs),
        "--pin-prefix",
        "kmesh",
    ]
    r = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **env.daemon_env()}, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert not env.pin_dir.exists()
    assert env.connect("cli", f"{env.vip}:80", timeout=1)["ok"] == 0
    bpftool = subprocess.run(["bpftool", "cgroup", "show", str(env.cgroup)], capture_output=True, text=True)
    assert "connect4" not in bpftool.stdout, bpftool.stdout
    env.start_daemon()
    wait_for(lambda: env.status()["ready"], 60, "daemon ready again")
    wait_for(lambda: env.connect("cli", f"{env.vip}:80")["ok"] == 1, 30, "translated again")
    assert env.daemon.stop(signal.SIGTERM) == 0
    assert not env.pin_dir.exists()
    assert "uninstall" in env.daemon_log() or "removing pins" in env.daemon_log()
    r = env.connect("cli", f"{env.vip}:80", timeout=1)
    assert r["ok"] == 0, r
