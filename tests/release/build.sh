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
# The commit each release tag names, so that a clone without tags still finds the release
# in its history, and a built release is found in the cache without git at all.
declare -A PINNED=([v0.1.0]=69494b771ffa57b58c0e6449694406e8a8315370)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(git -C "$here" rev-parse --show-toplevel 2>/dev/null || true)"
commit=""
if [[ -n "$repo" ]]; then
  commit="$(git -C "$repo" rev-parse --verify --quiet "refs/tags/$tag^{commit}" || true)"
fi
commit="${commit:-${PINNED[$tag]:-}}"
if [[ -z "$commit" ]]; then
  echo "tests/release/build.sh: tag $tag is not in the clone and no commit is pinned for it;" \
    "fetch it (git fetch --tags origin)" >&2
  exit 1
fi
cache_root="${VAULT_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vault-registrar}"
dest="$cache_root/release-$commit"
if [[ -x "$dest/vault-registrar" && -f "$dest/chart/Chart.yaml" ]]; then
  echo "$dest"
  exit 0
fi
if [[ -z "$repo" ]]; then
  echo "tests/release/build.sh: $here is not in a git clone; the upgrade test builds the" \
    "previous release ($tag) from the clone's history" >&2
  exit 1
fi
if ! git -C "$repo" cat-file -e "$commit^{tree}" 2>/dev/null; then
  echo "tests/release/build.sh: commit $commit of $tag is missing (a shallow clone?);" \
    "git fetch --unshallow --tags" >&2
  exit 1
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
