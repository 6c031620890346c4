//! Cluster mode in the messaging front: messages for users connected to
//! other nodes, and users moving between nodes. docs/cluster.md gives the
//! design and the reasoning; in short:
//!
//! - **Ownership.** The node holding a user's socket owns the user, recorded
//!   in PostgreSQL (`relay_presence`). It alone routes live to them and
//!   numbers their messages; anyone stores for a user nobody owns. Every
//!   store passes the fence (`relay_fence`), so a node that lost a user
//!   cannot store behind the new owner's back.
//! - **Lanes.** A message for a user not connected here goes through that
//!   recipient's lane on this node: one unit (a batch of that recipient's
//!   messages, in send order) at a time is stored through the fence or
//!   forwarded to the owner, and the next unit starts only once the owner
//!   has routed this one or refused it (the user moved: try again where
//!   they are). One unit in flight per recipient is what keeps order while
//!   a user moves.
//! - **Answers.** The owner answers `Routed` once the unit has its place in
//!   the recipient's order, then an `Outcome` per message (delivered,
//!   queued, dropped). The sender's node answers the sender from those; a
//!   peer that dies or stays silent fails the send as retryable, never as
//!   a false confirmation.
//! - **Moving.** A node taking over a user records in PostgreSQL that it
//!   wants them and asks the old owner over Redis to let go (close with
//!   4409, store what it held, release the row); the owner's periodic
//!   claim check sees the want too, should the ask not arrive. The new
//!   node waits for that up to the release timeout, then claims the user,
//!   which waits for stores in flight. By then the old owner has stopped
//!   delivering to the user even if it heard nothing: its lease ran out
//!   (see `lease`). A node that finds a user claimed away from it closes
//!   the user's socket.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use prost::Message as _;
use sqlx::{ConnectOptions as _, Connection as _, PgConnection};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

mod claims;
mod lease;

use self::claims::{Claim, Claims};
use self::lease::Lease;
use super::answer::Responder;
use super::dedupe::Attempt;
use super::registry::{Registry, Route};
use super::store::{StoreWriter, ToStore};
use super::{Delivery, MessagingError};
use crate::cluster::wire::{self, DeliveryResult, Envelope, Kind};
use crate::cluster::{Cluster, Inbound, Listener};
use crate::envelope::{EnvelopeType, Message};
use crate::metrics::{ForwardResult, HandoffResult, Metrics};
use crate::protocol::{Close, proto};
use crate::storage::cluster::ClaimCheck;
use crate::storage::messages::Stored;
use crate::storage::{self, Database, StorageError};

/// How many times a unit may be sent after a user who keeps moving before
/// its messages fail as retryable.
const MAX_HOPS: usize = 4;
/// Most entries in the owner cache; it is cleared when full (a miss costs
/// one refused store, nothing more).
const OWNER_CACHE: usize = 100_000;
/// Longest between two checks that this node still owns the users
/// connected here (they run three times per lease term, and at least this
/// often).
const CHECK_AT_LEAST_EVERY: Duration = Duration::from_secs(2);
/// How many claims in turn a claim waits on before it fails (each one let
/// the user go, and another connection took them meanwhile).
const MAX_CLAIM_WAITS: usize = 3;
/// Users per statement of that check. One statement for all of them grew
/// with the node, and so did the write buffers of the connections that
/// sent it (pooled ones then; the checks' own now), which keep their size (390 KB at 4,000 users, by
/// heaptrack): about 0.1 KiB per connected user, for nothing.
const VALIDATE_BATCH: usize = 1024;

/// What a lane's sender hears.
type Answer = oneshot::Sender<Result<Delivery, MessagingError>>;

/// Who waits for one forwarded message's outcome.
struct Waiter {
    answer: Answer,
    /// The send's idempotency record, completed with the outcome.
    attempt: Option<Attempt>,
}

impl Waiter {
    fn finish(self, outcome: Result<Delivery, MessagingError>) {
        if let (Some(attempt), Ok(delivery)) = (self.attempt, &outcome) {
            attempt.complete(*delivery);
        }
        let _ = self.answer.send(outcome);
    }
}

/// One recipient's queue on this node. The map entry exists exactly while
/// a driver task runs for it.
struct Lane {
    queue: VecDeque<(ToStore, Answer)>,
}

/// A forward waiting for its answers.
struct Unit {
    /// The peer it went to.
    to: Uuid,
    /// Whose messages.
    recipient: Uuid,
    /// Told when the peer routed or refused it.
    routed: Option<oneshot::Sender<RoutedAnswer>>,
    /// One per message, taken as outcomes arrive.
    waiters: Vec<Option<Waiter>>,
    /// After this, whatever has not been answered fails as retryable.
    deadline: Instant,
}

enum RoutedAnswer {
    Accepted,
    /// The peer does not own the recipient; `to` does (or nobody).
    Moved {
        to: Option<Uuid>,
        waiters: Vec<Option<Waiter>>,
    },
}

