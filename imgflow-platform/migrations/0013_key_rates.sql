-- A client key's own rate of submissions, set by an operator
-- (PUT /v1/keys/{id}/limits): jobs a second, and how many it may send at
-- once. NULL: the API's defaults (KEY_RATE_LIMIT, KEY_RATE_BURST).
ALTER TABLE api_keys
    ADD COLUMN rate_per_second double precision,
    ADD COLUMN rate_burst integer;
