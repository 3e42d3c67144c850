-- Throughput that does not depend on history (see docs/BENCHMARKS.md,
-- "The job path"). The `jobs` table keeps one row per job; what the hot
-- path looks up lives in narrow tables of its own, so the job's two updates
-- (started, finished) change no indexed column and stay HOT, and no lookup
-- walks a client's history.

-- The jobs that have not finished, one narrow row each: inserted with the
-- job, deleted in the statement that finishes it. The sweeper and the
-- plugin-version check read this, never the whole `jobs` table.
CREATE TABLE unfinished_jobs (
    id          UUID        PRIMARY KEY,
    owner       TEXT        NOT NULL,
    enqueued_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO unfinished_jobs (id, owner, enqueued_at)
    SELECT id, owner, COALESCE(enqueued_at, created_at) FROM jobs
    WHERE status IN ('queued', 'running');

-- The result cache (RESULT_CACHE): for each client and cache key, the
-- completed job (one that ran) whose result (and input, the same bytes)
-- answers equal jobs. An exact match on the primary key; written when such
-- a job completes, deleted with it.
CREATE TABLE result_cache (
    owner       TEXT   NOT NULL,
    cache_key   TEXT   NOT NULL,
    job_id      UUID   NOT NULL,
    input_key   TEXT   NOT NULL,
    output_key  TEXT   NOT NULL,
    output_size BIGINT NOT NULL,
    PRIMARY KEY (owner, cache_key)
);
CREATE INDEX result_cache_job ON result_cache (job_id);
INSERT INTO result_cache (owner, cache_key, job_id, input_key, output_key, output_size)
    SELECT DISTINCT ON (owner, cache_key) owner, cache_key, id, input_key, output_key, output_size
    FROM jobs
    WHERE status = 'completed' AND cache_key IS NOT NULL AND cached_from IS NULL
      AND output_key IS NOT NULL AND output_size IS NOT NULL
    ORDER BY owner, cache_key, id DESC;

-- How the jobs that finished went, per minute: what the overview reads
-- (a bounded number of rows per minute, however many jobs finished). A
-- run time (a worker's start to finish, of a completed job that ran) is
-- counted in its bucket (see imgflow_platform::activity::BUCKETS); bucket
-- -1 holds the jobs with no run time (failed, cancelled, completed from
-- the cache). `job_minutes` is every client's, `job_minutes_by_owner` one
-- client's.
CREATE TABLE job_minutes (
    minute    TIMESTAMPTZ NOT NULL,
    action    TEXT        NOT NULL,
    bucket    SMALLINT    NOT NULL,
    completed BIGINT      NOT NULL DEFAULT 0,
    failed    BIGINT      NOT NULL DEFAULT 0,
    cancelled BIGINT      NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, action, bucket)
);
CREATE TABLE job_minutes_by_owner (
    owner     TEXT        NOT NULL,
    minute    TIMESTAMPTZ NOT NULL,
    action    TEXT        NOT NULL,
    bucket    SMALLINT    NOT NULL,
    completed BIGINT      NOT NULL DEFAULT 0,
    failed    BIGINT      NOT NULL DEFAULT 0,
    cancelled BIGINT      NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, minute, action, bucket)
);

