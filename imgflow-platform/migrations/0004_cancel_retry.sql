-- Cancellation and retries: a job can end `cancelled`, and a retry is a new
-- job that names the failed or cancelled one it retries (sharing its input).

ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled'));
ALTER TABLE jobs ADD COLUMN retry_of UUID;
CREATE INDEX jobs_retry_of ON jobs (retry_of) WHERE retry_of IS NOT NULL;
