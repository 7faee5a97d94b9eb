"""``python -m sandbox.pilot``: the sandbox's istiod stand-in (workload xDS over delta ADS).

Serves TLS (authenticated: TokenReview + cluster id + node identity) and plaintext (no
authentication, like istiod :15010) on 127.0.0.1. Prints ``ready tls=<port> plaintext=<port>``
on stderr once its caches are synced and both ports listen; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sandbox.pilot", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", required=True, type=Path, help="kubeconfig of the sandbox API server")
    p.add_argument("--cluster-id", default="Kubernetes", help="cluster id accepted")
    p.add_argument("--revision", default="default", help="istio revision: Service istiod-<rev>")
    p.add_argument("--namespace", default="istio-system", help="istio namespace (default istio-system)")
    p.add_argument("--root-namespace", default=None,
                   help="mesh root namespace: its AuthorizationPolicies without selector are GLOBAL "
                        "(default: --namespace)")
    p.add_argument("--tls-port", type=int, default=15012, help="TLS xDS port (0 = any free port)")
    p.add_argument("--plaintext-port", type=int, default=15010, help="plaintext xDS port (0 = any; -1 = off)")
    p.add_argument("--state-dir", required=True, type=Path, help="CA and serving certificate live here")
    p.add_argument("--xds-socket", type=Path, default=None,
                   help="plaintext xDS on this unix socket too, for waypoint pods "
                        "(default STATE_DIR/xds.sock)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("tls_port", "plaintext_port"):
        if not -1 <= getattr(args, name) <= 65535:
            print(f"error: --{name.replace('_', '-')} {getattr(args, name)} is out of range; give 0-65535",
                  file=sys.stderr)
            return 2
    if not args.kubeconfig.is_file():
        print(f"error: kubeconfig {args.kubeconfig} not found; pass the file the sandbox API server wrote",
              file=sys.stderr)
        return 2
    from kubernetes import config

    from sandbox.pilot import ca
    from sandbox.pilot.auth import KubeJwtAuthenticator
    from sandbox.pilot.controller import Controller
    from sandbox.pilot.server import ResourceStore, serve

    try:
        api_client = config.new_client_from_config(config_file=str(args.kubeconfig))
    except Exception as e:  # noqa: BLE001
        print(f"error: cannot load kubeconfig {args.kubeconfig}: {e}", file=sys.stderr)
        return 2
    cert = ca.load_or_create(args.state_dir, args.namespace, args.revision)
    store = ResourceStore()
    auth = KubeJwtAuthenticator(api_client, args.cluster_id)
    from sandbox.pilot.waypointxds.service import WaypointXds

    waypoints = WaypointXds(api_client, root_namespace=args.root_namespace or args.namespace)
    socket_path = str(args.xds_socket or args.state_dir / "xds.sock")
    servers = []
    try:  # bind first: a busy port fails before anything is written to the cluster
        tls = (cert.key_pem, cert.cert_pem)
        tls_server, tls_port, _ = serve(store, args.tls_port, auth, tls=tls, start=False,
                                        router=waypoints.router)
        servers.append(tls_server)
        args.state_dir.mkdir(parents=True, exist_ok=True)
        plain_server, plain_port, _ = serve(store, args.plaintext_port, start=False,
                                            router=waypoints.router, unix_socket=socket_path)
        servers.append(plain_server)
    except (OSError, RuntimeError) as e:
        for s in servers:
            s.stop(0)
        ports = f"tls {args.tls_port}, plaintext {args.plaintext_port}"
        print(f"error: cannot listen on 127.0.0.1 ({ports}): {e}; pick free ports (0 = any)", file=sys.stderr)
        return 1
    controller = Controller(api_client, store, args.cluster_id, cert.root_pem,
                            root_namespace=args.root_namespace or args.namespace,
                            revision=args.revision, istio_namespace=args.namespace)
    controller.start()
    waypoints.start()
    # istiod too refuses streams before its caches are synced
    if not controller.wait_synced(60) or not waypoints.wait_synced(60):
        print("error: could not list namespaces/services/pods/authorizationpolicies from the API server "
              "in 60s; is it the sandbox API server (it serves security.istio.io)?", file=sys.stderr)
        return 1
    for s in servers:
        s.start()
    controller.ensure_istiod_service(args.namespace, args.revision, tls_port, max(plain_port, 0))
    (args.state_dir / "ports.json").write_text(json.dumps({"tls": tls_port, "plaintext": plain_port,
                                                          "socket": socket_path}))
    print(f"ready tls={tls_port} plaintext={plain_port}", file=sys.stderr, flush=True)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    controller.stop()
    waypoints.stop()
    for s in servers:
        s.stop(grace=0.5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
