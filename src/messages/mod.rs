//! The messaging front: every way a message moves through the relay goes
//! through [`Relay`], and nothing above this module touches the machinery
//! below it.
//!
//! A message is *accepted* when [`Registry::route`](registry::Registry::route)
//! gives it a sequence number; from then on it goes one of two ways: live,
//! through the recipient's connection, which answers the sender `delivered`
//! when the recipient acks; or to PostgreSQL through the batching
//! [`store::StoreWriter`], which answers `queued` once committed. A live
//! message that is not acked in time, or whose recipient goes away, is
//! handed back and stored with its original sequence number, so
//! per-recipient order holds across the live/stored boundary. [`drain`]
//! delivers stored messages to a connecting recipient; [`dedupe`] makes
//! retries with a client message id idempotent; [`unacked`] is what one
//! connection holds until its recipient acks.
//!
//! [`Relay`]'s operations are the whole interface: send a message, ack
//! stored messages (which sends their receipts), hand back what a
//! connection held, take a user's seat (connect), push an event.

pub mod answer;
pub mod dedupe;
pub mod drain;
pub mod registry;
mod remote;
pub mod store;
pub mod unacked;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::cluster::Cluster;
use crate::config::MessagingLimits;
use crate::envelope::{self, EnvelopeType, Message, Now};
use crate::metrics::Metrics;
use crate::protocol::{Close, RequestError, proto};
use crate::storage::batch::breaks_connection;
use crate::storage::messages::Stored;
use crate::storage::{self, Database, StorageError};
pub use answer::{Answers, Responder, SessionAnswer, SessionReply};
use dedupe::{Begin, Dedupe};
pub use drain::{Drain, Step};
pub use registry::{LiveDelivery, Outbound};
use registry::{Registry, Route, StoreTicket};
use store::StoreWriter;
pub use store::{StoreError, ToStore};
pub use unacked::Unacked;

/// How a message left the relay's hands, as told to its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The recipient acked it.
    Delivered,
    /// It is committed to storage.
    Queued,
    /// Ephemeral, and the recipient was not there to take it.
    Dropped,
}

impl Delivery {
    pub fn to_proto(self) -> proto::SendOutcome {
        match self {
            Delivery::Delivered => proto::SendOutcome::Delivered,
            Delivery::Queued => proto::SendOutcome::Queued,
            Delivery::Dropped => proto::SendOutcome::Dropped,
        }
    }
}

