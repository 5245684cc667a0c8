#!/usr/bin/env bash
# Builds kube-apiserver and kube-controller-manager of the oldest Kubernetes release the
# chart admits, from the Go module pinned beside this script, into a cache directory outside
# the repository keyed by the release. Prints that directory on stdout; a no-op when the
# binaries are there. Cold (modules downloaded, empty Go build cache): about 4 minutes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../lib.sh"

K8S="$(mod_version k8s.io/kubernetes "$here/go.mod")"
[[ -n "$K8S" ]] || { echo "tests/controlplane/oldest/build.sh: no Kubernetes version in go.mod" >&2; exit 1; }
bin="$(cache_root)/bin-k8s-$K8S"
mkdir -p "$bin"
stamp="$(k8s_stamp "$K8S")"
for cmd in kube-apiserver kube-controller-manager; do
  build_into "$bin" "$cmd" "$here" "k8s.io/kubernetes/cmd/$cmd" "$stamp"
done
echo "$bin"
