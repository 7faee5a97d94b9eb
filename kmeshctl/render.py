"""Render the install manifests (manifests/kmesh/*.yaml, manifests/envoyfilters/*.yaml).

The templates are plain YAML with ``${name}`` placeholders. They are parsed first and the
placeholders are substituted inside string values afterwards, so a value such as a cluster id
containing ``:`` or ``#`` can never change the YAML structure. No network access here:
``kmeshctl install --dry-run`` only renders.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANAGED_BY_KEY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "kmeshctl"
MANAGED_BY_SELECTOR = f"{MANAGED_BY_KEY}={MANAGED_BY_VALUE}"
DEFAULT_NAMESPACE = "kmesh-system"
DEFAULT_MODE = "dual-engine"
SUPPORTED_MODES = ("dual-engine",)
IMAGE_REPOSITORY = "ghcr.io/kmesh-py/kmesh-daemon"
DAEMONSET_NAME = "kmesh"

_KMESH_TEMPLATES = ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml", "daemonset.yaml")
_ENVOYFILTER_TEMPLATES = ("waypoint.yaml",)


def manifests_dir() -> Path:
    """Where the templates live: $KMESH_MANIFESTS_DIR, else the packaged (or checkout's) manifests/."""
    from daemon.assets import AssetError
    from daemon.assets import manifests_dir as find

    try:
        return find()
    except AssetError as e:
        from kmeshctl.common import KmeshctlError

        raise KmeshctlError(f"{e}, or set KMESH_MANIFESTS_DIR to a manifests/ directory") from None


def project_version() -> str:
    """The kmesh-py version (image tag of the default daemon image)."""
    from daemon.version import version

    return version()


def default_image() -> str:
    """This project's daemon image, built by the repository's Dockerfile."""
    return f"{IMAGE_REPOSITORY}:{project_version()}"


@dataclass(frozen=True)
class InstallValues:
    """Everything the templates need; validated by the caller (kmeshctl.install)."""

    xds_address: str
    cluster_id: str
    image: str
    namespace: str = DEFAULT_NAMESPACE
    mode: str = DEFAULT_MODE


def _substitute(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, str):
        return string.Template(node).substitute(values) if "$" in node else node
    if isinstance(node, dict):
        return {_substitute(k, values): _substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    return node


def _load(path: Path) -> list[dict]:
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        from kmeshctl.common import KmeshctlError

        raise KmeshctlError(f"cannot read manifest template {path}: {e.strerror}; "
                            "set KMESH_MANIFESTS_DIR to a dir holding kmesh/ and envoyfilters/") from None
    return [d for d in yaml.safe_load_all(text) if d]


def render(values: InstallValues, envoyfilters: bool = True) -> list[dict]:
    """The objects to apply, in apply order (Namespace first, EnvoyFilters last)."""
    subs = {k: str(v) for k, v in asdict(values).items()}
    base = manifests_dir()
    files = [base / "kmesh" / f for f in _KMESH_TEMPLATES]
    if envoyfilters:
        files += [base / "envoyfilters" / f for f in _ENVOYFILTER_TEMPLATES]
    objects: list[dict] = []
    for f in files:
        objects.extend(_substitute(doc, subs) for doc in _load(f))
    return objects


def object_ref(obj: dict) -> str:
    """``Kind namespace/name`` (or ``Kind name`` when cluster-scoped), for messages."""
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    return f"{obj.get('kind')} {ns + '/' if ns else ''}{meta.get('name')}"
