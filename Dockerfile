# syntax=docker/dockerfile:1
# imgflow images: `docker build --target api .` and `--target worker`
# (compose.yml builds both). The build stage runs `make build`, the same
# command CI and `make up` run: the built-in plugins for wasm32-wasip2, then
# host-api and host-worker in release.

FROM rust:1.95-bookworm AS build
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    make build \
 && mkdir -p /out/plugins \
 && cp target/release/host-api target/release/host-worker /out/ \
 && cp target/builtin-plugins/*.wasm /out/plugins/

# A slim runtime, shared by both services: no compiler, a non-root user,
# curl for the healthchecks, /data for storage (a volume in compose.yml).
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin imgflow \
 && mkdir -p /app/plugins /data/storage /data/compiled \
 && chown -R imgflow:imgflow /data
WORKDIR /app
ENV STORAGE_URL=/data/storage \
    COMPILE_CACHE_DIR=/data/compiled \
    LOG_FORMAT=json

FROM runtime AS api
COPY --from=build /out/host-api /usr/local/bin/host-api
USER imgflow
ENV API_ADDR=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["host-api"]

FROM runtime AS worker
COPY --from=build /out/host-worker /usr/local/bin/host-worker
COPY --from=build /out/plugins/ /app/plugins/
USER imgflow
ENV PLUGINS_DIR=/app/plugins \
    METRICS_ADDR=0.0.0.0:9091
EXPOSE 9091
HEALTHCHECK --interval=10s --timeout=3s CMD curl -fsS http://127.0.0.1:9091/healthz || exit 1
ENTRYPOINT ["host-worker", "serve"]
