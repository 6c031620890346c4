//! The hasher of the maps on a message's path, keyed by user and message
//! ids: foldhash, seeded at random per map, instead of the standard
//! library's SipHash-1-3, which profiles showed on every message (a route,
//! a delivery's place among the unacked, its ack, the sender's rate limit).
//!
//! Why it is safe for each of those maps, whose keys clients can name:
//! - user ids are made by the server (random UUIDs); a client names any id
//!   it likes as a recipient, and one that is no user's holds its place in
//!   the registry only until its store fails;
//! - message ids are random UUIDs, or, for a send with a client message id,
//!   a SHA-256 digest of the sender and that id, which the client chooses.
//!
//! A client could so choose keys. But a seeded hash gives it nothing to aim
//! at: the seed is random per map and process, never leaves it, and no
//! answer depends on a key's place in a map, so keys that collide cannot be
//! searched for from outside. The per-connection maps are also bounded
//! (`max_unacked`), which bounds what even a collision could cost.

/// Builds the hashers of the maps above.
pub type IdHasher = foldhash::fast::RandomState;
