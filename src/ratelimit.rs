//! Token buckets: [`RateLimiter`] keeps one per authenticated user (whose
//! number is bounded by the accounts that exist), [`SlotLimiter`] a fixed
//! table of them for keys anyone can make up (client addresses, usernames
//! tried), so an attacker inventing keys cannot grow it. Both refill the
//! same way ([`Bucket::take`]).

use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use uuid::Uuid;

use crate::idhash::IdHasher;

/// One token bucket per user. Cheap to share behind an `Arc`; each check
/// locks only that user's shard, briefly.
#[derive(Debug)]
pub struct RateLimiter {
    /// Per-user buckets. Full buckets are pruned by [`RateLimiter::prune`],
    /// so the map holds only recently active users.
    buckets: DashMap<Uuid, Bucket, IdHasher>,
    /// How the buckets fill.
    refill: Refill,
}

/// How fast a bucket fills and how much it holds.
#[derive(Debug, Clone, Copy)]
struct Refill {
    /// Tokens added per second.
    rate: f64,
    /// Bucket capacity: the largest burst.
    burst: f64,
}

impl Refill {
    fn new(rate_per_sec: f64, burst: f64) -> Self {
        Refill {
            rate: rate_per_sec.max(f64::MIN_POSITIVE),
            burst: burst.max(1.0),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(refill: Refill, now: Instant) -> Self {
        Bucket {
            tokens: refill.burst,
            updated: now,
        }
    }

    fn fill(&mut self, refill: Refill, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * refill.rate).min(refill.burst);
        self.updated = now;
    }

    /// Takes one token, or says how long until one is available.
    fn take(&mut self, refill: Refill, now: Instant) -> Result<(), Duration> {
        self.fill(refill, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / refill.rate;
            Err(Duration::from_secs_f64(wait.min(86_400.0)).max(Duration::from_millis(1)))
        }
    }

    /// Gives back a token taken earlier (never beyond the burst).
    fn give_back(&mut self, refill: Refill, now: Instant) {
        self.fill(refill, now);
        self.tokens = (self.tokens + 1.0).min(refill.burst);
    }
}

impl RateLimiter {
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        RateLimiter {
            buckets: DashMap::with_hasher(IdHasher::default()),
            refill: Refill::new(rate_per_sec, burst),
        }
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub fn check(&self, key: Uuid) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// [`RateLimiter::check`] at `now`, for a caller that has read the
    /// clock already.
    pub fn check_at(&self, key: Uuid, now: Instant) -> Result<(), Duration> {
        self.buckets
            .entry(key)
            .or_insert_with(|| Bucket::full(self.refill, now))
            .take(self.refill, now)
    }

    /// Forgets buckets that have refilled: they behave like new ones.
    pub fn prune(&self) {
        let now = Instant::now();
        let refill = self.refill;
        self.buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * refill.rate
                < refill.burst
        });
    }
}

/// A fixed table of token buckets for keys that clients choose. A key
/// hashes (with a per-process random key, so nobody can aim at a slot) to
/// one slot; two keys that collide share a bucket, which can only make the
/// limit stricter for them, never looser. Memory is the table, whatever
/// arrives: no pruning, no eviction, and a flood of invented keys cannot
/// grow it.
#[derive(Debug)]
pub struct SlotLimiter {
    /// The buckets, each behind its own lock: a check locks one, briefly.
    slots: Box<[Mutex<Bucket>]>,
    /// Picks a key's slot.
    hasher: RandomState,
    /// How the buckets fill.
    refill: Refill,
}

/// A slot of a [`SlotLimiter`], to give a token back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(usize);

impl SlotLimiter {
    pub fn new(rate_per_sec: f64, burst: f64, slots: usize) -> Self {
        let refill = Refill::new(rate_per_sec, burst);
        let now = Instant::now();
        SlotLimiter {
            slots: (0..slots.max(1))
                .map(|_| Mutex::new(Bucket::full(refill, now)))
                .collect(),
            hasher: RandomState::new(),
            refill,
        }
    }

    /// The slot `key` lives in.
    pub fn slot(&self, key: impl Hash) -> Slot {
        Slot((self.hasher.hash_one(key) % self.slots.len() as u64) as usize)
    }

    /// Takes one token from `slot`, or says how long until one is there.
    pub fn take(&self, slot: Slot, now: Instant) -> Result<(), Duration> {
        self.bucket(slot).take(self.refill, now)
    }

    /// Gives back a token taken from `slot`.
    pub fn give_back(&self, slot: Slot) {
        self.bucket(slot).give_back(self.refill, Instant::now());
    }

    fn bucket(&self, slot: Slot) -> std::sync::MutexGuard<'_, Bucket> {
        // A bucket is two numbers always left consistent: a panic elsewhere
        // while one was locked leaves it usable.
        self.slots[slot.0]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The key a client address is limited by: an IPv4 address, or the /64 of
/// an IPv6 one (one subscriber usually holds a whole /64, so a key per
/// address would give them 2^64 buckets). An IPv4-mapped IPv6 address is its
/// IPv4 address.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_limited() {
        let limiter = RateLimiter::new(1.0, 3.0);
        let user = Uuid::new_v4();
        for _ in 0..3 {
            assert!(limiter.check(user).is_ok());
        }
        let retry = limiter.check(user).unwrap_err();
        assert!(retry > Duration::ZERO && retry <= Duration::from_secs(1));
        assert!(
            limiter.check(Uuid::new_v4()).is_ok(),
            "other users unaffected"
        );
    }

    #[test]
    fn slots_limit_refill_and_take_back() {
        let limiter = SlotLimiter::new(2.0, 2.0, 1024);
        let now = Instant::now();
        let slot = limiter.slot("alice");
        assert_eq!(slot, limiter.slot("alice"), "a key keeps its slot");
        assert!(limiter.take(slot, now).is_ok());
        assert!(limiter.take(slot, now).is_ok());
        let retry = limiter.take(slot, now).unwrap_err();
        assert!(retry <= Duration::from_millis(500), "{retry:?}");
        // Half a second refills one token at 2/s.
        assert!(limiter.take(slot, now + Duration::from_millis(500)).is_ok());
        // A token given back can be taken again, but never beyond the burst.
        limiter.give_back(slot);
        limiter.give_back(slot);
        limiter.give_back(slot);
        let later = now + Duration::from_millis(500);
        assert!(limiter.take(slot, later).is_ok());
        assert!(limiter.take(slot, later).is_ok());
        assert!(limiter.take(slot, later).is_err());
    }

    #[test]
    fn one_slot_is_shared_by_every_key() {
        // The degenerate table: collisions make the limit stricter.
        let limiter = SlotLimiter::new(1.0, 1.0, 1);
        let now = Instant::now();
        assert!(limiter.take(limiter.slot("a"), now).is_ok());
        assert!(limiter.take(limiter.slot("b"), now).is_err());
    }

    #[test]
    fn ipv6_addresses_are_limited_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(address_key(v4), v4);
    }
}
