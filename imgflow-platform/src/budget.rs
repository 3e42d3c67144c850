//! A memory budget in MiB, shared by the jobs of one process: the worker's
//! (`WORKER_MEMORY_MB`: decoding, the sandbox, encoding) and the API's
//! (`API_DECODE_MEMORY_MB`: decoding a submitted image to validate it).
//!
//! Before anything large is allocated, its size is estimated from the image
//! header and reserved; a reservation waits (first come, first served)
//! until it fits, and is returned when its last clone drops. So however
//! many requests or jobs run at once, the memory they can hold together
//! stays within the budget. A reservation larger than the whole budget can
//! never be granted and fails at once.

use std::sync::Arc;

use std::time::Duration;

use prometheus::IntGauge;
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One mebibyte, the budget's unit.
const MIB: u64 = 1024 * 1024;

/// Why a reservation was not granted.
#[derive(Debug, Error)]
pub enum BudgetError {
    /// More than the whole budget: it can never be granted.
    #[error("{need_mib} MiB is more than the whole budget of {budget_mib} MiB ({setting})")]
    Never {
        /// What was asked for.
        need_mib: u64,
        /// The budget.
        budget_mib: u32,
        /// The setting that sets the budget.
        setting: &'static str,
    },
    /// It did not fit within the time it could wait.
    #[error("{need_mib} MiB of the {budget_mib} MiB budget ({setting}) did not come free in time")]
    Busy {
        /// What was asked for.
        need_mib: u64,
        /// The budget.
        budget_mib: u32,
        /// The setting that sets the budget.
        setting: &'static str,
    },
}

/// The budget, shared by one process's jobs or requests.
#[derive(Debug)]
pub struct MemoryBudget {
    mib: u32,
    setting: &'static str,
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
    /// A budget of `mib` MiB, set by `setting` (named in errors);
    /// `reserved` follows what is reserved.
    pub fn new(mib: u32, setting: &'static str, reserved: IntGauge) -> MemoryBudget {
        let mib = mib.max(1);
        MemoryBudget {
            mib,
            setting,
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
    pub async fn reserve(&self, bytes: u64) -> Result<Reservation, BudgetError> {
        let need = self.fits(bytes)?;
        let permit = self.free.clone().acquire_many_owned(need as u32).await;
        // The semaphore is never closed.
        let permit = permit.map_err(|_| self.busy(need))?;
        Ok(self.held(permit, need))
    }

    /// Reserves `bytes`, waiting at most `wait` for them to fit.
    pub async fn reserve_within(
        &self,
        bytes: u64,
        wait: Duration,
    ) -> Result<Reservation, BudgetError> {
        let need = self.fits(bytes)?;
        let acquire = self.free.clone().acquire_many_owned(need as u32);
        match tokio::time::timeout(wait, acquire).await {
            Ok(Ok(permit)) => Ok(self.held(permit, need)),
            _ => Err(self.busy(need)),
        }
    }

    /// The MiB `bytes` take, if they can ever fit (then they fit in a u32:
    /// they are at most `self.mib`).
    fn fits(&self, bytes: u64) -> Result<u64, BudgetError> {
        let need = bytes.div_ceil(MIB).max(1);
        if need > u64::from(self.mib) {
            return Err(BudgetError::Never {
                need_mib: need,
                budget_mib: self.mib,
                setting: self.setting,
            });
        }
        Ok(need)
    }

    fn busy(&self, need: u64) -> BudgetError {
        BudgetError::Busy {
            need_mib: need,
            budget_mib: self.mib,
            setting: self.setting,
        }
    }

    fn held(&self, permit: OwnedSemaphorePermit, need: u64) -> Reservation {
        let bytes = i64::try_from(need * MIB).unwrap_or(i64::MAX);
        self.reserved.add(bytes);
        Reservation {
            _held: Arc::new(Held {
                _permit: permit,
                bytes,
                reserved: self.reserved.clone(),
            }),
        }
    }
}

/// A default budget: three quarters of the memory this process may use, the cgroup's limit if it has one (a container), else
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
        let budget = MemoryBudget::new(10, "TEST_MB", gauge.clone());
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
        assert!(
            matches!(err, BudgetError::Never { need_mib: 11, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("TEST_MB"), "{err}");
        let held = budget.reserve(6 * MIB).await.unwrap();
        let err = budget
            .reserve_within(6 * MIB, std::time::Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(matches!(err, BudgetError::Busy { .. }), "{err}");
        drop(held);
        assert!(default_mib() > 0);
    }
}