/// Why a message could not be sent or acked. `UnknownRecipient` is the
/// client's fault; the retryable and storage variants are ours.
#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    #[error("no user with id {0}")]
    UnknownRecipient(Uuid),
    /// The recipient's connection ended before it acked or handed the
    /// message back; whether it arrived is unknown, so the sender retries.
    #[error("delivery was interrupted; retry")]
    Interrupted,
    #[error("an earlier attempt with this client_message_id failed; retry")]
    EarlierAttemptFailed,
    #[error("storing the message failed")]
    Store(#[source] StoreError),
    #[error("deleting acked messages failed")]
    Ack(#[source] StorageError),
    /// Cluster mode: reading who owns a user, or claiming one, failed.
    #[error("finding or claiming the user's node failed")]
    Ownership(#[source] StorageError),
    /// Cluster mode: the node the message had to go through could not be
    /// reached or did not answer in time; nothing was confirmed, so the
    /// sender retries (with the same client message id).
    #[error("{0}; retry")]
    Unreachable(&'static str),
}

impl MessagingError {
    /// Whether the database could not be reached (rather than refused the
    /// work): the client should retry shortly, not report a failure.
    fn database_unreachable(&self) -> bool {
        match self {
            MessagingError::Store(StoreError::Storage(err)) => breaks_connection(err),
            MessagingError::Store(StoreError::Closed(_) | StoreError::Dropped) => false,
            MessagingError::Ack(err) | MessagingError::Ownership(err) => breaks_connection(err),
            _ => false,
        }
    }
}

impl From<MessagingError> for RequestError {
    fn from(err: MessagingError) -> Self {
        match err {
            MessagingError::UnknownRecipient(_) => RequestError::NotFound(err.to_string()),
            MessagingError::Interrupted
            | MessagingError::EarlierAttemptFailed
            | MessagingError::Unreachable(_) => RequestError::Unavailable(err.to_string()),
            _ if err.database_unreachable() => {
                tracing::warn!(error = %err, source = ?std::error::Error::source(&err), "the database is unreachable");
                RequestError::Unavailable("the database is unreachable; retry shortly".into())
            }
            MessagingError::Store(_) | MessagingError::Ack(_) | MessagingError::Ownership(_) => {
                RequestError::internal(err)
            }
        }
    }
}

/// A message as its sender hands it over, validated at the edge.
#[derive(Debug)]
pub struct Outgoing {
    pub sender_id: Uuid,
    /// Shared: every message of this sender carries it.
    pub sender_username: Arc<str>,
    pub recipient: Uuid,
    pub envelope_type: EnvelopeType,
    pub content: Bytes,
    pub client_timestamp_ms: i64,
    /// Delivered only if the recipient is online; never stored.
    pub ephemeral: bool,
    /// How long it may stay queued, already capped by the server's limit.
    pub ttl_ms: i64,
    /// Makes retries idempotent: the same id gives the same message id.
    pub client_message_id: Option<Bytes>,
}

impl Outgoing {
    fn into_message(self, id: Uuid, seq: i64, now_ms: i64) -> Message {
        Message {
            id,
            seq,
            sender_id: Some(self.sender_id),
            sender_username: self.sender_username,
            recipient_id: self.recipient,
            envelope_type: self.envelope_type,
            content: self.content,
            server_timestamp_ms: now_ms,
            client_timestamp_ms: self.client_timestamp_ms,
            expires_at_ms: now_ms.saturating_add(self.ttl_ms),
            ephemeral: self.ephemeral,
        }
    }
}

/// How long a new connection waits for the one it displaced to store what
/// it held before draining anyway.
const DISPLACED_GRACE: Duration = Duration::from_secs(10);

/// The messaging front. Cheap to clone (one `Arc`).
///
/// Locking: nothing here is behind a lock a caller can hold. The registry
/// and the dedupe cache lock internally, per call, and never across an
/// `.await`; the store writer and the reader are channels.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    /// Who is online; where each message goes.
    registry: Registry,
    /// The batching writer through which messages reach storage.
    store: StoreWriter,
    /// Outcomes of recent idempotent sends.
    dedupe: Dedupe,
    /// Ack deletes, and the drain's reads through its batched reader.
    db: Database,
    /// Lifetime of a delivery receipt: the longest a message may be kept.
    receipt_ttl_ms: i64,
    /// Most messages, and content bytes, per drain read.
    drain_batch: (usize, usize),
    /// Receipts sent, failed ack deletes.
    metrics: Metrics,
    /// Cluster mode: users on other nodes, and users moving between nodes.
    remote: Option<Arc<remote::Remote>>,
}

/// What cluster mode gives the messaging front: the node's transport, what
/// arrives through it, and when to stop reading it (after the connections
/// have closed, since they may still wait on peers).
pub struct ClusterLink {
    pub cluster: Cluster,
    pub stop: CancellationToken,
}

impl Relay {
    /// Starts the store writers on `tasks` over a migrated database.
    /// `batch_timeout` bounds each store batch on its dedicated connection.
    pub async fn start(
        db: Database,
        limits: &MessagingLimits,
        batch_timeout: Duration,
        cluster: Option<ClusterLink>,
        tasks: &TaskTracker,
        metrics: &Metrics,
    ) -> Result<Self, StorageError> {
        // Sequence numbers must exceed every stored one, and should keep
        // growing across restarts even if the table is empty: seed from both
        // the table and the clock (nanoseconds since the epoch).
        let stored = storage::messages::max_seq(db.pool()).await?.unwrap_or(0);
        let clock = envelope::now_ns();
        let registry = Registry::new(stored.max(clock) + 1, limits.outbound_queue);
        let fence = cluster.as_ref().map(|c| c.cluster.incarnation());
        let store = StoreWriter::spawn(
            db.pool().clone(),
            limits,
            batch_timeout,
            fence,
            tasks,
            metrics,
        );
        let remote = cluster.map(|link| {
            remote::Remote::start(
                link.cluster,
                db.clone(),
                registry.clone(),
                store.clone(),
                tasks,
                metrics.clone(),
                link.stop,
            )
        });
        Ok(Relay {
            inner: Arc::new(Inner {
                registry,
                store,
                remote,
                dedupe: Dedupe::new(limits.dedupe_capacity),
                receipt_ttl_ms: limits.max_ttl().as_millis() as i64,
                drain_batch: (limits.drain_batch, limits.drain_batch_bytes),
                metrics: metrics.clone(),
                db,
            }),
        })
    }

    /// Accepts a message and routes it, now, in the caller's order. Returns
    /// the message id and, unless the message was routed live, a future of
    /// its outcome: `Delivered` once the recipient acked, `Queued` once
    /// committed, `Dropped` for an ephemeral message nobody could take. A
    /// message routed live (`None`) is answered through `answers`, under
    /// `request_id`, and counted there. A retry with the same client
    /// message id gets the first attempt's id and outcome, never a second
    /// copy.
    pub fn send(
        &self,
        outgoing: Outgoing,
        answers: &mut Answers,
        request_id: u64,
        now: Now,
    ) -> (Uuid, Option<Sending>) {
        let id = envelope::message_id(outgoing.sender_id, outgoing.client_message_id.as_deref());
        let attempt = match outgoing.client_message_id {
            None => None,
            Some(_) => match self.inner.dedupe.begin(id) {
                Begin::New(attempt) => Some(attempt),
                Begin::Done(outcome) => return (id, Some(Sending::Done(Some(outcome)))),
                Begin::InProgress(first) => return (id, Some(Sending::earlier(first))),
            },
        };
        let now_ms = now.wall_ms();
        if let Some(remote) = &self.inner.remote
            && outgoing.ephemeral
            && !self.inner.registry.is_online(outgoing.recipient)
        {
            let message = outgoing.into_message(id, 0, now_ms);
            return (
                id,
                Some(Sending::Waiting(Box::pin(
                    remote.send_ephemeral(message, attempt),
                ))),
            );
        }
        let sending = match self.inner.registry.route_at(
            now,
            outgoing.recipient,
            outgoing.ephemeral,
            attempt,
            Some(Responder::Session(answers.reply_to(request_id, id))),
            |seq| outgoing.into_message(id, seq, now_ms),
        ) {
            Route::Live => {
                answers.expect();
                None
            }
            Route::Dropped => Some(Sending::Done(Some(Delivery::Dropped))),
            Route::Store(order) => Some(self.store_or_forward(order)),
        };
        (id, sending)
    }

    /// A message the registry could not deliver live: stored here, or, in
    /// cluster mode for a recipient not connected here, sent through their
    /// lane (which stores it or forwards it to the node they are on).
    fn store_or_forward(&self, order: ToStore) -> Sending {
        match &self.inner.remote {
            Some(remote) if !order.local => Sending::Waiting(Box::pin(remote.enqueue(order))),
            _ => Sending::store(self.inner.store.clone(), order),
        }
    }

    /// Deletes the acker's stored messages among `ids` and tells each
    /// sender: live if they are online, else as a stored RECEIPT envelope.
    /// Receipts for receipts are not sent.
    ///
    /// The receipts that must be stored are inserted in the delete's
    /// transaction, so the ack and its receipts commit together or not at
    /// all. Each receipt is routed by the registry, as any message is,
    /// between the delete and the insert: that gives it its place in the
    /// sender's order and, when stored, a store ticket held until the
    /// commit, so the sender's drain cannot pass it while it is on its way.
    /// A receipt routed live goes out at once; should the commit then fail,
    /// the ack fails, the message stays queued, and acking it again sends a
    /// second receipt: a receipt arrives at least once.
    ///
    /// In cluster mode a receipt for a sender not connected here goes
    /// through their lane (stored through the fence, or routed by the node
    /// they are on), which no transaction here can include. Those receipts
    /// are therefore placed first, from a read of the messages to be acked,
    /// and only those messages are deleted, once every receipt is placed
    /// (stored, or routed live by the sender's node: not waiting for the
    /// sender's client to ack it). One that cannot be placed (Redis down,
    /// the sender's node dead) fails the ack as retryable, and nothing is
    /// deleted. The rule is the same: a receipt arrives at least once,
    /// before its message leaves the queue. Receipts for senders connected
    /// here are stored in the transaction, through the fence as every store
    /// in cluster mode is; a sender claimed by another node since fails the
    /// ack the same way, and acked again the receipt takes their lane.
    pub fn ack_stored(
        &self,
        acker: Uuid,
        acker_username: Arc<str>,
        ids: Vec<Uuid>,
    ) -> impl Future<Output = Result<StoredAcks, MessagingError>> + Send + 'static {
        let relay = self.clone();
        let work = async move {
            let failed = |err: sqlx::Error| MessagingError::Ack(err.into());
            let receipts = Receipts {
                acker,
                acker_username,
                now: envelope::now_ms(),
            };
            // Cluster mode: the receipts that go through a lane, placed
            // before the transaction; the ones to store, kept for it. Only
            // the messages read here are deleted: one that reached the
            // queue since (a live delivery handed back) has no receipt
            // placed, so it stays, reported unknown, and is acked again
            // when it is delivered again.
            let mut early: Option<HashMap<Uuid, ToStore>> = None;
            let mut to_delete = &ids;
            let ackable_ids: Vec<Uuid>;
            if relay.inner.remote.is_some() {
                let ackable = storage::messages::ackable(relay.inner.db.pool(), acker, &ids)
                    .await
                    .map_err(MessagingError::Ack)?;
                ackable_ids = ackable.iter().map(|a| a.id).collect();
                to_delete = &ackable_ids;
                let (to_store, through_lanes) = relay.route_receipts(&receipts, &ackable);
                let placed = futures::future::join_all(
                    through_lanes
                        .into_iter()
                        .map(|order| relay.store_or_forward(order)),
                )
                .await;
                for outcome in placed {
                    match outcome {
                        // A sender deleted meanwhile gets no receipt.
                        Ok(_) | Err(MessagingError::UnknownRecipient(_)) => {}
                        Err(err) => return Err(err),
                    }
                }
                early = Some(to_store.into_iter().collect());
            }
            let mut tx = relay.inner.db.pool().begin().await.map_err(failed)?;
            let acked = storage::messages::delete_acked(&mut tx, acker, to_delete)
                .await
                .map_err(MessagingError::Ack)?;
            let deleted: HashSet<Uuid> = acked.iter().map(|a| a.id).collect();
            let unknown = ids
                .iter()
                .filter(|id| !deleted.contains(id))
                .copied()
                .collect();
            let stored: Vec<ToStore> = match early {
                // Only receipts of what this ack deleted are stored.
                Some(mut early) => deleted.iter().filter_map(|id| early.remove(id)).collect(),
                None => {
                    let (to_store, through_lanes) = relay.route_receipts(&receipts, &acked);
                    debug_assert!(through_lanes.is_empty(), "lanes exist in cluster mode only");
                    to_store.into_iter().map(|(_, order)| order).collect()
                }
            };
            if !stored.is_empty() {
                let messages: Vec<&Message> = stored.iter().map(|order| &order.message).collect();
                let fence_for = relay
                    .inner
                    .remote
                    .as_ref()
                    .map(|remote| remote.incarnation());
                let moved = storage::messages::insert_receipts(&mut tx, &messages, fence_for)
                    .await
                    .map_err(MessagingError::Ack)?;
                if !moved.is_empty() {
                    // A sender still connected here when their receipt was
                    // routed, claimed by another node since: acked again,
                    // the receipt goes through their lane to that node.
                    tx.rollback().await.map_err(failed)?;
                    return Err(MessagingError::Unreachable(
                        "a receipt's recipient moved to another node",
                    ));
                }
            }
            tx.commit().await.map_err(failed)?;
            // Releases the tickets: the senders' drains may read them now.
            drop(stored);
            let receipted = acked
                .iter()
                .filter(|a| {
                    a.sender_id.is_some() && a.envelope_type != EnvelopeType::Receipt.code()
                })
                .count();
            relay.inner.metrics.receipts.inc_by(receipted as u64);
            Ok(StoredAcks {
                deleted: deleted.into_iter().collect(),
                unknown,
            })
        };
        // Detached: the acking socket may go away meanwhile, and the
        // transaction must not be cancelled halfway (see `detached`).
        async move { storage::detached(work).await.map_err(MessagingError::Ack)? }
    }

    /// Routes the receipts of `acked` messages (none for receipts, none
    /// without a sender): live ones go out at once; the rest come back, by
    /// original message id, to be stored in the ack's transaction, or, for
    /// senders not connected here in cluster mode, to go through their
    /// lanes.
    fn route_receipts(
        &self,
        receipts: &Receipts,
        acked: &[storage::messages::Acked],
    ) -> (Vec<(Uuid, ToStore)>, Vec<ToStore>) {
        let mut to_store = Vec::new();
        let mut through_lanes = Vec::new();
        let wanted = acked
            .iter()
            .filter(|a| a.envelope_type != EnvelopeType::Receipt.code())
            .filter_map(|a| Some((a.id, a.sender_id?)));
        for (original, sender) in wanted {
            // Nobody waits for a receipt's outcome.
            let route = self.inner.registry.route(sender, false, None, None, |seq| {
                Message::receipt(
                    receipts.acker,
                    receipts.acker_username.clone(),
                    original,
                    sender,
                    seq,
                    receipts.now,
                    self.inner.receipt_ttl_ms,
                )
            });
            match route {
                // The sender's connection stores it if they never ack it.
                Route::Live | Route::Dropped => {}
                Route::Store(order) if !order.local && self.inner.remote.is_some() => {
                    through_lanes.push(order);
                }
                Route::Store(order) => to_store.push((original, order)),
            }
        }
        (to_store, through_lanes)
    }

    /// Whether messages may be written to the sockets here. Always, on a
    /// single node; in cluster mode only while this node's lease on its
    /// users holds: past it, another node may have taken them over.
    pub fn may_deliver(&self) -> bool {
        self.inner
            .remote
            .as_ref()
            .is_none_or(|remote| remote.may_deliver())
    }

    /// Stores live messages a connection held but that were not acked,
    /// answering each sender: `queued` once stored, `dropped` for ephemeral
    /// ones. A failed store drops the message's waiter, which answers the
    /// sender `Interrupted`, so it retries.
    pub fn hand_back(&self, held: Vec<LiveDelivery>) -> impl Future<Output = ()> + Send + 'static {
        self.store_held(held.into_iter().map(|delivery| (delivery, None)).collect())
    }

    /// For a connection whose recipient stopped reading: switches the user
    /// to storage until the connection has drained, and stores every live
    /// message queued on it (`rx`, its own queue), answering their senders
    /// as [`Relay::hand_back`] does. These were never written, so the
    /// connection's drain delivers them from storage once its recipient
    /// reads again; see [`Registry::divert`] for why that drain cannot pass
    /// one before it commits.
    pub fn divert(
        &self,
        presence: &Presence,
        rx: &mut mpsc::Receiver<Outbound>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let taken = self
            .inner
            .registry
            .divert(presence.user, presence.conn_id, rx);
        self.store_held(taken)
    }

    /// Stores each held message (releasing its ticket, if any, once
    /// committed) and answers its sender.
    fn store_held(
        &self,
        held: Vec<(LiveDelivery, Option<StoreTicket>)>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let store = self.inner.store.clone();
        async move {
            let stores = held.into_iter().map(|(delivery, ticket)| {
                let store = &store;
                async move {
                    let LiveDelivery {
                        message, waiter, ..
                    } = delivery;
                    if message.ephemeral {
                        return waiter.finish(Delivery::Dropped);
                    }
                    // The recipient's connection held it here: stored here.
                    let order = ToStore {
                        message,
                        ticket,
                        attempt: None,
                        local: true,
                    };
                    match store.store(order).await {
                        Ok(Stored::Inserted | Stored::AlreadyStored) => {
                            waiter.finish(Delivery::Queued)
                        }
                        // The recipient deleted their account meanwhile.
                        Ok(Stored::UnknownRecipient) => waiter.finish(Delivery::Dropped),
                        // Cluster mode: another node took the user over
                        // without this one letting go (it was paused, or
                        // slow to answer). Storing now would put these
                        // behind what the new owner delivered: the waiter,
                        // dropped, answers `Interrupted`, and the sender
                        // retries.
                        Ok(Stored::Moved(owner)) => {
                            tracing::warn!(peer = %owner, "a user moved before this node could store what it held");
                        }
                        // The waiter, dropped, answers `Interrupted`: the
                        // sender retries.
                        Err(err) => {
                            tracing::error!(error = %err, source = ?std::error::Error::source(&err), "storing an unacked live message failed");
                        }
                    }
                }
            });
            futures::future::join_all(stores).await;
        }
    }

    /// Makes a new connection the user's, in draining mode. A connection it
    /// displaces is closed, and waited for (up to a grace period) while it
    /// hands back what it held: that is older than anything the new
    /// connection's drain will read.
    ///
    /// In cluster mode the user is first claimed for this node, which waits
    /// for a node that held them to let go; that needs PostgreSQL.
    pub async fn connect(&self, user: Uuid) -> Result<Seat, MessagingError> {
        let registry = &self.inner.registry;
        let epoch = match &self.inner.remote {
            Some(remote) => Some(remote.claim(user).await?),
            None => None,
        };
        let (handle, ends) = registry.new_connection();
        let conn_id = handle.id;
        if let (Some(remote), Some(epoch)) = (&self.inner.remote, epoch) {
            remote.claimed(user, conn_id, epoch);
        }
        let (displaced, wake) = registry.connect(user, handle);
        if let Some(old) = displaced {
            old.close(Close::DISPLACED);
            if tokio::time::timeout(DISPLACED_GRACE, old.finished())
                .await
                .is_err()
            {
                tracing::warn!(user_id = %user, "displaced connection did not finish in time");
            }
        }
        Ok(Seat {
            drain: Drain::new(
                self.inner.db.clone(),
                registry.clone(),
                user,
                conn_id,
                wake,
                self.inner.drain_batch,
            ),
            rx: ends.rx,
            kick: ends.kick,
            close_reason: ends.close_reason,
            presence: Presence {
                registry: registry.clone(),
                remote: self.inner.remote.clone(),
                user,
                conn_id,
                finished: ends.finished,
            },
        })
    }

    /// Pushes an event to the user if online and their queue has room.
    /// Advisory events are dropped rather than waited for.
    /// In cluster mode an event for a user not connected here goes to the
    /// node they are on (and `false` is returned: not pushed here).
    pub fn push(&self, user: Uuid, event: proto::push::Event) -> bool {
        match &self.inner.remote {
            Some(remote) if !self.inner.registry.is_online(user) => {
                remote.push(user, event);
                false
            }
            _ => self.inner.registry.push(user, event),
        }
    }

    /// Who is online, for tests and operators to look at.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }
}

