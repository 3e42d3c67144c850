//! How the jobs that finished went, per minute: counts by outcome and a
//! histogram of run times, per action (and per client), kept as rollups
//! that the statements finishing jobs update as they finish them
//! ([`rollup_ctes!`]). The overview ([`Activity::read`]) reads a bounded
//! number of rows per minute, however many jobs finished in it.
//!
//! A run time is a worker's start to finish of a completed job that ran
//! (not one completed from the result cache), counted in the bucket
//! [`BUCKETS`] places it in; percentiles are estimated from the buckets
//! (linearly within one), so they are as fine as the buckets: 1, 2, 5, 10,
//! 20, 50 ms and so on.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// The upper bounds of the run-time buckets, in milliseconds (as SQL's
/// `width_bucket` uses them: bucket 0 is under 1 ms, bucket `i` from
/// `BUCKETS[i - 1]` to `BUCKETS[i]`, bucket 16 from 2 minutes up). The
/// same array is written in [`rollup_ctes!`] and the migration.
pub const BUCKETS: [f64; 16] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0,
    60000.0, 120000.0,
];

/// How long rollups are kept: the longest window the overview shows, and
/// an hour of margin.
pub const KEEP: Duration = Duration::from_secs(2 * 3600);

/// The bucket and the three counts of the finished jobs in `$rows`
/// (as `r`), with `$run_ms` as each one's run time: the columns after the
/// key of both rollups ([`rollup_ctes!`]).
macro_rules! rollup_counts {
    ($rows:literal, $run_ms:literal) => {
        concat!(
            "CASE WHEN r.status = 'completed' AND r.cached_from IS NULL
                                 AND (",
            $run_ms,
            ") IS NOT NULL
                            THEN width_bucket((",
            $run_ms,
            "), ARRAY[1, 2, 5, 10, 20, 50, 100, 200, 500,
                                 1000, 2000, 5000, 10000, 30000, 60000, 120000]::float8[])
                            ELSE -1 END,
                       count(*) FILTER (WHERE r.status = 'completed'),
                       count(*) FILTER (WHERE r.status = 'failed'),
                       count(*) FILTER (WHERE r.status = 'cancelled')
                FROM ",
            $rows,
            " AS r"
        )
    };
}
pub(crate) use rollup_counts;

/// Two common table expressions, `rollup_all` and `rollup_owner`, that
/// add the finished jobs in the rows of `$rows` (a CTE with `finished_at`,
/// `action`, `owner`, `status` and `cached_from`) to the rollups, with
/// `$run_ms` (an SQL expression over `r`, or `NULL::float8`) as each one's
/// run time. Rows are upserted in key order, so concurrent statements
/// never wait for each other in a cycle.
macro_rules! rollup_ctes {
    ($rows:literal, $run_ms:literal) => {
        concat!(
            "rollup_all AS (
                INSERT INTO job_minutes (minute, action, bucket, completed, failed, cancelled)
                SELECT date_trunc('minute', r.finished_at), r.action,
                       ", $crate::activity::rollup_counts!($rows, $run_ms), "
                GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
                ON CONFLICT (minute, action, bucket) DO UPDATE
                SET completed = job_minutes.completed + EXCLUDED.completed,
                    failed = job_minutes.failed + EXCLUDED.failed,
                    cancelled = job_minutes.cancelled + EXCLUDED.cancelled
             ), rollup_owner AS (
                INSERT INTO job_minutes_by_owner (owner, minute, action, bucket, completed, failed, cancelled)
                SELECT r.owner, date_trunc('minute', r.finished_at), r.action,
                       ", $crate::activity::rollup_counts!($rows, $run_ms), "
                GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
                ON CONFLICT (owner, minute, action, bucket) DO UPDATE
                SET completed = job_minutes_by_owner.completed + EXCLUDED.completed,
                    failed = job_minutes_by_owner.failed + EXCLUDED.failed,
                    cancelled = job_minutes_by_owner.cancelled + EXCLUDED.cancelled
             )"
        )
    };
}
pub(crate) use rollup_ctes;

/// What finished recently ([`Activity::read`]).
#[derive(Debug, Clone)]
pub struct Activity {
    /// One row per action, by name.
    pub actions: Vec<ActionActivity>,
    /// One row per minute and action that had jobs finish, oldest first.
    pub per_minute: Vec<MinuteActivity>,
}

/// How one action's recent jobs went.
#[derive(Debug, Clone)]
pub struct ActionActivity {
    /// The job's action (a pipeline's: its steps, comma-separated).
    pub action: String,
    /// Jobs completed.
    pub completed: i64,
    /// Jobs failed.
    pub failed: i64,
    /// Jobs cancelled.
    pub cancelled: i64,
    /// Median run time of the completed jobs that ran, in milliseconds
    /// (estimated from the buckets).
    pub p50_ms: Option<f64>,
    /// 95th percentile of that run time.
    pub p95_ms: Option<f64>,
    /// 99th percentile of that run time.
    pub p99_ms: Option<f64>,
}

/// The jobs of one action that finished within one minute.
#[derive(Debug, Clone)]
pub struct MinuteActivity {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// The action.
    pub action: String,
    /// Jobs completed in that minute.
    pub completed: i64,
    /// Jobs failed in that minute.
    pub failed: i64,
}

