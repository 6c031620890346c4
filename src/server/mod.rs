//! The server: accept TCP connections (optionally TLS), upgrade them at
//! `/v1/websocket` (or answer a health probe), and hand each to the
//! connection handler; run the background [`sweeper`], the database probe
//! and the [`admin`] endpoint; shut down as a protocol.
//!
//! Start-up: the admin endpoint answers first (alive, not ready); then the
//! database is reached, retrying until it answers, and migrated; only then
//! does the caller bind the public listener, so no client is accepted only
//! to fail.
//!
//! Shutdown: when `shutdown` is cancelled, `/healthz` turns 503, the
//! listener closes, every connection closes with "going away" after storing
//! what it held, in-flight stores commit, and the whole thing gives up at
//! the configured deadline.

pub mod admin;
mod cut_off;
pub mod handshake;
pub mod http;
pub mod proxy;
pub mod sweeper;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::config::{Config, ConnectionLimits};
use crate::connection::handler::{self, Entry};
use crate::connection::read_ahead::ReadAhead;
use crate::connection::slots::{NoSlot, Refused, Slots, Ticket};
use crate::connection::stop::{Stop, StopOnDrop};
use crate::health::{self, Health};
use crate::messages::ClusterLink;
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::storage::{self, StorageError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("storage is not available")]
    Storage(#[from] StorageError),
    #[error("TLS configuration is invalid")]
    Tls(#[from] tls::TlsError),
    #[error("cannot set up the listening socket")]
    Listen(#[source] std::io::Error),
    #[error("cannot listen for admin requests on {addr}")]
    AdminListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("shut down before the database could be reached")]
    Cancelled,
    #[error("cannot join the cluster")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// Cluster mode: the other nodes declared this one dead (it was paused
    /// or cut off too long) and may serve its users now. It stopped; a
    /// supervisor restarts it as a new incarnation.
    #[error("this node was declared dead by its peers and stopped")]
    FencedOut,
}

/// Runs the server on `listener` until `shutdown` is cancelled, then shuts
/// down gracefully. Tests pass a listener bound to port 0.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    Server::build(config, &shutdown)
        .await?
        .run(listener, shutdown)
        .await
}

/// How long to wait between attempts to reach the database at start.
const CONNECT_RETRY: Duration = Duration::from_secs(1);

/// A server that is connected to its database and ready to accept.
pub struct Server {
    /// Limits and settings.
    config: Config,
    /// Set when TLS is configured.
    tls: Option<TlsAcceptor>,
    /// State shared by every connection.
    state: AppState,
    /// The store writers and the sweeper; shutdown waits for them.
    background: TaskTracker,
    /// Where the admin endpoint listens, if it does.
    admin_addr: Option<SocketAddr>,
    /// Stops the admin endpoint when the server is dropped, which is after
    /// `run` has shut everything else down.
    _admin: tokio_util::sync::DropGuard,
    /// Cluster mode: stops the inbox and membership once the connections
    /// have closed (they may wait on peers until then).
    cluster_stop: CancellationToken,
    /// Cluster mode: cancelled when this node learns it was declared dead.
    fenced_out: Option<CancellationToken>,
}