/// Who sends the receipts of one ack, and when.
struct Receipts {
    acker: Uuid,
    acker_username: Arc<str>,
    now: i64,
}

/// What an ack of stored messages found.
#[derive(Debug)]
pub struct StoredAcks {
    /// Deleted now; their senders were sent receipts.
    pub deleted: Vec<Uuid>,
    /// Matched nothing of the acker's: already acked, expired, or never
    /// theirs.
    pub unknown: Vec<Uuid>,
}

/// The outcome of a send not routed live, as a future (a live one is
/// answered through its [`SessionReply`]). Known already, or boxed: an
/// `async fn` over every case would be as large as its largest, and the
/// session keeps it among its requests in flight while it waits.
pub enum Sending {
    /// Known already; `None` once taken.
    Done(Option<Delivery>),
    /// On its way to storage, or waiting for an earlier attempt.
    Waiting(BoxFuture<'static, Result<Delivery, MessagingError>>),
}

impl Sending {
    fn store(store: StoreWriter, order: ToStore) -> Self {
        let recipient = order.message.recipient_id;
        Sending::Waiting(Box::pin(async move {
            match store.store(order).await.map_err(MessagingError::Store)? {
                Stored::Inserted | Stored::AlreadyStored => Ok(Delivery::Queued),
                Stored::UnknownRecipient => Err(MessagingError::UnknownRecipient(recipient)),
                // This node lost the recipient to another one meanwhile.
                Stored::Moved(_) => Err(MessagingError::Interrupted),
            }
        }))
    }

