#!/usr/bin/env bash
# What `make test` needs beyond Rust, installed only when missing (so a run
# on a prepared machine costs a few checks):
#   - the wasm32-wasip2 and wasm32-wasip1 targets, clippy and rustfmt;
#   - cargo-component 0.21.1 (about ten minutes to build the first time);
#   - s3s-fs 0.14.1, an S3 server the S3 test runs against (a few minutes,
#     once);
#   - Debian packages: jq, curl, prometheus (prometheus and promtool, for the
#     rule tests and the real-Prometheus test), docker-compose (validates
#     compose.yml; no Docker engine is needed), kubernetes-client (`kubectl
#     kustomize` renders deploy/kubernetes; no cluster is needed);
#   - from PyPI: openapi-spec-validator (validates the API's OpenAPI
#     document), schemathesis (`st`, fuzzes the API from that document) and
#     kubernetes-validate (validates the rendered manifests offline);
#   - Debian's chromium and chromium-driver, and playwright from PyPI, for
#     the console's browser tests (Playwright drives the system Chromium).
# Redis and PostgreSQL must run: `make up` starts them on a fresh machine.
#
#   scripts/test-deps.sh           install what is missing
#   scripts/test-deps.sh --pg-url  print the PostgreSQL URL the tests create
#                                  their databases with: the postgres role
#                                  when the server trusts local connections,
#                                  else the role `make up` created (CREATEDB)
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"

if [ "${1:-}" = --pg-url ]; then
  if ! command -v psql >/dev/null 2>&1 \
    || psql -h 127.0.0.1 -p "${PG_PORT:-5432}" -U postgres -d postgres -w -tAc 'SELECT 1' >/dev/null 2>&1; then
    echo "postgres://postgres@127.0.0.1:${PG_PORT:-5432}/postgres"
  else
    echo "postgres://${IMGFLOW_DB_USER:-imgflow}:${IMGFLOW_DB_PASSWORD:-imgflow}@127.0.0.1:${PG_PORT:-5432}/postgres"
  fi
  exit 0
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else echo "error: need root (or sudo) to run: $*" >&2; exit 1
  fi
}

installed=$(rustup target list --installed)
for target in wasm32-wasip2 wasm32-wasip1; do
  grep -qx "$target" <<<"$installed" || rustup target add "$target"
done
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

if ! command -v cargo-component >/dev/null 2>&1; then
  echo "==> installing cargo-component (about ten minutes, once)"
  cargo install cargo-component --locked --version 0.21.1
fi

# An S3 server for the S3 end-to-end test (system-tests/tests/system/s3.rs). 0.14.1
# is the last release that builds with this machine's Rust.
if ! command -v s3s-fs >/dev/null 2>&1; then
  echo "==> installing s3s-fs (an S3 server; a few minutes, once)"
  cargo install s3s-fs --locked --version 0.14.1 --features binary
fi

missing=()
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v curl >/dev/null 2>&1 || missing+=(curl)
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
# Headless Chromium for the console's browser tests (Playwright drives this
# one; its own browser download cannot work offline).
command -v chromium >/dev/null 2>&1 || missing+=(chromium chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]} (Debian packages)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if ! command -v st >/dev/null 2>&1 || ! command -v openapi-spec-validator >/dev/null 2>&1; then
  echo "==> installing schemathesis and openapi-spec-validator (PyPI)"
  command -v python3 >/dev/null 2>&1 || { as_root apt-get update -qq; as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3; }
  if ! python3 -m pip --version >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip
  fi
  pkgs=(schemathesis==4.32.5 openapi-spec-validator==0.9.0)
  python3 -m pip install -q "${pkgs[@]}" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "${pkgs[@]}"
  # pyenv installs console scripts behind shims that need a rehash.
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
fi

if ! python3 -c 'import kubernetes_validate, jsonschema, yaml' >/dev/null 2>&1; then
  echo "==> installing kubernetes-validate (PyPI)"
  python3 -m pip install -q kubernetes-validate==1.37.0 2>/dev/null \
    || python3 -m pip install -q --break-system-packages kubernetes-validate==1.37.0
fi

if ! python3 -c 'import playwright.sync_api' >/dev/null 2>&1; then
  echo "==> installing playwright (PyPI; it drives the system chromium)"
  python3 -m pip install -q playwright==1.65.2 2>/dev/null \
    || python3 -m pip install -q --break-system-packages playwright==1.65.2
fi