/// Cluster mode's part of the relay. See the module docs.
pub(super) struct Remote {
    /// Itself, for what it hands to spawned tasks when the cluster calls it.
    this: Weak<Remote>,
    cluster: Cluster,
    /// This node incarnation.
    me: Uuid,
    db: Database,
    registry: Registry,
    store: StoreWriter,
    /// Recipient to its lane, for recipients not connected here.
    lanes: DashMap<Uuid, Lane>,
    /// Forwards waiting for answers, by unit id.
    units: DashMap<u64, Unit>,
    /// Release requests waiting for `Released`, by request id: the peer
    /// asked, and who waits.
    releases: DashMap<u64, (Uuid, oneshot::Sender<()>)>,
    /// Recipient to the incarnation believed to own them. A hint: a wrong
    /// one costs a refused attempt.
    owners: DashMap<Uuid, Uuid>,
    /// Users claimed by connections here: connection id and claim epoch.
    claims: Claims,
    /// Claims being given up, by user: the claim's epoch and the work,
    /// which a second request to give it up waits for.
    giving_up: DashMap<Uuid, (i64, Shared<BoxFuture<'static, ()>>)>,
    /// Per sender, messages in this node's lanes not yet routed. A user
    /// is let go only once theirs are routed, so what they sent here is
    /// placed before anything they send through their next node.
    unrouted: DashMap<Uuid, usize>,
    /// Woken when a sender's unrouted count reaches zero.
    routed_all: tokio::sync::Notify,
    /// Unit and request ids.
    next_id: AtomicU64,
    /// Most messages queued in one lane.
    lane_limit: usize,
    /// Most messages per unit.
    unit_limit: usize,
    forward_timeout: Duration,
    release_timeout: Duration,
    /// How long this node may deliver to its users without confirming its
    /// claims on them; the release timeout long.
    lease: Lease,
    /// How often the claims are checked (and the lease renewed).
    check_every: Duration,
    /// Spawned work (forward handling, releases) that shutdown waits for.
    tasks: TaskTracker,
    /// Forwards and hand-offs are counted for operators.
    metrics: Metrics,
}

impl Remote {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        cluster: Cluster,
        db: Database,
        registry: Registry,
        store: StoreWriter,
        tasks: &TaskTracker,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> Arc<Remote> {
        let config = cluster.config().clone();
        let release_timeout = config.release_timeout();
        let remote = Arc::new_cyclic(|this| Remote {
            this: this.clone(),
            me: cluster.incarnation(),
            cluster,
            db,
            registry,
            store,
            lanes: DashMap::new(),
            units: DashMap::new(),
            releases: DashMap::new(),
            owners: DashMap::new(),
            claims: Claims::default(),
            giving_up: DashMap::new(),
            unrouted: DashMap::new(),
            routed_all: tokio::sync::Notify::new(),
            next_id: AtomicU64::new(1),
            lane_limit: config.cluster_lane.max(1),
            unit_limit: config.cluster_batch.max(1),
            forward_timeout: config.forward_timeout(),
            release_timeout,
            lease: Lease::new(Instant::now(), release_timeout),
            check_every: (release_timeout / 3).min(CHECK_AT_LEAST_EVERY),
            tasks: tasks.clone(),
            metrics: metrics.clone(),
        });
        // Weak: the metrics outlive the relay in tests that start several.
        let sampled = Arc::downgrade(&remote);
        metrics.sample_cluster(move || {
            sampled.upgrade().map_or((0, 0), |remote| {
                (remote.lanes.len() as i64, remote.units.len() as i64)
            })
        });
        let listener: Weak<dyn Listener> = Arc::downgrade(&remote) as Weak<Remote>;
        remote.cluster.listen(listener);
        tasks.spawn(remote.clone().watch(stop));
        remote
    }

    /// This node incarnation, which the fence checks ownership against.
    pub(super) fn incarnation(&self) -> Uuid {
        self.me
    }

    /// Whether this node may still deliver to the users connected here:
    /// it confirmed its claims on them within the lease (see `lease`).
    pub(super) fn may_deliver(&self) -> bool {
        self.lease.holds()
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    // ------------------------------------------------------------- sending

    /// Queues a message for a recipient not connected here on their lane;
    /// the future resolves with its outcome.
    pub(super) fn enqueue(
        self: &Arc<Self>,
        order: ToStore,
    ) -> impl Future<Output = Result<Delivery, MessagingError>> + Send + 'static {
        let recipient = order.message.recipient_id;
        let (answer, outcome) = oneshot::channel();
        if let Some(sender) = order.message.sender_id {
            *self.unrouted.entry(sender).or_default() += 1;
        }
        let start = match self.lanes.entry(recipient) {
            Entry::Occupied(mut lane) => {
                if lane.get().queue.len() >= self.lane_limit {
                    self.routed(order.message.sender_id);
                    let _ = answer.send(Err(MessagingError::Unreachable(
                        "the recipient's lane is full",
                    )));
                } else {
                    lane.get_mut().queue.push_back((order, answer));
                }
                false
            }
            Entry::Vacant(vacant) => {
                vacant.insert(Lane {
                    queue: VecDeque::from([(order, answer)]),
                });
                true
            }
        };
        if start {
            self.tasks.spawn(self.clone().drive(recipient));
        }
        async move {
            outcome
                .await
                .unwrap_or(Err(MessagingError::Unreachable("the send was abandoned")))
        }
    }

    /// Sends an ephemeral message to whoever owns the recipient, outside
    /// any lane (ephemeral messages keep no order). Nobody online: dropped.
    ///
    /// The owner is read from PostgreSQL, not from the owner cache. The
    /// cache learns of a move only when a lane's store is refused or a
    /// forward comes back refused; an ephemeral message is never stored,
    /// so the node it was sent to answers `Dropped` for a user who left it,
    /// and with a stale cache every typing indicator to an online user
    /// would be dropped until an ordinary message corrected it.
    pub(super) fn send_ephemeral(
        self: &Arc<Self>,
        message: Message,
        attempt: Option<Attempt>,
    ) -> impl Future<Output = Result<Delivery, MessagingError>> + Send + 'static {
        let remote = self.clone();
        async move {
            let recipient = message.recipient_id;
            let owner = storage::cluster::owner(&remote.db, recipient)
                .await
                .map_err(MessagingError::Ownership)?;
            remote.learn_owner(recipient, owner);
            let Some(owner) = owner.filter(|o| *o != remote.me) else {
                if let Some(attempt) = attempt {
                    attempt.complete(Delivery::Dropped);
                }
                return Ok(Delivery::Dropped);
            };
            let (answer, outcome) = oneshot::channel();
            let order = ToStore {
                message,
                ticket: None,
                attempt,
                local: false,
            };
            match remote.forward(owner, vec![(order, answer)]).await {
                Forwarded::Done => {}
                Forwarded::Moved(_, units) => {
                    for (order, answer) in units {
                        if let Some(attempt) = order.attempt {
                            attempt.complete(Delivery::Dropped);
                        }
                        let _ = answer.send(Ok(Delivery::Dropped));
                    }
                }
            }
            outcome
                .await
                .unwrap_or(Err(MessagingError::Unreachable("the send was abandoned")))
        }
    }

