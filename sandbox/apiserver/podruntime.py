"""Where a pod runs: what the kubelet published for exec and port-forward.

A real API server proxies pods/exec and pods/portforward to the kubelet; the sandbox's kubelet
has no server of its own, it writes ``<state dir>/pods/<uid>/pod.json`` (netns, hostNetwork,
container pids and cgroups; see sandbox/kubelet/runtime.py) and names that file in the pod
annotation ``sandbox.kmesh.io/runtime-info``. The API server reads it and joins the pod itself,
with the same helper as ``kmeshctl sandbox exec`` (sandbox.kubelet.launch).

The file must name the pod's own UID, namespace and name, so an annotation pointing at another
pod's file is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import errors

RUNTIME_INFO_ANNOTATION = "sandbox.kmesh.io/runtime-info"
LOG_PATH_ANNOTATION = "sandbox.kmesh.io/log-path"


@dataclass
class PodRuntime:
    """The published runtime facts of one running pod."""

    info: dict[str, Any]
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def host_network(self) -> bool:
        return bool(self.info.get("hostNetwork"))

    @property
    def netns(self) -> str | None:
        return self.info.get("netns") or None


def _info_path(pod: dict[str, Any]) -> Path | None:
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    if ann.get(RUNTIME_INFO_ANNOTATION):
        return Path(ann[RUNTIME_INFO_ANNOTATION])
    log_path = ann.get(LOG_PATH_ANNOTATION)
    if log_path:  # kubelets that predate the annotation: <pod dir>/logs/<container>.log
        return Path(log_path).parent.parent / "pod.json"
    return None


def container_names(pod: dict[str, Any]) -> list[str]:
    return [str(c.get("name")) for c in (pod.get("spec") or {}).get("containers") or []]


def pick_container(pod: dict[str, Any], name: str, requested: str | None) -> str:
    """The container an exec names, or the pod's only/default one; BadRequest like kube-apiserver."""
    names = container_names(pod)
    names_all = names + [str(c.get("name")) for c in (pod.get("spec") or {}).get("initContainers") or []]
    if requested:
        if requested not in names_all:
            raise errors.bad_request(f"container {requested} is not valid for pod {name}")
        return requested
    if len(names) == 1:
        return names[0]
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    default = annotations.get("kubectl.kubernetes.io/default-container")
    if default in names:
        return str(default)
    raise errors.bad_request(
        f"a container name must be specified for pod {name}, choose one of: [{' '.join(names)}]"
    )


def resolve(pod: dict[str, Any]) -> PodRuntime:
    """The runtime info of a running pod; BadRequest (as kube-apiserver) when it is not running."""
    meta = pod.get("metadata") or {}
    name, namespace = meta.get("name", ""), meta.get("namespace", "")
    phase = (pod.get("status") or {}).get("phase", "Pending")
    if not (pod.get("spec") or {}).get("nodeName"):
        raise errors.bad_request(f"pod {name} does not have a host assigned")
    if phase in ("Succeeded", "Failed"):
        raise errors.bad_request(f"cannot exec into a container in a completed pod; current phase is {phase}")
    path = _info_path(pod)
    info: dict[str, Any] | None = None
    if path is not None:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = None
    if not isinstance(info, dict) or (info.get("uid"), info.get("namespace"), info.get("name")) != (
        meta.get("uid"), namespace, name
    ):
        raise errors.bad_request(f"pod {name} in namespace {namespace} is not running on a sandbox node yet")
    return PodRuntime(info, dict(info.get("containers") or {}))


def running_container(rt: PodRuntime, pod_name: str, container: str) -> dict[str, Any]:
    """pid/cgroup of a running container; BadRequest like the kubelet's "container not found"."""
    c = rt.containers.get(container)
    if not c or not Path(f"/proc/{c.get('pid')}").exists():
        raise errors.bad_request(
            f'unable to upgrade connection: container not found ("{container}") in pod {pod_name}'
        )
    return c
