//! Rate limits on password attempts, as Signal-Server and most services
//! have them: one token bucket per client address and one per account.
//!
//! - The **address** bucket bounds what one client can make the server
//!   hash, right or wrong (login, register, the `Basic` header,
//!   delete-account all count): it stops one client from guessing fast or
//!   burning the Argon2 workers.
//! - The **account** bucket bounds the guesses against one account from
//!   all addresses together, which the address bucket alone cannot (a
//!   botnet has many addresses). Only wrong passwords count: a right one
//!   (or a check that never ran, the server being busy) gives its token
//!   back, so the owner's own logins never drain it.
//!
//! The trade-off: someone guessing an account's password keeps its bucket
//! empty, and while they do, its owner's password logins are refused too
//! (`RATE_LIMITED` with `retry_after_ms`). Once guessing stops the owner
//! waits at most one refill interval (1/rate, 20 s by default), and an owner
//! who holds a session token (`Resume`, `Bearer`) is never limited at all.
//! Refusing the owner briefly is the price of bounding guesses: the server
//! cannot tell the owner's attempt from an attacker's without hashing it,
//! and hashing it is the guess.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::Username;
use crate::config::AuthLimits;
use crate::ratelimit::{Slot, SlotLimiter, address_key};

/// The two tables of buckets. See the module docs.
#[derive(Debug)]
pub struct PasswordLimits {
    /// Every password attempt, by client address.
    by_address: SlotLimiter,
    /// Wrong password attempts, by account (the username, in lower case,
    /// as usernames are unique in any case).
    by_account: SlotLimiter,
}

/// Which bucket refused an attempt, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Address(Duration),
    Account(Duration),
}

impl Refused {
    pub fn retry_after(self) -> Duration {
        match self {
            Refused::Address(wait) | Refused::Account(wait) => wait,
        }
    }
}

/// An admitted attempt: the account token it took, to give back unless
/// the password turns out wrong.
#[derive(Debug)]
#[must_use = "only a wrong password keeps its account token"]
pub struct Admitted {
    account: Option<Slot>,
}

impl PasswordLimits {
    pub fn new(limits: &AuthLimits) -> Self {
        PasswordLimits {
            by_address: SlotLimiter::new(
                limits.password_address_rate_per_sec,
                limits.password_address_burst,
                limits.password_limit_slots,
            ),
            by_account: SlotLimiter::new(
                limits.password_account_rate_per_sec,
                limits.password_account_burst,
                limits.password_limit_slots,
            ),
        }
    }

    /// Admits a password attempt from `from` on `account` (none for a
    /// registration, which has no account yet), or refuses it.
    ///
    /// The rule: the attempt takes a token from its address's bucket, then
    /// one from its account's; refused by either, it is refused. A token
    /// already taken stays taken, so an attempt refused for its account
    /// still counts against its address. Each take is atomic under its
    /// bucket's lock; no invariant spans the two.
    pub fn admit(&self, from: IpAddr, account: Option<&Username>) -> Result<Admitted, Refused> {
        let now = Instant::now();
        let address = self.by_address.slot(address_key(from));
        self.by_address
            .take(address, now)
            .map_err(Refused::Address)?;
        let Some(account) = account else {
            return Ok(Admitted { account: None });
        };
        let slot = self.by_account.slot(account.as_ref().to_ascii_lowercase());
        self.by_account.take(slot, now).map_err(Refused::Account)?;
        Ok(Admitted {
            account: Some(slot),
        })
    }

    /// The password was right, or never checked (the server was busy):
    /// it was no guess, so the account's token goes back. The address's
    /// stays taken.
    pub fn not_a_guess(&self, admitted: Admitted) {
        if let Some(slot) = admitted.account {
            self.by_account.give_back(slot);
        }
    }

    /// The password was wrong (or, registering, there is no account): the
    /// tokens stay taken.
    pub fn spent(&self, admitted: Admitted) {
        let _ = admitted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn limits(address: (f64, f64), account: (f64, f64)) -> PasswordLimits {
        let mut config = crate::Config::parse_from(["relay"]).limits.auth;
        (
            config.password_address_rate_per_sec,
            config.password_address_burst,
        ) = address;
        (
            config.password_account_rate_per_sec,
            config.password_account_burst,
        ) = account;
        PasswordLimits::new(&config)
    }

    fn name(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    #[test]
    fn an_address_is_limited_whatever_it_tries() {
        let limits = limits((0.001, 3.0), (1000.0, 1000.0));
        let attacker: IpAddr = "192.0.2.1".parse().unwrap();
        for user in ["a01", "a02", "a03"] {
            let admitted = limits.admit(attacker, Some(&name(user))).unwrap();
            limits.not_a_guess(admitted);
        }
        // Right passwords count against the address too: each was a hash.
        assert!(matches!(
            limits.admit(attacker, Some(&name("a04"))),
            Err(Refused::Address(_))
        ));
        assert!(matches!(
            limits.admit(attacker, None),
            Err(Refused::Address(_))
        ));
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(limits.admit(other, Some(&name("a04"))).is_ok());
    }

    #[test]
    fn wrong_passwords_drain_an_account_and_right_ones_do_not() {
        let limits = limits((1000.0, 1000.0), (0.001, 2.0));
        let owner: IpAddr = "198.51.100.7".parse().unwrap();
        // The owner logs in again and again: never limited.
        for _ in 0..10 {
            let admitted = limits.admit(owner, Some(&name("alice"))).unwrap();
            limits.not_a_guess(admitted);
        }
        // Two wrong guesses from two addresses empty the account's bucket,
        // in any letter case, and the next attempt from anywhere waits.
        for (i, user) in ["alice", "ALICE"].iter().enumerate() {
            let from = IpAddr::from([203, 0, 113, i as u8]);
            let admitted = limits.admit(from, Some(&name(user))).unwrap();
            limits.spent(admitted);
        }
        let refused = limits.admit(owner, Some(&name("Alice"))).unwrap_err();
        assert!(matches!(refused, Refused::Account(_)), "{refused:?}");
        assert!(refused.retry_after() > Duration::ZERO);
        assert!(
            limits.admit(owner, Some(&name("bob"))).is_ok(),
            "other accounts are unaffected"
        );
    }
}
