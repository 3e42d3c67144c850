#!/usr/bin/env bash
# `make load`: the end-to-end rows of docs/BENCHMARKS.md, against the system
# `make up` started (this starts nothing). Each run submits distinct image
# bytes, so the result cache cannot answer and every job really runs.
#
#   IMGFLOW_API_URL  default http://127.0.0.1:8080
#   IMGFLOW_KEY      default: the key `make up` provisioned (.imgflow/client-key)
#   LOAD_DURATION    default 10s per run
set -euo pipefail
cd "$(dirname "$0")/.."
export IMGFLOW_API_URL="${IMGFLOW_API_URL:-http://127.0.0.1:8080}"
if [ -z "${IMGFLOW_KEY:-}" ] && [ -f .imgflow/client-key ]; then
  IMGFLOW_KEY=$(cat .imgflow/client-key)
fi
export IMGFLOW_KEY="${IMGFLOW_KEY:-}"
[ -n "$IMGFLOW_KEY" ] || unset IMGFLOW_KEY
duration="${LOAD_DURATION:-10s}"
load=target/release/imgflow-load
photo=tests/fixtures/photos/kodim23.png
curl -fsS "$IMGFLOW_API_URL/healthz" >/dev/null \
  || { echo "error: no API at $IMGFLOW_API_URL; start the system with make up" >&2; exit 1; }

echo "## make load ($(nproc) cores, $(date -u +%Y-%m-%d), $duration a run)"
echo
# CPU time of each part of the system over a run, from /proc (ticks of user
# + system time of every process with that name), as % of one core.
cpu_ticks() {
  for name in postgres redis-server host-api host-worker imgflow-load; do
    total=0
    for pid in $(pgrep -x "$name" || true); do
      t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
      total=$((total + t))
    done
    echo "$name $total"
  done
}

echo "### Small jobs (64x64 PNG, grayscale), flat out, 32 clients"
before=$(cpu_ticks); started=$(date +%s.%N)
$load --action grayscale --image small --clients 32 --duration "$duration"
after=$(cpu_ticks); ended=$(date +%s.%N)
echo
echo "CPU during that run (100% = one core busy; $(nproc) cores), submitting and draining:"
echo
echo "| process | CPU |"
echo "|---|---:|"
paste <(echo "$before") <(echo "$after") | awk -v secs="$(echo "$ended - $started" | bc -l)" -v hz="$(getconf CLK_TCK)" \
  '{ printf "| %s | %.0f%% |\n", $1, ($4 - $2) / hz / secs * 100 }'
echo
echo "### Small jobs at a steady 500 jobs/s"
$load --action grayscale --image small --rate 500 --clients 64 --duration "$duration"
echo
echo "### Photo jobs (kodim23 PNG in, PNG out), flat out, 4 clients: grayscale"
$load --action grayscale --image "$photo" --clients 4 --duration "$duration"
echo
echo "### Photo jobs: blur sigma=2"
$load --action blur --param sigma=2 --image "$photo" --clients 4 --duration "$duration"
echo
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