impl Server {
    /// Loads TLS material, starts the admin endpoint, reaches (retrying
    /// until `shutdown`) and migrates the database, and starts the store
    /// writers and readers.
    pub async fn build(
        config: Config,
        shutdown: &CancellationToken,
    ) -> Result<Server, ServerError> {
        let tls = match (&config.tls.tls_cert, &config.tls.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let (metrics, health) = (Metrics::new(), Health::new());
        let admin_stop = CancellationToken::new();
        let admin_addr = match config.admin_listen.0 {
            None => None,
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::AdminListen { addr, source })?;
                let bound = listener.local_addr().ok();
                tracing::info!(addr = ?bound, "admin endpoint listening");
                tokio::spawn(admin::serve(
                    listener,
                    health.clone(),
                    metrics.clone(),
                    admin_stop.clone(),
                ));
                bound
            }
        };
        let admin = admin_stop.drop_guard();
        let db = loop {
            match storage::connect(&config.database_url, config.db_pool).await {
                Ok(db) => break db,
                Err(err) if storage::is_permanent(&err) => return Err(err.into()),
                Err(err) => {
                    health.database_unreachable();
                    tracing::warn!(error = %err, source = ?std::error::Error::source(&err), "cannot reach the database yet; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err(ServerError::Cancelled),
                _ = tokio::time::sleep(CONNECT_RETRY) => {}
            }
        };
        health.migrated();
        health.database_answered();
        let background = TaskTracker::new();
        let cluster_stop = CancellationToken::new();
        let (cluster, fenced_out) = match &config.cluster.redis_url {
            None => (None, None),
            Some(url) => {
                let cluster = Cluster::start(
                    &config.cluster,
                    url,
                    config.listen,
                    db.clone(),
                    &background,
                    &cluster_stop,
                )
                .await?;
                let fenced_out = cluster.fenced_out();
                let link = ClusterLink {
                    cluster,
                    stop: cluster_stop.clone(),
                };
                (Some(link), Some(fenced_out))
            }
        };
        let state = AppState::new(
            db,
            config.limits.clone(),
            cluster,
            &background,
            metrics,
            health,
        )
        .await?;
        Ok(Server {
            config,
            tls,
            state,
            background,
            admin_addr,
            _admin: admin,
            cluster_stop,
            fenced_out,
        })
    }

    /// The shared state, for inspection (tests, embedding).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Where the admin endpoint listens, if it does (port 0 resolved).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Accepts connections until `shutdown`, then shuts down gracefully.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let Server {
            config,
            tls,
            state,
            background,
            admin_addr: _,
            _admin,
            cluster_stop,
            fenced_out,
        } = self;
        let fenced_out = fenced_out.unwrap_or_default();
        background.spawn(sweeper::run(state.clone(), shutdown.clone()));
        background.spawn(cut_off::run(state.clone(), shutdown.clone()));
        background.spawn(health::probe(
            state.db().pool().clone(),
            state.health().clone(),
            state.metrics().clone(),
            shutdown.clone(),
        ));
        let listener = with_backlog(listener, config.limits.connection.listen_backlog)
            .map_err(ServerError::Listen)?;
        let addr = listener.local_addr().ok();
        tracing::info!(?addr, tls = tls.is_some(), "relay listening");

        let connections = TaskTracker::new();
        let stop = Stop::default();
        let _stop_on_drop = StopOnDrop(stop.clone());
        let slots = Slots::new(&config.limits.connection);
        state
            .metrics()
            .sample_unauthenticated(slots.unauthenticated_reader());
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = fenced_out.cancelled() => {
                    shutdown.cancel();
                    break;
                }
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Typically out of file descriptors: back off, don't spin.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if config.proxy_protocol_from.trusts(peer.ip()) {
                connections.spawn(connection(Box::pin(serve_proxied(
                    state.clone(),
                    stream,
                    peer,
                    tls.clone(),
                    slots.clone(),
                    stop.clone(),
                ))));
                continue;
            }
            let ticket = slots.accept(peer.ip()).map_err(|why| slots.refused(why));
            connections.spawn(connection(Box::pin(serve_socket(
                state.clone(),
                stream,
                peer,
                tls.clone(),
                ticket,
                stop.clone(),
            ))));
        }
        drop(listener);
        state.health().shutting_down();
        stop.stop();

        let deadline = tokio::time::Instant::now() + config.limits.housekeeping.shutdown_grace();
        tracing::info!(connections = connections.len(), "shutting down");
        connections.close();
        if tokio::time::timeout_at(deadline, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = connections.len(),
                "shutdown deadline passed with connections open"
            );
        }
        cluster_stop.cancel();
        // The store writers stop once the last state handle is gone and their
        // queue is empty, after committing what was in it.
        // The pool alone: a clone of the whole Database would keep the
        // reader's queue open, and its tasks (which shutdown waits for)
        // alive until the deadline.
        let db = state.db().pool().clone();
        drop(state);
        background.close();
        if tokio::time::timeout_at(deadline, background.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown deadline passed with background work unfinished");
        }
        db.close().await;
        tracing::info!("shut down");
        if fenced_out.is_cancelled() {
            return Err(ServerError::FencedOut);
        }
        Ok(())
    }
}

/// Raises the listen backlog of an already listening socket (calling
/// `listen` again only changes the queue length, on Linux). Whoever bound
/// the listener chose the backlog, and tokio's is 1,024: a storm of 2,000
/// concurrent reconnects overflowed it about 4,000 times per run, and every
/// dropped handshake costs its client a one-second retransmission.
fn with_backlog(listener: TcpListener, backlog: u32) -> std::io::Result<TcpListener> {
    let fd = std::os::fd::OwnedFd::from(listener.into_std()?);
    tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd)).listen(backlog)
}

