//! Records every send attempt, every answer and every delivery, and checks
//! the cluster's contracts over them:
//!
//! - **confirmed ⇒ received**: a message whose sender heard DELIVERED or
//!   QUEUED reached its recipient (at least once);
//! - **one id per message**: every copy of a message, and every answer to a
//!   retry of it, carries the same message id;
//! - **order**: per (sender, recipient), of two confirmed messages where the
//!   last attempt of the first started before the first attempt of the
//!   second, the first arrived first. (A retry is a new send: a message that
//!   failed and was sent again after a later one may arrive after it.)

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use signal_relay::proto::SendOutcome;
use uuid::Uuid;

#[derive(Debug, Default)]
struct Send {
    /// What happened to it, for the failure message: (tick, event).
    history: Vec<(u64, String)>,
    first_attempt: Option<u64>,
    last_attempt: u64,
    ids: HashSet<Uuid>,
    outcome: Option<SendOutcome>,
}

#[derive(Default)]
struct State {
    /// (sender, recipient) → message number → its record.
    sends: HashMap<(Uuid, Uuid), HashMap<u64, Send>>,
    /// recipient → (sender, message number, id), in arrival order.
    arrivals: HashMap<Uuid, Vec<(Uuid, u64, Uuid)>>,
}

#[derive(Default)]
pub struct Checker {
    clock: AtomicU64,
    state: Mutex<State>,
}

impl Checker {
    /// A send attempt of message `n` starts.
    pub fn attempt(&self, sender: Uuid, recipient: Uuid, n: u64, via: &str) {
        let tick = self.clock.fetch_add(1, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap();
        let send = state
            .sends
            .entry((sender, recipient))
            .or_default()
            .entry(n)
            .or_default();
        send.first_attempt.get_or_insert(tick);
        send.last_attempt = tick;
        send.history.push((tick, format!("attempt via {via}")));
    }

    /// The relay answered an attempt.
    pub fn answered(&self, sender: Uuid, recipient: Uuid, n: u64, id: Uuid, outcome: SendOutcome) {
        let tick = self.clock.fetch_add(1, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap();
        let send = state
            .sends
            .get_mut(&(sender, recipient))
            .and_then(|m| m.get_mut(&n))
            .expect("answered after an attempt");
        send.ids.insert(id);
        send.history.push((tick, format!("answered {outcome:?}")));
        // A confirmation is never taken back by a later answer.
        if !is_confirmed(send) {
            send.outcome = Some(outcome);
        }
    }

    /// A recipient received message `n` of `sender`.
    pub fn arrived(&self, recipient: Uuid, sender: Uuid, n: u64, id: Uuid, via: &str) {
        let tick = self.clock.fetch_add(1, Ordering::SeqCst);
        let mut state = self.state.lock().unwrap();
        if let Some(send) = state
            .sends
            .get_mut(&(sender, recipient))
            .and_then(|m| m.get_mut(&n))
        {
            send.history
                .push((tick, format!("arrived via {via} as {id}")));
        }
        state
            .arrivals
            .entry(recipient)
            .or_default()
            .push((sender, n, id));
    }

    /// How many sends were confirmed.
    pub fn confirmed(&self) -> usize {
        let state = self.state.lock().unwrap();
        state
            .sends
            .values()
            .flat_map(|m| m.values())
            .filter(|s| is_confirmed(s))
            .count()
    }

    /// Whether every confirmed message has arrived.
    pub fn all_arrived(&self) -> bool {
        self.missing().is_empty()
    }

    /// What happened to message `n` from `sender` to `recipient`, for a
    /// failure message.
    pub fn history(&self, sender: Uuid, recipient: Uuid, n: u64) -> String {
        let state = self.state.lock().unwrap();
        let send = state
            .sends
            .get(&(sender, recipient))
            .and_then(|m| m.get(&n));
        format!("{:?}", send.map(|s| (&s.history, &s.ids)))
    }

    /// Confirmed messages that have not arrived: (sender, recipient, n).
    pub fn missing(&self) -> Vec<(Uuid, Uuid, u64)> {
        let state = self.state.lock().unwrap();
        let mut missing = Vec::new();
        for ((sender, recipient), sends) in &state.sends {
            let arrived: HashSet<u64> = state
                .arrivals
                .get(recipient)
                .into_iter()
                .flatten()
                .filter(|(s, _, _)| s == sender)
                .map(|(_, n, _)| *n)
                .collect();
            for (n, send) in sends {
                if is_confirmed(send) && !arrived.contains(n) {
                    missing.push((*sender, *recipient, *n));
                }
            }
        }
        missing
    }

    /// Asserts every contract; returns (confirmed, arrivals).
    pub fn verify(&self) -> (usize, usize) {
        let missing = self.missing();
        assert!(
            missing.is_empty(),
            "{} confirmed messages never arrived, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        let state = self.state.lock().unwrap();
        let mut arrivals_total = 0;
        for (recipient, arrivals) in &state.arrivals {
            arrivals_total += arrivals.len();
            // One id per message.
            let mut id_of: HashMap<(Uuid, u64), Uuid> = HashMap::new();
            for (sender, n, id) in arrivals {
                let first = *id_of.entry((*sender, *n)).or_insert(*id);
                assert_eq!(first, *id, "copies of {sender}/{n} carry different ids");
                if let Some(send) = state
                    .sends
                    .get(&(*sender, *recipient))
                    .and_then(|m| m.get(n))
                {
                    assert!(
                        send.ids.is_empty() || send.ids.contains(id),
                        "{sender}/{n} arrived with id {id}, answered with {:?}",
                        send.ids
                    );
                }
            }
            // Order of first arrivals, per sender.
            let mut seen = HashSet::new();
            let mut firsts: HashMap<Uuid, Vec<u64>> = HashMap::new();
            for (sender, n, _) in arrivals {
                if seen.insert((*sender, *n)) {
                    firsts.entry(*sender).or_default().push(*n);
                }
            }
            for (sender, order) in firsts {
                let Some(sends) = state.sends.get(&(sender, *recipient)) else {
                    continue;
                };
                let position: HashMap<u64, usize> =
                    order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
                let mut confirmed: Vec<(&u64, &Send)> =
                    sends.iter().filter(|(_, s)| is_confirmed(s)).collect();
                confirmed.sort_by_key(|(n, _)| **n);
                for (i, (a, send_a)) in confirmed.iter().enumerate() {
                    for (b, send_b) in &confirmed[i + 1..] {
                        let must_precede =
                            send_a.last_attempt < send_b.first_attempt.expect("attempted");
                        if must_precede {
                            assert!(
                                position[a] < position[b],
                                "{sender} -> {recipient}: {a} was sent before {b} but arrived after it\n{a}: {:?}\n{b}: {:?}",
                                send_a.history,
                                send_b.history
                            );
                        }
                    }
                }
            }
        }
        let confirmed = state
            .sends
            .values()
            .flat_map(|m| m.values())
            .filter(|s| is_confirmed(s))
            .count();
        (confirmed, arrivals_total)
    }
}

fn is_confirmed(send: &Send) -> bool {
    matches!(
        send.outcome,
        Some(SendOutcome::Delivered | SendOutcome::Queued)
    )
}