-- The last two hours, from the jobs (the bucket bounds are BUCKETS').
INSERT INTO job_minutes (minute, action, bucket, completed, failed, cancelled)
    SELECT date_trunc('minute', finished_at), action,
           CASE WHEN status = 'completed' AND started_at IS NOT NULL AND cached_from IS NULL
                THEN width_bucket(extract(epoch FROM finished_at - started_at) * 1000,
                                  ARRAY[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000,
                                        10000, 30000, 60000, 120000]::float8[])
                ELSE -1 END,
           count(*) FILTER (WHERE status = 'completed'),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled')
    FROM jobs WHERE finished_at >= now() - interval '2 hours'
    GROUP BY 1, 2, 3;
INSERT INTO job_minutes_by_owner (owner, minute, action, bucket, completed, failed, cancelled)
    SELECT owner, date_trunc('minute', finished_at), action,
           CASE WHEN status = 'completed' AND started_at IS NOT NULL AND cached_from IS NULL
                THEN width_bucket(extract(epoch FROM finished_at - started_at) * 1000,
                                  ARRAY[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000,
                                        10000, 30000, 60000, 120000]::float8[])
                ELSE -1 END,
           count(*) FILTER (WHERE status = 'completed'),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled')
    FROM jobs WHERE finished_at >= now() - interval '2 hours'
    GROUP BY 1, 2, 3, 4;

-- A job's result is named by the job (outputs/<id>.<ext>), so its key is
-- known when the job is made: it is written then, and never changes.
UPDATE jobs SET output_key = 'outputs/' || id || '.' ||
        CASE output_format WHEN 'jpeg' THEN 'jpg' ELSE output_format END
    WHERE output_key IS NULL;
ALTER TABLE jobs ALTER COLUMN output_key SET NOT NULL;

-- Each step's run time, apart from the steps (which then never change).
ALTER TABLE jobs ADD COLUMN step_ms DOUBLE PRECISION[];

-- Indexes: only what reads need, on columns that never change once a job
-- is made (so starting and finishing it are HOT updates). Status, finish
-- time and the result are no longer indexed: unfinished jobs are in
-- `unfinished_jobs`, the cache in `result_cache`, retention walks the
-- primary key (ids are UUIDv7s, in creation order), the overview reads
-- `job_minutes`.
DROP INDEX IF EXISTS jobs_unfinished;
DROP INDEX IF EXISTS jobs_status;
DROP INDEX IF EXISTS jobs_owner_unfinished;
DROP INDEX IF EXISTS jobs_finished;
DROP INDEX IF EXISTS jobs_cache;
DROP INDEX IF EXISTS jobs_output_key;
DROP INDEX IF EXISTS jobs_input_key;
DROP INDEX IF EXISTS jobs_steps;
-- Idempotency keys: only the jobs that have one.
DROP INDEX IF EXISTS jobs_owner_idempotency_key;
CREATE UNIQUE INDEX jobs_owner_idempotency_key ON jobs (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Listing by action finds the pipelines that have it as a step (a
-- one-step job is found by `jobs_action`).
CREATE INDEX jobs_steps ON jobs USING gin (steps jsonb_path_ops) WHERE action LIKE '%,%';
-- Files a job shares with others: a job completed from the cache shares
-- its source's result; a retry shares its original's input. Each file is
-- named by the job that made it, so the rest are found here.
CREATE INDEX jobs_borrowed_output ON jobs (output_key) WHERE cached_from IS NOT NULL;
CREATE INDEX jobs_borrowed_input ON jobs (input_key)
    WHERE cached_from IS NOT NULL OR retry_of IS NOT NULL;
-- Room on each page for a row's new versions (HOT updates).
ALTER TABLE jobs SET (fillfactor = 80);

-- These tables change with every job: vacuum and analyze them after a
-- small share of changes (the defaults wait for a fifth of the table), so
-- dead rows and stale statistics never pile up under a steady load.
ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0.02,
                      autovacuum_analyze_scale_factor = 0.02);
ALTER TABLE unfinished_jobs SET (autovacuum_vacuum_scale_factor = 0,
                                 autovacuum_vacuum_threshold = 2000,
                                 autovacuum_analyze_scale_factor = 0,
                                 autovacuum_analyze_threshold = 2000);
ALTER TABLE job_minutes SET (autovacuum_vacuum_scale_factor = 0,
                             autovacuum_vacuum_threshold = 2000);
ALTER TABLE job_minutes_by_owner SET (autovacuum_vacuum_scale_factor = 0,
                                      autovacuum_vacuum_threshold = 2000);
ALTER TABLE result_cache SET (autovacuum_vacuum_scale_factor = 0.02,
                              autovacuum_analyze_scale_factor = 0.02);
