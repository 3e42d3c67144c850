#!/usr/bin/env bash
# `make load`: the end-to-end rows of docs/BENCHMARKS.md, against the system
# `make up` started (this starts nothing). Each run submits distinct image
# bytes, so the result cache cannot answer and every job really runs.
#
# For each run it prints what imgflow-load measured (accepted and completed
# per second, submit-to-completed percentiles from the job records), the CPU
# each process used over the run, from its first submission until every
# accepted job finished (from /proc: PostgreSQL, Redis, the API, the worker,
# and imgflow-load itself), and PostgreSQL's work per completed job (from
# pg_stat_database and pg_stat_user_tables: commits, tuples read, row
# updates of `jobs` and how many of them were HOT).
#
#   IMGFLOW_API_URL   default http://127.0.0.1:8080
#   IMGFLOW_KEY       default: the key `make up` provisioned (.imgflow/client-key)
#   LOAD_DURATION     default 10s: the flat-out and photo runs
#   LOAD_RATE         default 1000: the fixed-rate run's jobs per second
#   LOAD_RATE_DURATION default 60s: the fixed-rate run
#   LOAD_RATE_RUNS    default 1: how many fixed-rate runs, one after the other
#   LOAD_PHOTOS       default 1: 0 skips the photo runs and libvips
#   IMGFLOW_PG        default: psql to the database `make up` created
set -euo pipefail
cd "$(dirname "$0")/.."
export IMGFLOW_API_URL="${IMGFLOW_API_URL:-http://127.0.0.1:8080}"
if [ -z "${IMGFLOW_KEY:-}" ] && [ -f .imgflow/client-key ]; then
  IMGFLOW_KEY=$(cat .imgflow/client-key)
fi
export IMGFLOW_KEY="${IMGFLOW_KEY:-}"
[ -n "$IMGFLOW_KEY" ] || unset IMGFLOW_KEY
duration="${LOAD_DURATION:-10s}"
rate="${LOAD_RATE:-1000}"
rate_duration="${LOAD_RATE_DURATION:-60s}"
rate_runs="${LOAD_RATE_RUNS:-1}"
load=target/release/imgflow-load
photo=tests/fixtures/photos/kodim23.png
pg="${IMGFLOW_PG:-postgres://${IMGFLOW_DB_USER:-imgflow}:${IMGFLOW_DB_PASSWORD:-imgflow}@127.0.0.1:${PG_PORT:-5432}/${IMGFLOW_DB_NAME:-imgflow}}"
curl -fsS "$IMGFLOW_API_URL/healthz" >/dev/null \
  || { echo "error: no API at $IMGFLOW_API_URL; start the system with make up" >&2; exit 1; }

# imgflow-load measures the system itself, from its first submission until
# every accepted job has finished: CPU per process (/proc) and PostgreSQL's
# work (psql, pg_stat_*).
export IMGFLOW_PG="$pg"
measure() {
  local title=$1
  shift
  echo "### $title"
  echo
  $load "$@" | sed -n '/^| figure/,$p'
  echo
}

echo "## make load ($(nproc) cores, $(date -u +%Y-%m-%d), $duration a run)"
echo
# The kernel's writeback settings shape the tail at a fixed rate (README,
# "How a job flows": one disk for PostgreSQL and the storage directory).
vm() { cat "/proc/sys/vm/$1" 2>/dev/null || echo '?'; }
echo "Kernel writeback: vm.dirty_background_bytes=$(vm dirty_background_bytes)" \
  "(0: vm.dirty_background_ratio=$(vm dirty_background_ratio)% of memory)," \
  "vm.dirty_expire_centisecs=$(vm dirty_expire_centisecs)," \
  "vm.dirty_writeback_centisecs=$(vm dirty_writeback_centisecs)"
echo
measure "Small jobs (64x64 PNG, grayscale), flat out, 32 clients, $duration" \
  --action grayscale --image small --clients 32 --duration "$duration"
for run in $(seq "$rate_runs"); do
  measure "Small jobs at a steady $rate jobs/s for $rate_duration (run $run of $rate_runs)" \
    --action grayscale --image small --rate "$rate" --clients 256 --duration "$rate_duration"
done
if [ "${LOAD_PHOTOS:-1}" = 0 ]; then
  exit 0
fi
measure "Photo jobs (kodim23 PNG in, PNG out), flat out, 4 clients: grayscale" \
  --action grayscale --image "$photo" --clients 4 --duration "$duration"
measure "Photo jobs: blur sigma=2" \
  --action blur --param sigma=2 --image "$photo" --clients 4 --duration "$duration"
if vips=$(python3 scripts/vips_bench.py "$photo" 2 2>/dev/null); then
  python3 - "$vips" <<'PY'
import json, sys
v = json.loads(sys.argv[1])
g, b = v["job_grayscale"], v["job_blur_2"]
print("### libvips %s, the same photo job in one thread (decode, filter, PNG encode)" % v["libvips_version"])
print()
print("| job | ms per job | jobs/s on 2 cores |")
print("|---|---:|---:|")
print("| grayscale | %.1f | %.0f |" % (g, 2000 / g))
print("| blur sigma=2 | %.1f | %.0f |" % (b, 2000 / b))
PY
else
  echo "libvips: not measured (run scripts/bench-deps.sh)"
fi
