# syntax=docker/dockerfile:1
# The three sharddb images from one build: `docker build --target <operator|router|shard-server>`.
# The builder stage is shared, so building the second and third target reuses the compiled
# workspace. The Postgres sidecar is not built here: it is the upstream `postgres` image, pinned
# by DEFAULT_POSTGRES_IMAGE in operator/src/crd.rs.

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# Dependencies first: this layer changes only when a manifest or the lock file does. Each member
# gets an empty library so cargo can read the workspace without its sources.
COPY Cargo.toml Cargo.lock ./
COPY shard-server/Cargo.toml shard-server/
COPY router/Cargo.toml router/
COPY operator/Cargo.toml operator/
COPY localpg/Cargo.toml localpg/
COPY tests/Cargo.toml tests/
COPY fake-apiserver/Cargo.toml fake-apiserver/
RUN for m in shard-server router operator localpg tests fake-apiserver; do \
      mkdir -p "$m/src" && touch "$m/src/lib.rs" && printf 'fn main() {}\n' > "$m/src/main.rs"; \
    done \
 && cargo fetch --locked
COPY . .
# The whole workspace resolves features as scripts/test.sh does; only the binaries are built.
RUN cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && cp target/release/sharddb-operator target/release/sharddb-router target/release/sharddb-shard-server /out/

FROM ${RUNTIME_IMAGE} AS operator
COPY --from=builder /out/sharddb-operator /usr/local/bin/sharddb-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/sharddb-operator"]
CMD ["run"]

FROM ${RUNTIME_IMAGE} AS router
COPY --from=builder /out/sharddb-router /usr/local/bin/sharddb-router
USER 65532:65532
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/sharddb-router"]

# The operator runs this image as uid 999 (the upstream postgres image's user) so that both
# containers of a server pod share one security context; 65532 is the default elsewhere.
FROM ${RUNTIME_IMAGE} AS shard-server
COPY --from=builder /out/sharddb-shard-server /usr/local/bin/sharddb-shard-server
USER 65532:65532
EXPOSE 5000
ENTRYPOINT ["/usr/local/bin/sharddb-shard-server"]
