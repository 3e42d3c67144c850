#!/usr/bin/env bash
# `make load-scale`: whether the job path's cost depends on history or on
# queue depth (docs/BENCHMARKS.md, "The job path"). Against the system
# `make up` started (this starts nothing), with its client key:
#
#   1. flat out on the table as it is;
#   2. the same after seeding, with SQL, SCALE_HISTORY finished jobs of the
#      same key (each the result cache's answer for its own key) and as many
#      of another client, all finished inside the overview's window, with
#      their per-minute rollups; no manual ANALYZE;
#   3. GET /v1/overview timed (operator and client) with those jobs in its
#      window;
#   4. flat out again with SCALE_QUEUED jobs of other keys queued (recorded
#      as unfinished and not on the stream, as with the workers stopped; the
#      sweeper is kept off them by their enqueue time);
#   5. the retention sweep on SCALE_EXPIRED jobs finished 8 days ago: rows
#      deleted per second (with JOB_RETENTION=7d, the default);
#   6. everything seeded deleted (its rollups subtracted) and the tables it
#      touched vacuumed, flat out again on the table as it was.
#
# Runs 2 and 4 are compared with the mean of runs 1 and 6, which bracket
# them: the machine's own drift over the benchmark's minutes (this 2-core
# machine's CPU per job for the same work moves by several per cent over
# ten minutes, Redis's and the load generator's too) is not counted as the
# history's cost. Each flat-out run prints what `make load` prints
# (completed/s, CPU per process, PostgreSQL commits and tuples read per
# job).
#
#   SCALE_HISTORY   default 1000000 (per client: two clients, so twice that in the window)
#   SCALE_QUEUED    default 100000
#   SCALE_EXPIRED   default 200000
#   LOAD_DURATION   default 10s
#   SCALE_RUNS      default 3: flat-out runs of each case (one after the
#                   other; each printed, then their median, which the
#                   comparison uses: one 10 s run varies by about 5%)
#   IMGFLOW_API_URL, IMGFLOW_KEY, IMGFLOW_PG, IMGFLOW_ADMIN_TOKEN: as `make load`
set -euo pipefail
cd "$(dirname "$0")/.."
export IMGFLOW_API_URL="${IMGFLOW_API_URL:-http://127.0.0.1:8080}"
if [ -z "${IMGFLOW_KEY:-}" ] && [ -f .imgflow/client-key ]; then
  IMGFLOW_KEY=$(cat .imgflow/client-key)
fi
export IMGFLOW_KEY="${IMGFLOW_KEY:?set IMGFLOW_KEY (make up writes .imgflow/client-key)}"
if [ -z "${IMGFLOW_ADMIN_TOKEN:-}" ] && [ -f .imgflow/admin-token ]; then
  IMGFLOW_ADMIN_TOKEN=$(cat .imgflow/admin-token)
fi
history="${SCALE_HISTORY:-1000000}"
queued="${SCALE_QUEUED:-100000}"
expired="${SCALE_EXPIRED:-200000}"
duration="${LOAD_DURATION:-10s}"
runs="${SCALE_RUNS:-3}"
load=target/release/imgflow-load
export IMGFLOW_PG="${IMGFLOW_PG:-postgres://${IMGFLOW_DB_USER:-imgflow}:${IMGFLOW_DB_PASSWORD:-imgflow}@127.0.0.1:${PG_PORT:-5432}/${IMGFLOW_DB_NAME:-imgflow}}"
sql() { psql "$IMGFLOW_PG" -v ON_ERROR_STOP=1 -qAtX "$@"; }
curl -fsS "$IMGFLOW_API_URL/healthz" >/dev/null \
  || { echo "error: no API at $IMGFLOW_API_URL; start the system with make up" >&2; exit 1; }

wal() { sql -c "SELECT wal_bytes, wal_fpi FROM pg_stat_wal" | tr '|' ' '; }
flat_out() { # title; each of SCALE_RUNS runs printed, then their median
  echo "### $1"
  echo
  local before after jobs0 jobs1 out rates=() run
  for run in $(seq "$runs"); do
    read -r -a before <<<"$(wal)"
    jobs0=$(rows)
    out=$($load --action grayscale --image small --clients 32 --duration "$duration" | sed -n '/^| figure/,$p')
    read -r -a after <<<"$(wal)"
    jobs1=$(rows)
    [ "$runs" = 1 ] || printf 'Run %s of %s:\n\n' "$run" "$runs"
    echo "$out"
    printf '| WAL bytes per job (full-page images per job) | %.0f (%.2f) |\n\n' \
      "$(echo "(${after[0]} - ${before[0]}) / ($jobs1 - $jobs0)" | bc -l)" \
      "$(echo "(${after[1]} - ${before[1]}) / ($jobs1 - $jobs0)" | bc -l)"
    rates+=("$(echo "$out" | sed -n 's/^| completed\/s [^|]*| \([0-9.]*\) |$/\1/p')")
  done
  median=$(printf '%s\n' "${rates[@]}" | sort -n | sed -n "$(((runs + 1) / 2))p")
  if [ "$runs" != 1 ]; then
    echo "completed/s in the $runs runs: ${rates[*]}; median $median"
    echo
  fi
}
# Writes everything the seeding dirtied, so that it is not written during
# the next run (needs a superuser or pg_checkpoint; skipped if refused).
checkpoint() {
  psql "${IMGFLOW_PG_ADMIN:-postgres://postgres@127.0.0.1:${PG_PORT:-5432}/postgres}" -qAtX \
    -c CHECKPOINT >/dev/null 2>&1 || psql "$IMGFLOW_PG" -qAtX -c CHECKPOINT >/dev/null 2>&1 || true
}

