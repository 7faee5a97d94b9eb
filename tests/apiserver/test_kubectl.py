"""The real kubectl against the server: discovery, get, label, apply --server-side, describe, logs, delete."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from kubernetes import client

from sandbox.apiserver import LOG_PATH_ANNOTATION

from .conftest import Cluster


def _manifest(ns: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Namespace
        metadata:
          name: {ns}
        ---
        apiVersion: apps/v1
        kind: DaemonSet
        metadata:
          name: agent
          namespace: {ns}
          labels: {{app.kubernetes.io/managed-by: kmeshctl}}
        spec:
          selector:
            matchLabels: {{app: agent}}
          template:
            metadata:
              labels: {{app: agent}}
            spec:
              containers:
              - name: agent
                image: example/agent:1
                env:
                - {{name: XDS_ADDRESS, value: "istiod.istio-system.svc:15012"}}
                volumeMounts:
                - {{name: bpf, mountPath: /sys/fs/bpf}}
              volumes:
              - name: bpf
                hostPath: {{path: /sys/fs/bpf}}
        ---
        apiVersion: v1
        kind: Service
        metadata:
          name: web
          namespace: {ns}
        spec:
          selector: {{app: web}}
          ports:
          - {{name: http, port: 80, targetPort: 8080}}
        ---
        apiVersion: networking.istio.io/v1alpha3
        kind: EnvoyFilter
        metadata:
          name: skip-tunneling
          namespace: {ns}
        spec:
          configPatches: []
        """)


def test_api_resources_lists_the_kinds(cluster: Cluster) -> None:
    out = cluster.kubectl("api-resources", "-o", "name").stdout.split()
    for name in (
        "pods",
        "services",
        "namespaces",
        "configmaps",
        "secrets",
        "serviceaccounts",
        "events",
        "daemonsets.apps",
        "deployments.apps",
        "clusterroles.rbac.authorization.k8s.io",
        "clusterrolebindings.rbac.authorization.k8s.io",
        "envoyfilters.networking.istio.io",
        "virtualservices.networking.istio.io",
        "destinationrules.networking.istio.io",
        "gateways.gateway.networking.k8s.io",
        "tokenreviews.authentication.k8s.io",
    ):
        assert name in out, name
    versions = cluster.kubectl("api-versions").stdout.split()
    assert {"v1", "apps/v1", "networking.istio.io/v1alpha3", "networking.istio.io/v1beta1"} <= set(versions)
    assert "Server Version: v1.32" in cluster.kubectl("version").stdout


def test_apply_server_side_get_label_delete(cluster: Cluster, tmp_path: Path) -> None:
    ns = "kubectl-apply"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(_manifest(ns))
    out = cluster.kubectl("apply", "--server-side", "--field-manager", "kmeshctl", "-f", str(manifest)).stdout
    assert "daemonset.apps/agent serverside-applied" in out
    assert "envoyfilter.networking.istio.io/skip-tunneling serverside-applied" in out
    ds = json.loads(cluster.kubectl("get", "ds", "agent", "-n", ns, "-o", "json").stdout)
    rv = ds["metadata"]["resourceVersion"]
    # Re-applying the same manifest changes nothing.
    cluster.kubectl("apply", "--server-side", "--field-manager", "kmeshctl", "-f", str(manifest))
    assert (
        json.loads(cluster.kubectl("get", "ds", "agent", "-n", ns, "-o", "json").stdout)["metadata"][
            "resourceVersion"
        ]
        == rv
    )

    table = cluster.kubectl("get", "svc", "-n", ns).stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP"]
    assert table[1].split()[0:2] == ["web", "ClusterIP"] and table[1].split()[2].startswith("10.96.")

    cluster.kubectl("label", "ns", ns, "istio.io/dataplane-mode=Kmesh")
    assert cluster.kubectl(
        "get", "ns", "-l", "istio.io/dataplane-mode=Kmesh", "-o", "name"
    ).stdout.split() == [f"namespace/{ns}"]
    out = cluster.kubectl("label", "ns", ns, "istio.io/dataplane-mode-").stdout
    assert "unlabeled" in out
    names = cluster.kubectl(
        "get", "all,envoyfilters", "-n", ns, "-l", "app.kubernetes.io/managed-by=kmeshctl", "-o", "name"
    ).stdout.split()
    assert names == ["daemonset.apps/agent"]

    assert "Name:         skip-tunneling" in cluster.kubectl("describe", "envoyfilter", "-n", ns).stdout
    assert (
        "XDS_ADDRESS:  istiod.istio-system.svc:15012"
        in cluster.kubectl("describe", "ds", "agent", "-n", ns).stdout
    )

    out = cluster.kubectl("delete", "-f", str(manifest)).stdout
    assert f'namespace "{ns}" deleted' in out
    gone = cluster.kubectl("get", "ns", ns, check=False)
    assert gone.returncode == 1
    assert gone.stderr.strip() == f'Error from server (NotFound): namespaces "{ns}" not found'


