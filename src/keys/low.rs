//! When to push `PreKeysLow`: once per owner per crossing of the threshold,
//! not once per fetch (100 pipelined fetches used to push 100 times).
//!
//! The rule: an owner who was told is not told again until they upload
//! keys (a fresh crossing can follow only a refill), or until `interval`
//! has passed without one, so a push the client lost or ignored is
//! repeated now and then rather than never. A push that could not be sent
//! (the owner was offline) does not count: the first low fetch after they
//! connect tells them.
//!
//! Bounded: an entry is an owner told within the last `interval`; the
//! sweeper prunes older ones.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use uuid::Uuid;

/// Who was told their pre-keys are low, and when. Each decision is one
/// synchronous call under the owner's shard lock.
#[derive(Debug)]
pub struct LowNotices {
    /// Owners told within the last `interval`, with when.
    told: DashMap<Uuid, Instant>,
    /// How long a notice stands without an upload.
    interval: Duration,
}

impl LowNotices {
    pub fn new(interval: Duration) -> Self {
        LowNotices {
            told: DashMap::new(),
            interval,
        }
    }

    /// Whether to tell `owner`, whose keys are low, now; if so, records
    /// that they are told. Concurrent fetches: exactly one gets `true`.
    pub fn claim(&self, owner: Uuid, now: Instant) -> bool {
        match self.told.entry(owner) {
            Entry::Occupied(at) if now.saturating_duration_since(*at.get()) < self.interval => {
                false
            }
            Entry::Occupied(mut at) => {
                at.insert(now);
                true
            }
            Entry::Vacant(vacant) => {
                vacant.insert(now);
                true
            }
        }
    }

    /// The claimed push could not be sent (the owner is offline): the next
    /// low fetch may try again.
    pub fn unsent(&self, owner: Uuid) {
        self.told.remove(&owner);
    }

    /// The owner uploaded keys: a new crossing may be told at once.
    pub fn uploaded(&self, owner: Uuid) {
        self.told.remove(&owner);
    }

    /// Forgets notices older than the interval: they no longer hold
    /// anything back.
    pub fn prune(&self, now: Instant) {
        self.told
            .retain(|_, at| now.saturating_duration_since(*at) < self.interval);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.told.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_owner_until_an_upload_or_the_interval() {
        let notices = LowNotices::new(Duration::from_secs(60));
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let now = Instant::now();
        assert!(notices.claim(alice, now));
        for _ in 0..100 {
            assert!(!notices.claim(alice, now), "told once per crossing");
        }
        assert!(notices.claim(bob, now), "owners apart");
        notices.uploaded(alice);
        assert!(notices.claim(alice, now), "an upload allows a new notice");
        assert!(!notices.claim(alice, now + Duration::from_secs(59)));
        assert!(
            notices.claim(alice, now + Duration::from_secs(60)),
            "a reminder after the interval"
        );
        notices.unsent(bob);
        assert!(notices.claim(bob, now), "an unsent notice does not count");
    }

    #[test]
    fn prune_forgets_only_stale_notices() {
        let notices = LowNotices::new(Duration::from_secs(60));
        let now = Instant::now();
        let (old, fresh) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(notices.claim(old, now));
        assert!(notices.claim(fresh, now + Duration::from_secs(30)));
        notices.prune(now + Duration::from_secs(61));
        assert_eq!(notices.len(), 1);
        assert!(!notices.claim(fresh, now + Duration::from_secs(61)));
    }
}
