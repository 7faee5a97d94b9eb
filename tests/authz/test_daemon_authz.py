"""AuthorizationPolicy applied with kubectl -> sandbox pilot -> daemon -> kernel -> real SYNs.

Each test removes the policies it applies. Timing bounds are real (a refused connection
errors in well under 100 ms: the reset is generated in the kernel on the SYN's way in) with the
measured figures printed for the report.
"""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.authz.daemon_env import FORTIO, NODE_IP, PLAIN, REPO, DaemonEnv, make_env
from tests.support.procs import wait_for

DENY_OTHER = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: default}
spec:
  selector: {matchLabels: {app: fortio}}
  action: DENY
  rules:
  - from:
    - source: {namespaces: [other]}
"""

ALLOW_NETUTILS_8080 = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-netutils, namespace: default}
spec:
  selector: {matchLabels: {app: fortio}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/netutils]}
    to:
    - operation: {ports: ["8080"]}
"""


@pytest.fixture(scope="module")
def denv(run_prefix: str, test_cgroup: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonEnv]:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root (netns, cgroups, BPF)")
    yield from make_env(run_prefix, test_cgroup, tmp_path_factory.mktemp("azd"))


def policy(name: str, spec: str, ns: str = "default", annotations: str = "") -> str:
    meta = f"{{name: {name}, namespace: {ns}{', annotations: {' + annotations + '}' if annotations else ''}}}"
    return f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {meta}\nspec:\n{spec}"


def refused_times(denv: DaemonEnv, client: str, n: int = 20, port: int = 8080) -> list[float]:
    out = []
    for _ in range(n):
        r = denv.attempt(client, port=port)
        assert r["result"] == "refused", r
        out.append(r["ms"])
    return out


def test_no_policy_means_no_recompile_on_workload_changes(denv: DaemonEnv) -> None:
    """With no policy anywhere the tables are empty whatever the workloads do: a workload change
    must not recompile them (at 100k pods that cost every single update ~50 ms of CPU)."""
    wait_for(lambda: denv.get("/authz")["compiles"] >= 1, 30, "a first compile")
    assert denv.get("/authz")["policies"] == 0
    # the daemon started with no policy: its first compile waited for the data plane's first sync
    first = denv.get("/authz")["first_compile"]
    synced = denv.get("/status")["dataplane_sync"]["first_sync_done_monotonic"]
    assert first["policies"] == 0 and first["started_monotonic"] >= synced > 0
    before = denv.get("/authz")["compiles"]
    try:
        denv.kubectl("label", "pod", "fortio", "-n", "default",
                     "service.istio.io/canonical-revision=relabelled",
                     "--overwrite")
        wait_for(lambda: "relabelled" in denv.kubectl("get", "pod", "fortio", "-n", "default",
                                                      "-o", "jsonpath={.metadata.labels}").stdout, 10,
                 "the relabel")
        time.sleep(1.0)  # the pilot pushes the changed workload; the daemon applies it
        assert denv.get("/authz")["compiles"] == before
    finally:
        denv.kubectl("label", "pod", "fortio", "-n", "default", "service.istio.io/canonical-revision-")


