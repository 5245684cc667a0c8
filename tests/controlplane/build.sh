#!/usr/bin/env bash
# Builds the real control-plane binaries (etcd, kube-apiserver, kube-controller-manager,
# kubectl), the node's (kubelet, kube-scheduler, kube-proxy) and helm from the Go modules pinned beside this script, into a cache directory
# outside the repository keyed by their versions. Prints that directory on stdout.
# Binaries already present are not rebuilt, so a fresh clone reuses them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/lib.sh"

K8S="$(mod_version k8s.io/kubernetes "$here/go.mod")"
ETCD="$(mod_version go.etcd.io/etcd/server/v3 "$here/go.mod")"
HELM="$(grep -oE 'helm.sh/helm/v3 v[0-9.]+' "$here/helm/go.mod" | awk '{print $2}')"
bin="$(cache_root)/bin-k8s-$K8S-etcd-$ETCD-helm-$HELM"
mkdir -p "$bin"
stamp="$(k8s_stamp "$K8S")"
build() { build_into "$bin" "$@"; }

build etcd "$here" go.etcd.io/etcd/server/v3 ""
build kube-apiserver "$here" k8s.io/kubernetes/cmd/kube-apiserver "$stamp"
build kube-controller-manager "$here" k8s.io/kubernetes/cmd/kube-controller-manager "$stamp"
build kubectl "$here" k8s.io/kubernetes/cmd/kubectl "$stamp"
build kube-scheduler "$here" k8s.io/kubernetes/cmd/kube-scheduler "$stamp"
build kubelet "$here" k8s.io/kubernetes/cmd/kubelet "$stamp"
build kube-proxy "$here" k8s.io/kubernetes/cmd/kube-proxy "$stamp"
build helm "$here/helm" helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=$HELM -X helm.sh/helm/v3/internal/version.gitTreeState=clean"

echo "$bin"
