"""Writing the kubeconfig that points clients (kubectl, the official client) at the server."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import yaml


def write_kubeconfig(
    path: Path, server: str, token: str, context: str = "sandbox", ca_pem: bytes | None = None
) -> Path:
    """Write a kubeconfig with one cluster, one token user and ``context`` as current-context.

    Written to a temporary file and renamed, so a reader never sees a half-written file; mode 0600
    because it holds a credential.
    """
    cluster: dict[str, str] = {"server": server}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": cluster}],
        "users": [{"name": f"{context}-admin", "user": {"token": token}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": f"{context}-admin"}}],
        "current-context": context,
        "preferences": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    os.replace(tmp, path)
    return path
