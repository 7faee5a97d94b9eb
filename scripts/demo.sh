#!/usr/bin/env bash
# `make demo`: the seed's walkthrough on this machine, against the sandbox.
#   sandbox up -> kmeshctl install (finds istiod-1-22-6 itself) -> enable ns default -> fortio v1/v2
#   + netutils -> kmeshctl waypoint apply (a real Envoy waypoint pod) -> 20 requests from netutils to
#   the fortio ClusterIP, then 200 counted per version (~90/10) -> a trace excerpt -> dump workloads.
# The sandbox stays up afterwards; `make demo-down` removes it. Setup (`make setup`) is done by make.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
KMESHCTL="$REPO/.venv/bin/kmeshctl"
KUBECTL="$REPO/.venv/bin/kubectl"  # pinned by `make setup`; the machine's own kubectl is never used
kubectl() { "$KUBECTL" "$@"; }
export KMESH_SANDBOX_DIR="${KMESH_SANDBOX_DIR:-$HOME/.kmesh/sandbox}"
export KUBECONFIG="$KMESH_SANDBOX_DIR/kubeconfig"
START=$(date +%s.%N)

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
fail() { printf '\ndemo: %s\n' "$*" >&2; exit 1; }
elapsed() { awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

[[ -x "$KMESHCTL" ]] || fail "kmeshctl is not installed in .venv: run \`make setup\` first"
[[ $EUID -eq 0 ]] || fail "the sandbox needs root (network namespaces, cgroups, BPF): run as root"
[[ -x "$KUBECTL" ]] || fail "kubectl is not installed in .venv: run \`make setup\`"
command -v curl >/dev/null || fail "curl is not installed (the netutils pod uses the machine's curl): apt-get install curl"
if [[ ! -x "$REPO/.venv/bin/kmesh-daemon" && -z "${KMESH_SANDBOX_DAEMON_COMMAND:-}" ]]; then
    fail "the kmesh-daemon console script is not installed in .venv/bin (the daemon pod would fail with reason DaemonNotInstalled): run \`make setup\`"
fi

step "Starting the sandbox (API server, istiod stand-in revision 1-22-6, one node)"
if "$KMESHCTL" sandbox status >/dev/null 2>&1; then
    echo "a sandbox is already running in $KMESH_SANDBOX_DIR: reusing it"
else
    # The daemon pod runs from the image when `make image` has built one: bring it up to date
    # first (about a second when current), so the demo never runs a stale daemon.
    VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' daemon/version.py)
    if [[ "${KMESH_SANDBOX_DAEMON_RUNTIME:-auto}" != process ]] && command -v podman >/dev/null \
        && CONTAINERS_CONF="$REPO/sandbox/kubelet/containers.conf" podman image exists "ghcr.io/kmesh-py/kmesh-daemon:$VERSION" 2>/dev/null; then
        echo "refreshing the daemon image (make image)"
        bash scripts/image.sh >/dev/null
    fi
    "$KMESHCTL" sandbox up >/dev/null
fi
CLUSTER_ID=$("$KMESHCTL" sandbox status -o json | "$REPO/.venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["clusterId"])')
echo "cluster id: $CLUSTER_ID    kubeconfig: $KUBECONFIG"
kubectl get svc -n istio-system

step "kmeshctl install --cluster-id $CLUSTER_ID --wait   (the seed's hand-edited DaemonSet, as one command)"
"$KMESHCTL" install --cluster-id "$CLUSTER_ID" --wait --timeout 90s

step "kmeshctl enable ns default   (label istio.io/dataplane-mode=Kmesh)"
"$KMESHCTL" enable ns default

step "Deploying the samples: fortio v1 + v2 behind Service fortio, the 90/10 VirtualService, netutils"
kubectl apply --server-side -f manifests/samples/fortio/fortio-route.yaml -f manifests/samples/netutils.yaml

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        (( $(date +%s) < deadline )) || fail "timed out waiting for $what"
        sleep 0.5
    done
}
deployments_ready() {
    local d
    for d in fortio-v1 fortio-v2 netutils; do
        [[ "$(kubectl get deploy "$d" -o jsonpath='{.status.readyReplicas}')" == "1" ]] || return 1
    done
}
pods_redirected() {
    local n
    n=$(kubectl get pods -l 'app in (fortio,netutils)' \
        -o jsonpath='{range .items[*]}{.metadata.annotations.kmesh\.net/redirection}{"\n"}{end}' | grep -c '^enabled$')
    [[ "$n" -ge 3 ]]
}
wait_for 60 "the fortio and netutils deployments to be ready" deployments_ready
wait_for 60 "the daemon to enroll the pods (annotation kmesh.net/redirection: enabled)" pods_redirected

step "Pods and their kmesh.net/redirection annotation"
kubectl get pods -A -o wide
echo
kubectl get pods -o custom-columns='POD:.metadata.name,IP:.status.podIP,VERSION:.metadata.labels.version,KMESH.NET/REDIRECTION:.metadata.annotations.kmesh\.net/redirection'

step "kmeshctl waypoint apply -n default --enroll-namespace --wait   (a Gateway -> an Envoy waypoint pod)"
"$KMESHCTL" waypoint apply -n default --enroll-namespace --wait
kubectl get gateway -n default
kubectl get pods -l gateway.networking.k8s.io/gateway-name=waypoint -o wide

FORTIO_IP=$(kubectl get svc fortio -o jsonpath='{.spec.clusterIP}')
via_waypoint() {  # the waypoint's Envoy adds x-request-id; the kernel-only path cannot
    "$KMESHCTL" sandbox exec netutils -- curl -s -m 2 "http://$FORTIO_IP/debug" | grep -qi 'x-request-id'
}
wait_for 30 "requests to fortio to go through the waypoint" via_waypoint

step "20 requests from netutils to the fortio ClusterIP $FORTIO_IP (the seed's kubectl loop, verbatim)"
# Given a terminal (`script`) as a user at a shell has, so `-it` gets a pty and curl -v's headers
# reach grep; against any cluster, without one kubectl says "Unable to use a TTY" and they go to stderr.
# (PATH: the loop's `kubectl` is the pinned .venv/bin/kubectl, as everywhere in this script.)
SEED_LOOP="$KMESH_SANDBOX_DIR/seed-loop.sh"
cat >"$SEED_LOOP" <<'LOOP'
for i in {1..20}; do kubectl exec -it $(kubectl get pod | grep netutils | awk '{print $1}') -- curl -v $(kubectl get svc -owide | grep fortio | awk '{print $3}'):80 | grep "Server:"; done
LOOP
printf '$ %s\n' "$(cat "$SEED_LOOP")"
OUT=$(PATH="$REPO/.venv/bin:$PATH" script -qec "bash $SEED_LOOP" /dev/null </dev/null | tr -d '\r' | sed -n 's/^.*\(Server:.*\)$/\1/p') || true
echo "$OUT"
OK=$(grep -ci '^Server:' <<<"$OUT" || true)
[[ "$OK" -eq 20 ]] || fail "only $OK of 20 requests were answered: see \`$KMESHCTL dump bpf\`, the daemon log ($KUBECTL logs -n kmesh-system -l app=kmesh) and the waypoint's ($KUBECTL logs deploy/waypoint)"

step "200 more requests, counted per version (the VirtualService says 90% v1 / 10% v2)"
COUNT=$("$KMESHCTL" sandbox exec netutils -- sh -c \
    "for i in \$(seq 1 200); do curl -s -m 2 -I http://$FORTIO_IP/ | grep -i '^Server:'; done") || true
TOTAL=$(grep -ci '^Server:' <<<"$COUNT" || true)
tr -d '\r' <<<"$COUNT" | grep -i '^Server:' | sort | uniq -c \
    | awk -v t="$TOTAL" '{ printf "  Server: %-4s %4d  (%.1f%%)\n", $3, $1, 100 * $1 / t }'
echo "  answered: $TOTAL/200"
echo
echo "Where the split happens: connect4 in the kernel sends each connection for the fortio VIP to the"
echo "waypoint pod with Kmesh's TLV naming the VIP; the waypoint's Envoy, configured by the sandbox"
echo "istiod from the VirtualService and DestinationRule, picks v1 or v2 for each request."

NETUTILS=$(kubectl get pods -l app=netutils -o jsonpath='{.items[0].metadata.name}')
step "kmeshctl trace pod $NETUTILS   (an excerpt: connections handed to the waypoint)"
TRACE_FILE="$KMESH_SANDBOX_DIR/demo-trace.txt"
"$KMESHCTL" trace pod "$NETUTILS" --count 40 --timeout 8 >"$TRACE_FILE" 2>&1 &
TRACE_PID=$!
sleep 1
"$KMESHCTL" sandbox exec netutils -- sh -c \
    "for i in 1 2 3 4 5; do curl -s -m 2 -o /dev/null http://$FORTIO_IP/; done" || true
wait "$TRACE_PID" || true
{ grep -m 6 'VIA_WAYPOINT' "$TRACE_FILE" || head -n 8 "$TRACE_FILE"; } | sed 's/^/  /'

step "kmeshctl dump workloads"
"$KMESHCTL" dump workloads

cat <<EOF

Done in $(elapsed)s. The sandbox is still running. Explore (kubectl and kmeshctl from .venv/bin):
  export KUBECONFIG=$KUBECONFIG PATH=$REPO/.venv/bin:\$PATH
  kubectl get pods -A -o wide; kubectl describe pod -l app=fortio; kubectl logs -n kmesh-system -l app=kmesh
  $KMESHCTL trace pod \$(kubectl get pods -l app=netutils -o jsonpath='{.items[0].metadata.name}')
  kubectl exec deploy/netutils -- curl -sI http://fortio
  kubectl port-forward svc/fortio 8080:80    # then: curl -sI 127.0.0.1:8080
  kubectl exec deploy/waypoint -- curl -s 127.0.0.1:15000/config_dump   # the waypoint Envoy's admin
  $KMESHCTL dump services; $KMESHCTL dump bpf; $KMESHCTL sandbox status
Stop and remove everything:  make demo-down
EOF