    fn earlier(mut first: watch::Receiver<Option<Delivery>>) -> Self {
        Sending::Waiting(Box::pin(async move {
            match first.wait_for(Option::is_some).await {
                Ok(outcome) => Ok(outcome.expect("waited for Some")),
                Err(_) => Err(MessagingError::EarlierAttemptFailed),
            }
        }))
    }
}

impl Future for Sending {
    type Output = Result<Delivery, MessagingError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Sending::Done(outcome) => Poll::Ready(Ok(outcome.take().expect("polled after done"))),
            Sending::Waiting(waiting) => waiting.as_mut().poll(cx),
        }
    }
}

/// A connection's place in the relay, from [`Relay::connect`].
pub struct Seat {
    /// Reads this user's stored messages.
    pub drain: Drain,
    /// Live messages and pushes routed to this connection.
    pub rx: mpsc::Receiver<Outbound>,
    /// Cancelled when someone closes this connection (displacement).
    pub kick: CancellationToken,
    /// Why it was kicked; set before `kick` is cancelled.
    pub close_reason: Arc<OnceLock<Close>>,
    /// The registration itself.
    pub presence: Presence,
}

/// A connection's registration. Dropping it leaves the registry and lets a
/// successor drain; done on drop so a panicking connection cannot leave its
/// slot behind or its successor waiting.
pub struct Presence {
    /// Where we are registered.
    registry: Registry,
    /// Cluster mode: releases the user's claim once we are gone.
    remote: Option<Arc<remote::Remote>>,
    /// Whose connection this is.
    user: Uuid,
    /// Which connection of theirs.
    conn_id: u64,
    /// Cancelled to tell a successor everything we held is stored.
    finished: CancellationToken,
}

impl Presence {
    /// Tells this connection apart from the user's others, in logs.
    pub fn conn_id(&self) -> u64 {
        self.conn_id
    }

    /// Starts closing: from now on the user's messages go to storage,
    /// behind whatever the connection still holds, while it stays
    /// registered, so a successor that connects meanwhile displaces it and
    /// waits for it to hand back what it held before draining.
    pub fn closing(&self) {
        self.registry.closing(self.user, self.conn_id);
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.registry.disconnect(self.user, self.conn_id);
        if let Some(remote) = &self.remote {
            remote.disconnected(self.user, self.conn_id);
        }
        self.finished.cancel();
    }
}
