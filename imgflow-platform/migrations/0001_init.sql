-- imgflow's records. PostgreSQL holds the truth about every job and plugin;
-- Redis only carries the work.

CREATE TABLE plugins (
    name        TEXT        NOT NULL,
    version     TEXT        NOT NULL,
    digest      TEXT        NOT NULL,
    size        BIGINT      NOT NULL,
    metadata    JSONB       NOT NULL,
    uploader    TEXT        NOT NULL,
    builtin     BOOLEAN     NOT NULL DEFAULT false,
    active      BOOLEAN     NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);
-- At most one active version of each plugin.
CREATE UNIQUE INDEX plugins_one_active ON plugins (name) WHERE active;

CREATE TABLE jobs (
    id               UUID        PRIMARY KEY,
    action           TEXT        NOT NULL,
    plugin_version   TEXT        NOT NULL,
    plugin_digest    TEXT        NOT NULL,
    params           JSONB       NOT NULL,
    status           TEXT        NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    attempts         INTEGER     NOT NULL DEFAULT 0,
    error_code       TEXT,
    error_message    TEXT,
    input_key        TEXT        NOT NULL,
    input_size       BIGINT      NOT NULL,
    input_format     TEXT        NOT NULL,
    output_format    TEXT        NOT NULL,
    output_key       TEXT,
    output_size      BIGINT,
    idempotency_key  TEXT        UNIQUE,
    stream_id        TEXT,
    worker_id        TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    enqueued_at      TIMESTAMPTZ,
    started_at       TIMESTAMPTZ,
    finished_at      TIMESTAMPTZ
);
CREATE INDEX jobs_unfinished ON jobs (enqueued_at) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_action ON jobs (action, id DESC);
CREATE INDEX jobs_status ON jobs (status, id DESC);
