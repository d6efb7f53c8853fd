#!/usr/bin/env bash
# The e2e suite on a real control plane started here: ../shared/k8s/up.sh (etcd,
# kube-apiserver, controller-manager, scheduler of Kubernetes 1.19; every pod a local process
# of the release binary in its own network namespace), then `just e2e`, then down.
#
#   scripts/e2e-local.sh          (as root; `just e2e-local` runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
k8s=${KASMINA_K8S:-$PWD/../shared/k8s}
export KASMINA_K8S_DIR=${KASMINA_K8S_DIR:-/tmp/kasmina-k8s}
[ -x "$k8s/up.sh" ] || { echo "no control plane at $k8s (set KASMINA_K8S)" >&2; exit 1; }

# Pods of an earlier control plane that its kubelet could not stop in time (down.sh kills it
# after 10 s) keep their processes and network namespaces; the next one reuses those names.
leftover_pods() {
  for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^kp[0-9]+$/ {print $1}'); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    ip link del "v$ns" 2>/dev/null || true
  done
}
stop() {
  "$k8s/down.sh" || true
  leftover_pods
}

stop
"$k8s/down.sh" --purge
# Artifacts of earlier runs sit under the same revision names.
rm -rf /var/lib/kasmina/artifacts/e2e-*
# Pod to pod (the operator scraping runtime pods) crosses this host, as with every CNI.
sysctl -qw net.ipv4.ip_forward=1
trap stop EXIT
"$k8s/up.sh" --kasmina "$PWD/target/release/kasmina" \
  --node edge-eu-1:region=eu-west-1:memory=4Gi:cpu=2 \
  --node edge-us-1:region=us-east-1:memory=4Gi:cpu=2
export KUBECONFIG="$KASMINA_K8S_DIR/kubeconfig"
just e2e
