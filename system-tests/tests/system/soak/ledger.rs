//! The soak's accounting of every accepted job, read from PostgreSQL every
//! few seconds while the soak runs (jobs expire under the short retention,
//! so the end alone could not account for them): the first final state
//! each job is seen in, any later change of it (a job that ended twice),
//! whether a completed job's result was in storage when it was first seen
//! completed, its attempts and its webhook's status as last seen, and
//! which jobs vanished (expired after they finished, or deleted by their
//! client).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use sqlx::PgPool;
use uuid::Uuid;

/// One job as the ledger last read it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The first final state it was seen in (`None`: not finished yet).
    pub first_final: Option<String>,
    /// Its state as last read.
    pub status: String,
    /// Its error code as last read.
    pub error_code: Option<String>,
    /// Its attempts as last read.
    pub attempts: i32,
    /// Its webhook's status as last read (`pending`, `delivered`,
    /// `gave_up`), if it has a webhook.
    pub callback_status: Option<String>,
    /// Its row is gone (deleted by its client, or expired).
    pub vanished: bool,
}

/// What the ledger knows of every accepted job.
#[derive(Debug, Default)]
pub struct Ledger {
    /// By job id.
    pub jobs: HashMap<Uuid, Seen>,
    /// Jobs whose final state changed to another one: (id, from, to).
    pub ended_twice: Vec<(Uuid, String, String)>,
    /// Jobs first seen completed whose result was not in storage then
    /// (their client may have deleted them in between: see
    /// [`Ledger::results_missing`]).
    missing_results: Vec<Uuid>,
}

impl Ledger {
    /// Reads every accepted job whose row has not vanished yet (`accepted`:
    /// every id the API accepted; `deleted`: those its client deleted),
    /// and looks in storage (`objects`: the directory the storage keys are
    /// relative to) for the result of each job seen completed for the
    /// first time. A failed read (PostgreSQL cut off) is returned, the
    /// ledger as it was.
    pub async fn read(
        &mut self,
        pool: &PgPool,
        objects: &Path,
        accepted: &[Uuid],
        deleted: &HashSet<Uuid>,
    ) -> Result<(), sqlx::Error> {
        let watched: Vec<Uuid> = accepted
            .iter()
            .filter(|id| !self.jobs.get(*id).is_some_and(|s| s.vanished))
            .copied()
            .collect();
        type Row = (
            Uuid,
            String,
            i32,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, status, attempts, error_code, callback_status, output_key
             FROM jobs WHERE id = ANY($1)",
        )
        .bind(&watched)
        .fetch_all(pool)
        .await?;
        let found: HashSet<Uuid> = rows.iter().map(|r| r.0).collect();
        for (id, status, attempts, error_code, callback_status, output_key) in rows {
            let finished = matches!(status.as_str(), "completed" | "failed" | "cancelled");
            let seen = self.jobs.entry(id).or_insert_with(|| Seen {
                first_final: None,
                status: status.clone(),
                error_code: None,
                attempts,
                callback_status: None,
                vanished: false,
            });
            match (&seen.first_final, finished) {
                (None, true) => {
                    seen.first_final = Some(status.clone());
                    let stored = output_key.is_some_and(|key| objects.join(key).is_file());
                    if status == "completed" && !stored {
                        self.missing_results.push(id);
                    }
                }
                (Some(first), _)
                    if *first != status && !self.ended_twice.iter().any(|(j, _, _)| *j == id) =>
                {
                    self.ended_twice.push((id, first.clone(), status.clone()));
                }
                _ => {}
            }
            seen.status = status;
            seen.attempts = attempts;
            seen.error_code = error_code;
            seen.callback_status = callback_status;
        }
        for id in watched.iter().filter(|id| !found.contains(*id)) {
            match self.jobs.get_mut(id) {
                Some(seen) => seen.vanished = true,
                // Not seen yet: its row may not be committed yet (a
                // submission in flight), or it was deleted at once.
                None if deleted.contains(id) => {
                    self.jobs.insert(
                        *id,
                        Seen {
                            first_final: None,
                            status: "deleted".into(),
                            error_code: None,
                            attempts: 0,
                            callback_status: None,
                            vanished: true,
                        },
                    );
                }
                None => {}
            }
        }
        Ok(())
    }

    /// The accepted jobs not deleted by their client that are not seen
    /// finished yet.
    pub fn unfinished(&self, accepted: &[Uuid], deleted: &HashSet<Uuid>) -> usize {
        accepted
            .iter()
            .filter(|id| !deleted.contains(*id))
            .filter(|id| {
                self.jobs
                    .get(*id)
                    .is_none_or(|s| s.first_final.is_none() && !s.vanished)
            })
            .count()
    }

    /// The jobs whose row was gone before they were seen finished, and
    /// that their client did not delete (`deleted`, as known at the end: a
    /// deletion is recorded once its answer arrives, after the row went).
    pub fn vanished_unfinished(&self, deleted: &HashSet<Uuid>) -> Vec<Uuid> {
        self.jobs
            .iter()
            .filter(|(id, s)| s.vanished && s.first_final.is_none() && !deleted.contains(*id))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The jobs seen completed without their result in storage, that
    /// their client did not delete.
    pub fn results_missing(&self, deleted: &HashSet<Uuid>) -> Vec<Uuid> {
        self.missing_results
            .iter()
            .filter(|id| !deleted.contains(*id))
            .copied()
            .collect()
    }

    /// How many jobs ended in each final state (by the first one seen),
    /// and how many of them expired since (gone, not deleted).
    pub fn by_final_state(&self, deleted: &HashSet<Uuid>) -> (BTreeMap<String, u64>, u64) {
        let mut states = BTreeMap::new();
        let mut expired = 0;
        for (id, seen) in &self.jobs {
            if let Some(state) = &seen.first_final {
                *states.entry(state.clone()).or_default() += 1;
                expired += u64::from(seen.vanished && !deleted.contains(id));
            }
        }
        (states, expired)
    }
}
