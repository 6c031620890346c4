//! Token-bucket rate limits keyed by user.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use uuid::Uuid;

/// One token bucket per user. Cheap to share behind an `Arc`; each check
/// locks only that user's shard, briefly.
#[derive(Debug)]
pub struct RateLimiter {
    /// Per-user buckets. Full buckets are pruned by [`RateLimiter::prune`],
    /// so the map holds only recently active users.
    buckets: DashMap<Uuid, Bucket>,
    /// Tokens added per second.
    rate: f64,
    /// Bucket capacity: the largest burst.
    burst: f64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    pub fn new(rate_per_sec: f64, burst: f64) -> Self {
        RateLimiter {
            buckets: DashMap::new(),
            rate: rate_per_sec.max(f64::MIN_POSITIVE),
            burst: burst.max(1.0),
        }
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub fn check(&self, key: Uuid) -> Result<(), Duration> {
        let now = Instant::now();
        let mut bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let elapsed = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.rate;
            Err(Duration::from_secs_f64(wait.min(86_400.0)).max(Duration::from_millis(1)))
        }
    }

    /// Forgets buckets that have refilled: they behave like new ones.
    pub fn prune(&self) {
        let now = Instant::now();
        self.buckets.retain(|_, b| {
            b.tokens + now.duration_since(b.updated).as_secs_f64() * self.rate < self.burst
        });
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
}
