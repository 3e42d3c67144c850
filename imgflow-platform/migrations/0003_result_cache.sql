-- The result cache (RESULT_CACHE): a job whose input, plugin, parameters and
-- output format equal a completed job's of the same owner is completed from
-- that job's result without running.

-- SHA-256 of (input bytes, plugin digest, parameters, output format); NULL
-- when the job may not be served from, or serve, the cache.
ALTER TABLE jobs ADD COLUMN cache_key TEXT;
-- The job whose result (and input) this one reused; NULL if it ran.
ALTER TABLE jobs ADD COLUMN cached_from UUID;
CREATE INDEX jobs_cache ON jobs (owner, cache_key) WHERE status = 'completed' AND cache_key IS NOT NULL;
-- Files can be shared between jobs: a file is deleted with its last job.
CREATE INDEX jobs_output_key ON jobs (output_key) WHERE output_key IS NOT NULL;
CREATE INDEX jobs_input_key ON jobs (input_key);

-- An operator marks a plugin that reads clocks or randomness not cacheable
-- (every version of the name; later versions inherit the setting).
ALTER TABLE plugins ADD COLUMN cacheable BOOLEAN NOT NULL DEFAULT true;
