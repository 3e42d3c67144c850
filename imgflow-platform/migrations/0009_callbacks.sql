-- Webhooks: a job may carry a callback URL; when it finishes, imgflow POSTs
-- the job there, retrying with backoff for a bounded time.
ALTER TABLE jobs ADD COLUMN callback_url TEXT;
-- pending (a delivery is due or being tried), delivered or gave_up; NULL
-- without a callback or before the job finished.
ALTER TABLE jobs ADD COLUMN callback_status TEXT
    CHECK (callback_status IN ('pending', 'delivered', 'gave_up'));
-- When the next attempt is due (or, while one is being made, when the
-- claim on it lapses); NULL when none is.
ALTER TABLE jobs ADD COLUMN callback_next_at TIMESTAMPTZ;
CREATE INDEX jobs_callback_due ON jobs (callback_next_at) WHERE callback_next_at IS NOT NULL;

-- Every delivery attempt, kept with its job.
CREATE TABLE callback_attempts (
    job_id      UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt     INT NOT NULL,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    status_code INT,
    error       TEXT,
    took_ms     DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job_id, attempt)
);
