//! The node's lease on the users it holds: how long it may go on delivering
//! to their sockets without hearing from PostgreSQL.
//!
//! A node taking a user over records that it wants them, asks the owner to
//! let go, and after the release timeout claims them whether or not the
//! owner answered (it may be paused, or cut off from Redis and PostgreSQL).
//! The owner must have stopped delivering by then, or a message stored for
//! the user under the new claim could be passed by a later one delivered
//! live on the old socket. It stops when its claim check sees the want (it
//! closes the socket first), or when this lease runs out: the lease is
//! renewed only by a check that found nothing wanted or lost, to the time
//! that check *started* plus the release timeout. A want recorded after a
//! check started is seen by the next check, and a want recorded before it
//! leaves the lease ending before the claimer's timeout does (both count
//! the same interval from about the same moment, on monotonic clocks).
//!
//! The clock is the monotonic one, which a paused process's keeps counting
//! but a suspended machine's (or virtual machine's) does not: a node woken
//! from suspend believes its lease younger than it is, until its first
//! check finds its claims lost or wanted.
//!
//! One window stays open: a claim committed here but not yet recorded in
//! the node's claims when a check starts is not checked by it. The next
//! check sees it, a third of the timeout later; only a check failing then
//! as well leaves the lease longer than the want's timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The lease. See the module docs.
pub(super) struct Lease {
    /// What `until` counts from.
    base: Instant,
    /// Nanoseconds after `base` at which the lease runs out.
    until: AtomicU64,
    /// How long after a check started it holds.
    term: Duration,
}

impl Lease {
    /// A lease that holds for `term` from `now`: a node just started has
    /// claimed nobody it would have to check.
    pub fn new(now: Instant, term: Duration) -> Lease {
        Lease {
            base: now,
            until: AtomicU64::new(nanos(term)),
            term,
        }
    }

    /// Whether the node may still deliver to the users it holds.
    pub fn holds(&self) -> bool {
        self.holds_at(Instant::now())
    }

    fn holds_at(&self, now: Instant) -> bool {
        nanos(now.saturating_duration_since(self.base)) < self.until.load(Ordering::Acquire)
    }

    /// A check that started at `started` found every claim still this
    /// node's and unwanted (or closed the sockets of those that were not):
    /// the lease holds for a term from then. Never shortens it, so a slow
    /// check finishing after a later one cannot take back its renewal.
    pub fn renew(&self, started: Instant) {
        let until = nanos(started.saturating_duration_since(self.base) + self.term);
        self.until.fetch_max(until, Ordering::AcqRel);
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: Duration = Duration::from_secs(3);

    #[test]
    fn a_new_lease_holds_for_one_term() {
        let start = Instant::now();
        let lease = Lease::new(start, TERM);
        assert!(lease.holds_at(start));
        assert!(lease.holds_at(start + TERM - Duration::from_millis(1)));
        assert!(!lease.holds_at(start + TERM));
    }

    #[test]
    fn a_renewal_counts_from_when_the_check_started() {
        let start = Instant::now();
        let lease = Lease::new(start, TERM);
        let check = start + Duration::from_secs(2);
        lease.renew(check);
        assert!(lease.holds_at(check + TERM - Duration::from_millis(1)));
        assert!(!lease.holds_at(check + TERM), "not from when it ended");
    }

    #[test]
    fn a_late_renewal_from_an_earlier_check_does_not_shorten_it() {
        let start = Instant::now();
        let lease = Lease::new(start, TERM);
        lease.renew(start + Duration::from_secs(5));
        lease.renew(start + Duration::from_secs(1));
        assert!(lease.holds_at(start + Duration::from_secs(7)));
    }
}