    /// Runs a lane: one unit at a time, until the queue is empty.
    async fn drive(self: Arc<Self>, recipient: Uuid) {
        loop {
            let unit: Vec<(ToStore, Answer)> = match self.lanes.get_mut(&recipient) {
                Some(mut lane) => {
                    let n = lane.queue.len().min(self.unit_limit);
                    lane.queue.drain(..n).collect()
                }
                None => return,
            };
            if unit.is_empty() {
                // Atomic with enqueue: a message queued meanwhile keeps the
                // entry, and this driver goes on.
                if self
                    .lanes
                    .remove_if(&recipient, |_, lane| lane.queue.is_empty())
                    .is_some()
                {
                    return;
                }
                continue;
            }
            let senders: Vec<Option<Uuid>> =
                unit.iter().map(|(o, _)| o.message.sender_id).collect();
            self.dispatch_unit(recipient, unit).await;
            for sender in senders {
                self.routed(sender);
            }
        }
    }

    /// One of `sender`'s messages left its lane (routed, stored or failed).
    fn routed(&self, sender: Option<Uuid>) {
        let Some(sender) = sender else { return };
        let emptied = self
            .unrouted
            .remove_if_mut(&sender, |_, n| {
                *n -= 1;
                *n == 0
            })
            .is_some();
        if emptied {
            self.routed_all.notify_waiters();
        }
    }

