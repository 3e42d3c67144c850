//! Per-client limits on long-lived requests: event streams
//! (`/v1/jobs/{id}/events`) and waits (`?wait=` on submit and read) each
//! hold a connection for up to `MAX_WAIT`, so one client key holds at most
//! `KEY_MAX_STREAMS` of them at once on an API instance; more are answered
//! 429 `too_many_streams`. Operators (the admin token) are not limited, nor
//! are requests without credentials (`AUTH_REQUIRED=false`, local
//! development: they have no identity to count by).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use imgflow_runtime::ErrorCode;

use crate::auth::Caller;
use crate::error::ApiError;

/// The long-lived requests each client holds on this instance.
#[derive(Debug)]
pub struct StreamSlots {
    max: usize,
    held: Mutex<HashMap<String, usize>>,
}

/// One long-lived request's place; given back when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    slots: Option<(Arc<StreamSlots>, String)>,
}

impl StreamSlots {
    /// At most `max` long-lived requests per client.
    pub fn new(max: usize) -> Arc<StreamSlots> {
        Arc::new(StreamSlots {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more long-lived request of `caller`, or 429.
    pub fn take(self: &Arc<Self>, caller: Caller) -> Result<StreamSlot, ApiError> {
        if matches!(caller, Caller::Admin | Caller::Anonymous) {
            return Ok(StreamSlot { slots: None });
        }
        let owner = caller.owner();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(owner.clone()).or_insert(0);
        if *count >= self.max {
            return Err(ApiError::new(
                ErrorCode::TooManyStreams,
                format!(
                    "this key already holds {} event streams and waits open (KEY_MAX_STREAMS); close one first",
                    self.max
                ),
            ));
        }
        *count += 1;
        Ok(StreamSlot {
            slots: Some((self.clone(), owner)),
        })
    }

    /// How many long-lived requests `caller` holds now.
    pub fn held(&self, caller: Caller) -> usize {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&caller.owner()).copied().unwrap_or(0)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let Some((slots, owner)) = self.slots.take() else {
            return;
        };
        let mut held = slots.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&owner) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn a_client_holds_at_most_max_and_gets_them_back() {
        let slots = StreamSlots::new(2);
        let (a, b) = (
            Caller::Client(Uuid::now_v7()),
            Caller::Client(Uuid::now_v7()),
        );
        let first = slots.take(a).unwrap();
        let _second = slots.take(a).unwrap();
        assert_eq!(slots.take(a).unwrap_err().code(), ErrorCode::TooManyStreams);
        let _other = slots.take(b).expect("another client is not limited by a");
        drop(first);
        let _third = slots.take(a).expect("a slot given back");
        assert_eq!(slots.held(a), 2);
        for _ in 0..10 {
            std::mem::forget(slots.take(Caller::Admin).unwrap());
        }
    }
}
