//! Cluster mode's transport and membership: how this node reaches its
//! peers, and which peers are alive. Which messages go where is decided by
//! the messaging front (`messages::remote`); this module only moves items
//! and watches nodes. See docs/cluster.md for the design.
//!
//! - Each node incarnation has an inbox, a Redis stream that peers append
//!   batches to ([`outbox`]) and that it alone reads, in order ([`inbox`]).
//! - Membership is a table in PostgreSQL, with heartbeats ([`membership`]).
//! - What arrives, and what could not be sent, reaches the messaging front
//!   as [`Inbound`], handed to its [`Listener`] by the task that read or
//!   failed it: no hop through another task on the way.

mod inbox;
mod link;
mod membership;
mod outbox;
pub mod wire;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::ClusterConfig;
use crate::storage::{self, StorageError};

/// How many gone incarnations a node remembers, to refuse sends to them.
const GONE_MEMORY: usize = 1024;

/// What the cluster hands the messaging front.
#[derive(Debug)]
pub enum Inbound {
    /// Items a peer sent, in its order.
    Items { from: Uuid, items: Vec<wire::Item> },
    /// Items this node could not write to `to`'s inbox.
    Undelivered { to: Uuid, items: Vec<wire::Item> },
    /// A peer is dead or silent past dead-after: nothing it owes will come.
    PeerGone(Uuid),
}

/// Handles what the cluster hands the messaging front. Called from the
/// cluster's own tasks (the inbox reader, in the peer's order; the outbox
/// writers; membership), so it must neither block nor await.
pub trait Listener: Send + Sync {
    fn inbound(&self, inbound: Inbound);
}

/// The listener, once there is one. Weak: the listener holds the cluster.
#[derive(Clone, Default)]
struct Listening(Arc<OnceLock<Weak<dyn Listener>>>);

impl Listening {
    /// Hands `inbound` to the listener. Nothing listens only before
    /// [`Cluster::listen`], when nothing was sent that could come back, or
    /// once it is gone, at shutdown.
    fn deliver(&self, inbound: Inbound) {
        if let Some(listener) = self.0.get().and_then(Weak::upgrade) {
            listener.inbound(inbound);
        }
    }
}

/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid Redis URL")]
    RedisUrl(#[source] redis::RedisError),
    #[error("cannot register this node")]
    Register(#[source] StorageError),
}

/// Why an item could not be queued for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the peer node is gone")]
    Gone,
    #[error("too much is waiting for the peer node")]
    Full,
}

/// This node's place in the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    /// This start of this node: new every start.
    incarnation: Uuid,
    /// The settings.
    config: ClusterConfig,
    /// Membership and ownership live here.
    db: PgPool,
    /// Shared connection for what is neither read nor written in bulk
    /// (deleting a dead peer's inbox).
    redis: ConnectionManager,
    /// Where the inbox reader and the outbox writers connect, each on a
    /// connection of its own.
    redis_info: Arc<redis::ConnectionInfo>,
    /// A queue and writer task per peer, made on first use.
    outboxes: DashMap<Uuid, mpsc::Sender<wire::Item>>,
    /// Peers known to be gone, oldest first; sends to them fail at once.
    gone: Mutex<VecDeque<Uuid>>,
    /// Where what arrives, undelivered items and peer deaths go.
    listener: Listening,
    /// Runs the outbox writers and the inbox reader.
    tasks: TaskTracker,
    /// Stops the inbox reader.
    shutdown: CancellationToken,
    /// Cancelled when this node finds it was declared dead.
    fenced_out: CancellationToken,
}

