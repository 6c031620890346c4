//! The hasher of the maps on a message's path, keyed by user and message
//! ids: foldhash, seeded from the operating system's randomness, instead of
//! the standard library's SipHash-1-3, which profiles showed on every
//! message (a route, a delivery's place among the unacked, its ack, the
//! sender's rate limit).
//!
//! Why it is safe for each of those maps, whose keys clients can name:
//! - user ids are made by the server (random UUIDs); a client names any id
//!   it likes as a recipient, and one that is no user's holds its place in
//!   the registry only until its store fails;
//! - message ids are random UUIDs, or, for a send with a client message id,
//!   a SHA-256 digest of the sender and that id, which the client chooses;
//!   an ack names any ids it likes, and its set of them (deduplicated
//!   before they are acked) is bounded by `max_ack_ids`.
//!
//! A client could so choose keys, offline. But a seeded hash gives it
//! nothing to aim at: both seeds come from the operating system's random
//! source (foldhash's own default seeds from addresses and the clock,
//! which it does not claim resists this), they never leave the process,
//! and no answer depends on a key's place in a map, so keys that collide
//! cannot be searched for from outside. The per-connection maps are also
//! bounded (`max_unacked`), which bounds what even a collision could cost.

use std::hash::BuildHasher;
use std::sync::OnceLock;

use foldhash::SharedSeed;
use foldhash::fast::{FoldHasher, SeedableRandomState};

/// Builds the hashers of the maps above: each map its own random seed,
/// beside one random seed per process.
#[derive(Clone, Copy, Debug)]
pub struct IdHasher(SeedableRandomState);

impl Default for IdHasher {
    fn default() -> Self {
        static SHARED: OnceLock<SharedSeed> = OnceLock::new();
        let shared = SHARED.get_or_init(|| SharedSeed::from_u64(rand::random()));
        IdHasher(SeedableRandomState::with_seed(rand::random(), shared))
    }
}

impl BuildHasher for IdHasher {
    type Hasher = FoldHasher;

    fn build_hasher(&self) -> FoldHasher {
        self.0.build_hasher()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_map_hashes_with_a_seed_of_its_own() {
        let (a, b) = (IdHasher::default(), IdHasher::default());
        let key = uuid::Uuid::from_u128(7);
        assert_eq!(a.hash_one(key), a.hash_one(key));
        assert_ne!(a.hash_one(key), b.hash_one(key));
    }
}