rows() { sql -c "SELECT count(*) FROM jobs"; }
echo "## make load-scale ($(nproc) cores, $(date -u +%Y-%m-%d), autovacuum $(sql -c 'SHOW autovacuum'))"
echo
checkpoint
flat_out "1. Flat out, the table as it is ($(rows) jobs)"
empty_median=$median

owner=$(sql -c "SELECT owner FROM jobs WHERE status = 'completed' AND owner NOT IN ('admin', 'anonymous')
                ORDER BY id DESC LIMIT 1")
[ -n "$owner" ] || { echo "error: no completed job of a client key to copy" >&2; exit 1; }

# A UUIDv7 for a given time (ids are in creation order; retention walks
# them). Seeded rows copy a real job of the key (every column), with their own
# id, files, cache key and times; input keys start with seed/ to find them.
seed() { # count owner finished-at-expression status
  sql <<SQL
CREATE OR REPLACE FUNCTION pg_temp.v7(at timestamptz) RETURNS uuid LANGUAGE sql AS \$\$
  SELECT (lpad(to_hex((extract(epoch FROM at) * 1000)::bigint), 12, '0') || '7'
          || substr(md5(random()::text), 1, 3) || '8' || substr(md5(random()::text), 1, 15))::uuid
\$\$;
CREATE TEMP TABLE tpl AS
  SELECT * FROM jobs WHERE owner = '$owner' AND status = 'completed' ORDER BY id DESC LIMIT 1;
INSERT INTO jobs
SELECT r.* FROM tpl, generate_series(1, $1) g,
  LATERAL (SELECT $3 AS at) t,
  LATERAL jsonb_populate_record(NULL::jobs, to_jsonb(tpl) || jsonb_build_object(
    'id', pg_temp.v7(t.at - interval '5 ms'), 'owner', '$2', 'status', '$4',
    'input_key', 'seed/in/' || g || '-' || '$2', 'output_key', 'seed/out/' || g || '-' || '$2',
    'cache_key', CASE WHEN '$4' = 'completed' THEN 'seed-' || g END,
    'idempotency_key', NULL, 'cached_from', NULL, 'retry_of', NULL, 'batch_id', NULL,
    'callback_url', NULL, 'callback_status', NULL, 'callback_next_at', NULL,
    'created_at', t.at - interval '5 ms',
    'started_at', CASE WHEN '$4' = 'completed' THEN t.at - interval '2 ms' END,
    'finished_at', CASE WHEN '$4' = 'completed' THEN t.at END)) r;
SQL
}

start=$(date +%s.%N)
seed "$history" "$owner" "now() - (g % 3500) * interval '1 second'" completed
seed "$history" "scale-other-client" "now() - (g % 3500) * interval '1 second'" completed
# What the outcome statement writes for each completed job: the cache's
# answer and the per-minute rollups.
rollup() { # sign
  sql <<SQL
INSERT INTO job_minutes (minute, action, bucket, completed)
  SELECT date_trunc('minute', finished_at), action, 1, $1 * count(*) FROM jobs
  WHERE input_key LIKE 'seed/%' AND status = 'completed' AND finished_at > now() - interval '2 hours'
  GROUP BY 1, 2
  ON CONFLICT (minute, action, bucket) DO UPDATE SET completed = job_minutes.completed + EXCLUDED.completed;
INSERT INTO job_minutes_by_owner (owner, minute, action, bucket, completed)
  SELECT owner, date_trunc('minute', finished_at), action, 1, $1 * count(*) FROM jobs
  WHERE input_key LIKE 'seed/%' AND status = 'completed' AND finished_at > now() - interval '2 hours'
  GROUP BY 1, 2, 3
  ON CONFLICT (owner, minute, action, bucket)
  DO UPDATE SET completed = job_minutes_by_owner.completed + EXCLUDED.completed;
SQL
}
rollup 1
sql -c "INSERT INTO result_cache (owner, cache_key, job_id, input_key, output_key, output_size)
        SELECT owner, cache_key, id, input_key, output_key, output_size FROM jobs
        WHERE input_key LIKE 'seed/%' AND status = 'completed'"
printf 'Seeded %s finished jobs (two clients, %s each) in %.0f s.\n\n' \
  "$((history * 2))" "$history" "$(echo "$(date +%s.%N) - $start" | bc)"
checkpoint

flat_out "2. Flat out with $history finished jobs of the same key ($(rows) jobs), no manual ANALYZE"
history_median=$median

echo "### 3. GET /v1/overview with $((history * 2)) jobs finished in its window"
echo
echo "| caller | median ms | max ms (20 requests) |"
echo "|---|---:|---:|"
overview() { # label bearer
  local times
  times=$(for _ in $(seq 20); do
    curl -fsS -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $2" "$IMGFLOW_API_URL/v1/overview"
  done | sort -n)
  printf '| %s | %.1f | %.1f |\n' "$1" \
    "$(echo "$times" | sed -n 10p | awk '{print $1 * 1000}')" \
    "$(echo "$times" | tail -1 | awk '{print $1 * 1000}')"
}
if [ -n "${IMGFLOW_ADMIN_TOKEN:-}" ]; then
  overview "operator (every client)" "$IMGFLOW_ADMIN_TOKEN"
fi
overview "client (its own jobs)" "$IMGFLOW_KEY"
echo

# Jobs of other keys waiting, as with the workers stopped: recorded and
# unfinished, not on the stream; enqueued "in the future" so that the
# sweeper does not queue them during the run.
seed "$queued" "scale-queued-client" "now()" queued
sql -c "INSERT INTO unfinished_jobs (id, owner, enqueued_at)
        SELECT id, owner, now() + interval '1 day' FROM jobs
        WHERE owner = 'scale-queued-client' AND input_key LIKE 'seed/%'"
checkpoint
flat_out "4. Flat out with $queued jobs of other keys queued"
queued_median=$median
sql -c "DELETE FROM unfinished_jobs WHERE owner = 'scale-queued-client';
        DELETE FROM jobs WHERE owner = 'scale-queued-client' AND input_key LIKE 'seed/%'"

echo "### 5. The retention sweep: $expired jobs finished 8 days ago"
echo
seed "$expired" "scale-expired-client" "now() - interval '8 days' - (g % 3600) * interval '1 second'" completed
left() { sql -c "SELECT count(*) FROM jobs WHERE owner = 'scale-expired-client'"; }
# Wait for the first deletion (the sweep runs every RETENTION_SWEEP_INTERVAL).
waited=0
while [ "$(left)" -ge "$expired" ] && [ $waited -lt 180 ]; do sleep 1; waited=$((waited + 1)); done
t0=$(date +%s.%N); n0=$(left)
while [ "$(left)" -gt 0 ] && [ $waited -lt 900 ]; do sleep 1; waited=$((waited + 1)); done
t1=$(date +%s.%N); n1=$(left)
printf '%s rows deleted in %.1f s after the first: %.0f jobs/s (%s left)\n\n' \
  "$((n0 - n1))" "$(echo "$t1 - $t0" | bc)" "$(echo "($n0 - $n1) / ($t1 - $t0)" | bc -l)" "$n1"

# Clean up: the seeded jobs, their cache entries and their rollups.
rollup -1
sql -c "DELETE FROM result_cache WHERE input_key LIKE 'seed/%';
        DELETE FROM jobs WHERE input_key LIKE 'seed/%'"
echo "Seeded rows deleted."
# The seed's dead rows and index entries gone, as autovacuum (on by
# default; this machine runs without it) would have reclaimed them.
sql -c "VACUUM jobs, result_cache, unfinished_jobs, job_minutes, job_minutes_by_owner" || true
checkpoint
flat_out "6. Flat out again, the seeded jobs deleted ($(rows) jobs)"
after_median=$median

echo "### Compared"
echo
echo "| case | median completed/s | vs runs 1 and 6 (mean $(echo "($empty_median + $after_median) / 2" | bc -l | xargs printf '%.0f')) | vs run 1 alone |"
echo "|---|---:|---:|---:|"
compare() { # label median
  printf '| %s | %.0f | %+.1f%% | %+.1f%% |\n' "$1" "$2" \
    "$(echo "100 * $2 / (($empty_median + $after_median) / 2) - 100" | bc -l)" \
    "$(echo "100 * $2 / $empty_median - 100" | bc -l)"
}
compare "1. the table as it is" "$empty_median"
compare "2. with $history finished jobs of the same key (goal: within 10%)" "$history_median"
compare "4. with $queued jobs of other keys queued" "$queued_median"
compare "6. the table as it was, again" "$after_median"
echo
