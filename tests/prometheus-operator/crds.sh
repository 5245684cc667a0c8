#!/usr/bin/env bash
# Fetches the Prometheus Operator's ServiceMonitor and PrometheusRule CRDs from its Go module
# (pinned beside this script, checked against go.sum; nothing is built) into a cache directory
# outside the repository keyed by the module's version. Prints that directory on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../controlplane/lib.sh"
module=github.com/prometheus-operator/prometheus-operator
VERSION="$(mod_version "$module" "$here/go.mod")"
[[ -n "$VERSION" ]] || { echo "tests/prometheus-operator/crds.sh: $module not found in go.mod" >&2; exit 1; }
dest="$(cache_root)/prometheus-operator-crds-$VERSION"
files=(monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_prometheusrules.yaml)

if [[ -f "$dest/${files[-1]}" ]]; then
  echo "$dest"
  exit 0
fi

echo "fetching the CRDs of $module $VERSION" >&2
dir="$(cd "$here" && GOFLAGS=-mod=mod go mod download -json "$module" |
  sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[[ -d "$dir" ]] || { echo "tests/prometheus-operator/crds.sh: go mod download gave no directory" >&2; exit 1; }
mkdir -p "$dest"
for f in "${files[@]}"; do
  cp "$dir/example/prometheus-operator-crd/$f" "$dest/$f.tmp"
  mv "$dest/$f.tmp" "$dest/$f"
done
echo "$dest"
