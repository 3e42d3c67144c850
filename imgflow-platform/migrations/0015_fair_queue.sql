-- Fair scheduling (issue 28): a job's priority among its owner's jobs
-- (high, normal or low; the API checks the name) and its input's pixels
-- (width x height: the queue estimates a job's cost from them). Both are
-- set once, when the job is made, so neither touches the updates of a
-- running job. Jobs from before have normal priority and unknown pixels.
ALTER TABLE jobs ADD COLUMN priority text NOT NULL DEFAULT 'normal';
ALTER TABLE jobs ADD COLUMN input_pixels bigint;
