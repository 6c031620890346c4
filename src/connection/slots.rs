//! Connection slots, in two budgets: `max_connections` for authenticated
//! sockets, and a smaller one (`max_unauthenticated`, and at most
//! `max_unauthenticated_per_address` from one client address) for sockets
//! that have not authenticated yet. A socket takes an unauthenticated slot
//! when it is accepted and trades it for an authenticated one when it
//! authenticates, so silent or slow sockets can only ever fill their own
//! budget, never the authenticated users'.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::ConnectionLimits;
use crate::ratelimit::address_key;

/// Both budgets. Cheap to clone.
#[derive(Clone)]
pub struct Slots {
    /// Authenticated sockets.
    authenticated: Arc<Semaphore>,
    /// Sockets not yet authenticated, from all addresses.
    unauthenticated: Arc<Semaphore>,
    /// Its size, to tell how many are taken.
    unauthenticated_max: usize,
    /// Sockets not yet authenticated, per client address.
    per_address: Arc<PerAddress>,
    /// Refused sockets waiting for their client to close after the
    /// answer, as many as the unauthenticated budget: beyond that a refusal
    /// is answered and closed at once, so a flood of refused sockets cannot
    /// hold file descriptors.
    lingering: Arc<Semaphore>,
}

/// Counts of unauthenticated sockets by client address. An address is in
/// the map only while it has some, so the map is bounded by the
/// unauthenticated budget.
struct PerAddress {
    counts: DashMap<IpAddr, u32>,
    /// Most from one address.
    cap: u32,
}

/// Why a new socket gets no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// The unauthenticated budget is spent.
    Full,
    /// This address holds its share of it.
    AddressFull,
}

/// A socket refused a slot, and whether it may linger after its answer
/// (see [`Slots::refused`]).
#[derive(Debug)]
pub struct Refused {
    pub why: NoSlot,
    /// Held while the socket lingers; `None`: close right after answering.
    pub linger: Option<OwnedSemaphorePermit>,
}

/// A socket's slot: unauthenticated until [`Ticket::authenticated`]. Its
/// slots are given back when it is dropped.
pub struct Ticket {
    /// When the socket was accepted; its deadlines count from here.
    pub accepted: Instant,
    /// Held until the socket authenticates.
    _unauthenticated: Unauthenticated,
    /// Where authenticated slots come from.
    pool: Arc<Semaphore>,
    /// Taken (reserved) just before an authentication is tried, so one
    /// that succeeds has its place; given back if it fails.
    authenticated: Option<OwnedSemaphorePermit>,
}

/// A socket's place in the unauthenticated budget, before its client's
/// share is taken; see [`Slots::hold`].
pub struct Held {
    /// When the socket was accepted; its deadlines count from here.
    pub accepted: Instant,
    permit: OwnedSemaphorePermit,
}

impl Held {
    /// The client is known: its address's share too, and the ticket. The
    /// deadlines still count from the accept.
    pub fn for_client(self, slots: &Slots, client: IpAddr) -> Result<Ticket, NoSlot> {
        let address = slots
            .per_address
            .take(address_key(client))
            .ok_or(NoSlot::AddressFull)?;
        Ok(slots.ticket(self, address))
    }
}

/// The unauthenticated slot's two parts.
struct Unauthenticated {
    _permit: OwnedSemaphorePermit,
    _address: AddressShare,
}

/// One of an address's unauthenticated sockets; counted down on drop.
struct AddressShare {
    per_address: Arc<PerAddress>,
    address: IpAddr,
}

impl Drop for AddressShare {
    fn drop(&mut self) {
        // Counting down and removing at zero happen under the shard lock,
        // so a concurrent `take` sees either the old count or no entry.
        self.per_address
            .counts
            .remove_if_mut(&self.address, |_, count| {
                *count -= 1;
                *count == 0
            });
    }
}