def test_server_side_dry_run_and_errors(cluster: Cluster, tmp_path: Path) -> None:
    ns = cluster.new_namespace("dry")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: bad, namespace: {ns}}}
        spec:
          containers:
          - name: c
            ports: [{{containerPort: 99999}}]
        """)
    )
    res = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", str(bad), check=False)
    assert res.returncode == 1
    assert (
        'The Pod "bad" is invalid' in res.stderr and "spec.containers[0].image: Required value" in res.stderr
    )
    assert "spec.containers[0].ports[0].containerPort: Invalid value: 99999" in res.stderr

    # kubectl's default strict field validation: unknown fields and wrong types are 400s.
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: t, namespace: {ns}}}\ndatta: {{a: b}}\n"
    )
    res = cluster.kubectl("apply", "--server-side", "-f", str(typo), check=False)
    assert res.returncode == 1 and 'strict decoding error: unknown field "datta"' in res.stderr
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(bad.read_text().replace("99999", '"80"').replace("name: c\n", "name: c\n    image: i\n"))
    res = cluster.kubectl("apply", "--server-side", "-f", str(wrong), check=False)
    assert res.returncode == 1 and "cannot unmarshal string into Go struct field" in res.stderr
    assert "spec.containers[0].ports[0].containerPort" in res.stderr
    assert cluster.kubectl("get", "cm,pods", "-n", ns, "-o", "name").stdout == ""

    good = tmp_path / "good.yaml"
    good.write_text(
        f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c, namespace: {ns}}}\ndata: {{a: b}}\n"
    )
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", str(good)).stdout
    assert "configmap/c serverside-applied (server dry run)" in out
    assert cluster.kubectl("get", "cm", "c", "-n", ns, check=False).returncode == 1

    missing = cluster.kubectl("create", "configmap", "x", "-n", "no-such-ns", check=False)
    assert missing.stderr.strip() == 'error: failed to create configmap: namespaces "no-such-ns" not found'

    cluster.kubectl("apply", "--server-side", "-f", str(good))
    dup = cluster.kubectl("create", "-f", str(good), check=False)
    assert (
        dup.stderr.strip()
        == 'Error from server (AlreadyExists): error when creating "'
        + str(good)
        + '": configmaps "c" already exists'
    )

    # Another manager changing the same field conflicts, --force-conflicts takes it over.
    other = tmp_path / "other.yaml"
    other.write_text(good.read_text().replace("a: b", "a: z"))
    res = cluster.kubectl("apply", "--server-side", "--field-manager", "other", "-f", str(other), check=False)
    assert res.returncode == 1 and 'conflict with "kubectl"' in res.stderr and ".data.a" in res.stderr
    cluster.kubectl(
        "apply", "--server-side", "--field-manager", "other", "--force-conflicts", "-f", str(other)
    )
    assert cluster.kubectl("get", "cm", "c", "-n", ns, "-o", "jsonpath={.data.a}").stdout == "z"


def test_logs_from_annotation_and_hook(cluster: Cluster, tmp_path: Path) -> None:
    ns = cluster.new_namespace("logs")
    log = tmp_path / "c.log"
    log.write_text("line 1\nline 2\nline 3\n")
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "p", "annotations": {LOG_PATH_ANNOTATION: str(log)}},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
        },
    )
    assert cluster.kubectl("logs", "p", "-n", ns).stdout == "line 1\nline 2\nline 3\n"
    assert cluster.kubectl("logs", "p", "-n", ns, "--tail", "1").stdout == "line 3\n"

    core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "q"},
            "spec": {"containers": [{"name": "a", "image": "i"}, {"name": "b", "image": "i"}]},
        },
    )
    assert cluster.kubectl("logs", "q", "-n", ns, "-c", "b").stdout == ""
    hooked = tmp_path / "hook.log"
    hooked.write_text("from the kubelet\n")
    cluster.server.set_log_resolver(lambda n, pod, c: hooked if (n, pod, c) == (ns, "q", "b") else None)
    try:
        assert cluster.kubectl("logs", "q", "-n", ns, "-c", "b").stdout == "from the kubelet\n"
    finally:
        cluster.server.set_log_resolver(None)
    bad = cluster.kubectl("logs", "q", "-n", ns, "-c", "nope", check=False)
    assert bad.returncode == 1 and "container nope is not valid for pod q" in bad.stderr


def test_get_tables_wide_all_namespaces_and_watch(cluster: Cluster) -> None:
    ns = cluster.new_namespace("tbl")
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": "p", "labels": {"app": "x"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "i"}]},
        },
    )
    core.patch_namespaced_pod_status(
        "p",
        ns,
        {
            "status": {
                "phase": "Running",
                "podIP": "10.244.0.5",
                "containerStatuses": [
                    {"name": "c", "ready": True, "restartCount": 2, "image": "i", "imageID": "", "state": {}}
                ],
            }
        },
    )
    plain = cluster.kubectl("get", "pods", "-n", ns).stdout.splitlines()
    assert plain[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert plain[1].split()[:4] == ["p", "1/1", "Running", "2"]
    wide = cluster.kubectl("get", "pods", "-n", ns, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-2:] == ["IP", "NODE"] and wide[1].split()[-2:] == ["10.244.0.5", "node-1"]
    every = cluster.kubectl("get", "pods", "-A", "-l", "app in (x)", "--show-labels").stdout.splitlines()
    assert (
        every[0].split()[0] == "NAMESPACE" and every[1].split()[0] == ns and every[1].split()[-1] == "app=x"
    )
    # A watch prints the current rows, then changes, until its timeout.
    out = cluster.kubectl("get", "pods", "-n", ns, "-w", "--request-timeout=2s", check=False).stdout
    assert out.splitlines()[0].split()[0] == "NAME" and out.splitlines()[1].split()[0] == "p"


def test_kubectl_generators(cluster: Cluster) -> None:
    """create ns/configmap/secret/serviceaccount/deployment send protobuf; run and expose send JSON."""
    ns = "gen"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("create", "configmap", "cm", "-n", ns, "--from-literal=a=1", "--from-literal=b=2")
    cluster.kubectl("create", "secret", "generic", "s", "-n", ns, "--from-literal=pw=hunter2")
    cluster.kubectl("create", "serviceaccount", "bot", "-n", ns)
    cluster.kubectl(
        "create", "deployment", "web", "-n", ns, "--image=nginx:1.27", "--port=80", "--replicas=2"
    )
    cluster.kubectl("run", "tool", "-n", ns, "--image=busybox:1", "--labels=app=tool", "--", "sleep", "60")
    cluster.kubectl("expose", "deployment", "web", "-n", ns, "--port=8080", "--target-port=80")
    api = cluster.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    assert core.read_namespaced_config_map("cm", ns).data == {"a": "1", "b": "2"}
    secret = core.read_namespaced_secret("s", ns)
    assert secret.type == "Opaque" and secret.data == {"pw": "aHVudGVyMg=="}
    assert core.read_namespaced_service_account("bot", ns).metadata.name == "bot"
    d = apps.read_namespaced_deployment("web", ns)
    assert d.spec.replicas == 2 and d.spec.selector.match_labels == {"app": "web"}
    c = d.spec.template.spec.containers[0]
    assert (c.name, c.image, c.ports[0].container_port) == ("nginx", "nginx:1.27", 80)
    assert core.read_namespaced_pod("tool", ns).spec.containers[0].args == ["sleep", "60"]
    svc = core.read_namespaced_service("web", ns)
    assert svc.spec.selector == {"app": "web"} and svc.spec.ports[0].target_port == 80