impl Cluster {
    /// Registers a new incarnation (declaring this node's earlier ones
    /// dead), then starts the membership loop on `tasks`; [`Cluster::listen`]
    /// starts reading the inbox. Redis need not be up: the connections come
    /// up when it does.
    pub async fn start(
        config: &ClusterConfig,
        redis_url: &secrecy::SecretString,
        listen: SocketAddr,
        db: PgPool,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<Cluster, ClusterError> {
        // TCP_NODELAY, which redis-rs leaves off: with Nagle's algorithm a
        // small write waits for the ACK of the one before it. (The inbox
        // reader and the outbox writers connect through `link`, which sets
        // it too; this is the shared connection's.)
        let info = redis::IntoConnectionInfo::into_connection_info(redis_url.expose_secret())
            .map_err(ClusterError::RedisUrl)?;
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        let info = info.set_tcp_settings(tcp);
        let client = redis::Client::open(info.clone()).map_err(ClusterError::RedisUrl)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(1)))
            .set_response_timeout(Some(std::time::Duration::from_secs(2)))
            .set_max_delay(std::time::Duration::from_secs(1));
        let redis = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(ClusterError::RedisUrl)?;
        let incarnation = Uuid::new_v4();
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| match listen.port() {
                // Port 0 is picked later: tell processes apart instead.
                0 => format!("{}:pid{}", host_name(), std::process::id()),
                port => format!("{}:{port}", host_name()),
            });
        let previous = storage::cluster::register_node(&db, incarnation, &node_id)
            .await
            .map_err(ClusterError::Register)?;
        tracing::info!(node_id = %node_id, %incarnation, previous = previous.len(), "joined the cluster");
        let inner = Arc::new(Inner {
            incarnation,
            config: config.clone(),
            db,
            redis,
            redis_info: Arc::new(info),
            outboxes: DashMap::new(),
            gone: Mutex::new(VecDeque::new()),
            listener: Listening::default(),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            fenced_out: CancellationToken::new(),
        });
        tasks.spawn(membership::run(inner.clone(), shutdown.clone()));
        Ok(Cluster { inner })
    }

    /// Starts reading the inbox, handing what arrives to `listener`, as
    /// well as what could not be sent and which peers are gone. Once only;
    /// later calls change nothing.
    pub fn listen(&self, listener: Weak<dyn Listener>) {
        if self.inner.listener.0.set(listener).is_err() {
            return;
        }
        self.inner.tasks.spawn(
            inbox::Reader {
                me: self.inner.incarnation,
                redis_info: self.inner.redis_info.clone(),
                listener: self.inner.listener.clone(),
                shutdown: self.inner.shutdown.clone(),
            }
            .run(),
        );
    }

    /// This start of this node.
    pub fn incarnation(&self) -> Uuid {
        self.inner.incarnation
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    /// Queues an item for a peer's inbox. Never waits: a full queue or a
    /// gone peer is an error the caller turns into a retryable failure.
    pub fn send(&self, to: Uuid, item: impl Into<wire::Item>) -> Result<(), SendError> {
        if self.inner.is_gone(to) {
            return Err(SendError::Gone);
        }
        let queue = self
            .inner
            .outboxes
            .entry(to)
            .or_insert_with(|| self.inner.spawn_outbox(to))
            .clone();
        queue.try_send(item.into()).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Gone,
        })
    }

    /// Cancelled when this node learns it was declared dead: it must stop
    /// serving, since its users may be served elsewhere now.
    pub fn fenced_out(&self) -> CancellationToken {
        self.inner.fenced_out.clone()
    }
}

impl Inner {
    fn spawn_outbox(&self, to: Uuid) -> mpsc::Sender<wire::Item> {
        let (tx, rx) = mpsc::channel(self.config.cluster_queue.max(1));
        let writer = outbox::Writer {
            me: self.incarnation,
            redis_info: self.redis_info.clone(),
            listener: self.listener.clone(),
            to,
            batch: self.config.cluster_batch.max(1),
            maxlen: self.config.cluster_inbox_maxlen.max(1),
            stream_ttl_ms: (self.config.dead_after().as_millis() as u64)
                .saturating_mul(12)
                .max(60_000),
            link: None,
            retry_at: None,
            backoff: outbox::MIN_BACKOFF,
        };
        self.tasks.spawn(writer.run(rx));
        tx
    }

    fn is_gone(&self, peer: Uuid) -> bool {
        self.gone.lock().expect("not poisoned").contains(&peer)
    }

    /// Remembers `peer` as gone and drops its outbox (its writer ends once
    /// its queue is empty).
    fn mark_gone(&self, peer: Uuid) {
        let mut gone = self.gone.lock().expect("not poisoned");
        if !gone.contains(&peer) {
            if gone.len() >= GONE_MEMORY {
                gone.pop_front();
            }
            gone.push_back(peer);
        }
        drop(gone);
        self.outboxes.remove(&peer);
    }
}

/// The Redis key of an incarnation's inbox.
fn inbox_key(incarnation: Uuid) -> String {
    format!("relay:inbox:{incarnation}")
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_owned())
}
