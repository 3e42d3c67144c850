-- Per-plugin limits and per-key shares (issue 28). A plugin's limits, set by an operator with
-- PUT /v1/plugins/{name}/limits, for every version of the plugin: how many
-- of its jobs may run at once across every worker and of one client key
-- (the queue holds the others back: they wait, they do not fail), the time
-- limit of each of its calls and its sandbox's memory (within the worker's
-- JOB_TIMEOUT_MS and JOB_MAX_MEMORY_MB). NULL: no limit of its own. No
-- row: no limits.
CREATE TABLE plugin_limits (
    name text PRIMARY KEY,
    max_concurrent integer CHECK (max_concurrent > 0),
    max_concurrent_per_key integer CHECK (max_concurrent_per_key > 0),
    timeout_ms integer CHECK (timeout_ms > 0),
    memory_mb integer CHECK (memory_mb > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- A client key's share of the workers' time, set by an operator with
-- PUT /v1/keys/{id}/limits: with several keys waiting, each gets worker
-- time in proportion to its share. NULL: 1, like every key by default.
ALTER TABLE api_keys ADD COLUMN share double precision CHECK (share >= 0.001 AND share <= 1000);
