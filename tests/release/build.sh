#!/usr/bin/env bash
# Builds the operator of a previous release (a git tag, v0.1.0 by default) and exports its
# chart, for tests/release_upgrade.rs: the tagged tree is taken with `git archive` into a
# scratch directory and built there (`cargo build --locked`, debug, its own target
# directory), so the working tree's target is untouched. The result goes into a cache
# directory outside the repository keyed by the tag's commit:
#   <cache>/release-<commit>/vault-registrar   the binary
#   <cache>/release-<commit>/chart/            the chart (charts/vault-registrar at the tag)
# Prints that directory on stdout. A no-op when it is there. Fails, saying why, when the tag
# or its commit is not in the repository (a shallow clone, or tags not fetched).
set -euo pipefail

tag="${1:-v0.1.0}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if ! repo="$(git -C "$here" rev-parse --show-toplevel 2>/dev/null)"; then
  echo "tests/release/build.sh: $here is not in a git clone; the upgrade test builds the" \
    "previous release ($tag) from the clone's history" >&2
  exit 1
fi
if ! commit="$(git -C "$repo" rev-parse --verify --quiet "refs/tags/$tag^{commit}")"; then
  echo "tests/release/build.sh: tag $tag is not in $repo; fetch it (git fetch --tags origin)," \
    "or clone without --depth: the upgrade test needs the previous release" >&2
  exit 1
fi
if ! git -C "$repo" cat-file -e "$commit^{tree}" 2>/dev/null; then
  echo "tests/release/build.sh: commit $commit of tag $tag is missing (a shallow clone?);" \
    "git fetch --unshallow --tags" >&2
  exit 1
fi
cache_root="${VAULT_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vault-registrar}"
dest="$cache_root/release-$commit"
if [[ -x "$dest/vault-registrar" && -f "$dest/chart/Chart.yaml" ]]; then
  echo "$dest"
  exit 0
fi

scratch="$(mktemp -d "${TMPDIR:-/tmp}/vault-registrar-release.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
echo "building vault-registrar $tag ($commit) in $scratch" >&2
git -C "$repo" archive "$commit" | tar -x -C "$scratch"
(cd "$scratch" && CARGO_TARGET_DIR="$scratch/target" cargo build --locked --quiet --bin vault-registrar)
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
cp "$scratch/target/debug/vault-registrar" "$dest.tmp/"
cp -r "$scratch/charts/vault-registrar" "$dest.tmp/chart"
echo "$commit" > "$dest.tmp/commit"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "$dest"