/// The WebSocket settings derived from the limits.
pub fn websocket_config(limits: &ConnectionLimits) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(limits.read_buffer_bytes)
        // Frames collect in the write buffer until the connection flushes
        // (or this much is pending), so bursts share syscalls.
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(limits.max_frame_bytes.saturating_mul(2).max(64 * 1024))
        .max_message_size(Some(limits.max_frame_bytes))
        .max_frame_size(Some(limits.max_frame_bytes))
}

/// How long a refused socket is read (and its bytes discarded) after its
/// answer, so closing does not reset the connection before the client has
/// read the answer.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// A socket's task: its handshake, then its session. The task lives as
/// long as the socket and is as large as its largest state, so both steps
/// are boxed: the handshake's box (its arguments, TLS, HTTP) is freed
/// before the session starts, and what an idle connection's task holds is
/// only the session's box.
async fn connection(handshake: Pin<Box<impl Future<Output = Option<Session>>>>) {
    if let Some(session) = handshake.await {
        session.await;
    }
}

/// A socket from a trusted load balancer: its PROXY header names the
/// client, whose address takes the unauthenticated share and is the one
/// every later limit and log sees. The socket holds its place in the
/// unauthenticated budget while the header is read, and the header must
/// arrive within the handshake timeout of the accept; no header, or a
/// malformed one, drops the socket.
async fn serve_proxied(
    state: AppState,
    mut stream: TcpStream,
    balancer: SocketAddr,
    tls: Option<TlsAcceptor>,
    slots: Slots,
    stop: Stop,
) -> Option<Session> {
    // Refused as any socket is when the budget is spent, before anything
    // is read.
    let (client, ticket) = match slots.hold() {
        Err(full) => (balancer, Err(slots.refused(full))),
        Ok(held) => {
            let deadline = held.accepted + state.limits().connection.handshake_timeout();
            let read = tokio::time::timeout_at(deadline, proxy::read_client(&mut stream, balancer));
            let client = match read.await {
                Ok(Ok(client)) => client,
                Ok(Err(err)) => {
                    let reason = match err {
                        proxy::ProxyError::Closed => "gone",
                        _ => "proxy_header",
                    };
                    state.metrics().upgrade_rejected(reason);
                    tracing::debug!(%balancer, error = %err, "socket from a balancer refused");
                    return None;
                }
                Err(_) => {
                    state.metrics().upgrade_rejected("proxy_header");
                    tracing::debug!(%balancer, "no PROXY header in time");
                    return None;
                }
            };
            tracing::trace!(%balancer, %client, "PROXY header read");
            let ticket = held.for_client(&slots, client.ip());
            (client, ticket.map_err(|why| slots.refused(why)))
        }
    };
    Box::pin(serve_socket(state, stream, client, tls, ticket, stop)).await
}

/// Accepts the socket: refuses it, answers a probe, or upgrades it and
/// returns its session.
async fn serve_socket(
    state: AppState,
    mut stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    ticket: Result<Ticket, Refused>,
    stop: Stop,
) -> Option<Session> {
    let _ = stream.set_nodelay(true);
    let ticket = match ticket {
        Ok(ticket) => ticket,
        Err(refused) => {
            let refusal = match refused.why {
                NoSlot::Full => handshake::UpgradeError::UnauthenticatedFull,
                NoSlot::AddressFull => handshake::UpgradeError::AddressFull,
            };
            state.metrics().upgrade_rejected(refusal.reason());
            tracing::debug!(%peer, reason = refusal.reason(), "socket refused");
            // Over TLS there is no HTTP to answer in before a handshake,
            // which a refused socket does not get.
            if tls.is_none()
                && let Some(response) = refusal.response()
            {
                // Lingering holds the socket (and the place `refused`
                // holds, to the end of this arm); past the cap on lingering
                // refusals, answered and closed at once.
                let linger = match refused.linger {
                    Some(_) => REFUSAL_LINGER,
                    None => Duration::ZERO,
                };
                Box::pin(http::refuse(&mut stream, &response, linger)).await;
            }
            return None;
        }
    };
    // Each path is boxed: inline, this future would be as large as the TLS
    // path's largest state (its stream holds the rustls connection) for
    // plain sockets too, while they shake hands (a reconnect storm's worth
    // of them at once).
    match tls {
        None => Box::pin(upgrade(state, stream, peer, ticket, stop)).await,
        Some(acceptor) => Box::pin(accept_tls(state, stream, peer, acceptor, ticket, stop)).await,
    }
}