impl PerAddress {
    /// Counts one more socket for `address`, or refuses when it has `cap`.
    /// Atomic under the entry's shard lock.
    fn take(self: &Arc<Self>, address: IpAddr) -> Option<AddressShare> {
        let mut count = self.counts.entry(address).or_insert(0);
        // The cap is at least 1, so an entry is never left behind at 0.
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        drop(count);
        Some(AddressShare {
            per_address: self.clone(),
            address,
        })
    }
}

impl Slots {
    pub fn new(limits: &ConnectionLimits) -> Self {
        Slots {
            authenticated: Arc::new(Semaphore::new(limits.max_connections)),
            unauthenticated: Arc::new(Semaphore::new(limits.max_unauthenticated)),
            unauthenticated_max: limits.max_unauthenticated,
            per_address: Arc::new(PerAddress {
                counts: DashMap::new(),
                cap: limits.max_unauthenticated_per_address.max(1),
            }),
            lingering: Arc::new(Semaphore::new(limits.max_unauthenticated)),
        }
    }

    /// A socket refused for `why`: it may linger after its answer (reading
    /// what its client still sends, so closing does not reset the
    /// connection and lose the answer) while fewer refused sockets linger
    /// than the unauthenticated budget.
    pub fn refused(&self, why: NoSlot) -> Refused {
        Refused {
            why,
            linger: self.lingering.clone().try_acquire_owned().ok(),
        }
    }

    /// An unauthenticated slot for a socket from `peer`, accepted now.
    pub fn accept(&self, peer: IpAddr) -> Result<Ticket, NoSlot> {
        let address = self
            .per_address
            .take(address_key(peer))
            .ok_or(NoSlot::AddressFull)?;
        Ok(self.ticket(self.hold()?, address))
    }

    /// A place in the unauthenticated budget for a socket, accepted now,
    /// whose client is not known yet: a load balancer's, until its PROXY
    /// header names the client ([`Held::for_client`]). Reading the header
    /// therefore counts against the budget like any other silent socket.
    pub fn hold(&self) -> Result<Held, NoSlot> {
        let permit = self
            .unauthenticated
            .clone()
            .try_acquire_owned()
            .map_err(|_| NoSlot::Full)?;
        Ok(Held {
            accepted: Instant::now(),
            permit,
        })
    }

    fn ticket(&self, held: Held, address: AddressShare) -> Ticket {
        Ticket {
            accepted: held.accepted,
            _unauthenticated: Unauthenticated {
                _permit: held.permit,
                _address: address,
            },
            pool: self.authenticated.clone(),
            authenticated: None,
        }
    }

    /// Reads how many sockets hold an unauthenticated slot.
    pub fn unauthenticated_reader(&self) -> impl Fn() -> i64 + Send + Sync + 'static {
        let (semaphore, max) = (self.unauthenticated.clone(), self.unauthenticated_max);
        move || max.saturating_sub(semaphore.available_permits()) as i64
    }
}

impl Ticket {
    /// Whether every authenticated slot is taken right now (and none is
    /// reserved for this socket).
    pub fn authenticated_full(&self) -> bool {
        self.authenticated.is_none() && self.pool.available_permits() == 0
    }

    /// Reserves an authenticated slot (if none is reserved yet), before
    /// the socket tries to authenticate; false when none is free.
    pub fn reserve(&mut self) -> bool {
        if self.authenticated.is_none() {
            self.authenticated = self.pool.clone().try_acquire_owned().ok();
        }
        self.authenticated.is_some()
    }

    /// An authentication failed: its reserved slot goes back.
    pub fn unreserve(&mut self) {
        self.authenticated = None;
    }

    /// The socket authenticated: its unauthenticated slot goes back, and
    /// the authenticated one reserved for it is its own.
    ///
    /// # Panics
    /// If no slot was reserved: a socket authenticates only after
    /// [`Ticket::reserve`] said yes.
    pub fn authenticated(self) -> Slot {
        Slot {
            _permit: self
                .authenticated
                .expect("an authenticated socket reserved its slot"),
        }
    }
}

