"""`kmeshctl install` and `kmeshctl uninstall`.

install renders manifests/ (kmeshctl.render), then: server-side dry run of EVERY object, and
only if all pass, server-side apply (field manager ``kmeshctl``) in order. So a rejected
object means nothing was applied. Results are reported per object: created / configured /
unchanged (resourceVersion unchanged by the apply). uninstall deletes exactly the objects of
the kinds install creates that carry ``app.kubernetes.io/managed-by=kmeshctl``.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from kmeshctl.common import (
    ContextOpt,
    KmeshctlError,
    KubeconfigOpt,
    UsageError,
    emit,
    note,
    to_yaml_documents,
    warn,
)
from kmeshctl.render import (
    DAEMONSET_NAME,
    DEFAULT_MODE,
    DEFAULT_NAMESPACE,
    IMAGE_REPOSITORY,
    MANAGED_BY_KEY,
    MANAGED_BY_SELECTOR,
    MANAGED_BY_VALUE,
    SUPPORTED_MODES,
    InstallValues,
    object_ref,
)

if TYPE_CHECKING:  # pragma: no cover
    from kubernetes.client import ApiClient

ISTIO_NAMESPACE = "istio-system"
XDS_TLS_PORT = 15012
CLUSTER_ID_HELP = (
    "--cluster-id is required: the id the control plane knows this cluster by (ASM: the ACK cluster id, "
    "shown in the ACK console under the cluster's Basic Information, or by `kubectl get cm -n istio-system "
    "istio-sidecar-injector -o yaml | grep clusterName`; plain istiod: Kubernetes unless "
    "values.global.multiCluster.clusterName was set)"
)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*\.?$")
_CLUSTER_ID = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")

# --- input validation (usage errors, exit 2, before anything is contacted) -------------------


def parse_xds(value: str) -> str:
    """Validate --xds HOST:PORT (IPv6 as [addr]:port); returns it normalised."""
    bad = f"--xds must be HOST:PORT (e.g. istiod.istio-system.svc:15012), not {value!r}"
    v = value.strip()
    if "://" in v or "/" in v:
        raise UsageError(bad + ": give no scheme or path")
    if v.startswith("["):
        host, sep, port = v[1:].partition("]:")
        if not sep:
            raise UsageError(bad)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"--xds: {host!r} is not an IPv6 address") from None
        shown = f"[{host}]"
    else:
        host, sep, port = v.rpartition(":")
        if not sep:
            raise UsageError(bad + ": the port is missing")
        if not host:
            raise UsageError(bad + ": the host is empty")
        if ":" in host:
            raise UsageError(bad + ": write an IPv6 host in brackets, e.g. [fd00::1]:15012")
        if not _HOSTNAME.match(host):
            raise UsageError(f"--xds: {host!r} is not a valid host name or IPv4 address")
        shown = host
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--xds: port {port!r} is not a number from 1 to 65535")
    return f"{shown}:{int(port)}"


def check_cluster_id(value: str | None) -> str:
    if value is None or not value.strip():
        raise UsageError(CLUSTER_ID_HELP)
    if not _CLUSTER_ID.match(value):
        raise UsageError(f"--cluster-id {value!r} is not a valid cluster id "
                         "(letters, digits, '-', '_', '.'; e.g. c1234567890abcdef or Kubernetes)")
    return value


def check_namespace(value: str, flag: str = "--namespace") -> str:
    if not _DNS_LABEL.match(value):
        raise UsageError(f"{flag} {value!r} is not a valid namespace name (lowercase DNS label)")
    return value


def check_image(value: str) -> str:
    if not value or not _IMAGE.match(value) or len(value) > 512:
        raise UsageError(f"--image {value!r} is not a valid image reference (e.g. {IMAGE_REPOSITORY}:TAG)")
    return value


def parse_timeout(value: str) -> float:
    """'300', '90s', '5m', '1h' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", value or "")
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--timeout must be a positive duration such as 90s or 5m, not {value!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# --- istiod discovery -------------------------------------------------------------------------


def _xds_port(svc: dict) -> int | None:
    for p in svc.get("spec", {}).get("ports") or []:
        if p.get("port") == XDS_TLS_PORT or p.get("name") in ("https-dns", "tls-xds"):
            return int(p["port"])
    return None


def discover_xds(api: ApiClient, revision: str | None) -> tuple[str, str]:
    """The seed's `kubectl get svc -n istio-system | grep istiod`, done properly.

    Services in istio-system labelled app=istiod with an istio.io/rev label; exactly one
    (or the one of --revision) is used; several without --revision is an error (never guess).
    Returns (address, a note saying which Service was chosen).
    """
    from kmeshctl import kubeapi

    selector = "app=istiod" + (f",istio.io/rev={revision}" if revision else "")
    listing = kubeapi.request(api, "GET", kubeapi.SERVICE.collection(ISTIO_NAMESPACE),
                              [("labelSelector", selector)])
    found = [s for s in listing.get("items") or []
             if (s.get("metadata", {}).get("labels") or {}).get("istio.io/rev")]
    if not found:
        if revision:
            raise KmeshctlError(f"no istiod Service with label istio.io/rev={revision} in {ISTIO_NAMESPACE}; "
                                "check the revision (kubectl get svc -n istio-system -l app=istiod) "
                                "or pass --xds HOST:PORT")
        raise KmeshctlError(f"no istiod Service (label app=istiod) found in {ISTIO_NAMESPACE}; "
                            "pass --xds HOST:PORT of your control plane")
    if len(found) > 1:
        names = ", ".join(f"{s['metadata']['name']} (revision {s['metadata']['labels']['istio.io/rev']})"
                          for s in sorted(found, key=lambda s: s["metadata"]["name"]))
        raise KmeshctlError(f"found {len(found)} istiod revisions in {ISTIO_NAMESPACE}: {names}; "
                            "pass --revision REV (or --xds HOST:PORT) to choose one")
    svc = found[0]
    name = svc["metadata"]["name"]
    port = _xds_port(svc)
    if port is None:
        raise KmeshctlError(f"Service {ISTIO_NAMESPACE}/{name} has no xDS port {XDS_TLS_PORT}; "
                            "pass --xds HOST:PORT")
    address = f"{name}.{ISTIO_NAMESPACE}.svc:{port}"
    rev = svc["metadata"]["labels"]["istio.io/rev"]
    return address, f"using control plane {address} (Service {ISTIO_NAMESPACE}/{name}, revision {rev})"


# --- apply -------------------------------------------------------------------------------------


def _short_ref(obj: dict) -> str:
    """kubectl-style ``daemonset.apps/kmesh``."""
    api_version = obj.get("apiVersion", "v1")
    group = api_version.split("/")[0] if "/" in api_version else ""
    return f"{obj['kind'].lower()}{'.' + group if group else ''}/{obj['metadata']['name']}"


def _conflict_managers(message: str) -> list[str]:
    return re.findall(r'conflict with "([^"]+)"', message)


def _rejected(obj: dict, exc: BaseException, applied_nothing: bool = True) -> KmeshctlError:
    from kmeshctl import kubeapi

    status, reason, message, _ = kubeapi.status_of(exc)
    if status is None:
        return exc if isinstance(exc, KmeshctlError) else KmeshctlError(str(exc))
    tail = "; nothing was applied" if applied_nothing else ""
    if status == 409 and _conflict_managers(message):
        managers = ", ".join(sorted(set(_conflict_managers(message))))
        return KmeshctlError(f"{object_ref(obj)} has fields owned by another field manager ({managers}): "
                             f"{message}{tail}; remove that manager's changes or delete the object first")
    return KmeshctlError(f"{object_ref(obj)} rejected by the API server ({status} {reason}): {message}{tail}")


def _namespace_missing(exc: BaseException, namespace: str) -> bool:
    from kmeshctl import kubeapi

    status, _, message, details = kubeapi.status_of(exc)
    return status == 404 and (details.get("kind") == "namespaces" or f'"{namespace}" not found' in message)


def _dry_run(api: ApiClient, obj: dict) -> bool:
    """Server-side dry run; conflicts only with our own (kmeshctl*) managers are forced.

    Returns whether the real apply must force (a conflict with another kmeshctl manager)."""
    from kubernetes.client.exceptions import ApiException

    from kmeshctl import kubeapi

    try:
        kubeapi.apply(api, obj, dry_run=True)
        return False
    except ApiException as e:
        status, _, message, _ = kubeapi.status_of(e)
        managers = _conflict_managers(message) if status == 409 else []
        if managers and all(m.startswith(kubeapi.FIELD_MANAGER) for m in managers):
            kubeapi.apply(api, obj, dry_run=True, force=True)
            return True
        raise


def _preflight(api: ApiClient, objects: list[dict], envoyfilters: bool) -> None:
    from kmeshctl import kubeapi

    if not envoyfilters:
        return
    try:
        kubeapi.request(api, "GET", "/apis/networking.istio.io/v1alpha3")
    except Exception as e:
        if kubeapi.status_of(e)[0] == 404:
            raise KmeshctlError("the API server does not serve networking.istio.io/v1alpha3 EnvoyFilter "
                                "(is Istio installed?); pass --no-envoyfilters to skip them") from None
        raise
    if kubeapi.get(api, kubeapi.NAMESPACE.path(ISTIO_NAMESPACE)) is None:
        raise KmeshctlError(f"namespace {ISTIO_NAMESPACE} not found (is Istio installed?); "
                            "pass --no-envoyfilters to skip the EnvoyFilters")


def apply_all(api: ApiClient, objects: list[dict], envoyfilters: bool = True,
              validated: Callable[[], None] | None = None) -> list[dict]:
    """Dry-run every object, then apply them all; returns [{kind, namespace, name, result}].

    ``validated`` is called once every dry run has passed, before the first real apply (so a
    failed install prints nothing but its one error line)."""
    from kubernetes.client.exceptions import ApiException

    from kmeshctl import kubeapi

    _preflight(api, objects, envoyfilters)
    existing = {id(o): kubeapi.get(api, kubeapi.object_path(o)) for o in objects}
    ns_objs = [o for o in objects if o["kind"] == "Namespace"]
    new_namespaces = {o["metadata"]["name"] for o in ns_objs if existing[id(o)] is None}

    deferred: list[dict] = []
    forced: set[int] = set()
    for obj in objects:
        try:
            if _dry_run(api, obj):
                forced.add(id(obj))
        except ApiException as e:
            ns = obj["metadata"].get("namespace")
            if ns in new_namespaces and _namespace_missing(e, ns):
                deferred.append(obj)  # validated once its namespace exists
                continue
            raise _rejected(obj, e) from None

    created_ns: list[dict] = []
    if deferred:
        # Objects in a namespace that does not exist yet can only be validated after it is
        # created; create it, validate them, and remove it again if any is rejected.
        for ns_obj in ns_objs:
            if ns_obj["metadata"]["name"] in new_namespaces:
                kubeapi.apply(api, ns_obj, dry_run=False)
                created_ns.append(ns_obj)
        for obj in deferred:
            try:
                if _dry_run(api, obj):
                    forced.add(id(obj))
            except ApiException as e:
                for ns_obj in created_ns:
                    try:
                        kubeapi.request(api, "DELETE", kubeapi.object_path(ns_obj))
                    except ApiException:
                        warn(f"could not remove {object_ref(ns_obj)} created for validation")
                raise _rejected(obj, e) from None

    if validated is not None:
        validated()
    results: list[dict] = []
    for i, obj in enumerate(objects):
        force = id(obj) in forced
        before = existing[id(obj)]
        try:
            after = kubeapi.apply(api, obj, dry_run=False, force=force)
        except ApiException as e:
            done = ", ".join(_short_ref(o) for o in objects[:i]) or "none"
            raise KmeshctlError(f"{_rejected(obj, e, applied_nothing=False)} (after the dry run passed; "
                                f"already applied: {done}; run install again or kmeshctl uninstall)"
                                ) from None
        if before is None:
            result = "created"
        elif before["metadata"].get("resourceVersion") == after.get("metadata", {}).get("resourceVersion"):
            result = "unchanged"
        else:
            result = "configured"
        results.append({"kind": obj["kind"], "namespace": obj["metadata"].get("namespace") or "",
                        "name": obj["metadata"]["name"], "ref": _short_ref(obj), "result": result})
    return results


# --- wait ----------------------------------------------------------------------------------------


def daemonset_ready(ds: dict) -> tuple[bool, int, int]:
    """(ready, numberReady, desired): ready when numberReady == desiredNumberScheduled > 0 and
    status.observedGeneration has caught up with metadata.generation."""
    st = ds.get("status") or {}
    desired = int(st.get("desiredNumberScheduled") or 0)
    ready = int(st.get("numberReady") or 0)
    gen = ds.get("metadata", {}).get("generation")
    observed = st.get("observedGeneration")
    current = gen is None or (observed is not None and int(observed) >= int(gen))
    updated = st.get("updatedNumberScheduled")
    up_to_date = updated is None or int(updated) >= desired
    return (desired > 0 and ready == desired and current and up_to_date), ready, desired


def wait_ready(api: ApiClient, namespace: str, timeout: float) -> None:
    """Poll the DaemonSet with a rich progress display on stderr until ready or timeout."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from kmeshctl import kubeapi
    from kmeshctl.common import err_console

    path = kubeapi.KINDS["DaemonSet"].path(DAEMONSET_NAME, namespace)
    label = f"DaemonSet {namespace}/{DAEMONSET_NAME}"
    deadline = time.monotonic() + timeout
    ready = desired = 0
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed:.0f}/{task.total:.0f} pods ready"), TimeElapsedColumn(),
                  console=err_console(), transient=False) as progress:
        task = progress.add_task(f"waiting for {label}", total=1, completed=0)
        while True:
            ds = kubeapi.get(api, path)
            if ds is None:
                raise KmeshctlError(f"{label} disappeared while waiting")
            ok, ready, desired = daemonset_ready(ds)
            progress.update(task, total=max(desired, 1), completed=ready)
            if ok:
                progress.update(task, description=f"{label} ready")
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    raise KmeshctlError(f"timed out after {timeout:g}s waiting for {label}: {ready}/{desired} pods ready; "
                        f"see kubectl -n {namespace} get pods -l app=kmesh")


# --- commands --------------------------------------------------------------------------------------


def install(
    xds: Annotated[str | None, typer.Option("--xds", metavar="HOST:PORT", show_default=False,
                                            help="xDS address of istiod/ASM (default: discovered from "
                                                 "the istiod Service in istio-system, port 15012).")] = None,
    cluster_id: Annotated[str | None, typer.Option("--cluster-id", show_default=False,
                                                   help="Cluster id the control plane knows this cluster "
                                                        "by (ASM: the ACK cluster id; istiod: Kubernetes). "
                                                        "Required.")] = None,
    image: Annotated[str | None, typer.Option("--image", show_default=False,
                                              help=f"Daemon image (default: {IMAGE_REPOSITORY}:<version>; "
                                                   "any Kmesh-compatible image works).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="Data plane mode.")] = DEFAULT_MODE,
    namespace: Annotated[str, typer.Option("-n", "--namespace", help="Namespace of the daemon.")]
    = DEFAULT_NAMESPACE,
    revision: Annotated[str | None, typer.Option("--revision", "-r", show_default=False,
                                                 help="istiod revision to use when several are "
                                                      "installed.")] = None,
    no_envoyfilters: Annotated[bool, typer.Option("--no-envoyfilters",
                                                  help="Do not install the three waypoint "
                                                       "EnvoyFilters in istio-system.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the manifests; contact "
                                                             "nothing.")] = False,
    output: Annotated[str | None, typer.Option("-o", "--output", show_default=False,
                                               help="yaml or json (manifests with --dry-run, results "
                                                    "otherwise; default: yaml / a line per object).")]
    = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the DaemonSet is ready.")] = False,
    timeout: Annotated[str, typer.Option("--timeout", help="How long --wait waits (e.g. 90s, 5m).")] = "5m",
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Install the Kmesh daemon (and the ASM waypoint EnvoyFilters) into the cluster."""
    from kmeshctl.render import default_image, render

    if xds is not None:
        xds = parse_xds(xds)
    cid = check_cluster_id(cluster_id)
    if mode not in SUPPORTED_MODES:
        raise UsageError(f"--mode {mode!r} is not supported; supported: {', '.join(SUPPORTED_MODES)}")
    check_namespace(namespace)
    if revision is not None and not _DNS_LABEL.match(revision):
        raise UsageError(f"--revision {revision!r} is not a valid revision name")
    img = check_image(image) if image is not None else default_image()
    if output not in (None, "yaml", "json"):
        raise UsageError(f"--output must be yaml or json, not {output!r}")
    seconds = parse_timeout(timeout)
    if dry_run and xds is None:
        raise UsageError("--dry-run contacts nothing, so it cannot discover istiod: pass --xds HOST:PORT")
    if dry_run and wait:
        raise UsageError("--wait cannot be combined with --dry-run")

    def objects(address: str) -> list[dict]:
        return render(InstallValues(xds_address=address, cluster_id=cid, image=img, namespace=namespace,
                                    mode=mode), envoyfilters=not no_envoyfilters)

    if dry_run:
        assert xds is not None
        objs = objects(xds)
        if output == "json":
            emit({"apiVersion": "v1", "kind": "List", "items": objs}, "json")
        else:
            print(to_yaml_documents(objs), end="")
        return

    from kmeshctl.common import load_kube

    api = load_kube(kubeconfig, context)
    chosen = ""
    if xds is None:
        xds, chosen = discover_xds(api, revision)
    elif revision is not None:
        warn("--revision is ignored because --xds is given")
    results = apply_all(api, objects(xds), envoyfilters=not no_envoyfilters,
                        validated=(lambda: note(chosen)) if chosen else None)
    if output:
        emit([{k: r[k] for k in ("kind", "namespace", "name", "result")} for r in results], output)
    else:
        for r in results:
            print(f"{r['ref']} {r['result']}")
    if wait:
        wait_ready(api, namespace, seconds)


UNINSTALL_ORDER = ("EnvoyFilter", "DaemonSet", "ClusterRoleBinding", "ClusterRole", "ServiceAccount",
                   "Namespace")

# Objects Kubernetes/Istio put in every namespace: they do not make a namespace "foreign".
_AMBIENT_OBJECTS = {("ConfigMap", "kube-root-ca.crt"), ("ConfigMap", "istio-ca-root-cert"),
                    ("ServiceAccount", "default")}
_NAMESPACE_CONTENT = (("v1", "pods", "Pod"), ("v1", "services", "Service"), ("v1", "configmaps", "ConfigMap"),
                      ("v1", "secrets", "Secret"), ("v1", "serviceaccounts", "ServiceAccount"),
                      ("apps/v1", "deployments", "Deployment"), ("apps/v1", "daemonsets", "DaemonSet"))


def foreign_objects(api: ApiClient, namespace: str) -> list[str]:
    """Objects in ``namespace`` that kmeshctl did not create (so deleting it would lose them)."""
    from kubernetes.client.exceptions import ApiException

    from kmeshctl import kubeapi

    found: list[str] = []
    for api_version, plural, kind in _NAMESPACE_CONTENT:
        path = kubeapi.Kind(kind, api_version, plural, True).collection(namespace)
        try:
            items = kubeapi.request(api, "GET", path).get("items") or []
        except ApiException as e:
            if e.status == 404:
                continue
            raise
        for item in items:
            meta = item.get("metadata", {})
            labels = meta.get("labels") or {}
            if labels.get(MANAGED_BY_KEY) == MANAGED_BY_VALUE or (kind, meta.get("name")) in _AMBIENT_OBJECTS:
                continue
            if kind == "Pod" and any(ref.get("kind") == "DaemonSet" and ref.get("name") == DAEMONSET_NAME
                                     for ref in meta.get("ownerReferences") or []):
                continue
            if kind == "Secret" and item.get("type") == "kubernetes.io/service-account-token":
                continue
            found.append(f"{kind.lower()}/{meta.get('name')}")
    return found


def uninstall(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be deleted; delete "
                                                             "nothing.")] = False,
    output: Annotated[str | None, typer.Option("-o", "--output", show_default=False,
                                               help="json or yaml list of the objects.")] = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Delete what `kmeshctl install` created (objects labelled app.kubernetes.io/managed-by=kmeshctl)."""
    from kubernetes.client.exceptions import ApiException

    from kmeshctl import kubeapi
    from kmeshctl.common import load_kube

    if output not in (None, "yaml", "json"):
        raise UsageError(f"--output must be yaml or json, not {output!r}")
    api = load_kube(kubeconfig, context)
    targets: list[dict] = []
    for kind_name in UNINSTALL_ORDER:
        kind = kubeapi.KINDS[kind_name]
        try:
            listing = kubeapi.request(api, "GET", kind.collection(), [("labelSelector", MANAGED_BY_SELECTOR)])
        except ApiException as e:
            if e.status == 404:  # kind not served (e.g. no Istio CRDs): nothing of ours there
                continue
            raise
        for item in listing.get("items") or []:
            if item.get("metadata", {}).get("deletionTimestamp"):
                continue  # already being deleted (e.g. a Terminating namespace)
            item.setdefault("kind", kind_name)
            item.setdefault("apiVersion", kind.api_version)
            targets.append(item)
    rows: list[dict] = []
    for obj in targets:
        meta = obj["metadata"]
        row = {"kind": obj["kind"], "namespace": meta.get("namespace") or "", "name": meta["name"],
               "ref": _short_ref(obj)}
        if obj["kind"] == "Namespace":
            others = foreign_objects(api, meta["name"])
            if others:
                shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
                warn(f"namespace {meta['name']} kept: it holds objects kmeshctl did not create ({shown})")
                rows.append({**row, "result": "kept"})
                continue
        if dry_run:
            rows.append({**row, "result": "would be deleted"})
            continue
        try:
            kubeapi.request(api, "DELETE", kubeapi.object_path(obj))
            rows.append({**row, "result": "deleted"})
        except ApiException as e:
            if e.status != 404:
                done = ", ".join(f"{r['kind'].lower()}/{r['name']}" for r in rows if r["result"] == "deleted")
                raise KmeshctlError(f"cannot delete {object_ref(obj)}: {kubeapi.status_of(e)[2]} "
                                    f"(already deleted: {done or 'none'})") from None
            continue  # deleted meanwhile by someone else: nothing to report
    if output:
        emit([{k: v for k, v in r.items() if k != "ref"} for r in rows], output)
    else:
        for row in rows:
            print(f"{row['ref']} {row['result']}")
    if not rows:
        note(f"nothing to uninstall: no objects labelled {MANAGED_BY_SELECTOR}")


def register(app: typer.Typer) -> None:
    app.command("install")(install)
    app.command("uninstall")(uninstall)