def test_deny_namespace_refused_fast_server_untouched_and_visible(denv: DaemonEnv) -> None:
    traces = [
        subprocess.Popen(
            denv.kmeshctl_cmd("trace", "pod", pod, "--count", "1000", "--timeout", "15"),
            cwd=REPO,
            env=denv.kmeshctl_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pod in ("other/other-netutils", "default/fortio")
    ]
    time.sleep(3)  # both streams open
    try:
        denv.apply(DENY_OTHER)
        denv.wait_outcome("other-netutils", "refused")
        before = len(denv.server_log("fortio"))
        times = refused_times(denv, "other-netutils", 30)
        print(f"\ndeny latency ms (30 attempts): p50={statistics.median(times):.2f} max={max(times):.2f}")
        assert max(times) <= 100, times
        assert len(denv.server_log("fortio")) == before, "a refused connection reached the server"
        # a real curl from the pod: connection refused (exit 7), fast
        t0 = time.monotonic()
        curl = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                Path(denv.netns("other-netutils")).name,
                "curl",
                "-sS",
                "--max-time",
                "5",
                f"http://{FORTIO}:8080/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert curl.returncode == 7 and "failed to connect" in curl.stderr.lower(), (
            curl.returncode,
            curl.stderr,
        )
        assert time.monotonic() - t0 < 2
        assert denv.attempt("netutils")["result"] == "ok"
        # inspection: dump policies says whom it selects, dump bpf shows the rules
        pol = denv.kmeshctl("dump", "policies")
        assert pol.returncode == 0, pol.stderr
        row = next(line for line in pol.stdout.splitlines() if "deny-other" in line)
        assert "default/fortio," in row and "default/plain (not enrolled)" in row, pol.stdout
        bpf = denv.kmeshctl("dump", "bpf")
        assert bpf.returncode == 0, bpf.stderr
        assert re.search(r"DENY default/deny-other: namespaces=\['other'\]", bpf.stdout), bpf.stdout
        assert re.search(rf"{re.escape(FORTIO)}\s+default/fortio", bpf.stdout), bpf.stdout
        # metrics with Istio-style labels
        wait_for(
            lambda: re.search(
                r'kmesh_authz_denied_connections_total\{[^}]*policy="default/deny-other"'
                r'[^}]*source_workload="other-netutils",source_workload_namespace="other"'
                r'[^}]*destination_workload="fortio"[^}]*\} (\d+)',
                denv.metrics(),
            ),
            10,
            "denied counter",
        )
        m = re.search(
            r'kmesh_authz_denied_connections_total\{[^}]*policy="default/deny-other"[^}]*\} (\d+)',
            denv.metrics(),
        )
        assert m and int(m.group(1)) >= 30
    finally:
        t_del = time.monotonic()
        denv.delete("default", "deny-other")
    denv.wait_outcome("other-netutils", "ok", timeout=5)
    took = time.monotonic() - t_del
    print(f"reopened {took:.3f}s after kubectl delete was issued")
    assert took <= 1.5
    out_src, out_dst = (p.communicate(timeout=40)[0] for p in traces)
    line = ("other/other-netutils (10.78.0.3) -> 10.78.0.10:8080 (default/fortio) "
            "DENIED (policy default/deny-other)")
    assert line in out_src, out_src
    assert line in out_dst, out_dst


def test_allow_principal_and_port_then_removal_reopens(denv: DaemonEnv) -> None:
    try:
        denv.apply(ALLOW_NETUTILS_8080)
        denv.wait_outcome("netutils", "refused", port=9090)
        assert denv.attempt("netutils", port=8080)["result"] == "ok"
        assert denv.attempt("other-netutils", port=8080)["result"] == "refused"
        refused_times(denv, "netutils", 5, port=9090)
        # probes from the node are not blocked; the opted-out pod is never filtered
        assert denv.clients["node"].attempt(FORTIO, 9090, NODE_IP)["result"] == "ok"
        assert denv.attempt("other-netutils", dst=PLAIN, port=9090)["result"] == "ok"
    finally:
        t0 = time.monotonic()
        denv.delete("default", "allow-netutils")
    wait_for(lambda: denv.attempt("other-netutils", port=9090, timeout=1)["result"] == "ok", 5, "reopen")
    took = time.monotonic() - t0
    print(f"\nALLOW removal reopened in {took:.3f}s")
    assert took <= 1.5


CASES = [  # (name, spec, client, port, want)
    (
        "ipblocks-allow",
        "  rules:\n  - from:\n    - source: {ipBlocks: [10.78.0.2/32]}\n",
        [("netutils", 8080, "ok"), ("other-netutils", 8080, "refused")],
    ),
    (
        "notipblocks-deny",
        "  action: DENY\n  rules:\n  - from:\n    - source: {notIpBlocks: [10.78.0.0/31, 10.78.0.2]}\n",
        [("netutils", 8080, "ok"), ("other-netutils", 8080, "refused")],
    ),
    (
        "notports-deny",
        '  action: DENY\n  rules:\n  - to:\n    - operation: {notPorts: ["8080"]}\n',
        [("netutils", 8080, "ok"), ("netutils", 9090, "refused")],
    ),
    (
        "notnamespaces-allow",
        "  rules:\n  - from:\n    - source: {notNamespaces: [other]}\n",
        [("netutils", 9090, "ok"), ("other-netutils", 9090, "refused")],
    ),
]


