-- Batches: the jobs one `POST /v1/batches` made share a batch id.
ALTER TABLE jobs ADD COLUMN batch_id UUID;
CREATE INDEX jobs_batch ON jobs (batch_id, id) WHERE batch_id IS NOT NULL;
