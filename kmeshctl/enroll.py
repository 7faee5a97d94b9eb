"""`kmeshctl enable|disable ns NAME...` and `kmeshctl enable|disable pod NAME... -n NS`.

Enrolment is the label ``istio.io/dataplane-mode=Kmesh`` on a namespace or a pod (the value
is matched case-insensitively, as Kmesh does); a pod labelled ``none`` is opted out even in
an enrolled namespace.

- enable ns/pod: set the label to ``Kmesh`` (replacing another value such as ``none``).
- disable ns: remove the label if it says Kmesh (another value, e.g. ``ambient``, is left alone).
- disable pod: remove the pod's own Kmesh label; and if its namespace is enrolled, set the pod
  label to ``none`` so the pod really leaves the data plane.

Every name is checked before anything changes: one missing namespace or pod is an error and
nothing is changed. Re-running is harmless ("already enabled"). Warnings (stderr) when a
namespace has ``istio-injection=enabled`` or pods carry an istio-proxy sidecar: Kmesh skips
sidecar pods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from kmeshctl.common import ContextOpt, KmeshctlError, KubeconfigOpt, UsageError, emit, warn

if TYPE_CHECKING:  # pragma: no cover
    from kubernetes.client import ApiClient

LABEL = "istio.io/dataplane-mode"
VALUE = "Kmesh"
OPT_OUT = "none"
SIDECAR = "istio-proxy"

NamesArg = Annotated[list[str], typer.Argument(metavar="NAME...", help="Names (one or more).",
                                               show_default=False)]
PodNamespaceOpt = Annotated[str | None, typer.Option("-n", "--namespace", show_default=False,
                                                     help="Namespace of the pods (default: the "
                                                          "context's namespace).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Validate the label change on the API server "
                                                           "(dryRun=All); change nothing.")]
EnrollOutputOpt = Annotated[str | None, typer.Option("-o", "--output", show_default=False,
                                                     help="json or yaml list of results.")]


def _enrolled(labels: dict | None) -> bool:
    return str((labels or {}).get(LABEL, "")).lower() == VALUE.lower()


def _check_names(names: list[str], what: str) -> None:
    from kmeshctl.install import _DNS_LABEL

    if not names:
        raise UsageError(f"give at least one {what} name")
    for n in names:
        if what == "namespace" and not _DNS_LABEL.match(n):
            raise UsageError(f"{n!r} is not a valid namespace name")
        if what == "pod" and (not n or len(n) > 253 or "/" in n):
            raise UsageError(f"{n!r} is not a valid pod name")


def _fetch_all(api: ApiClient, paths: dict[str, str], what: str) -> dict[str, dict]:
    """GET every object first; any missing one is an error before anything changes."""
    from kmeshctl import kubeapi

    found = {name: kubeapi.get(api, path) for name, path in paths.items()}
    missing = [n for n, obj in found.items() if obj is None]
    if missing:
        plural = what + ("s" if len(missing) > 1 else "")
        raise KmeshctlError(f"{plural} not found: {', '.join(missing)}; nothing was changed")
    return {n: o for n, o in found.items() if o is not None}


def _sidecar_pods(pods: list[dict]) -> list[str]:
    out = []
    for p in pods:
        spec = p.get("spec") or {}
        names = [c.get("name") for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])]
        if SIDECAR in names:
            out.append(p["metadata"]["name"])
    return out


def _list_pods(api: ApiClient, namespace: str) -> list[dict]:
    from kmeshctl import kubeapi

    return kubeapi.request(api, "GET", kubeapi.POD.collection(namespace)).get("items") or []


def _warn_sidecars(api: ApiClient, namespace: str, ns_obj: dict) -> None:
    labels = ns_obj.get("metadata", {}).get("labels") or {}
    if labels.get("istio-injection") == "enabled":
        warn(f"namespace {namespace} has istio-injection=enabled: new pods get an istio-proxy sidecar "
             f"and Kmesh skips sidecar pods; remove it (kubectl label ns {namespace} istio-injection-)")
    with_sidecar = _sidecar_pods(_list_pods(api, namespace))
    if with_sidecar:
        more = len(with_sidecar) - 5
        shown = ", ".join(with_sidecar[:5]) + (f" and {more} more" if more > 0 else "")
        warn(f"namespace {namespace}: {len(with_sidecar)} pod(s) carry an istio-proxy sidecar and are "
             f"not managed by Kmesh until restarted without it: {shown}")


def _report(rows: list[dict], output: str | None) -> None:
    if output:
        emit(rows, output)
        return
    for r in rows:
        ref = f"namespace/{r['name']}" if r["kind"] == "Namespace" else f"pod/{r['name']} -n {r['namespace']}"
        print(f"{ref} {r['result']}")


def _check_output(output: str | None) -> None:
    if output not in (None, "json", "yaml"):
        raise UsageError(f"--output must be json or yaml, not {output!r}")


def _label_patch(value: str | None) -> dict:
    return {"metadata": {"labels": {LABEL: value}}}


def _patch(api: ApiClient, path: str, patch: dict, dry_run: bool) -> None:
    """A merge patch; with dry_run the API server validates it (dryRun=All) and stores nothing."""
    from kmeshctl import kubeapi

    query = [("dryRun", "All")] if dry_run else None
    kubeapi.request(api, "PATCH", path, query, body=patch, content_type="application/merge-patch+json")


def _dry(rows: list[dict], dry_run: bool) -> list[dict]:
    if dry_run:
        for r in rows:
            if not r["result"].startswith("already"):
                r["result"] += " (server dry run)"
    return rows


def set_namespaces(names: list[str], enable: bool, kubeconfig: str | None, context: str | None,
                   dry_run: bool = False) -> list[dict]:
    """Enable or disable namespaces; returns [{kind, namespace, name, result}]."""
    from kmeshctl import kubeapi
    from kmeshctl.common import load_kube

    _check_names(names, "namespace")
    api = load_kube(kubeconfig, context)
    objs = _fetch_all(api, {n: kubeapi.NAMESPACE.path(n) for n in dict.fromkeys(names)}, "namespace")
    rows = []
    for name, obj in objs.items():
        labels = obj.get("metadata", {}).get("labels") or {}
        current = labels.get(LABEL)
        if enable:
            if _enrolled(labels):
                result = "already enabled"
            else:
                _patch(api, kubeapi.NAMESPACE.path(name), _label_patch(VALUE), dry_run)
                result = "enabled" + (f" (was {LABEL}={current})" if current else "")
            _warn_sidecars(api, name, obj)
        else:
            if _enrolled(labels):
                _patch(api, kubeapi.NAMESPACE.path(name), _label_patch(None), dry_run)
                result = "disabled"
                kept = [p["metadata"]["name"] for p in _list_pods(api, name)
                        if _enrolled(p.get("metadata", {}).get("labels"))]
                if kept:
                    warn(f"namespace {name}: {len(kept)} pod(s) keep their own {LABEL}={VALUE} label "
                         f"and stay enrolled: {', '.join(kept[:5])}")
            elif current:
                result = f"already disabled ({LABEL}={current} left as is)"
            else:
                result = "already disabled"
        rows.append({"kind": "Namespace", "namespace": "", "name": name, "result": result})
    return rows


def set_pods(names: list[str], namespace: str | None, enable: bool, kubeconfig: str | None,
             context: str | None, dry_run: bool = False) -> list[dict]:
    """Enable or disable pods of one namespace; returns [{kind, namespace, name, result}]."""
    from kmeshctl import kubeapi
    from kmeshctl.common import context_namespace, load_kube

    _check_names(names, "pod")
    ns = namespace or context_namespace(kubeconfig, context)
    api = load_kube(kubeconfig, context)
    ns_obj = _fetch_all(api, {ns: kubeapi.NAMESPACE.path(ns)}, "namespace")[ns]
    pod_paths = {n: kubeapi.POD.path(n, ns) for n in dict.fromkeys(names)}
    pods = _fetch_all(api, pod_paths, f"pod in namespace {ns}")
    ns_enrolled = _enrolled(ns_obj.get("metadata", {}).get("labels"))
    rows = []
    for name, pod in pods.items():
        labels = pod.get("metadata", {}).get("labels") or {}
        current = labels.get(LABEL)
        path = kubeapi.POD.path(name, ns)
        if enable:
            if _enrolled(labels):
                result = "already enabled"
            elif ns_enrolled and current is None:
                result = f"already enabled (namespace {ns} is enrolled)"
            else:
                _patch(api, path, _label_patch(VALUE), dry_run)
                result = "enabled" + (f" (was {LABEL}={current})" if current else "")
            if _sidecar_pods([pod]):
                warn(f"pod {ns}/{name} carries an istio-proxy sidecar: Kmesh does not manage it until it is "
                     "restarted without the sidecar")
            if (pod.get("spec") or {}).get("hostNetwork"):
                warn(f"pod {ns}/{name} uses the host network: Kmesh does not manage hostNetwork pods")
        else:
            if ns_enrolled:
                if current == OPT_OUT:
                    result = "already disabled"
                else:
                    _patch(api, path, _label_patch(OPT_OUT), dry_run)
                    result = f"disabled ({LABEL}={OPT_OUT}: namespace {ns} is enrolled)"
            elif _enrolled(labels):
                _patch(api, path, _label_patch(None), dry_run)
                result = "disabled"
            else:
                result = "already disabled"
        rows.append({"kind": "Pod", "namespace": ns, "name": name, "result": result})
    return rows


def _group(enable: bool) -> typer.Typer:
    verb = "Enroll" if enable else "Remove"
    group = typer.Typer(help=f"{verb} namespaces or pods {'in' if enable else 'from'} the Kmesh data plane "
                             f"(label {LABEL}).", no_args_is_help=True)

    def ns(names: NamesArg, dry_run: DryRunOpt = False, output: EnrollOutputOpt = None,
           kubeconfig: KubeconfigOpt = None, context: ContextOpt = None) -> None:
        _check_output(output)
        _report(_dry(set_namespaces(names, enable, kubeconfig, context, dry_run), dry_run), output)

    def pod(names: NamesArg, namespace: PodNamespaceOpt = None, dry_run: DryRunOpt = False,
            output: EnrollOutputOpt = None, kubeconfig: KubeconfigOpt = None,
            context: ContextOpt = None) -> None:
        _check_output(output)
        _report(_dry(set_pods(names, namespace, enable, kubeconfig, context, dry_run), dry_run), output)

    action = "Enable" if enable else "Disable"
    ns.__doc__ = (f"{action} Kmesh for whole namespaces ({'set' if enable else 'remove'} {LABEL}={VALUE}).")
    pod.__doc__ = (f"{action} Kmesh for single pods" +
                   (f" (set {LABEL}={VALUE})." if enable else
                    f" (remove their {LABEL}={VALUE}; set {OPT_OUT} if the namespace is enrolled)."))
    group.command("ns")(ns)
    group.command("namespace", hidden=True)(ns)
    group.command("pod")(pod)
    return group


def register(app: typer.Typer) -> None:
    app.add_typer(_group(True), name="enable")
    app.add_typer(_group(False), name="disable")
