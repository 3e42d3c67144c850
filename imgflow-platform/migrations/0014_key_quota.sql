-- A client key's own quota of work, set by an operator
-- (PUT /v1/keys/{id}/limits): megapixels of input images a UTC day. NULL:
-- the API's default (KEY_DAILY_MEGAPIXELS).
ALTER TABLE api_keys ADD COLUMN daily_megapixels double precision;