    /// Waits (up to `deadline`) until nothing `sender` sent through this
    /// node is still unrouted.
    ///
    /// Past the deadline the user is released anyway, and their next node
    /// may route what they send next at once. What they sent here and is
    /// still queued behind a unit the recipient's node has not routed (it
    /// may be paused) would then be placed after that: it fails instead,
    /// as retryable, never having been confirmed (and the socket it came
    /// on is closed). A unit already sent stays: it is in the recipient's
    /// node's inbox ahead of anything the next node can send there (unless
    /// that node refuses it later, having lost the recipient meanwhile: a
    /// rarer race, left open). Nothing is failed if the user is connected
    /// here again (under another claim than `letting_go`): their new
    /// connection's messages are not moving anywhere.
    async fn sender_settled(&self, sender: Uuid, deadline: Instant, letting_go: Option<Claim>) {
        let wait = async {
            loop {
                let notified = self.routed_all.notified();
                if !self.unrouted.contains_key(&sender) {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout_at(deadline, wait).await.is_err()
            && self
                .claims
                .of(sender)
                .is_none_or(|claim| Some(claim) == letting_go)
        {
            let abandoned = self.abandon_queued(sender);
            tracing::warn!(user_id = %sender, abandoned, "messages sent through this node were not routed in time");
        }
    }

    /// Takes what `sender` has queued in lanes here, not yet sent, and
    /// fails it as retryable. Returns how many.
    fn abandon_queued(&self, sender: Uuid) -> usize {
        let from_sender = |(order, _): &(ToStore, Answer)| order.message.sender_id == Some(sender);
        // Found under read locks; only the lanes holding some are rebuilt.
        let holding: Vec<Uuid> = self
            .lanes
            .iter()
            .filter(|lane| lane.queue.iter().any(from_sender))
            .map(|lane| *lane.key())
            .collect();
        let mut abandoned = Vec::new();
        for recipient in holding {
            let Some(mut lane) = self.lanes.get_mut(&recipient) else {
                continue;
            };
            let queue = &mut lane.queue;
            let mut kept = VecDeque::with_capacity(queue.len());
            for entry in queue.drain(..) {
                if from_sender(&entry) {
                    abandoned.push(entry.1);
                } else {
                    kept.push_back(entry);
                }
            }
            *queue = kept;
        }
        let n = abandoned.len();
        for answer in abandoned {
            self.routed(Some(sender));
            let _ = answer.send(Err(MessagingError::Unreachable(
                "the sender moved to another node",
            )));
        }
        n
    }

    /// Places one unit: stored here through the fence, or forwarded to the
    /// owner; after the user as they move, a few times at most.
    async fn dispatch_unit(&self, recipient: Uuid, mut unit: Vec<(ToStore, Answer)>) {
        for _ in 0..MAX_HOPS {
            let owner = self
                .owners
                .get(&recipient)
                .map(|o| *o)
                .filter(|o| *o != self.me);
            match owner {
                None => {
                    // Numbered now, not when accepted: an earlier unit may
                    // have been numbered on the node it was forwarded to
                    // since, and these must come after it. (The numbers
                    // follow the clock; the tickets, keyed by the old
                    // numbers, only hold a drain back longer.)
                    for (order, _) in &mut unit {
                        order.message.seq = self.registry.next_seq();
                    }
                    let (orders, answers): (Vec<ToStore>, Vec<Answer>) = unit.into_iter().unzip();
                    let report = match self.store.store_all(orders).await {
                        Ok(report) => report,
                        Err(err) => {
                            for answer in answers {
                                let _ = answer.send(Err(MessagingError::Store(err.duplicate())));
                            }
                            return;
                        }
                    };
                    tracing::debug!(recipient = %recipient, results = ?report.results, "stored a unit");
                    if report.moved.is_empty() {
                        for (answer, stored) in answers.into_iter().zip(report.results) {
                            let _ = answer.send(stored_outcome(stored, recipient));
                        }
                        return;
                    }
                    // The fence refuses a recipient as a whole.
                    if let Some(Stored::Moved(to)) = report.results.first() {
                        self.learn_owner(recipient, Some(*to));
                    }
                    unit = report.moved.into_iter().zip(answers).collect();
                }
                Some(owner) => match self.forward(owner, unit).await {
                    Forwarded::Done => return,
                    Forwarded::Moved(to, back) => {
                        self.learn_owner(recipient, to);
                        unit = back;
                    }
                },
            }
        }
        for (_, answer) in unit {
            let _ = answer.send(Err(MessagingError::Unreachable(
                "the recipient kept moving between nodes",
            )));
        }
    }

    /// Sends a unit to `owner` and waits until it is routed there (the
    /// outcomes come later, straight to the waiters) or refused.
    async fn forward(&self, owner: Uuid, unit: Vec<(ToStore, Answer)>) -> Forwarded {
        let id = self.next_id();
        let recipient = unit[0].0.message.recipient_id;
        let messages = unit
            .iter()
            .map(|(order, _)| Envelope::from_message(&order.message))
            .collect();
        let mut orders = Vec::with_capacity(unit.len());
        let mut waiters = Vec::with_capacity(unit.len());
        for (mut order, answer) in unit {
            waiters.push(Some(Waiter {
                answer,
                attempt: order.attempt.take(),
            }));
            orders.push(order);
        }
        let (routed, routed_answer) = oneshot::channel();
        self.units.insert(
            id,
            Unit {
                to: owner,
                recipient,
                routed: Some(routed),
                waiters,
                deadline: Instant::now() + self.forward_timeout,
            },
        );
        let forward = wire::Forward {
            unit: id,
            recipient: wire::id_bytes(recipient),
            messages,
        };
        tracing::debug!(unit = id, peer = %owner, recipient = %recipient, "forwarding");
        if let Err(err) = self.cluster.send(owner, Kind::Forward(forward)) {
            self.fail_unit(id, send_error_text(err));
            self.metrics.cluster_forward(ForwardResult::failed);
            return Forwarded::Done;
        }
        // Held until routed, so this node's drain for the recipient (should
        // they connect here meanwhile) cannot pass these messages.
        let answer = tokio::time::timeout(self.forward_timeout, routed_answer).await;
        self.metrics.cluster_forward(match &answer {
            Ok(Ok(RoutedAnswer::Accepted)) => ForwardResult::routed,
            Ok(Ok(RoutedAnswer::Moved { .. })) => ForwardResult::moved,
            Ok(Err(_)) | Err(_) => ForwardResult::failed,
        });
        match answer {
            Ok(Ok(RoutedAnswer::Accepted)) => Forwarded::Done,
            Ok(Ok(RoutedAnswer::Moved { to, waiters })) => {
                let back = orders
                    .into_iter()
                    .zip(waiters)
                    .filter_map(|(mut order, waiter)| {
                        let waiter = waiter?;
                        order.attempt = waiter.attempt;
                        Some((order, waiter.answer))
                    })
                    .collect();
                Forwarded::Moved(to, back)
            }
            // Failed, and answered, by whoever dropped it.
            Ok(Err(_)) => Forwarded::Done,
            Err(_) => {
                self.fail_unit(id, "the recipient's node did not answer");
                Forwarded::Done
            }
        }
    }

    /// Fails what a unit's waiters still wait for, as retryable.
    fn fail_unit(&self, id: u64, why: &'static str) {
        if let Some((_, unit)) = self.units.remove(&id) {
            for waiter in unit.waiters.into_iter().flatten() {
                waiter.finish(Err(MessagingError::Unreachable(why)));
            }
        }
    }

    fn learn_owner(&self, recipient: Uuid, owner: Option<Uuid>) {
        match owner.filter(|o| *o != self.me) {
            Some(owner) => {
                if self.owners.len() >= OWNER_CACHE {
                    self.owners.clear();
                }
                self.owners.insert(recipient, owner);
            }
            None => {
                self.owners.remove(&recipient);
            }
        }
    }

    /// Pushes an event to a user connected to another node, if any. Best
    /// effort, like every push.
    pub(super) fn push(self: &Arc<Self>, user: Uuid, event: proto::push::Event) {
        let remote = self.clone();
        self.tasks.spawn(async move {
            // From PostgreSQL, not the owner cache, for the reason
            // `send_ephemeral` gives: a push is never stored either.
            let owner = storage::cluster::owner(&remote.db, user)
                .await
                .ok()
                .flatten();
            if let Some(owner) = owner.filter(|o| *o != remote.me) {
                let push = proto::Push { event: Some(event) }.encode_to_vec();
                let _ = remote.cluster.send(
                    owner,
                    Kind::Push(wire::Push {
                        user: wire::id_bytes(user),
                        push: push.into(),
                    }),
                );
            }
        });
    }

    // ----------------------------------------------------------- ownership

    /// Makes this node the user's owner, for a connection about to
    /// register here: if another node owns them, records the want, waits
    /// for it to let go (up to the release timeout), then claims. Returns
    /// the claim's epoch.
    pub(super) async fn claim(&self, user: Uuid) -> Result<i64, MessagingError> {
        // The new socket could take no message until the next check renews
        // the lease: refused now (1013, retry), it is not let in to be shut
        // at its first message.
        if !self.lease.holds() {
            return Err(MessagingError::Unreachable(
                "this node cannot confirm its users in PostgreSQL just now",
            ));
        }
        let mut take_from = None;
        let mut waits = 0;
        loop {
            // Usually nobody else holds the user, and this is the whole claim.
            let first = storage::cluster::claim_if_free(&self.db, user, self.me, take_from)
                .await
                .map_err(MessagingError::Ownership)?;
            if let Some(epoch) = first.epoch {
                tracing::debug!(user_id = %user, epoch, previous = ?first.previous, "claimed a user");
                if let Some(max) = first.max_seq {
                    self.registry.raise_seq(max);
                }
                self.owners.remove(&user);
                return Ok(epoch);
            }
            if waits == MAX_CLAIM_WAITS {
                return Err(MessagingError::Unreachable(
                    "the user is being taken over by other nodes",
                ));
            }
            waits += 1;
            // Not claimed, so the function named the claim holding the user.
            let Some(holder) = first.held_by() else {
                continue;
            };
            self.wait_let_go(user, holder).await;
            // That claim let go, or its node stopped delivering (its lease
            // ran out): the next round takes the user from it, unless
            // another claim holds them by then.
            take_from = Some(holder);
        }
    }

    /// Asks the node holding `holder` to let the user go, and waits until
    /// that claim has left the row or the release timeout has passed (the
    /// node may be dead, paused or cut off). The want is already in
    /// PostgreSQL, where the holder's claim check finds it: the ask over
    /// Redis only makes it quicker, and the row is read too (once per
    /// check period, so a node that hung costs each user moving off it a
    /// few reads), in case the answer cannot cross Redis.
    async fn wait_let_go(&self, user: Uuid, holder: storage::cluster::Holder) {
        let owner = holder.incarnation;
        let deadline = Instant::now() + self.release_timeout;
        let request = self.next_id();
        let (released, answer) = oneshot::channel();
        self.releases.insert(request, (owner, released));
        let asked = self
            .cluster
            .send(
                owner,
                Kind::Release(wire::Release {
                    request,
                    user: wire::id_bytes(user),
                }),
            )
            .is_ok();
        let heard = async {
            // An error: Redis refused the ask, or the owner died; the row
            // still tells.
            if !(asked && answer.await.is_ok()) {
                std::future::pending::<()>().await;
            }
        };
        let row_left = async {
            loop {
                tokio::time::sleep(self.check_every).await;
                match storage::cluster::holder(&self.db, user).await {
                    Ok(now) if now != Some(holder) => return,
                    Ok(_) => {}
                    Err(err) => {
                        tracing::debug!(user_id = %user, error = %err, "cannot read a user's owner")
                    }
                }
            }
        };
        let let_go = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                () = heard => {}
                () = row_left => {}
            }
        })
        .await
        .is_ok();
        self.releases.remove(&request);
        if let_go {
            self.metrics.cluster_handoff(HandoffResult::released);
        } else {
            self.metrics.cluster_handoff(HandoffResult::timed_out);
            tracing::warn!(user_id = %user, peer = %owner, asked, "the previous node did not let go in time; claiming anyway");
        }
    }

