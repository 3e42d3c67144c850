-- Pipelines: a job runs a list of steps, each a plugin version with its
-- parameters. `steps` is the truth the worker runs; a job from before
-- pipelines is one step made of its own columns. Once a step has run, its
-- time (`run_ms`) is recorded in it.
ALTER TABLE jobs ADD COLUMN steps JSONB;
UPDATE jobs SET steps = jsonb_build_array(jsonb_build_object(
    'action', action, 'version', plugin_version, 'digest', plugin_digest, 'params', params));
ALTER TABLE jobs ALTER COLUMN steps SET NOT NULL;
-- Listing by action finds the pipelines that have it as a step.
CREATE INDEX jobs_steps ON jobs USING gin (steps jsonb_path_ops);
