#!/usr/bin/env bash
# The native launcher behind `make up`, `make down`, `make status` and
# `make logs`: the whole system without Docker.
#
#   up      install what is missing (Debian packages redis-server, postgresql,
#           prometheus, curl, jq; the wasm32-wasip2 target), start Redis and
#           PostgreSQL unless they already run, create the database, build
#           everything (make build), start Prometheus, the API and a worker
#           in the background, wait until they are ready, print the URLs.
#           Running it again starts only what is not running.
#   down    stop exactly what `up` started (Redis and PostgreSQL only if
#           `up` started them), nothing else.
#   status  what runs, and whether it answers.
#   logs    the last lines of every log (FOLLOW=1 to follow).
#
# State (pid files, logs, storage, Prometheus data, the admin token) lives in
# IMGFLOW_STATE_DIR, by default .imgflow/ in the repository.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=${IMGFLOW_STATE_DIR:-$ROOT/.imgflow}
API_PORT=${API_PORT:-8080}
METRICS_PORT=${METRICS_PORT:-9091}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
REDIS_PORT=${REDIS_PORT:-6379}
PG_PORT=${PG_PORT:-5432}
# The database `up` creates, and the role that owns it.
DB_NAME=${IMGFLOW_DB_NAME:-imgflow}
DB_USER=${IMGFLOW_DB_USER:-imgflow}
DB_PASSWORD=${IMGFLOW_DB_PASSWORD:-imgflow}

export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly, or through sudo.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

pid_of() { cat "$STATE/pids/$1.pid" 2>/dev/null || true; }