@pytest.mark.parametrize("name,spec,checks", CASES, ids=[c[0] for c in CASES])
def test_match_kinds(denv: DaemonEnv, name: str, spec: str, checks: list[tuple[str, int, str]]) -> None:
    try:
        denv.apply(policy(name, "  selector: {matchLabels: {app: fortio}}\n" + spec))
        client, port, want = next(c for c in checks if c[2] == "refused")
        denv.wait_outcome(client, want, port=port)
        for client, port, want in checks:
            assert denv.attempt(client, port=port)["result"] == want, (client, port, want)
    finally:
        denv.delete("default", name)
    denv.wait_outcome("other-netutils", "ok", port=9090)
    denv.wait_outcome("netutils", "ok", port=9090)


def test_allow_nothing_spares_node_probes_and_dry_run_only_counts(denv: DaemonEnv) -> None:
    try:
        denv.apply(policy("allow-nothing", "  selector: {matchLabels: {app: fortio}}\n"))
        denv.wait_outcome("netutils", "refused")
        assert denv.attempt("other-netutils")["result"] == "refused"
        assert denv.clients["node"].attempt(FORTIO, 8080, NODE_IP)["result"] == "ok"  # kubelet-style probe
        assert denv.attempt("netutils", dst=PLAIN)["result"] == "ok"
    finally:
        denv.delete("default", "allow-nothing")
    denv.wait_outcome("netutils", "ok")
    try:
        denv.apply(
            policy(
                "dry-deny",
                "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [other]}\n",
                annotations='"istio.io/dry-run": "true"',
            )
        )
        wait_for(lambda: "default/dry-deny" in denv.get("/authz").get("selected", {}), 10, "dry-run policy")
        for _ in range(3):
            assert denv.attempt("other-netutils")["result"] == "ok"
        wait_for(
            lambda: re.search(
                r'kmesh_authz_dry_run_denied_connections_total\{[^}]*policy="default/dry-deny"'
                r"[^}]*\} [3-9]",
                denv.metrics(),
            ),
            10,
            "dry-run counter",
        )
    finally:
        denv.delete("default", "dry-deny")


def test_established_connection_survives_a_new_deny(denv: DaemonEnv) -> None:
    c = denv.clients["other-netutils"]
    assert c.send({"op": "open", "id": 1, "dst": FORTIO, "port": 8080})["result"] == "open"
    try:
        denv.apply(DENY_OTHER)
        denv.wait_outcome("other-netutils", "refused")
        # documented limit: only SYNs are judged, so a connection made before stays usable
        assert c.send({"op": "finish", "id": 1})["result"] == "ok"
    finally:
        denv.delete("default", "deny-other")
    denv.wait_outcome("other-netutils", "ok")


def test_deny_never_lapses_while_other_policies_churn(denv: DaemonEnv) -> None:
    """Update order: a DENY in force all along must refuse every attempt while unrelated
    policies are added and removed (each change rewrites the whole table set)."""
    results: list[str] = []
    stop = threading.Event()
    try:
        denv.apply(DENY_OTHER)
        denv.wait_outcome("other-netutils", "refused")

        def hammer() -> None:
            while not stop.is_set():
                results.append(denv.attempt("other-netutils", timeout=1.0)["result"])

        t = threading.Thread(target=hammer)
        t.start()
        for i in range(8):
            denv.apply(
                policy(f"churn-{i}", '  rules:\n  - to:\n    - operation: {ports: ["8080", "9090"]}\n')
            )
            time.sleep(0.3)
            denv.delete("default", f"churn-{i}")
            time.sleep(0.2)
        compiles = denv.get("/authz")["compiles"]
        stop.set()
        t.join(10)
        assert results and set(results) == {"refused"}, {r: results.count(r) for r in set(results)}
        print(f"\n{len(results)} attempts during churn, all refused; {compiles} compiles so far")
    finally:
        stop.set()
        denv.delete("default", "deny-other")
    denv.wait_outcome("other-netutils", "ok")


