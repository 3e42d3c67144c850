-- The sweeper reads the unfinished jobs that have waited longest, 500 at a
-- time (`ORDER BY enqueued_at LIMIT 500`): by this index it reads those
-- 500, not every unfinished job, however deep the queue.
CREATE INDEX unfinished_jobs_enqueued ON unfinished_jobs (enqueued_at);