# Whether the process `up` recorded as $1 still runs.
running() {
  local pid
  pid=$(pid_of "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install_missing() {
  local packages=()
  command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
  command -v pg_ctlcluster >/dev/null 2>&1 || packages+=(postgresql)
  command -v prometheus >/dev/null 2>&1 || packages+=(prometheus)
  command -v curl >/dev/null 2>&1 || packages+=(curl)
  command -v jq >/dev/null 2>&1 || packages+=(jq)
  if [ ${#packages[@]} -gt 0 ]; then
    say "installing ${packages[*]} (Debian packages)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
  fi
  command -v cargo >/dev/null 2>&1 || die "Rust is missing: install it with rustup (https://rustup.rs), then run make up again"
  if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    say "adding the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
  fi
}

start_redis() {
  if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    say "Redis already runs on $REDIS_PORT (left alone)"
    return
  fi
  say "starting Redis on $REDIS_PORT (AOF in $STATE/redis)"
  mkdir -p "$STATE/redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" \
    --dir "$STATE/redis" --appendonly yes --appendfsync everysec \
    --maxmemory-policy noeviction \
    --pidfile "$STATE/pids/redis.pid" --logfile "$STATE/logs/redis.log"
  for _ in $(seq 50); do
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "Redis did not start; see $STATE/logs/redis.log"
}

start_postgres() {
  if pg_isready -h 127.0.0.1 -p "$PG_PORT" -q 2>/dev/null; then
    say "PostgreSQL already runs on $PG_PORT (left alone)"
    return
  fi
  local cluster
  cluster=$(pg_lsclusters --no-header 2>/dev/null | awk -v port="$PG_PORT" '$3 == port { print $1 " " $2; exit }')
  [ -n "$cluster" ] || die "no PostgreSQL cluster on port $PG_PORT (pg_lsclusters); create one with pg_createcluster"
  say "starting PostgreSQL cluster $cluster"
  # shellcheck disable=SC2086
  as_root pg_ctlcluster --skip-systemctl-redirect $cluster start
  echo "$cluster" > "$STATE/pids/postgres.cluster"
  for _ in $(seq 100); do
    pg_isready -h 127.0.0.1 -p "$PG_PORT" -q && return
    sleep 0.1
  done
  die "PostgreSQL did not start"
}

# psql as a superuser: over TCP when the server trusts local connections,
# else through the postgres system user (Debian's peer authentication).
admin_psql() {
  if psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -w -tAc 'SELECT 1' >/dev/null 2>&1; then
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -w -v ON_ERROR_STOP=1 -tA "$@"
  elif [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- psql -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 -tA "$@"
  else
    sudo -u postgres psql -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 -tA "$@"
  fi
}

create_database() {
  if [ "$(admin_psql -c "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'")" != 1 ]; then
    say "creating role $DB_USER"
    admin_psql -c "CREATE ROLE \"$DB_USER\" LOGIN PASSWORD '$DB_PASSWORD'" >/dev/null
  fi
  # CREATEDB: `make test` creates a database per test as this role when the
  # server does not trust local connections (scripts/test-deps.sh --pg-url).
  admin_psql -c "ALTER ROLE \"$DB_USER\" CREATEDB" >/dev/null
  if [ "$(admin_psql -c "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")" != 1 ]; then
    say "creating database $DB_NAME"
    admin_psql -c "CREATE DATABASE \"$DB_NAME\" OWNER \"$DB_USER\"" >/dev/null
  fi
}

# Starts `$1` in the background (its own session, so `down` can stop the
# whole group) unless it already runs; output goes to $STATE/logs/$1.log.
launch() {
  local name=$1 port=$2
  shift 2
  if running "$name"; then
    say "$name already runs (pid $(pid_of "$name"))"
    return
  fi
  if port_busy "$port"; then
    die "port $port (for $name) is taken by another program; stop it, or choose another with API_PORT, METRICS_PORT or PROMETHEUS_PORT"
  fi
  say "starting $name"
  setsid "$@" >>"$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE/pids/$name.pid"
}

write_prometheus_config() {
  mkdir -p "$STATE/prometheus"
  cat > "$STATE/prometheus/prometheus.yml" <<EOF
# Written by scripts/native.sh: prometheus/prometheus.yml's jobs and rules,
# with the native services on localhost.
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
  - "$ROOT/prometheus/rules/*.yml"
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["127.0.0.1:$PROMETHEUS_PORT"]
  - job_name: api-gateway
    static_configs:
      - targets: ["127.0.0.1:$API_PORT"]
  - job_name: worker-service
    static_configs:
      - targets: ["127.0.0.1:$METRICS_PORT"]
EOF
}

wait_for() {
  local what=$1 url=$2 seconds=$3 log=$4
  for _ in $(seq $((seconds * 5))); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && return
    sleep 0.2
  done
  tail -n 30 "$log" >&2 || true
  die "$what did not answer $url within ${seconds}s (log: $log)"
}

up() {
  mkdir -p "$STATE/pids" "$STATE/logs" "$STATE/storage" "$STATE/compiled"
  install_missing
  start_redis
  start_postgres
  create_database
  say "building (make build)"
  make -s build
  # Secrets, generated once (256 random bits each, 64 hex digits): the
  # admin token, the key of the worker's compiled-code cache, and the key
  # that signs result URLs. A token from an older launcher, shorter than
  # the API accepts, is replaced.
  for secret in admin-token cache-secret result-url-secret; do
    if [ ! -s "$STATE/$secret" ] || [ "$(wc -c < "$STATE/$secret")" -lt 32 ]; then
      head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$STATE/$secret"
    fi
    chmod 600 "$STATE/$secret"
  done

  write_prometheus_config
  launch prometheus "$PROMETHEUS_PORT" prometheus \
    --config.file="$STATE/prometheus/prometheus.yml" \
    --storage.tsdb.path="$STATE/prometheus/data" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT"

  local common=(
    DATABASE_URL="postgres://$DB_USER:$DB_PASSWORD@127.0.0.1:$PG_PORT/$DB_NAME"
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
    STORAGE_URL="$STATE/storage"
    LOG_FORMAT=text
    RUST_LOG="${RUST_LOG:-info}"
  )
  launch api "$API_PORT" env "${common[@]}" \
    API_ADDR="0.0.0.0:$API_PORT" \
    AUTH_REQUIRED=true \
    IMGFLOW_ADMIN_TOKEN="$(cat "$STATE/admin-token")" \
    RESULT_URL_SECRET="$(cat "$STATE/result-url-secret")" \
    "$ROOT/target/release/host-api"
  launch worker "$METRICS_PORT" env "${common[@]}" \
    METRICS_ADDR="0.0.0.0:$METRICS_PORT" \
    PLUGINS_DIR="$ROOT/target/builtin-plugins" \
    COMPILE_CACHE_DIR="$STATE/compiled" \
    COMPILE_CACHE_SECRET="$(cat "$STATE/cache-secret")" \
    "$ROOT/target/release/host-worker" serve

  wait_for Prometheus "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" 30 "$STATE/logs/prometheus.log"
  wait_for "the API" "http://127.0.0.1:$API_PORT/readyz" 60 "$STATE/logs/api.log"
  wait_for "the worker" "http://127.0.0.1:$METRICS_PORT/healthz" 60 "$STATE/logs/worker.log"
  for _ in $(seq 300); do
    curl -fsS "http://127.0.0.1:$API_PORT/v1/plugins" 2>/dev/null | grep -q '"grayscale"' && break
    sleep 0.2
  done
  curl -fsS "http://127.0.0.1:$API_PORT/v1/plugins" | grep -q '"grayscale"' \
    || die "the worker did not register the built-in plugins; see $STATE/logs/worker.log"
  # A first client key, for the README quickstart (jobs need one); made
  # again when the database no longer knows the one kept (a new database,
  # or the key revoked), so the printed curl commands keep working.
  if [ -s "$STATE/client-key" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' \
      -H "Authorization: Bearer $(cat "$STATE/client-key")" \
      "http://127.0.0.1:$API_PORT/v1/jobs?limit=1")" = 401 ]; then
    echo "The client key in $STATE/client-key is not a live key of this database; making a new one." >&2
    rm -f "$STATE/client-key"
  fi
  if [ ! -s "$STATE/client-key" ]; then
    curl -fsS -X POST -H "Authorization: Bearer $(cat "$STATE/admin-token")" \
      -H 'Content-Type: application/json' -d '{"name": "make-up"}' \
      "http://127.0.0.1:$API_PORT/v1/keys" | jq -r .key > "$STATE/client-key.new" \
      || die "cannot create the first client key; see $STATE/logs/api.log"
    mv "$STATE/client-key.new" "$STATE/client-key"
    chmod 600 "$STATE/client-key"
  fi

  cat <<EOF

imgflow is up.
  API          http://localhost:$API_PORT      (client key: cat ${STATE#"$ROOT"/}/client-key; admin token: cat ${STATE#"$ROOT"/}/admin-token)
  Console      http://localhost:$API_PORT/console   (sign in with the client key or the admin token)
  Worker       http://localhost:$METRICS_PORT/metrics
  Prometheus   http://localhost:$PROMETHEUS_PORT
  Grafana      with Docker only (docker compose up): http://localhost:3000
  Logs         make logs     State: make status     Stop: make down

Try it:
  curl -s -H "Authorization: Bearer \$(cat ${STATE#"$ROOT"/}/client-key)" -F image=@tests/fixtures/photos/kodim23.png -F action=grayscale http://localhost:$API_PORT/v1/jobs
EOF
}

# Stops `$1` if `up` started it and it still runs: SIGTERM to its process
# group, then SIGKILL after `$2` seconds.
stop() {
  local name=$1 grace=$2 pid
  pid=$(pid_of "$name")
  if [ -z "$pid" ]; then return; fi
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping $name (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((grace * 10))); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name did not stop within ${grace}s; killing it"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$STATE/pids/$name.pid"
}

down() {
  # The API first (no new jobs), then the worker (finishes its jobs).
  stop api 15
  stop worker 40
  stop prometheus 15
  if [ -f "$STATE/pids/redis.pid" ]; then
    say "stopping Redis (started by make up)"
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || stop redis 10
    rm -f "$STATE/pids/redis.pid"
  fi
  if [ -f "$STATE/pids/postgres.cluster" ]; then
    say "stopping PostgreSQL cluster $(cat "$STATE/pids/postgres.cluster") (started by make up)"
    # shellcheck disable=SC2046
    as_root pg_ctlcluster --skip-systemctl-redirect $(cat "$STATE/pids/postgres.cluster") stop || true
    rm -f "$STATE/pids/postgres.cluster"
  fi
  say "stopped"
}

status() {
  local name
  for name in api worker prometheus redis; do
    if running "$name"; then
      printf '%-11s running (pid %s)\n' "$name" "$(pid_of "$name")"
    elif [ "$name" = redis ] && redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
      printf '%-11s running (not started by make up)\n' "$name"
    else
      printf '%-11s stopped\n' "$name"
    fi
  done
  if pg_isready -h 127.0.0.1 -p "$PG_PORT" -q 2>/dev/null; then
    printf '%-11s running%s\n' postgresql "$([ -f "$STATE/pids/postgres.cluster" ] || echo ' (not started by make up)')"
  else
    printf '%-11s stopped\n' postgresql
  fi
  printf 'readyz      %s\n' "$(curl -s "http://127.0.0.1:$API_PORT/readyz" 2>/dev/null || echo 'no answer')"
  local up
  up=$(curl -s "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query?query=up" 2>/dev/null || true)
  if [ -z "$up" ]; then
    printf 'targets     Prometheus does not answer\n'
  elif command -v jq >/dev/null 2>&1; then
    printf 'targets     %s\n' "$(jq -r '[.data.result[] | "\(.metric.job)=\(.value[1])"] | join(" ")' <<<"$up")"
  else
    printf 'targets     %s\n' "$up"
  fi
}

logs() {
  shopt -s nullglob
  local files=("$STATE"/logs/*.log)
  [ ${#files[@]} -gt 0 ] || die "no logs yet in $STATE/logs (run make up)"
  if [ "${FOLLOW:-0}" = 1 ]; then
    tail -n "${LINES:-40}" -F "${files[@]}"
  else
    tail -n "${LINES:-40}" "${files[@]}"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  logs) logs ;;
  *) die "usage: $0 up|down|status|logs" ;;
esac