def test_kmeshctl_authz_disable_enable_status(denv: DaemonEnv) -> None:
    try:
        denv.apply(DENY_OTHER)
        denv.wait_outcome("other-netutils", "refused")
        st = denv.kmeshctl("authz", "status")
        assert st.returncode == 0, st.stderr
        assert re.search(r"^POD\s+AUTHORIZATION STATUS$", st.stdout, re.M) and "enabled" in st.stdout, (
            st.stdout
        )
        off = denv.kmeshctl("authz", "disable")
        assert off.returncode == 0 and "disabled" in off.stdout, off
        denv.wait_outcome("other-netutils", "ok", timeout=5)
        assert "disabled" in denv.kmeshctl("authz", "status").stdout
        on = denv.kmeshctl("authz", "enable")
        assert on.returncode == 0, on
        denv.wait_outcome("other-netutils", "refused", timeout=5)
        bad = denv.kmeshctl("authz", "maybe")
        assert bad.returncode != 0 and "enable, disable, status" in bad.stderr
    finally:
        denv.kmeshctl("authz", "enable")
        denv.delete("default", "deny-other")
    denv.wait_outcome("other-netutils", "ok")


def test_policies_stay_enforced_across_sigkill_and_restart(denv: DaemonEnv) -> None:
    results: list[str] = []
    stop = threading.Event()
    try:
        denv.apply(DENY_OTHER)
        denv.wait_outcome("other-netutils", "refused")
        old_links = {r["pin"]: r.get("prog_id") for r in denv.get("/debug/bpf")["authz"]["links"]}

        def hammer() -> None:
            while not stop.is_set():
                results.append(denv.attempt("other-netutils", timeout=1.0)["result"])
                time.sleep(0.01)

        t = threading.Thread(target=hammer)
        t.start()
        denv.daemon.send_signal(signal.SIGKILL)
        denv.daemon.wait(10)
        time.sleep(0.5)
        denv.start_daemon()
        wait_for(lambda: denv.get("/authz").get("compiles", 0) >= 1, 60, "restarted daemon compiled")
        time.sleep(1.0)
        stop.set()
        t.join(10)
        assert results and set(results) == {"refused"}, {r: results.count(r) for r in set(results)}
        print(f"\n{len(results)} denied attempts across SIGKILL + restart, none succeeded")
        new_links = {r["pin"]: r.get("prog_id") for r in denv.get("/debug/bpf")["authz"]["links"]}
        assert set(new_links) == set(old_links)
        assert all(new_links[p] != old_links[p] for p in new_links), (old_links, new_links)  # new program
        assert denv.attempt("netutils")["result"] == "ok"
    finally:
        stop.set()
        denv.delete("default", "deny-other")
    denv.wait_outcome("other-netutils", "ok")


def test_workload_change_follows_within_a_second(denv: DaemonEnv) -> None:
    """A relabelled pod leaves a selector policy's scope: its new connections follow at once."""
    try:
        denv.apply(DENY_OTHER)
        denv.wait_outcome("other-netutils", "refused")
        t0 = time.monotonic()
        denv.kubectl("label", "pod", "fortio", "-n", "default", "app=fortio-canary", "--overwrite")
        denv.wait_outcome("other-netutils", "ok", timeout=5)
        took = time.monotonic() - t0
        print(f"\nrelabel -> allowed in {took:.3f}s")
        assert took <= 1.5
        t0 = time.monotonic()
        denv.kubectl("label", "pod", "fortio", "-n", "default", "app=fortio", "--overwrite")
        denv.wait_outcome("other-netutils", "refused", timeout=5)
        assert time.monotonic() - t0 <= 1.5
    finally:
        denv.kubectl("label", "pod", "fortio", "-n", "default", "app=fortio", "--overwrite")
        denv.delete("default", "deny-other")
    denv.wait_outcome("other-netutils", "ok")