/// An upgraded connection's session, ready to run: boxed, because it is
/// what an idle connection's memory mostly is, and its size should not be
/// added to every state of the task that runs it.
type Session = Pin<Box<dyn Future<Output = ()> + Send>>;

async fn accept_tls(
    state: AppState,
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    ticket: Ticket,
    stop: Stop,
) -> Option<Session> {
    let deadline = ticket.accepted + state.limits().connection.handshake_timeout();
    match tokio::time::timeout_at(deadline, Box::pin(acceptor.accept(stream))).await {
        Ok(Ok(stream)) => upgrade(state, stream, peer, ticket, stop).await,
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

async fn upgrade<S>(
    state: AppState,
    mut stream: S,
    peer: SocketAddr,
    mut ticket: Ticket,
    stop: Stop,
) -> Option<Session>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Every step is boxed: this future is freed once it returns the
    // session, but while it runs (up to the handshake timeout, for every
    // socket at once in a reconnect storm) it is as large as its largest
    // state.
    let limits = &state.limits().connection;
    let deadlines = handshake::Deadlines {
        head: ticket.accepted + limits.handshake_timeout(),
        auth: ticket.accepted + limits.auth_timeout(),
    };
    if ticket.authenticated_full() {
        // Full: a probe is still answered (a full relay is alive, and a
        // load balancer must not take it for dead); an upgrade is refused.
        let answer = match Box::pin(http::read_probe(&mut stream, deadlines.head)).await {
            Some(probe) => probe.answer(state.health()),
            None => {
                let full = handshake::UpgradeError::AtCapacity;
                state.metrics().upgrade_rejected(full.reason());
                full.response().expect("a full server answers")
            }
        };
        Box::pin(answer.write(&mut stream)).await;
        return None;
    }
    let upgraded = Box::pin(handshake::accept(
        &mut stream,
        &state,
        peer,
        &mut ticket,
        deadlines,
    ))
    .await;
    let upgrade = match upgraded {
        Ok(handshake::Accepted::Upgrade(upgrade)) => upgrade,
        Ok(handshake::Accepted::Probe(probe)) => {
            Box::pin(probe.answer(state.health()).write(&mut stream)).await;
            return None;
        }
        Err(err) => {
            state.metrics().upgrade_rejected(err.reason());
            if let Some(response) = err.response() {
                // The request may not have been read whole (too large, too
                // slow): read the rest, so the answer is not reset away.
                Box::pin(http::refuse(&mut stream, &response, REFUSAL_LINGER)).await;
            }
            return None;
        }
    };
    let encoding = upgrade.encoding;
    let entry = match upgrade.auth {
        Some((auth, method)) => Entry::Authenticated {
            auth,
            method,
            accepted: ticket.accepted,
            slot: ticket.authenticated(),
        },
        None => Entry::Unauthenticated(ticket),
    };
    let config = Some(websocket_config(&state.limits().connection));
    let stream = ReadAhead::new(stream, state.limits().connection.read_ahead_bytes);
    let ws = Box::pin(WebSocketStream::from_partially_read(
        stream,
        upgrade.leftover,
        Role::Server,
        config,
    ))
    .await;
    Some(Box::pin(handler::serve(
        state, ws, encoding, entry, peer, stop,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future a function returns, without calling it.
    fn returned_size<F, Fut>(_: &F) -> usize
    where
        F: FnOnce(
            AppState,
            TcpStream,
            SocketAddr,
            Option<TlsAcceptor>,
            Result<Ticket, Refused>,
            Stop,
        ) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// A reconnect storm holds a handshake per socket at once: its TLS and
    /// HTTP steps are boxed, so the handshake itself stays small.
    #[test]
    fn a_handshake_future_stays_small() {
        let size = returned_size(&serve_socket);
        assert!(size <= 1024, "serve_socket's future is {size} bytes");
    }

    /// Every idle connection is one spawned task holding this future, so
    /// it must hold nothing but the session's box: the handshake, its
    /// arguments and the TLS and HTTP steps are boxed and freed before the
    /// session starts.
    #[test]
    fn an_idle_connection_task_holds_only_its_session() {
        let task = connection(Box::pin(std::future::ready::<Option<Session>>(None)));
        let size = std::mem::size_of_val(&task);
        // The handshake's box, the session's, the state's tag (48 in a
        // debug build): not a kilobyte of handshake.
        assert!(size <= 64, "a connection's task future is {size} bytes");
    }
}
