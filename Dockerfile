# Multi-stage build of the one `kasmina` binary (controller, builder, runtime, tools).
# Not built in CI here: the development machines run no Docker engine.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY e2e ./e2e
COPY tests ./tests
COPY benches ./benches
RUN cargo build --release --locked --bin kasmina --bin kubectl-kasmina

# Distroless with glibc and libgcc, nonroot user 65532, no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/kasmina /usr/local/bin/kasmina
# The kubectl plugin, for `docker cp` or `kubectl exec`; usually installed with cargo.
COPY --from=build /src/target/release/kubectl-kasmina /usr/local/bin/kubectl-kasmina
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kasmina"]
CMD ["--help"]
