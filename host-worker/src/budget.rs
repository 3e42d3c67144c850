//! The worker's memory budget (`WORKER_MEMORY_MB`).
//!
//! Before a job decodes anything, its working set is estimated from the
//! image header and the sandbox's memory cap
//! ([`Runtime::job_working_set`](imgflow_runtime::Runtime::job_working_set))
//! and reserved from the budget; the job waits (first come, first served)
//! until its reservation fits, and returns it when its last buffer is gone.
//! So however many jobs `CONCURRENCY` lets in, the memory they can hold
//! together stays within the budget. A job whose estimate alone is over the
//! budget can never run here and fails as `over_memory_budget`.

use std::sync::Arc;

use imgflow_runtime::{ErrorCode, Failure};
use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One mebibyte, the budget's unit.
const MIB: u64 = 1024 * 1024;

/// The budget, shared by the worker's jobs.
#[derive(Debug)]
pub struct MemoryBudget {
    mib: u32,
    free: Arc<Semaphore>,
    reserved: IntGauge,
}

/// A job's reservation; returned to the budget when the last clone drops.
/// Clone it into every thread that holds one of the job's buffers.
#[derive(Debug, Clone)]
pub struct Reservation {
    _held: Arc<Held>,
}

#[derive(Debug)]
struct Held {
    _permit: OwnedSemaphorePermit,
    bytes: i64,
    reserved: IntGauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.reserved.sub(self.bytes);
    }
}

impl MemoryBudget {
    /// A budget of `mib` MiB; `reserved` follows what is reserved.
    pub fn new(mib: u32, reserved: IntGauge) -> MemoryBudget {
        let mib = mib.max(1);
        MemoryBudget {
            mib,
            free: Arc::new(Semaphore::new(mib as usize)),
            reserved,
        }
    }

    /// The budget, in MiB.
    pub fn mib(&self) -> u32 {
        self.mib
    }

    /// Reserves `bytes`, waiting until they fit. Fails at once if they can
    /// never fit.
    pub async fn reserve(&self, bytes: u64) -> Result<Reservation, Failure> {
        let need = bytes.div_ceil(MIB).max(1);
        if need > u64::from(self.mib) {
            return Err(Failure::permanent(
                ErrorCode::OverMemoryBudget,
                format!(
                    "the job needs an estimated {need} MiB (decoded image, the plugin's memory cap and its output), more than this worker's WORKER_MEMORY_MB of {} MiB",
                    self.mib
                ),
            ));
        }
        // `need` fits in a u32: it is at most `self.mib`.
        let permit = self
            .free
            .clone()
            .acquire_many_owned(need as u32)
            .await
            .map_err(|_| Failure::transient(ErrorCode::Internal, "the memory budget is closed"))?;
        let bytes = i64::try_from(need * MIB).unwrap_or(i64::MAX);
        self.reserved.add(bytes);
        Ok(Reservation {
            _held: Arc::new(Held {
                _permit: permit,
                bytes,
                reserved: self.reserved.clone(),
            }),
        })
    }
}

/// The default `WORKER_MEMORY_MB`: three quarters of the memory this
/// process may use, the cgroup's limit if it has one (a container), else
/// the machine's; 2048 if neither can be read.
pub fn default_mib() -> u32 {
    let limit = cgroup_limit().or_else(machine_memory);
    match limit {
        Some(bytes) => u32::try_from(bytes / 4 * 3 / MIB).unwrap_or(u32::MAX),
        None => 2048,
    }
}

/// The cgroup v2 (`memory.max`) or v1 (`memory.limit_in_bytes`) limit, if
/// one is set.
fn cgroup_limit() -> Option<u64> {
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
    let v1 = || std::fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes").ok();
    let text = v2.or_else(v1)?;
    let bytes: u64 = text.trim().parse().ok()?;
    // v1 reports "no limit" as a huge number.
    (bytes < (1 << 60)).then_some(bytes)
}

/// `MemTotal` from `/proc/meminfo`.
fn machine_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_wait_for_room_and_return_it() {
        let gauge = IntGauge::new("reserved", "test").unwrap();
        let budget = MemoryBudget::new(10, gauge.clone());
        let a = budget.reserve(6 * MIB).await.unwrap();
        assert_eq!(gauge.get(), (6 * MIB) as i64);
        // 6 + 6 > 10: the second waits until the first is returned.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            budget.reserve(6 * MIB),
        )
        .await;
        assert!(waiting.is_err(), "should wait");
        let copy = a.clone();
        drop(a);
        assert_eq!(gauge.get(), (6 * MIB) as i64, "a clone still holds it");
        drop(copy);
        let b = budget.reserve(6 * MIB).await.unwrap();
        assert_eq!(gauge.get(), (6 * MIB) as i64);
        drop(b);
        assert_eq!(gauge.get(), 0);
        let err = budget.reserve(11 * MIB).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::OverMemoryBudget);
        assert!(!err.transient);
        assert!(default_mib() > 0);
    }
}
