-- The console's sign-in sessions (imgflow_platform::sessions): the cookie
-- holds a random id, this table its SHA-256 and who signed in; never a
-- credential.
CREATE TABLE console_sessions (
    id_hash          BYTEA       PRIMARY KEY,
    -- A client's session: its key (the session ends when the key is revoked).
    key_id           UUID        REFERENCES api_keys (id) ON DELETE CASCADE,
    -- An operator's session: SHA-256 of the admin token signed in with (the
    -- session ends when that token is no longer configured).
    admin_token_hash BYTEA,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at       TIMESTAMPTZ NOT NULL,
    CHECK ((key_id IS NULL) <> (admin_token_hash IS NULL))
);
CREATE INDEX console_sessions_key ON console_sessions (key_id) WHERE key_id IS NOT NULL;
