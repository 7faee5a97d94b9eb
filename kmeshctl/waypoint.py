"""`kmeshctl waypoint generate|apply|list|status|delete`: waypoints as Gateway API Gateways.

Flag-compatible with Kmesh's kmeshctl (itself istioctl's ``waypoint``): ``-n``, ``--name``
(default ``waypoint``), ``--for service|workload|all|none``, ``-r/--revision``, ``--image``;
``apply --enroll-namespace --overwrite -w/--wait``; ``list -A``; ``delete NAME... | --all``.

A waypoint is a ``gateway.networking.k8s.io/v1`` Gateway of class ``istio-waypoint`` with one
listener ``mesh`` on 15008 (HBONE); ``--for`` becomes the label ``istio.io/waypoint-for``,
the revision the label ``istio.io/rev``, and the image the annotation
``sidecar.istio.io/proxyImage`` (default: Kmesh's waypoint image, which carries the
``kmesh_tlv`` listener filter the ASM EnvoyFilters of ``kmeshctl install`` need). istiod's
gateway controller turns it into a Deployment and Service named after it.

Where this differs from Kmesh's kmeshctl, it is to keep "bad input: one line, exit != 0,
nothing applied": an existing, different Gateway of the same name, or a namespace already
enrolled with another waypoint, is an error unless ``--overwrite`` (Kmesh prints a warning and
exits 0 having done nothing); deleting a name that does not exist is an error before anything
is deleted; ``--all`` deletes waypoints only, not every Gateway of the namespace.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kmeshctl.common import ContextOpt, KmeshctlError, KubeconfigOpt, UsageError, emit, note, warn

if TYPE_CHECKING:  # pragma: no cover
    from kubernetes.client import ApiClient

GROUP, VERSION = "gateway.networking.k8s.io", "v1"
WAYPOINT_CLASS = "istio-waypoint"
DEFAULT_NAME = "waypoint"
HBONE_PORT = 15008
TRAFFIC_TYPES = ("all", "none", "service", "workload")
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
REV_LABEL = "istio.io/rev"
DATAPLANE_LABEL = "istio.io/dataplane-mode"
IMAGE_ANNOTATION = "sidecar.istio.io/proxyImage"
# Kmesh's waypoint image (istio-proxy + the kmesh_tlv filter) of the Kmesh release the seed runs.
WAYPOINT_IMAGE = "ghcr.io/kmesh-net/waypoint:v0.5.0"
WAIT_TIMEOUT = 90.0
ISTIO_NAMESPACE = "istio-system"

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

NamespaceOpt = Annotated[str | None, typer.Option("-n", "--namespace", show_default=False,
                                                  help="Namespace of the waypoint (default: the "
                                                       "context's namespace).")]
NameOpt = Annotated[str, typer.Option("--name", help="Name of the waypoint.")]
ImageOpt = Annotated[str | None, typer.Option("--image", show_default=False,
                                              help=f"Waypoint proxy image (default: {WAYPOINT_IMAGE}).")]
ForOpt = Annotated[str | None, typer.Option("--for", show_default=False,
                                            help="Traffic the waypoint handles: service, workload, all "
                                                 "or none (default: unset, istiod uses service).")]
RevisionOpt = Annotated[str | None, typer.Option("-r", "--revision", show_default=False,
                                                 help="istiod revision to label the waypoint with.")]
ListOutputOpt = Annotated[str, typer.Option("-o", "--output", help="table, json or yaml.")]


# --- the Gateway ---------------------------------------------------------------------------------


def check_name(name: str) -> str:
    if name == "none":
        raise UsageError("invalid name provided for waypoint, 'none' is a reserved value")
    if not _DNS1035.match(name or ""):
        raise UsageError(f"--name {name!r} is not a valid waypoint name: it names a Service, so use a "
                         "lowercase DNS label starting with a letter (e.g. waypoint)")
    return name


def check_for(value: str | None) -> str | None:
    if value is not None and value not in TRAFFIC_TYPES:
        raise UsageError(f"invalid traffic type: {value!r}; valid options are: {', '.join(TRAFFIC_TYPES)}")
    return value


def check_revision(value: str | None) -> str | None:
    if value is not None and not _DNS_LABEL.match(value):
        raise UsageError(f"--revision {value!r} is not a valid revision name (e.g. 1-22-6)")
    return value


def check_namespace(value: str | None) -> str | None:
    if value is not None and not _DNS_LABEL.match(value):
        raise UsageError(f"--namespace {value!r} is not a valid namespace name (lowercase DNS label)")
    return value


def make_gateway(name: str, namespace: str | None, traffic: str | None, revision: str | None,
                 image: str | None) -> dict[str, Any]:
    """The waypoint Gateway (checked against the Gateway API v1 schema before it is returned)."""
    from kmeshctl import gatewayschema

    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    labels = {}
    if traffic:
        labels[WAYPOINT_FOR_LABEL] = traffic
    if revision:
        labels[REV_LABEL] = revision
    if labels:
        metadata["labels"] = labels
    metadata["annotations"] = {IMAGE_ANNOTATION: image or WAYPOINT_IMAGE}
    gw = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Gateway", "metadata": metadata,
          "spec": {"gatewayClassName": WAYPOINT_CLASS,
                   "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}]}}
    try:
        gatewayschema.check(gw)
    except ValueError as e:
        raise UsageError(f"the waypoint would not be accepted by the Gateway API v1 schema: {e}") from None
    return gw


def _path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/gateways"
    return f"{base}/{name}" if name else base


def _condition(gw: dict, kind: str) -> dict:
    for c in (gw.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return {}


def _is_waypoint(gw: dict) -> bool:
    return (gw.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS


def _gateway_api_served(api: ApiClient) -> None:
    from kmeshctl import kubeapi

    try:
        kubeapi.request(api, "GET", f"/apis/{GROUP}/{VERSION}")
    except Exception as e:
        if kubeapi.status_of(e)[0] == 404:
            raise KmeshctlError(f"the API server does not serve {GROUP}/{VERSION} Gateway: install the "
                                "Kubernetes Gateway API CRDs before applying a waypoint; nothing was applied"
                                ) from None
        raise


def _namespace(api: ApiClient, ns: str) -> dict:
    from kmeshctl import kubeapi

    obj = kubeapi.get(api, kubeapi.NAMESPACE.path(ns))
    if obj is None:
        raise KmeshctlError(f"namespace {ns} not found; create it first or pass -n NAMESPACE; "
                            "nothing was applied")
    return obj


def _resolve_namespace(namespace: str | None, kubeconfig: str | None, context: str | None) -> str:
    from kmeshctl.common import context_namespace

    return namespace or context_namespace(kubeconfig, context)


def _discover_revision(api: ApiClient) -> str | None:
    """The revision of the only istiod in istio-system (None: default, none found, or several)."""
    from kmeshctl import kubeapi

    try:
        listing = kubeapi.request(api, "GET", kubeapi.SERVICE.collection(ISTIO_NAMESPACE),
                                  [("labelSelector", "app=istiod")])
    except Exception:
        return None
    revs = sorted({(s.get("metadata", {}).get("labels") or {}).get(REV_LABEL, "default")
                   for s in listing.get("items") or []})
    if len(revs) > 1:
        warn(f"several istiod revisions in {ISTIO_NAMESPACE} ({', '.join(revs)}): the waypoint gets no "
             f"{REV_LABEL} label (the default revision handles it); pass -r REVISION to choose one")
        return None
    if revs and revs[0] != "default":
        return revs[0]
    return None


def _differences(current: dict, wanted: dict) -> list[str]:
    """What in ``current`` (an existing Gateway) differs from the waypoint we would apply."""
    out = []
    spec, want_spec = current.get("spec") or {}, wanted["spec"]
    if spec.get("gatewayClassName") != want_spec["gatewayClassName"]:
        out.append(f"class {spec.get('gatewayClassName')!r}")
    listeners = [(x.get("name"), x.get("port"), x.get("protocol")) for x in spec.get("listeners") or []]
    if listeners != [(x["name"], x["port"], x["protocol"]) for x in want_spec["listeners"]]:
        out.append("listeners " + ", ".join(f"{n}:{p}/{pr}" for n, p, pr in listeners))
    labels = current["metadata"].get("labels") or {}
    want_labels = wanted["metadata"].get("labels") or {}
    for key in (WAYPOINT_FOR_LABEL, REV_LABEL):
        if labels.get(key) != want_labels.get(key):
            out.append(f"{key}={labels.get(key) or '(unset)'}")
    image = (current["metadata"].get("annotations") or {}).get(IMAGE_ANNOTATION)
    if image != wanted["metadata"]["annotations"][IMAGE_ANNOTATION]:
        out.append(f"image {image or '(istiod default)'}")
    return out


# --- commands ------------------------------------------------------------------------------------


def generate(namespace: NamespaceOpt = None, name: NameOpt = DEFAULT_NAME, traffic: ForOpt = None,
             revision: RevisionOpt = None, image: ImageOpt = None,
             output: Annotated[str, typer.Option("-o", "--output", help="yaml or json.")] = "yaml") -> None:
    """Print the waypoint Gateway as YAML (contacts nothing; `kubectl apply -f -` accepts it)."""
    from kmeshctl.install import check_image

    if output not in ("yaml", "json"):
        raise UsageError(f"--output must be yaml or json, not {output!r}")
    gw = make_gateway(check_name(name), check_namespace(namespace), check_for(traffic),
                      check_revision(revision), check_image(image) if image is not None else None)
    emit(gw, output)


def apply(
    namespace: NamespaceOpt = None,
    name: NameOpt = DEFAULT_NAME,
    traffic: ForOpt = None,
    revision: RevisionOpt = None,
    image: ImageOpt = None,
    enroll_namespace: Annotated[bool, typer.Option(
        "--enroll-namespace",
        help=f"Label the namespace {USE_WAYPOINT_LABEL}=<name> (after the waypoint is ready, with --wait)."
    )] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite",
                                            help="Replace a different Gateway of the same name, and the "
                                                 "namespace's existing waypoint label.")] = False,
    wait: Annotated[bool, typer.Option("-w", "--wait", help="Wait until it is Programmed.")] = False,
    timeout: Annotated[str, typer.Option("--timeout", help="How long --wait waits (e.g. 90s).")] = "90s",
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Apply a waypoint to the cluster (server-side apply, field manager kmeshctl)."""
    from kubernetes.client.exceptions import ApiException

    from kmeshctl import kubeapi
    from kmeshctl.common import load_kube
    from kmeshctl.install import check_image, parse_timeout

    check_name(name)
    check_namespace(namespace)
    check_for(traffic)
    check_revision(revision)
    if image is not None:
        check_image(image)
    seconds = parse_timeout(timeout)
    ns = _resolve_namespace(namespace, kubeconfig, context)
    api = load_kube(kubeconfig, context)

    # Every check before the first write: a bad input changes nothing.
    ns_obj = _namespace(api, ns)
    _gateway_api_served(api)
    discovered = revision is None
    if discovered:
        revision = _discover_revision(api)
    gw = make_gateway(name, ns, traffic, revision, image)
    current = kubeapi.get(api, _path(ns, name))
    if current is not None and not overwrite:
        diff = _differences(current, gw)
        if diff:
            what = "waypoint" if _is_waypoint(current) else "Gateway"
            raise KmeshctlError(f"a {what} named {name} already exists in namespace {ns} with "
                                f"{', '.join(diff)}; pass --overwrite to replace it, or choose another "
                                "--name; nothing was applied")
    ns_labels = ns_obj.get("metadata", {}).get("labels") or {}
    enrolled_with = ns_labels.get(USE_WAYPOINT_LABEL)
    if enroll_namespace and enrolled_with and enrolled_with != name and not overwrite:
        raise KmeshctlError(f"namespace {ns} already uses waypoint {enrolled_with} ({USE_WAYPOINT_LABEL}="
                            f"{enrolled_with}); pass --overwrite to switch it to {name}; nothing was applied")

    if discovered and revision:  # said once every check passed: a failed apply prints one line only
        note(f"using istiod revision {revision} (label {REV_LABEL}={revision})")
    query = [("fieldManager", kubeapi.FIELD_MANAGER)] + ([("force", "true")] if overwrite else [])
    try:
        kubeapi.request(api, "PATCH", _path(ns, name), [*query, ("dryRun", "All")], body=gw,
                        content_type="application/apply-patch+yaml")
        after = kubeapi.request(api, "PATCH", _path(ns, name), query, body=gw,
                                content_type="application/apply-patch+yaml")
    except ApiException as e:
        status, reason, message, _ = kubeapi.status_of(e)
        hint = "; pass --overwrite to take those fields over" if status == 409 else ""
        raise KmeshctlError(f"waypoint {ns}/{name} rejected by the API server ({status} {reason}): "
                            f"{message}{hint}; nothing was applied") from None
    if current is None:
        result = "created"
    elif current["metadata"].get("resourceVersion") == after.get("metadata", {}).get("resourceVersion"):
        result = "unchanged"
    else:
        result = "configured"
    if enroll_namespace and str(ns_labels.get(DATAPLANE_LABEL, "")).lower() != "kmesh":
        warn(f"namespace {ns} is not enrolled in Kmesh: its traffic does not reach the waypoint until you "
             f"run `kmeshctl enable ns {ns}`")
    if wait:
        wait_programmed(api, ns, name, seconds)
    print(f"waypoint {ns}/{name} applied ({result})")
    if enroll_namespace:
        if enrolled_with == name:
            print(f'namespace {ns} already labeled with "{USE_WAYPOINT_LABEL}: {name}"')
        else:
            patch = {"metadata": {"labels": {USE_WAYPOINT_LABEL: name}}}
            kubeapi.merge_patch(api, kubeapi.NAMESPACE.path(ns), patch)
            print(f'namespace {ns} labeled with "{USE_WAYPOINT_LABEL}: {name}"')