    /// Records that connection `conn_id` holds the user under `epoch`.
    pub(super) fn claimed(&self, user: Uuid, conn_id: u64, epoch: i64) {
        self.claims.hold(user, Claim { conn_id, epoch });
    }

    /// Connection `conn_id` of the user is gone and stored what it held:
    /// give the user up, unless a newer connection here holds them.
    pub(super) fn disconnected(self: &Arc<Self>, user: Uuid, conn_id: u64) {
        let Some(claim) = self.claims.ended(user, conn_id) else {
            return;
        };
        let remote = self.clone();
        self.tasks.spawn(async move {
            let deadline = Instant::now() + remote.release_timeout;
            remote.sender_settled(user, deadline, None).await;
            if let Err(err) =
                storage::cluster::release(&remote.db, user, remote.me, claim.epoch).await
            {
                // The row stays until this node dies or the user claims
                // again; meanwhile others forward here and this node stores.
                tracing::warn!(user_id = %user, error = %err, "cannot release a user");
            }
        });
    }

    /// A peer asks this node to let a user go: close their socket (4409),
    /// wait for it to store what it held, release the row, and say so.
    ///
    /// What is let go is the claim held when the request came. Should the
    /// user connect here again meanwhile, the new connection's claim and
    /// row stay (the peer's claim then takes the user over, and this node's
    /// check closes the new socket; or the peer is asked to let go in turn).
    /// With no claim here there is no row of this node's to release: the
    /// peer's claim replaces whatever row is left.
    ///
    /// All of it within half the release timeout of the request. The peer
    /// claims after the whole of it, counted from before the request
    /// crossed Redis: what this node gives up on is given up before the
    /// peer routes anything the user sends next.
    async fn let_go(self: Arc<Self>, from: Uuid, request: u64, user: Uuid) {
        tracing::debug!(user_id = %user, peer = %from, "letting a user go");
        let deadline = Instant::now() + self.release_timeout / 2;
        self.give_up(user, self.claims.of(user), deadline).await;
        tracing::debug!(user_id = %user, peer = %from, "let a user go");
        if request != 0 {
            let _ = self
                .cluster
                .send(from, Kind::Released(wire::Released { request }));
        }
    }

