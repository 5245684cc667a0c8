# syntax=docker/dockerfile:1
#
# Container image of the vault-registrar operator.
#
#   docker build -t ghcr.io/vault-registrar/vault-registrar:0.1.0 .
#
# The test kit (tests/testkit/src/image.rs) builds this file's runtime stage with buildah, as
# written, on a base assembled from Debian 12's own files in place of distroless (no registry
# is reachable there): keep the runtime stage to instructions that work on any base (COPY,
# USER, EXPOSE, ENTRYPOINT, CMD) and the binary's libraries to what distroless/cc holds.

# Build stage: the shipped binary (Cargo's `dist` profile: release with whole-program LTO),
# with the exact dependency versions of Cargo.lock. The whole
# workspace is copied because Cargo needs every member (tests/testkit) to resolve it.
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked --bin vault-registrar \
    && install -m 0755 target/dist/vault-registrar /vault-registrar

# Runtime stage. The binary links glibc (libc, libm, libgcc_s), so distroless/static will not
# do; distroless/cc carries exactly those libraries and CA certificates, and no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /vault-registrar /vault-registrar
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/vault-registrar"]
CMD ["run"]