def wait_programmed(api: ApiClient, ns: str, name: str, timeout: float) -> dict:
    """Poll the Gateway with a progress line on stderr until Programmed=True or the timeout."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from kmeshctl import kubeapi
    from kmeshctl.common import err_console

    label = f"waypoint {ns}/{name}"
    deadline = time.monotonic() + timeout
    cond: dict = {}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console(), transient=False) as progress:
        task = progress.add_task(f"waiting for {label} to be programmed", total=None)
        while True:
            gw = kubeapi.get(api, _path(ns, name))
            if gw is None:
                raise KmeshctlError(f"{label} disappeared while waiting")
            cond = _condition(gw, "Programmed")
            if cond.get("status") == "True":
                progress.update(task, description=f"{label} programmed", total=1, completed=1)
                return gw
            detail = f"{cond.get('reason', 'Pending')}: {cond.get('message', 'waiting for istiod')}"
            state = cond.get("status", "Unknown")
            progress.update(task, description=f"waiting for {label}: Programmed={state} ({detail})")
            if time.monotonic() >= deadline:
                break
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise KmeshctlError(f"timed out after {timeout:g}s waiting for {label} to be programmed "
                        f"(Programmed={cond.get('status', 'Unknown')}, {cond.get('reason', '')}: "
                        f"{cond.get('message', '')}); see kubectl get deploy,pods -n {ns} "
                        f"-l gateway.networking.k8s.io/gateway-name={name}")


def _waypoints(api: ApiClient, ns: str | None) -> list[dict]:
    from kmeshctl import kubeapi

    path = f"/apis/{GROUP}/{VERSION}/gateways" if ns is None else _path(ns)
    try:
        items = kubeapi.request(api, "GET", path).get("items") or []
    except Exception as e:
        if kubeapi.status_of(e)[0] == 404:
            raise KmeshctlError(f"the API server does not serve {GROUP}/{VERSION} Gateway (the Kubernetes "
                                "Gateway API CRDs are not installed), so there are no waypoints") from None
        raise
    wps = [g for g in items if _is_waypoint(g)]
    return sorted(wps, key=lambda g: (g["metadata"].get("namespace", ""), g["metadata"]["name"]))


def list_cmd(
    namespace: NamespaceOpt = None,
    all_namespaces: Annotated[bool, typer.Option("-A", "--all-namespaces",
                                                 help="List waypoints in all namespaces.")] = False,
    output: ListOutputOpt = "table",
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """List the waypoints of a namespace (or of all, with -A): NAME REVISION PROGRAMMED."""
    rows = [{"namespace": g["metadata"].get("namespace", ""), "name": g["metadata"]["name"],
             "revision": (g["metadata"].get("labels") or {}).get(REV_LABEL) or "default",
             "programmed": _condition(g, "Programmed").get("status") or "False"}
            for g in _selected_waypoints(namespace, all_namespaces, output, kubeconfig, context)]
    _emit_rows(rows, output, all_namespaces, ["name", "revision", "programmed"])


def _selected_waypoints(namespace: str | None, all_namespaces: bool, output: str,
                        kubeconfig: str | None, context: str | None) -> list[dict]:
    """The waypoints `list` and `status` show: checks the flags first, then one namespace or all."""
    from kmeshctl.common import load_kube

    _check_table_output(output)
    check_namespace(namespace)
    ns = None if all_namespaces else _resolve_namespace(namespace, kubeconfig, context)
    return _waypoints(load_kube(kubeconfig, context), ns)


def _emit_rows(rows: list[dict], output: str, all_namespaces: bool, columns: list[str]) -> None:
    if output != "table":
        emit(rows, output)
    elif not rows:
        print("No waypoints found.")
    else:
        emit(rows, "table", columns=(["namespace"] if all_namespaces else []) + columns)


def status(
    namespace: NamespaceOpt = None,
    all_namespaces: Annotated[bool, typer.Option("-A", "--all-namespaces",
                                                 help="Waypoints of all namespaces.")] = False,
    output: ListOutputOpt = "table",
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Show each waypoint's Programmed condition: NAME STATUS TYPE REASON MESSAGE."""
    rows = []
    for g in _selected_waypoints(namespace, all_namespaces, output, kubeconfig, context):
        conds = (g.get("status") or {}).get("conditions") or []
        cond = _condition(g, "Programmed") or (conds[-1] if conds else {})
        rows.append({"namespace": g["metadata"].get("namespace", ""), "name": g["metadata"]["name"],
                     "status": cond.get("status", "Unknown"), "type": cond.get("type", "Programmed"),
                     "reason": cond.get("reason", ""), "message": cond.get("message", "")})
    _emit_rows(rows, output, all_namespaces, ["name", "status", "type", "reason", "message"])


