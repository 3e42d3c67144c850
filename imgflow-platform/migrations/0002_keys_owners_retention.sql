-- Client API keys, job ownership, idempotency per client, retention.

-- A client's key: the secret itself is never stored, only its SHA-256
-- (the secret is 256 random bits, so a plain hash cannot be reversed).
CREATE TABLE api_keys (
    id          UUID        PRIMARY KEY,
    name        TEXT        NOT NULL,
    hash        BYTEA       NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ
);

-- Who submitted a job: a client key's id, `admin`, or `anonymous` (a job
-- submitted with AUTH_REQUIRED=false and no key).
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT 'anonymous';
-- The SHA-256 of what was submitted (action, parameters, format, image),
-- so a reused Idempotency-Key with another request is refused.
ALTER TABLE jobs ADD COLUMN request_hash TEXT;
-- Idempotency keys belong to the client that sent them.
ALTER TABLE jobs DROP CONSTRAINT jobs_idempotency_key_key;
CREATE UNIQUE INDEX jobs_owner_idempotency_key ON jobs (owner, idempotency_key);
CREATE INDEX jobs_owner ON jobs (owner, id DESC);
CREATE INDEX jobs_owner_unfinished ON jobs (owner) WHERE status IN ('queued', 'running');
-- The retention sweep's question: finished before when?
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
