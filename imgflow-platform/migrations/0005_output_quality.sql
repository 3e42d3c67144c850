-- A job's JPEG quality (`quality`, 1 to 100), when the client set one.
ALTER TABLE jobs ADD COLUMN output_quality SMALLINT;
