"""Turn a Pod's spec into what the runtime needs: env, volumes on disk, mounts, probes.

Pure helpers over plain dicts (the JSON the API serves); API reads are passed in as callables so
the rules here (which field wins, what is an error) can be tested without a server.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox.kubelet.runtime import Mount

Getter = Callable[[str, str], dict | None]  # (namespace, name) -> object or None
TokenFn = Callable[[str, str, list[str], int], str]  # (namespace, sa, audiences, seconds) -> token

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class VolumeError(Exception):
    """A volume cannot be prepared yet (missing ConfigMap, Secret, token); the pod waits."""


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known variables are replaced, unknown ones left as written."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value).replace("$$", "$")


def field_value(pod: dict, path: str) -> str:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str(meta.get(m.group(1), {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": status.get("podIP"), "status.hostIP": status.get("hostIP"),
        "status.podIPs": status.get("podIP"),
    }
    return str(simple.get(path) or "")


def _key_ref(kind: str, ref: dict, namespace: str, get: Getter) -> str | None:
    obj = get(namespace, ref.get("name", ""))
    data = (obj or {}).get("data") or {}
    if ref.get("key") not in data:
        if ref.get("optional"):
            return None
        raise VolumeError(f"{kind} {namespace}/{ref.get('name')} key {ref.get('key')!r} not found")
    raw = data[ref["key"]]
    return base64.b64decode(raw).decode(errors="replace") if kind == "secret" else str(raw)


def container_env(pod: dict, container: dict, get_cm: Getter, get_secret: Getter) -> dict[str, str]:
    """The container's environment as a kubelet computes it (envFrom, then env in order)."""
    ns = pod["metadata"]["namespace"]
    env: dict[str, str] = {"HOSTNAME": pod["metadata"]["name"]}
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            data = (get_cm(ns, src["configMapRef"]["name"]) or {}).get("data") or {}
            env.update({prefix + k: str(v) for k, v in data.items()})
        elif "secretRef" in src:
            data = (get_secret(ns, src["secretRef"]["name"]) or {}).get("data") or {}
            env.update({prefix + k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()})
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        ref = item.get("valueFrom") or {}
        value: str | None = ""
        if "fieldRef" in ref:
            value = field_value(pod, ref["fieldRef"].get("fieldPath", ""))
        elif "configMapKeyRef" in ref:
            value = _key_ref("configmap", ref["configMapKeyRef"], ns, get_cm)
        elif "secretKeyRef" in ref:
            value = _key_ref("secret", ref["secretKeyRef"], ns, get_secret)
        elif "resourceFieldRef" in ref:
            value = "0"
        if value is not None:
            env[name] = value
    return env


def _write_items(target: Path, data: dict[str, str], items: list[dict] | None, binary: bool) -> None:
    target.mkdir(parents=True, exist_ok=True)
    pairs = [(i["key"], i.get("path", i["key"])) for i in items] if items else [(k, k) for k in data]
    for key, rel in pairs:
        if key not in data:
            continue
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        raw = base64.b64decode(data[key]) if binary else str(data[key]).encode()
        dest.write_bytes(raw)


