#!/usr/bin/env bash
# Builds the real control-plane binaries (etcd, kube-apiserver, kube-controller-manager,
# kubectl), the node's (kubelet, kube-scheduler, kube-proxy) and helm from the Go modules pinned beside this script, into a cache directory
# outside the repository keyed by their versions. Prints that directory on stdout.
# Binaries already present are not rebuilt, so a fresh clone reuses them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mod_version() { awk -v m="$1" '$1 == m { print $2; exit }' "$2"; }

K8S="$(mod_version k8s.io/kubernetes "$here/go.mod")"
ETCD="$(mod_version go.etcd.io/etcd/server/v3 "$here/go.mod")"
HELM="$(grep -oE 'helm.sh/helm/v3 v[0-9.]+' "$here/helm/go.mod" | awk '{print $2}')"
cache_root="${VAULT_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vault-registrar}"
bin="$cache_root/bin-k8s-$K8S-etcd-$ETCD-helm-$HELM"
mkdir -p "$bin"

export CGO_ENABLED=0 GOFLAGS=-mod=mod
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
major="$(echo "${K8S#v}" | cut -d. -f1)"
minor="$(echo "${K8S#v}" | cut -d. -f2)"
stamp=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp+=" -X $pkg.gitVersion=$K8S -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  stamp+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date -X $pkg.gitCommit=release-$K8S"
done

build() { # name, module dir, package, ldflags
  local name="$1" dir="$2" pkg="$3" flags="$4"
  if [[ -x "$bin/$name" ]]; then return; fi
  echo "building $name from $pkg" >&2
  (cd "$dir" && go build -trimpath -ldflags "-s -w $flags" -o "$bin/$name.tmp" "$pkg")
  mv "$bin/$name.tmp" "$bin/$name"
}

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