    /// Gives up the claim `held` on the user, for a node taking them over:
    /// closes the socket holding it, waits (up to `deadline`) for the
    /// socket to store what it held and for what the user sent through
    /// here to be routed, then releases the row, unless a newer claim here
    /// holds the user by then.
    ///
    /// A claim is given up once: a second call for it (the check seeing the
    /// want again, or the ask over Redis arriving too) waits for the first
    /// to finish, so nobody hears `Released` before the row is gone.
    async fn give_up(self: &Arc<Self>, user: Uuid, held: Option<Claim>, deadline: Instant) {
        let Some(claim) = held else {
            // No claim here, so no row of ours: only a socket on its way out.
            if let Some(conn) = self.registry.connection(user) {
                conn.close(Close::DISPLACED);
                let _ = tokio::time::timeout_at(deadline, conn.finished()).await;
            }
            self.sender_settled(user, deadline, None).await;
            return;
        };
        let work = match self.giving_up.entry(user) {
            Entry::Occupied(under_way) if under_way.get().0 == claim.epoch => {
                under_way.get().1.clone()
            }
            entry => {
                // Weak: the work sits in this node's own map while it runs.
                let this = self.this.clone();
                let work = async move {
                    let Some(remote) = this.upgrade() else { return };
                    remote.let_claim_go(user, claim, deadline).await;
                    remote
                        .giving_up
                        .remove_if(&user, |_, (epoch, _)| *epoch == claim.epoch);
                }
                .boxed()
                .shared();
                // Replaces the give-up of an older claim, which then does
                // not remove this one's entry.
                entry.insert_entry((claim.epoch, work.clone()));
                work
            }
        };
        work.await;
    }

    /// [`Remote::give_up`]'s work.
    async fn let_claim_go(&self, user: Uuid, claim: Claim, deadline: Instant) {
        if let Some(conn) = self.registry.connection(user)
            && conn.id == claim.conn_id
        {
            conn.close(Close::DISPLACED);
            if tokio::time::timeout_at(deadline, conn.finished())
                .await
                .is_err()
            {
                tracing::warn!(user_id = %user, "a displaced connection did not finish in time");
            }
        }
        self.sender_settled(user, deadline, Some(claim)).await;
        if self.claims.forget(user, claim)
            && let Err(err) = storage::cluster::release(&self.db, user, self.me, claim.epoch).await
        {
            tracing::warn!(user_id = %user, error = %err, "cannot release a user");
        }
    }

