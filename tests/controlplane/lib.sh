# Shared by the scripts that build or fetch what the tests run (sourced, not run): where the
# cache is, which version a go.mod pins, the stamp of a Kubernetes release, and one binary
# built into the cache unless it is there.

# The -ldflags that make a Kubernetes binary report release $1 (e.g. v1.35.4).
k8s_stamp() {
  local version="$1" major minor pkg stamp="" date
  date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  major="$(echo "${version#v}" | cut -d. -f1)"
  minor="$(echo "${version#v}" | cut -d. -f2)"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    stamp+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date -X $pkg.gitCommit=release-$version"
  done
  echo "$stamp"
}

# build_into BIN_DIR NAME MODULE_DIR PACKAGE LDFLAGS: a static, stripped build, atomically
# moved into place; a no-op when BIN_DIR/NAME exists.
build_into() {
  local bin="$1" name="$2" dir="$3" pkg="$4" flags="$5"
  if [[ -x "$bin/$name" ]]; then return; fi
  echo "building $name from $pkg" >&2
  (cd "$dir" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w $flags" -o "$bin/$name.tmp" "$pkg")
  mv "$bin/$name.tmp" "$bin/$name"
}

# mod_version MODULE GO_MOD: the version GO_MOD requires (in a block or on a require line).
mod_version() { awk -v m="$1" '$1 == m || ($1 == "require" && $2 == m) { print ($1 == m ? $2 : $3); exit }' "$2"; }

cache_root() { echo "${VAULT_REGISTRAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vault-registrar}"; }