/// An authenticated socket's slot; given back when dropped.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn slots(max_connections: usize, unauthenticated: usize, per_address: u32) -> Slots {
        let mut limits = crate::Config::parse_from(["relay"]).limits.connection;
        limits.max_connections = max_connections;
        limits.max_unauthenticated = unauthenticated;
        limits.max_unauthenticated_per_address = per_address;
        Slots::new(&limits)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    /// The rules: an address holds at most its share of unauthenticated
    /// slots, all addresses together at most the budget; a slot and an
    /// address's share come back when the socket goes.
    #[test]
    fn unauthenticated_sockets_have_a_budget_and_a_share_per_address() {
        let slots = slots(10, 3, 2);
        let a1 = slots.accept(ip(2)).unwrap();
        let _a2 = slots.accept(ip(2)).unwrap();
        assert_eq!(slots.accept(ip(2)).err(), Some(NoSlot::AddressFull));
        let _b1 = slots.accept(ip(3)).unwrap();
        assert_eq!(slots.accept(ip(4)).err(), Some(NoSlot::Full));
        assert_eq!(slots.unauthenticated_reader()(), 3);
        drop(a1);
        assert_eq!(slots.unauthenticated_reader()(), 2);
        let _a3 = slots.accept(ip(2)).expect("a share comes back");
        assert_eq!(slots.per_address.counts.len(), 2);
    }

    /// A balancer's socket holds a place in the budget while its client is
    /// not known, then takes the client's share: it is refused for the
    /// client's address, and its place comes back.
    #[test]
    fn a_held_socket_counts_then_takes_its_clients_share() {
        let slots = slots(10, 2, 1);
        let held = slots.hold().unwrap();
        assert_eq!(slots.unauthenticated_reader()(), 1, "counted while held");
        let accepted = held.accepted;
        let ticket = held.for_client(&slots, ip(7)).unwrap();
        assert_eq!(ticket.accepted, accepted, "deadlines count from the accept");
        let second = slots.hold().unwrap();
        assert!(slots.hold().is_err(), "the budget holds held sockets too");
        assert_eq!(
            second.for_client(&slots, ip(7)).err(),
            Some(NoSlot::AddressFull)
        );
        assert_eq!(slots.unauthenticated_reader()(), 1, "its place came back");
    }

    /// Refused sockets linger after their answer only as many at a time as
    /// the unauthenticated budget; the rest are closed at once.
    #[test]
    fn refused_sockets_linger_within_the_budget() {
        let slots = slots(10, 2, 2);
        let lingering: Vec<Refused> = (0..2).map(|_| slots.refused(NoSlot::Full)).collect();
        assert!(lingering.iter().all(|r| r.linger.is_some()));
        let closed = slots.refused(NoSlot::AddressFull);
        assert!(closed.linger.is_none(), "beyond the budget");
        assert_eq!(closed.why, NoSlot::AddressFull);
        drop(lingering);
        assert!(
            slots.refused(NoSlot::Full).linger.is_some(),
            "places come back"
        );
    }

    /// An address with no unauthenticated socket left is forgotten.
    #[test]
    fn an_address_without_sockets_leaves_the_map() {
        let slots = slots(10, 10, 5);
        let tickets: Vec<_> = (0..5).map(|_| slots.accept(ip(9)).unwrap()).collect();
        assert_eq!(slots.per_address.counts.get(&ip(9)).map(|c| *c), Some(5));
        drop(tickets);
        assert!(slots.per_address.counts.is_empty());
    }

    /// Authenticating trades the unauthenticated slot for an authenticated
    /// one, reserved first; a failed attempt gives the reservation back.
    #[test]
    fn authenticating_moves_a_socket_between_budgets() {
        let slots = slots(1, 2, 2);
        let mut first = slots.accept(ip(2)).unwrap();
        let mut second = slots.accept(ip(2)).unwrap();
        assert!(first.reserve());
        assert!(!second.reserve(), "one authenticated slot");
        first.unreserve();
        assert!(second.reserve());
        let slot = second.authenticated();
        assert_eq!(slots.unauthenticated_reader()(), 1);
        let third = slots
            .accept(ip(2))
            .expect("the unauthenticated slot came back");
        assert!(third.authenticated_full());
        drop(slot);
        assert!(!third.authenticated_full());
    }
}