/// One rollup row, as read.
#[derive(sqlx::FromRow)]
struct Row {
    minute: DateTime<Utc>,
    action: String,
    bucket: i16,
    completed: i64,
    failed: i64,
    cancelled: i64,
}

impl Activity {
    /// How each action's jobs that finished in the last `minutes` (the
    /// current minute included) went, only `owner`'s if given.
    pub async fn read(
        db: &PgPool,
        minutes: i32,
        owner: Option<&str>,
    ) -> Result<Activity, sqlx::Error> {
        let rows: Vec<Row> =
            match owner {
                None => sqlx::query_as(
                    "SELECT minute, action, bucket, completed, failed, cancelled FROM job_minutes
                     WHERE minute >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
                     ORDER BY minute, action, bucket",
                )
                .bind(minutes)
                .fetch_all(db)
                .await?,
                Some(owner) => {
                    sqlx::query_as(
                        "SELECT minute, action, bucket, completed, failed, cancelled
                     FROM job_minutes_by_owner
                     WHERE owner = $2
                       AND minute >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
                     ORDER BY minute, action, bucket",
                    )
                    .bind(minutes)
                    .bind(owner)
                    .fetch_all(db)
                    .await?
                }
            };
        Ok(Activity::from_rows(rows))
    }

    fn from_rows(rows: Vec<Row>) -> Activity {
        let mut actions: BTreeMap<String, (i64, i64, i64, [i64; 17])> = BTreeMap::new();
        let mut minutes: BTreeMap<(DateTime<Utc>, String), (i64, i64)> = BTreeMap::new();
        for row in rows {
            let totals = actions
                .entry(row.action.clone())
                .or_insert((0, 0, 0, [0; 17]));
            totals.0 += row.completed;
            totals.1 += row.failed;
            totals.2 += row.cancelled;
            if let Ok(bucket) = usize::try_from(row.bucket) {
                if let Some(count) = totals.3.get_mut(bucket) {
                    *count += row.completed;
                }
            }
            let minute = minutes.entry((row.minute, row.action)).or_insert((0, 0));
            minute.0 += row.completed;
            minute.1 += row.failed;
        }
        Activity {
            actions: actions
                .into_iter()
                .map(
                    |(action, (completed, failed, cancelled, histogram))| ActionActivity {
                        action,
                        completed,
                        failed,
                        cancelled,
                        p50_ms: percentile(&histogram, 0.50),
                        p95_ms: percentile(&histogram, 0.95),
                        p99_ms: percentile(&histogram, 0.99),
                    },
                )
                .collect(),
            per_minute: minutes
                .into_iter()
                .filter(|(_, (completed, failed))| completed + failed > 0)
                .map(|((minute, action), (completed, failed))| MinuteActivity {
                    minute,
                    action,
                    completed,
                    failed,
                })
                .collect(),
        }
    }

    /// Deletes the rollups older than [`KEEP`]. Returns how many rows.
    pub async fn expire(db: &PgPool) -> Result<u64, sqlx::Error> {
        let mut deleted = 0;
        for table in ["job_minutes", "job_minutes_by_owner"] {
            deleted += sqlx::query(&format!(
                "DELETE FROM {table} WHERE minute < now() - make_interval(secs => $1)"
            ))
            .bind(KEEP.as_secs_f64())
            .execute(db)
            .await?
            .rows_affected();
        }
        Ok(deleted)
    }
}

/// The `p` quantile (0 to 1) of run times counted in `histogram` (one
/// count per bucket of [`BUCKETS`], and one for the bucket above the
/// last), linearly within its bucket; `None` when it is empty.
pub fn percentile(histogram: &[i64; 17], p: f64) -> Option<f64> {
    let total: i64 = histogram.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = p * total as f64;
    let mut seen = 0.0;
    for (i, &count) in histogram.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let next = seen + count as f64;
        if next >= rank {
            let low = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
            let Some(&high) = BUCKETS.get(i) else {
                return Some(low);
            };
            let within = ((rank - seen) / count as f64).clamp(0.0, 1.0);
            return Some(low + (high - low) * within);
        }
        seen = next;
    }
    Some(BUCKETS[BUCKETS.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_buckets() {
        let mut h = [0i64; 17];
        assert_eq!(percentile(&h, 0.5), None);
        // 100 runs between 5 and 10 ms (bucket 3).
        h[3] = 100;
        let p50 = percentile(&h, 0.5).unwrap();
        assert!(
            (5.0..=10.0).contains(&p50) && (p50 - 7.5).abs() < 0.01,
            "{p50}"
        );
        // One slow run over two minutes.
        h[16] = 1;
        assert_eq!(percentile(&h, 1.0), Some(120000.0));
        assert!(percentile(&h, 0.99).unwrap() <= 10.0);
    }

    #[test]
    fn rows_are_summed_per_action_and_minute() {
        let minute = Utc::now();
        let row = |action: &str, bucket, completed, failed| Row {
            minute,
            action: action.into(),
            bucket,
            completed,
            failed,
            cancelled: 0,
        };
        let a = Activity::from_rows(vec![
            row("blur", 3, 10, 0),
            row("blur", -1, 2, 1),
            row("grayscale", 1, 5, 0),
        ]);
        assert_eq!(a.actions.len(), 2);
        assert_eq!((a.actions[0].completed, a.actions[0].failed), (12, 1));
        assert!(a.actions[0].p50_ms.unwrap() >= 5.0);
        assert_eq!(a.per_minute.len(), 2);
    }
}
