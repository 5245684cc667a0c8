#!/usr/bin/env bash
# Builds the real Vault binary that the end-to-end tests run as a raft HA cluster, from the Go
# module pinned beside this script, into a cache directory outside the repository keyed by
# Vault's version. Prints the binary's path on stdout. A no-op when the binary is there.
#
# Vault's own module cannot be built as published: its go.mod points the nested sdk module at
# ./sdk, which the module zip leaves out, and the published sdk versions do not match the
# in-tree one. The build therefore runs in a scratch copy of this module that replaces the sdk
# with a patched copy of the version Vault requires (see patch_sdk). Vault's code is never
# written into the repository.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# A module's version in go.mod, whether it stands in a require block or on a require line.
mod_version() {
  awk -v m="$1" '$1 == "require" && $2 == m { print $3; exit } $1 == m { print $2; exit }' "$2"
}

VAULT="$(mod_version github.com/hashicorp/vault "$here/go.mod")"
SDK="$(mod_version github.com/hashicorp/vault/sdk "$here/go.mod")"
cache_root="${VAULT_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vault-registrar}"
[[ -n "$VAULT" && -n "$SDK" ]] || { echo "tests/vault/build.sh: versions not found in go.mod" >&2; exit 1; }
dest="$cache_root/vault-$VAULT"
binary="$dest/vault"

if [[ -x "$binary" ]]; then
  echo "$binary"
  exit 0
fi

export CGO_ENABLED=0 GOFLAGS=-mod=mod
work="$(mktemp -d "${TMPDIR:-/tmp}/vault-registrar-vault-build.XXXXXX")"
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

fail() { echo "tests/vault/build.sh: $*" >&2; exit 1; }

# Replaces the text $2 by $3 in file $1, and fails when $2 is absent: a silent no-op would
# only show up as a compile error far from its cause after a version bump.
replace_in() {
  local file="$1" from="$2" to="$3"
  grep -qF -- "$from" "$file" || fail "expected text not found in $file: $from"
  FROM="$from" TO="$to" perl -0pi -e 's/\Q$ENV{FROM}\E/$ENV{TO}/g' "$file"
}

# The published sdk $SDK is what Vault's go.mod requires, but Vault $VAULT was released against
# its in-tree sdk, which differs in two places the build reaches:
# - ActivationFunc lost the string argument that $SDK added;
# - LockManager.RestorePolicy returns (string, error), as the published sdk does from v0.24.0.
patch_sdk() {
  local sdk_dir="$1" newer
  replace_in "$sdk_dir/framework/backend.go" \
    'ActivationFunc func(context.Context, *logical.Request, string) error' \
    'ActivationFunc func(context.Context, *logical.Request) error'
  newer="$(cd "$work" && go mod download -json github.com/hashicorp/vault/sdk@v0.24.0 |
    awk -F'"' '$2 == "Dir" { print $4 }')"
  [[ -f "$newer/helper/keysutil/lock_manager.go" ]] || fail "sdk v0.24.0 was not downloaded"
  cp "$newer/helper/keysutil/lock_manager.go" "$sdk_dir/helper/keysutil/lock_manager.go"
}

echo "building Vault $VAULT (sdk $SDK, patched) in $work; about 8 minutes cold on 2 cores" >&2
# Everything runs in the scratch copy, so the go commands never touch the repository's files.
cp "$here/go.mod" "$here/go.sum" "$here/tools.go" "$work/"
sdk_src="$(cd "$work" && go mod download -json "github.com/hashicorp/vault/sdk@$SDK" |
  awk -F'"' '$2 == "Dir" { print $4 }')"
[[ -d "$sdk_src" ]] || fail "sdk $SDK was not downloaded"
cp -r "$sdk_src" "$work/sdk"
chmod -R u+w "$work/sdk"
patch_sdk "$work/sdk"
(cd "$work" && go mod edit -replace "github.com/hashicorp/vault/sdk=./sdk")

build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
mkdir -p "$dest"
(cd "$work" && go build -trimpath \
  -ldflags "-s -w -X github.com/hashicorp/vault/version.BuildDate=$build_date" \
  -o "$binary.tmp" github.com/hashicorp/vault)
"$binary.tmp" version | grep -qF "Vault $VAULT" || fail "built binary does not report Vault $VAULT"
mv "$binary.tmp" "$binary"
echo "$binary"