def prepare_volumes(pod: dict, volumes_dir: Path, get_cm: Getter, get_secret: Getter,
                    token: TokenFn, host_aliases: dict[str, str] | None = None) -> dict[str, str]:
    """Write every volume's content under volumes_dir; returns volume name -> host path.

    hostPath sources that do not exist are replaced by an empty per-pod directory: the sandbox never
    creates anything on the machine outside its state dir. `host_aliases` maps a host path to the
    one the sandbox uses instead (/sys/fs/bpf -> a private bpffs when the machine has none there).
    """
    ns = pod["metadata"]["namespace"]
    sa = pod.get("spec", {}).get("serviceAccountName") or "default"
    paths: dict[str, str] = {}
    for vol in pod.get("spec", {}).get("volumes") or []:
        name = vol["name"]
        target = volumes_dir / name
        if "hostPath" in vol:
            src = vol["hostPath"].get("path", "")
            for original, alias in (host_aliases or {}).items():
                if src == original or src.startswith(original.rstrip("/") + "/"):
                    src = alias + src[len(original.rstrip("/")):]
            if os.path.exists(src):
                paths[name] = src
                continue
            target.mkdir(parents=True, exist_ok=True)
        elif "configMap" in vol:
            cm_ref = vol["configMap"]
            cm = get_cm(ns, cm_ref.get("name", ""))
            if cm is None and not cm_ref.get("optional"):
                raise VolumeError(f'configmap "{cm_ref.get("name")}" not found')
            _write_items(target, (cm or {}).get("data") or {}, cm_ref.get("items"), binary=False)
        elif "secret" in vol:
            s_ref = vol["secret"]
            secret = get_secret(ns, s_ref.get("secretName", ""))
            if secret is None and not s_ref.get("optional"):
                raise VolumeError(f'secret "{s_ref.get("secretName")}" not found')
            _write_items(target, (secret or {}).get("data") or {}, s_ref.get("items"), binary=True)
        elif "projected" in vol:
            target.mkdir(parents=True, exist_ok=True)
            for src in vol["projected"].get("sources") or []:
                if "serviceAccountToken" in src:
                    t = src["serviceAccountToken"]
                    aud = [t["audience"]] if t.get("audience") else []
                    value = token(ns, sa, aud, int(t.get("expirationSeconds") or 3600))
                    (target / t.get("path", "token")).write_text(value)
                elif "configMap" in src:
                    cm = get_cm(ns, src["configMap"].get("name", ""))
                    if cm is None and not src["configMap"].get("optional"):
                        raise VolumeError(f'configmap "{src["configMap"].get("name")}" not found')
                    _write_items(target, (cm or {}).get("data") or {}, src["configMap"].get("items"), False)
                elif "secret" in src:
                    secret = get_secret(ns, src["secret"].get("name", ""))
                    if secret is None and not src["secret"].get("optional"):
                        raise VolumeError(f'secret "{src["secret"].get("name")}" not found')
                    _write_items(target, (secret or {}).get("data") or {}, src["secret"].get("items"), True)
                elif "downwardAPI" in src:
                    _write_downward(target, pod, src["downwardAPI"].get("items") or [])
        elif "downwardAPI" in vol:
            _write_downward(target, pod, vol["downwardAPI"].get("items") or [])
        else:  # emptyDir and anything else: an empty per-pod directory
            if target.exists() and "emptyDir" not in vol:
                shutil.rmtree(target)
            target.mkdir(parents=True, exist_ok=True)
        paths[name] = str(target)
    return paths


def _write_downward(target: Path, pod: dict, items: list[dict]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for item in items:
        if "fieldRef" in item:
            (target / item["path"]).write_text(field_value(pod, item["fieldRef"].get("fieldPath", "")))


def container_mounts(container: dict, volume_paths: dict[str, str]) -> list[Mount]:
    mounts = []
    for vm in container.get("volumeMounts") or []:
        src = volume_paths.get(vm["name"])
        if src is None:
            continue
        if vm.get("subPath"):
            src = os.path.join(src, vm["subPath"])
        mounts.append(Mount(src, vm["mountPath"], bool(vm.get("readOnly"))))
    return mounts


def probe_target(probe: dict | None, container: dict) -> tuple[str, int, str] | None:
    """(kind "tcp"|"http", port, path) of a readiness probe we can run, else None (exec probes)."""
    if not probe:
        return None
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}

    def port_of(v: Any) -> int | None:
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.isdigit():
            return int(v)
        return ports.get(v)

    if "tcpSocket" in probe:
        port = port_of(probe["tcpSocket"].get("port"))
        return ("tcp", port, "") if port else None
    if "httpGet" in probe:
        port = port_of(probe["httpGet"].get("port"))
        return ("http", port, probe["httpGet"].get("path", "/")) if port else None
    return None