    /// Periodically: fail forwards past their deadline, and check this
    /// node's claims (which renews its lease).
    async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut conn = CheckConn {
            conn: None,
            retry_at: Instant::now(),
        };
        let mut tick = tokio::time::interval(self.check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            let now = Instant::now();
            let late: Vec<u64> = self
                .units
                .iter()
                .filter(|u| u.deadline <= now)
                .map(|u| *u.key())
                .collect();
            for id in late {
                self.fail_unit(id, "the recipient's node did not answer");
            }
            let started = Instant::now();
            if self.check_claims(&mut conn, started).await {
                self.lease.renew(started);
            }
        }
        if let Some(conn) = conn.conn {
            let _ = conn.close().await;
        }
    }

    /// Checks in PostgreSQL every claim held here: closes the sockets of
    /// users this node no longer owns (claimed by another node while this
    /// one was paused or cut off, or deleted), and of users another node
    /// wants, whom it then gives up. True if every claim was checked, every
    /// socket that had to close closed (the lease may be renewed).
    ///
    /// On the checks' own connection if there is one, dropped after an
    /// error or when the check outlasts the release timeout (cut off
    /// mid-statement, it holds no transaction, but its state is unknown).
    async fn check_claims(self: &Arc<Self>, conn: &mut CheckConn, started: Instant) -> bool {
        let checked = tokio::time::timeout(self.release_timeout, async {
            let (users, epochs): (Vec<Uuid>, Vec<i64>) = self.claims.epochs().into_iter().unzip();
            for (users, epochs) in users
                .chunks(VALIDATE_BATCH)
                .zip(epochs.chunks(VALIDATE_BATCH))
            {
                conn.connect(&self.db).await;
                let ending = match &mut conn.conn {
                    Some(c) => storage::cluster::check_claims(c, self.me, users, epochs).await?,
                    None => {
                        storage::cluster::check_claims(self.db.pool(), self.me, users, epochs)
                            .await?
                    }
                };
                self.end_claims(ending, started);
            }
            Ok::<(), StorageError>(())
        })
        .await;
        match checked {
            Ok(Ok(())) => return true,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, source = ?std::error::Error::source(&err), "cannot check this node's claims");
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.release_timeout, "checking this node's claims timed out");
            }
        }
        conn.conn = None;
        false
    }

    /// Acts on what a check found: closes the sockets of claims lost, and
    /// gives up those wanted.
    fn end_claims(self: &Arc<Self>, ending: Vec<(Uuid, i64, ClaimCheck)>, started: Instant) {
        for (user, epoch, check) in ending {
            let Some(claim) = self.claims.of(user).filter(|c| c.epoch == epoch) else {
                // Claimed again here since the check began.
                continue;
            };
            match check {
                ClaimCheck::Lost { exists } => {
                    if !self.claims.forget(user, claim) {
                        continue;
                    }
                    if let Some(conn) = self.registry.connection(user)
                        && conn.id == claim.conn_id
                    {
                        tracing::info!(user_id = %user, exists, "user claimed elsewhere or deleted; closing here");
                        conn.close(if exists {
                            Close::DISPLACED
                        } else {
                            Close::ACCOUNT_DELETED
                        });
                    }
                }
                ClaimCheck::Wanted => {
                    tracing::debug!(user_id = %user, "user wanted by another node; letting go");
                    // Closed now, before the lease is renewed: the socket
                    // takes nothing more. Storing what it held and releasing
                    // the row may take longer than a check.
                    if let Some(conn) = self.registry.connection(user)
                        && conn.id == claim.conn_id
                    {
                        conn.close(Close::DISPLACED);
                    }
                    // Half the timeout from the check's start, as `let_go`
                    // counts from the ask: the want was recorded at most a
                    // check period before, so this is over before the
                    // claimer's whole timeout.
                    let remote = self.clone();
                    let deadline = started + self.release_timeout / 2;
                    self.tasks
                        .spawn(async move { remote.give_up(user, Some(claim), deadline).await });
                }
            }
        }
    }

    // ----------------------------------------------------------- receiving

    /// Handles what the cluster hands over: what a peer sent (in its
    /// order), what could not be sent, a peer's death.
    fn inbound(self: &Arc<Self>, inbound: Inbound) {
        match inbound {
            Inbound::Items { from, items } => {
                for item in items {
                    if let Some(kind) = item.kind {
                        self.receive(from, kind);
                    }
                }
            }
            Inbound::Undelivered { to, items } => {
                self.metrics.cluster_undelivered.inc_by(items.len() as u64);
                for kind in items.into_iter().filter_map(|i| i.kind) {
                    match kind {
                        Kind::Forward(f) => self.fail_unit(f.unit, "Redis refused the forward"),
                        Kind::Release(r) => {
                            self.releases.remove(&r.request);
                        }
                        _ => {}
                    }
                }
                tracing::debug!(peer = %to, "items to a peer were not delivered");
            }
            Inbound::PeerGone(peer) => self.peer_gone(peer),
        }
    }

    fn receive(self: &Arc<Self>, from: Uuid, kind: Kind) {
        match kind {
            Kind::Forward(forward) => self.accept(from, forward),
            Kind::Routed(routed) => {
                if routed.moved_to.is_empty() {
                    if let Some(mut unit) = self.units.get_mut(&routed.unit)
                        && let Some(tell) = unit.routed.take()
                    {
                        let _ = tell.send(RoutedAnswer::Accepted);
                    }
                } else if let Some((_, unit)) = self.units.remove(&routed.unit) {
                    let to = wire::parse_id(&routed.moved_to, "moved_to").ok();
                    if let Some(tell) = unit.routed {
                        let _ = tell.send(RoutedAnswer::Moved {
                            to,
                            waiters: unit.waiters,
                        });
                    }
                }
            }
            Kind::Outcome(outcome) => {
                let done = {
                    let Some(mut unit) = self.units.get_mut(&outcome.unit) else {
                        return;
                    };
                    if let Some(waiter) = unit
                        .waiters
                        .get_mut(outcome.index as usize)
                        .and_then(Option::take)
                    {
                        waiter.finish(result_outcome(outcome.result(), unit.recipient));
                    }
                    unit.waiters.iter().all(Option::is_none)
                };
                if done {
                    self.units.remove(&outcome.unit);
                }
            }
            Kind::Release(release) => {
                if let Ok(user) = wire::parse_id(&release.user, "user") {
                    self.tasks
                        .spawn(self.clone().let_go(from, release.request, user));
                }
            }
            Kind::Released(released) => {
                if let Some((_, (_, tell))) = self.releases.remove(&released.request) {
                    let _ = tell.send(());
                }
            }
            Kind::Push(push) => {
                let Ok(user) = wire::parse_id(&push.user, "user") else {
                    return;
                };
                if let Ok(proto::Push { event: Some(event) }) = proto::Push::decode(&push.push[..])
                {
                    self.registry.push(user, event);
                }
            }
        }
    }

    /// Routes a forwarded unit here as if it had been sent here, and
    /// answers: `Routed` (or refused), then each message's outcome.
    fn accept(self: &Arc<Self>, from: Uuid, forward: wire::Forward) {
        let unit = forward.unit;
        tracing::debug!(unit, peer = %from, "accepting a forward");
        let Ok(recipient) = wire::parse_id(&forward.recipient, "recipient") else {
            tracing::warn!(peer = %from, "a forward with a malformed recipient");
            return;
        };
        let mut live = Vec::new();
        // Receipts routed live: answered `Queued` at once (the connection
        // stores one it does not get acked, as for a receipt routed live on
        // the acker's own node). What waits for a receipt is an ack, which
        // must not wait for another user's client to ack it in turn.
        let mut live_receipts = Vec::new();
        let mut to_store = Vec::new();
        let mut store_index = Vec::new();
        let mut dropped = Vec::new();
        let mut failed = Vec::new();
        for (index, envelope) in forward.messages.into_iter().enumerate() {
            let index = index as u32;
            let mut message = match envelope.into_message(recipient, 0) {
                Ok(message) => message,
                Err(err) => {
                    tracing::warn!(peer = %from, error = %err, "a forwarded message is malformed");
                    failed.push(index);
                    continue;
                }
            };
            let ephemeral = message.ephemeral;
            let receipt = message.envelope_type == EnvelopeType::Receipt;
            // Nobody waits for a receipt's outcome.
            let (responder, outcome) = if receipt {
                (None, None)
            } else {
                let (responder, outcome) = oneshot::channel();
                (Some(Responder::Once(responder)), Some(outcome))
            };
            let route = self
                .registry
                .route(recipient, ephemeral, None, responder, |seq| {
                    message.seq = seq;
                    message
                });
            match (route, outcome) {
                (Route::Live, None) => live_receipts.push(index),
                (Route::Live, Some(outcome)) => live.push((index, outcome)),
                (Route::Dropped, _) => dropped.push(index),
                (Route::Store(order), _) => {
                    store_index.push(index);
                    to_store.push(order);
                }
            }
        }
        let remote = self.clone();
        self.tasks.spawn(async move {
            let answer = |item: Kind| {
                let _ = remote.cluster.send(from, item);
            };
            let outcome = |index: u32, result: DeliveryResult| {
                Kind::Outcome(wire::Outcome {
                    unit,
                    index,
                    result: result as i32,
                })
            };
            let mut stored = Vec::new();
            if !to_store.is_empty() {
                match remote.store.store_all(to_store).await {
                    Ok(report) => {
                        if live.is_empty()
                            && live_receipts.is_empty()
                            && dropped.is_empty()
                            && failed.is_empty()
                            && let Some(Stored::Moved(owner)) = report.results.first()
                        {
                            // Not ours: refused whole, nothing kept.
                            answer(Kind::Routed(wire::Routed {
                                unit,
                                moved_to: wire::id_bytes(*owner),
                            }));
                            return;
                        }
                        stored = store_index
                            .into_iter()
                            .zip(report.results)
                            .map(|(i, s)| (i, stored_result(s)))
                            .collect();
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "storing forwarded messages failed");
                        stored = store_index
                            .into_iter()
                            .map(|i| (i, DeliveryResult::Failed))
                            .collect();
                    }
                }
            }
            answer(Kind::Routed(wire::Routed {
                unit,
                moved_to: Default::default(),
            }));
            for (index, result) in stored {
                answer(outcome(index, result));
            }
            for index in live_receipts {
                answer(outcome(index, DeliveryResult::Queued));
            }
            for index in dropped {
                answer(outcome(index, DeliveryResult::Dropped));
            }
            for index in failed {
                answer(outcome(index, DeliveryResult::Failed));
            }
            let live = live.into_iter().map(|(index, delivery)| async move {
                let result = match delivery.await {
                    Ok(Delivery::Delivered) => DeliveryResult::Delivered,
                    Ok(Delivery::Queued) => DeliveryResult::Queued,
                    Ok(Delivery::Dropped) => DeliveryResult::Dropped,
                    Err(_) => DeliveryResult::Failed,
                };
                (index, result)
            });
            for (index, result) in futures::future::join_all(live).await {
                answer(outcome(index, result));
            }
        });
    }

    /// A peer is dead or silent: nothing it owes will come.
    fn peer_gone(&self, peer: Uuid) {
        let lost: Vec<u64> = self
            .units
            .iter()
            .filter(|u| u.to == peer)
            .map(|u| *u.key())
            .collect();
        for id in lost {
            self.fail_unit(id, "the recipient's node died");
        }
        self.releases.retain(|_, (to, _)| *to != peer);
        self.owners.retain(|_, owner| *owner != peer);
    }
}