def delete(
    names: Annotated[list[str] | None, typer.Argument(metavar="NAME", show_default=False,
                                                      help="Waypoints to delete.")] = None,
    all_waypoints: Annotated[bool, typer.Option("--all", help="Delete every waypoint of the namespace."
                                                )] = False,
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Delete waypoints by name, or all of a namespace with --all."""
    from kubernetes.client.exceptions import ApiException

    from kmeshctl import kubeapi
    from kmeshctl.common import load_kube

    names = list(dict.fromkeys(names or []))
    if all_waypoints and names:
        raise UsageError("cannot specify waypoint names when deleting all waypoints (--all)")
    if not all_waypoints and not names:
        raise UsageError("must either specify a waypoint name or delete all using --all")
    check_namespace(namespace)
    ns = _resolve_namespace(namespace, kubeconfig, context)
    api = load_kube(kubeconfig, context)
    ns_obj = _namespace(api, ns)
    present = {g["metadata"]["name"]: g for g in _waypoints(api, ns)}
    if all_waypoints:
        names = sorted(present)
        if not names:
            print(f"No waypoints found in namespace {ns}.")
            return
    missing = [n for n in names if n not in present]
    if missing:
        others = [n for n in missing if kubeapi.get(api, _path(ns, n)) is not None]
        if others:
            raise KmeshctlError(f"Gateway {ns}/{others[0]} is not a waypoint (class is not "
                                f"{WAYPOINT_CLASS}); delete it with kubectl; nothing was deleted")
        plural = "waypoints" if len(missing) > 1 else "waypoint"
        raise KmeshctlError(f"{plural} not found in namespace {ns}: {', '.join(missing)} (see kmeshctl "
                            f"waypoint list -n {ns}); nothing was deleted")
    for n in names:
        try:
            kubeapi.request(api, "DELETE", _path(ns, n))
            print(f"waypoint {ns}/{n} deleted")
        except ApiException as e:
            if e.status == 404:
                print(f"waypoint {ns}/{n} not found")
                continue
            raise
    enrolled = (ns_obj.get("metadata", {}).get("labels") or {}).get(USE_WAYPOINT_LABEL)
    if enrolled in names:
        warn(f"namespace {ns} still has {USE_WAYPOINT_LABEL}={enrolled}: its services fall back to the "
             f"kernel only; remove the label with kubectl label ns {ns} {USE_WAYPOINT_LABEL}-")


def _check_table_output(output: str) -> None:
    if output not in ("table", "json", "yaml"):
        raise UsageError(f"--output must be one of table, json, yaml, not {output!r}")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Manage waypoints (Gateway API Gateways of class istio-waypoint).",
                        no_args_is_help=True)
    group.command("generate")(generate)
    group.command("apply")(apply)
    group.command("list")(list_cmd)
    group.command("status")(status)
    group.command("delete")(delete)
    app.add_typer(group, name="waypoint")
