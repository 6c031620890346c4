//! The users this node holds: for each, the connection holding them here
//! and the epoch of the claim it registered under (`relay_presence`).
//!
//! A user can reconnect to this node while something is still being done
//! about their previous connection: its end, a peer asking this node to let
//! go, the periodic check that finds a claim lost. Each of those acts on
//! the claim it was started for, never on whatever claim the user holds by
//! the time it finishes. Acting on the user alone closed the new socket or
//! deleted its presence row, leaving it live with no row: other nodes then
//! stored for the user behind its back.

use dashmap::DashMap;
use uuid::Uuid;

/// One connection's claim on its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Claim {
    /// The connection (its registry id).
    pub conn_id: u64,
    /// The claim's epoch in `relay_presence`.
    pub epoch: i64,
}

/// User to the claim of the connection holding them here.
#[derive(Default)]
pub(super) struct Claims {
    held: DashMap<Uuid, Claim>,
}

impl Claims {
    /// Connection `claim.conn_id` holds the user now: a newer claim (a
    /// higher epoch, from one sequence) replaces an older one, whichever
    /// of two connections racing on this node records its claim last.
    pub fn hold(&self, user: Uuid, claim: Claim) {
        self.held
            .entry(user)
            .and_modify(|held| {
                if claim.epoch > held.epoch {
                    *held = claim;
                }
            })
            .or_insert(claim);
    }

    /// The claim on `user`, if this node holds them.
    pub fn of(&self, user: Uuid) -> Option<Claim> {
        self.held.get(&user).map(|c| *c)
    }

    /// Connection `conn_id` ended: forgets its claim, unless a newer
    /// connection holds the user. Returns the ended claim, to release.
    pub fn ended(&self, user: Uuid, conn_id: u64) -> Option<Claim> {
        self.held
            .remove_if(&user, |_, c| c.conn_id == conn_id)
            .map(|(_, c)| c)
    }

    /// Forgets `claim` if it is still the user's: they were let go, or the
    /// claim was found lost. False if a newer claim holds them.
    pub fn forget(&self, user: Uuid, claim: Claim) -> bool {
        self.held.remove_if(&user, |_, c| *c == claim).is_some()
    }

    /// Every user held, with the epoch of the claim holding them, for the
    /// periodic check of which claims are still this node's.
    pub fn epochs(&self) -> Vec<(Uuid, i64)> {
        self.held.iter().map(|c| (*c.key(), c.epoch)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(conn_id: u64, epoch: i64) -> Claim {
        Claim { conn_id, epoch }
    }

    #[test]
    fn a_connection_that_ends_forgets_only_its_own_claim() {
        let claims = Claims::default();
        let user = Uuid::new_v4();
        claims.hold(user, claim(1, 10));
        claims.hold(user, claim(2, 11));
        assert_eq!(claims.ended(user, 1), None, "the newer connection's");
        assert_eq!(claims.of(user), Some(claim(2, 11)));
        assert_eq!(claims.ended(user, 2), Some(claim(2, 11)));
        assert_eq!(claims.of(user), None);
    }

    #[test]
    fn the_newest_claim_holds_whichever_is_recorded_last() {
        let claims = Claims::default();
        let user = Uuid::new_v4();
        claims.hold(user, claim(2, 11));
        claims.hold(user, claim(1, 10));
        assert_eq!(claims.of(user), Some(claim(2, 11)));
        assert_eq!(claims.ended(user, 1), None);
    }

    #[test]
    fn a_claim_found_lost_or_let_go_leaves_a_newer_one() {
        let claims = Claims::default();
        let user = Uuid::new_v4();
        claims.hold(user, claim(1, 10));
        let checked = claims.epochs();
        assert_eq!(checked, vec![(user, 10)]);
        // The user reconnects here before the check's answer is handled.
        claims.hold(user, claim(2, 11));
        assert!(!claims.forget(user, claim(1, 10)));
        assert_eq!(claims.of(user), Some(claim(2, 11)));
        assert!(claims.forget(user, claim(2, 11)));
        assert_eq!(claims.of(user), None);
        assert!(claims.epochs().is_empty());
    }
}
