# syntax=docker/dockerfile:1
#
# Container image of the vault-registrar operator.
#
#   docker build -t ghcr.io/vault-registrar/vault-registrar:0.1.0 .
#
# Not built on the development machines: no Docker engine runs there. Build it in CI or on a
# machine with Docker/BuildKit.

# Build stage: the release binary, with the exact dependency versions of Cargo.lock. The whole
# workspace is copied because Cargo needs every member (tests/testkit) to resolve it.
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin vault-registrar \
    && install -m 0755 target/release/vault-registrar /vault-registrar

# Runtime stage. The binary links glibc (libc, libm, libgcc_s), so distroless/static will not
# do; distroless/cc carries exactly those libraries and CA certificates, and no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /vault-registrar /vault-registrar
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/vault-registrar"]
CMD ["run"]