impl Listener for Remote {
    fn inbound(&self, inbound: Inbound) {
        if let Some(this) = self.this.upgrade() {
            Remote::inbound(&this, inbound);
        }
    }
}

/// The claim checks' own connection. Behind stores queued for the pool, a
/// check could wait long enough to let the lease lapse; but the server may
/// have no connection to spare (`max_connections` reached, which a
/// benchmark met), and then the checks use the pool rather than fail.
struct CheckConn {
    conn: Option<PgConnection>,
    /// No new connection is tried before this after one could not be made:
    /// each try costs the server a backend, and the pool serves meanwhile.
    retry_at: Instant,
}

impl CheckConn {
    /// How long after a failed try the next one is made.
    const RETRY: Duration = Duration::from_secs(30);

    /// Makes the connection if there is none and it is time to try.
    async fn connect(&mut self, db: &Database) {
        if self.conn.is_some() || Instant::now() < self.retry_at {
            return;
        }
        match db.connect_options().connect().await {
            Ok(conn) => self.conn = Some(conn),
            Err(err) => {
                tracing::warn!(error = %err, "cannot open a connection for the claim checks; they use the pool");
                self.retry_at = Instant::now() + Self::RETRY;
            }
        }
    }
}

/// What a forward came to.
enum Forwarded {
    /// Routed there, or failed; either way every waiter is taken care of.
    Done,
    /// Refused: the recipient is owned by the given node (or nobody); the
    /// unit comes back to be placed again.
    Moved(Option<Uuid>, Vec<(ToStore, Answer)>),
}

fn stored_outcome(stored: Stored, recipient: Uuid) -> Result<Delivery, MessagingError> {
    match stored {
        Stored::Inserted | Stored::AlreadyStored => Ok(Delivery::Queued),
        Stored::UnknownRecipient => Err(MessagingError::UnknownRecipient(recipient)),
        Stored::Moved(_) => Err(MessagingError::Unreachable("the recipient moved")),
    }
}

fn stored_result(stored: Stored) -> DeliveryResult {
    match stored {
        Stored::Inserted | Stored::AlreadyStored => DeliveryResult::Queued,
        Stored::UnknownRecipient => DeliveryResult::UnknownRecipient,
        Stored::Moved(_) => DeliveryResult::Failed,
    }
}

fn result_outcome(result: DeliveryResult, recipient: Uuid) -> Result<Delivery, MessagingError> {
    match result {
        DeliveryResult::Delivered => Ok(Delivery::Delivered),
        DeliveryResult::Queued => Ok(Delivery::Queued),
        DeliveryResult::Dropped => Ok(Delivery::Dropped),
        DeliveryResult::UnknownRecipient => Err(MessagingError::UnknownRecipient(recipient)),
        DeliveryResult::Failed | DeliveryResult::Unspecified => Err(MessagingError::Unreachable(
            "delivery on another node failed",
        )),
    }
}

fn send_error_text(err: crate::cluster::SendError) -> &'static str {
    match err {
        crate::cluster::SendError::Gone => "the recipient's node is gone",
        crate::cluster::SendError::Full => "too much is waiting for the recipient's node",
    }
}
