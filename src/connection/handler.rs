//! A connection's life: authenticate, take the user's registry slot
//! (displacing an older socket), drain stored messages, then serve requests
//! and live deliveries until the socket ends. On the way out, everything the
//! connection still held (live messages not yet acked or not yet written) is
//! stored before a successor may start draining, so nothing is lost.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{BoxFuture, Either};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::{Connection, Inbound};
use crate::auth::{self, Authenticated};
use crate::cmd::{AuthCommand, Command, Counted, Ctx, Done, Reply};
use crate::envelope;
use crate::messages::{Delivery, Drain, LiveDelivery, Outbound, Presence, Seat, Step, Unacked};
use crate::metrics::{AuthMethod, Limit};
use crate::protocol::proto::{ServerFrame, push};
use crate::protocol::{self, Close, Encoding, ProtocolError, RequestError};
use crate::state::AppState;

/// Serves one upgraded socket from `peer` to the end, in the `encoding` its
/// upgrade chose. `pre_auth` is set when the upgrade request carried valid
/// credentials.
///
/// Two phases, chained so that they share the future's memory rather than
/// add up: admission (authentication, taking the user's seat), boxed
/// because it is large and short-lived, then the session, which is what an
/// idle connection keeps for its whole life. Each value lives in exactly
/// one place: an `async fn` taking the connection by value would keep a
/// second copy of it for as long as it runs.
pub fn serve<S>(
    state: AppState,
    ws: WebSocketStream<S>,
    encoding: Encoding,
    pre_auth: Option<(Authenticated, AuthMethod)>,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Connection::new(ws, state.limits().connection.max_frame_bytes, encoding);
    let ledger = Box::new(Ledger {
        peer,
        method: pre_auth.as_ref().map(|(_, method)| *method),
        opened: Instant::now(),
        sent: 0,
        received: 0,
    });
    let admission = Box::pin(admit(
        state,
        conn,
        pre_auth.map(|(auth, _)| auth),
        ledger,
        shutdown.clone(),
    ));
    admission.then(|admitted| match admitted {
        Some(session) => Either::Left(session.run(shutdown)),
        None => Either::Right(std::future::ready(())),
    })
}

/// Authenticates the socket (unless the upgrade did) and takes the user's
/// seat. `None` when the socket ended first.
async fn admit<S>(
    state: AppState,
    mut conn: Connection<S>,
    pre_auth: Option<Authenticated>,
    mut ledger: Box<Ledger>,
    shutdown: CancellationToken,
) -> Option<Session<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let auth = match pre_auth {
        Some(auth) => auth,
        None => match authenticate(&state, &mut conn, ledger.peer, &shutdown).await {
            Ok((auth, method)) => {
                ledger.method = Some(method);
                auth
            }
            Err(Some(close)) => {
                conn.close(close).await;
                return None;
            }
            Err(None) => return None,
        },
    };
    tracing::debug!(user_id = %auth.user_id, "authenticated");
    let seat = state.relay().connect(auth.user_id).await;
    ledger.opened = Instant::now();
    Some(Session::new(state, conn, auth, seat, ledger))
}

/// Reads requests until one authenticates the socket. `Err` carries the
/// close, if the socket should be told why.
async fn authenticate<S>(
    state: &AppState,
    conn: &mut Connection<S>,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Result<(Authenticated, AuthMethod), Option<Close>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + state.limits().connection.auth_timeout();
    let max_failures = state.limits().auth.max_auth_attempts;
    let mut failures = 0;
    loop {
        let inbound = tokio::select! {
            _ = shutdown.cancelled() => return Err(Some(Close::SHUTTING_DOWN)),
            read = timeout_at(deadline, conn.read()) => match read {
                Err(_) => return Err(Some(Close::AUTH_TIMEOUT)),
                Ok(read) => read,
            },
        };
        let frame = match inbound {
            Ok(Some(Inbound::Frame(frame))) => frame,
            Ok(Some(Inbound::Heartbeat)) => continue,
            Ok(None) => return Err(None),
            Err(err) => return Err(protocol_close(&err)),
        };
        let request_id = frame.request_id;
        let attempt = frame.request.as_ref().and_then(AuthCommand::attempt);
        let (method, username) = match attempt {
            Some((method, username)) => (Some(method), username.map(str::to_owned)),
            None => (None, None),
        };
        let command = match frame.request.map(AuthCommand::from_frame) {
            None => Err(RequestError::bad_request("frame carries no request")),
            Some(Ok(Some(command))) => Ok(command),
            Some(Ok(None)) => {
                let err = RequestError::Unauthorized(
                    "authenticate first with register, login or resume".into(),
                );
                let _ = conn.send(&protocol::error(request_id, &err)).await;
                return Err(Some(Close::NOT_AUTHENTICATED));
            }
            Some(Err(err)) => Err(err),
        };
        let outcome = match command {
            Ok(command) => command.apply(state).await,
            Err(err) => Err(err),
        };
        if let Some(method) = method {
            let result = outcome.as_ref().map(|_| ());
            auth::record_attempt(state.metrics(), method, username.as_deref(), peer, result);
        }
        match outcome {
            Ok((auth, result)) => {
                if conn.send(&protocol::ok(request_id, result)).await.is_err() {
                    return Err(None);
                }
                let method = method.expect("only authentication requests authenticate");
                return Ok((auth, method));
            }
            Err(err) => {
                log_request_error("authenticate", &err);
                if conn.send(&protocol::error(request_id, &err)).await.is_err() {
                    return Err(None);
                }
                failures += 1;
                if failures >= max_failures {
                    return Err(Some(Close::TOO_MANY_AUTH_FAILURES));
                }
            }
        }
    }
}

/// Why the session loop ended.
enum End {
    /// The peer closed or the transport broke: nobody to tell.
    Gone,
    /// Close with this code and reason.
    Close(Close),
}

/// What a connection's closing log line reports. Boxed: it is read once,
/// at the end, and an idle connection's future should not carry it (twice,
/// as a parameter and as a field).
struct Ledger {
    /// Where the socket came from.
    peer: SocketAddr,
    /// How it authenticated; `None` until it did.
    method: Option<AuthMethod>,
    /// When the session began.
    opened: Instant,
    /// `SendMessage` requests read.
    sent: u64,
    /// Messages written to the client, live and drained.
    received: u64,
}

/// A request's reply, with the id to answer it under. Its own future
/// type, so a request in flight costs the command's one allocation, not two.
struct Tagged {
    /// Whose answers are counted, and how.
    counted: Counted,
    /// The request being answered.
    request_id: u64,
    /// The command's asynchronous rest.
    reply: Reply,
}

impl Future for Tagged {
    type Output = (Counted, u64, Result<Done, RequestError>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (counted, request_id) = (self.counted, self.request_id);
        self.reply
            .as_mut()
            .poll(cx)
            .map(|outcome| (counted, request_id, outcome))
    }
}

/// An authenticated connection. See the module docs.
struct Session<S> {
    /// Shared server state.
    state: AppState,
    /// The socket.
    conn: Connection<S>,
    /// Who is connected, and with which session token.
    auth: Authenticated,
    /// Live messages and pushes routed to us.
    rx: mpsc::Receiver<Outbound>,
    /// Cancelled when someone closes us (displacement).
    kick: CancellationToken,
    /// Why we were kicked.
    close_reason: Arc<OnceLock<Close>>,
    /// Our registration: leaves the registry and lets a successor drain
    /// when dropped, at the end of `finish` or while unwinding from a panic.
    presence: Presence,
    /// Requests in flight, answered as they finish.
    requests: FuturesUnordered<Tagged>,
    /// Hand-backs of live messages that were not acked in time.
    handoffs: FuturesUnordered<BoxFuture<'static, ()>>,
    /// Live messages written but not yet acked.
    unacked: Unacked,
    /// Reads stored messages for us.
    drain: Drain,
    /// The peer sent something since the last heartbeat tick. A flag rather
    /// than a timestamp, so a frame costs no clock read; the idle timeout
    /// is therefore checked at heartbeat granularity.
    heard: bool,
    /// Last heartbeat tick at which the peer had been heard from.
    last_heard: Instant,
    /// Frames were written to the socket's buffer since the last flush.
    unflushed: bool,
    /// For the closing log line.
    ledger: Box<Ledger>,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn new(
        state: AppState,
        conn: Connection<S>,
        auth: Authenticated,
        seat: Seat,
        ledger: Box<Ledger>,
    ) -> Self {
        let metrics = state.metrics();
        metrics.connections.inc();
        metrics.connections_opened.inc();
        let now = Instant::now();
        let messaging = &state.limits().messaging;
        Session {
            drain: seat.drain,
            unacked: Unacked::new(messaging.max_unacked, metrics.delivery_seconds.clone()),
            ledger,
            conn,
            auth,
            rx: seat.rx,
            kick: seat.kick,
            close_reason: seat.close_reason,
            presence: seat.presence,
            requests: FuturesUnordered::new(),
            handoffs: FuturesUnordered::new(),
            heard: false,
            last_heard: now,
            unflushed: false,
            state,
        }
    }

    /// Serves until the socket ends, then hands back what it held.
    async fn run(mut self, shutdown: CancellationToken) {
        let end = self.serve(&shutdown).await;
        Box::pin(self.finish(end)).await;
    }

    async fn serve(&mut self, shutdown: &CancellationToken) -> End {
        // Copied out rather than cloning `Limits`, which would then sit in
        // every idle connection's future.
        let idle_timeout = self.state.limits().connection.idle_timeout();
        let max_in_flight = self.state.limits().connection.max_inflight_requests;
        // The loop's long-lived waits are made once and polled again each
        // time round: re-creating them would register and deregister a
        // waiter or a timer for each of them on every frame.
        let kick = self.kick.clone();
        let mut shutting_down = pin!(shutdown.cancelled());
        let mut kicked = pin!(kick.cancelled());
        let ping_every = ping_interval(idle_timeout);
        let mut ping = pin!(sleep_until(Instant::now() + ping_every));
        // Armed at the oldest unacked deadline. Acks only move that deadline
        // later, so the timer is left as it is and may fire early, finding
        // nothing due; it is re-armed after firing.
        let mut ack_timer = pin!(sleep_until(Instant::now()));
        let mut ack_armed = false;
        loop {
            if self.drain.wanted() {
                // Live messages queued before the switch to storage are older
                // than anything the drain will read: write them first.
                while let Ok(item) = self.rx.try_recv() {
                    if let Err(end) = self.write_outbound(item).await {
                        return end;
                    }
                }
                self.drain.start();
            }
            if !ack_armed && let Some(deadline) = self.unacked.next_deadline() {
                ack_timer.as_mut().reset(deadline);
                ack_armed = true;
            }
            let take_live = self.drain.is_live() && self.unacked.has_room();
            // Keep reading past the in-flight limit (new requests beyond it
            // are refused, see `on_inbound`) so acks still get through: two
            // clients that each wait on the other's acks must not stall.
            let read_more = self.requests.len() < 2 * max_in_flight;
            let result = tokio::select! {
                _ = &mut shutting_down => return Box::pin(self.wind_down()).await,
                _ = &mut kicked => {
                    let reason = self.close_reason.get().cloned().unwrap_or(Close::DISPLACED);
                    return End::Close(reason);
                }
                inbound = self.conn.read(), if read_more => self.on_inbound(inbound).await,
                Some((counted, request_id, outcome)) = self.requests.next() => self.on_reply(counted, request_id, outcome).await,
                Some(item) = self.rx.recv(), if take_live => self.write_outbound(item).await,
                step = self.drain.step() => Box::pin(self.on_drain(step)).await,
                _ = &mut ack_timer, if ack_armed => {
                    ack_armed = false;
                    self.hand_off_expired();
                    Ok(())
                }
                Some(()) = self.handoffs.next() => Ok(()),
                _ = &mut ping => {
                    ping.as_mut().reset(Instant::now() + ping_every);
                    self.heartbeat(idle_timeout).await
                }
            };
            if let Err(end) = result {
                return end;
            }
            if self.unflushed
                && let Err(end) = self.flush().await
            {
                return end;
            }
        }
    }

    /// Shutdown, step by step: take no new work, store what we hold so its
    /// senders hear `queued`, answer the requests already in flight, then
    /// close with 1001. The server's grace deadline bounds all of it.
    async fn wind_down(&mut self) -> End {
        self.presence.closing();
        let held = self.take_held();
        self.handoffs
            .push(self.state.relay().hand_back(held).boxed());
        loop {
            tokio::select! {
                Some((counted, request_id, outcome)) = self.requests.next() => {
                    if let Err(end) = self.on_reply(counted, request_id, outcome).await {
                        return end;
                    }
                    if let Err(end) = self.bounded(|conn| conn.flush()).await {
                        return end;
                    }
                }
                Some(()) = self.handoffs.next() => {}
                else => return End::Close(Close::SHUTTING_DOWN),
            }
        }
    }

    /// Closes our queue and takes every live message we still hold:
    /// written but unacked, or queued but unwritten.
    fn take_held(&mut self) -> Vec<LiveDelivery> {
        self.rx.close();
        let mut held = self.unacked.take_all();
        while let Ok(item) = self.rx.try_recv() {
            if let Outbound::Deliver(delivery) = item {
                held.push(*delivery);
            }
        }
        held
    }

    async fn on_inbound(
        &mut self,
        inbound: Result<Option<Inbound>, ProtocolError>,
    ) -> Result<(), End> {
        self.heard = true;
        let frame = match inbound {
            Ok(Some(Inbound::Frame(frame))) => frame,
            Ok(Some(Inbound::Heartbeat)) => return Ok(()),
            Ok(None) => return Err(End::Gone),
            Err(err) => {
                return Err(protocol_close(&err).map_or(End::Gone, End::Close));
            }
        };
        let request_id = frame.request_id;
        let counted = frame.request.as_ref().map_or(Counted::Other, Counted::of);
        if counted == Counted::Send {
            self.ledger.sent += 1;
        }
        let command = frame
            .request
            .ok_or_else(|| RequestError::bad_request("frame carries no request"))
            .and_then(|request| Command::from_frame(request, &self.state.limits().messaging));
        let limit = self.state.limits().connection.max_inflight_requests;
        match command {
            Ok(command)
                if self.requests.len() >= limit && !matches!(command, Command::AckMessages(_)) =>
            {
                let err = RequestError::RateLimited {
                    retry_after: Duration::from_millis(50),
                };
                self.state.metrics().rate_limited(Limit::inflight);
                self.on_reply(counted, request_id, Err(err)).await
            }
            Ok(command) => {
                let mut ctx = Ctx {
                    state: &self.state,
                    auth: &self.auth,
                    unacked: &mut self.unacked,
                };
                let mut reply = command.apply(&mut ctx);
                // Many commands answer at once: write those now rather
                // than through the set of requests in flight.
                match (&mut reply).now_or_never() {
                    Some(outcome) => self.on_reply(counted, request_id, outcome).await,
                    None => {
                        self.requests.push(Tagged {
                            counted,
                            request_id,
                            reply,
                        });
                        Ok(())
                    }
                }
            }
            Err(err) => self.on_reply(counted, request_id, Err(err)).await,
        }
    }

    async fn on_reply(
        &mut self,
        counted: Counted,
        request_id: u64,
        outcome: Result<Done, RequestError>,
    ) -> Result<(), End> {
        counted.record(self.state.metrics(), &outcome);
        match outcome {
            Ok(done) => {
                self.write(&protocol::ok(request_id, done.result)).await?;
                match done.close {
                    Some(close) => Err(End::Close(close)),
                    None => Ok(()),
                }
            }
            Err(err) => {
                log_request_error("request", &err);
                self.write(&protocol::error(request_id, &err)).await
            }
        }
    }

    async fn write_outbound(&mut self, item: Outbound) -> Result<(), End> {
        match item {
            Outbound::Push(event) => self.write(&protocol::push(*event)).await,
            Outbound::Deliver(delivery) => {
                let delivery = *delivery;
                if delivery.message.is_expired(envelope::now_ms()) {
                    delivery.waiter.finish(Delivery::Dropped);
                    return Ok(());
                }
                let frame = protocol::push(push::Event::Deliver(delivery.message.to_envelope()));
                if !delivery.message.ephemeral {
                    // Ephemeral messages skip the queue order, so their
                    // sequence numbers say nothing about what was read.
                    self.drain.delivered_live(delivery.message.seq);
                }
                let deadline = Instant::now() + self.state.limits().messaging.ack_timeout();
                self.unacked.insert(delivery, deadline);
                self.ledger.received += 1;
                self.write(&frame).await
            }
        }
    }

    async fn on_drain(
        &mut self,
        step: Result<Step, crate::storage::StorageError>,
    ) -> Result<(), End> {
        match step {
            Ok(Step::Deliver(batch)) => {
                let now = envelope::now_ms();
                for message in batch.iter().filter(|m| !m.is_expired(now)) {
                    self.write(&protocol::push(push::Event::Deliver(message.to_envelope())))
                        .await?;
                    self.ledger.received += 1;
                    self.state.metrics().messages_drained.inc();
                }
                Ok(())
            }
            Ok(Step::QueueEmpty) => {
                self.write(&protocol::push(push::Event::QueueEmpty(Default::default())))
                    .await
            }
            Ok(Step::Idle) => Ok(()),
            Err(err) => {
                tracing::error!(error = %err, source = ?std::error::Error::source(&err), "drain failed");
                Err(End::Close(Close::DRAIN_FAILED))
            }
        }
    }

    /// Stores live messages whose ack is overdue and answers their senders
    /// `queued`. The recipient may still ack them; then they are deleted.
    fn hand_off_expired(&mut self) {
        let expired = self.unacked.take_expired(Instant::now());
        if !expired.is_empty() {
            self.handoffs
                .push(self.state.relay().hand_back(expired).boxed());
        }
    }

    async fn heartbeat(&mut self, idle_timeout: Duration) -> Result<(), End> {
        if std::mem::take(&mut self.heard) {
            self.last_heard = Instant::now();
        } else if self.last_heard.elapsed() >= idle_timeout {
            return Err(End::Close(Close::IDLE));
        }
        self.bounded(|conn| conn.ping()).await
    }

    /// Queues a frame in the socket's write buffer; the loop flushes once
    /// it has written everything that is ready, so a burst of frames costs
    /// one syscall rather than one each.
    async fn write(&mut self, frame: &ServerFrame) -> Result<(), End> {
        self.unflushed = true;
        self.bounded(|conn| conn.feed(frame)).await
    }

    /// Before flushing, writes whatever else is ready right now (live
    /// messages, finished requests), up to a bound, so it shares the flush.
    async fn flush(&mut self) -> Result<(), End> {
        const GATHER: usize = 64;
        for _ in 0..GATHER {
            let mut progressed = false;
            if self.drain.is_live()
                && self.unacked.has_room()
                && let Ok(item) = self.rx.try_recv()
            {
                self.write_outbound(item).await?;
                progressed = true;
            }
            if let Some(Some((counted, request_id, outcome))) = self.requests.next().now_or_never()
            {
                self.on_reply(counted, request_id, outcome).await?;
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        self.unflushed = false;
        self.bounded(|conn| conn.flush()).await
    }

    /// Runs a write with the write timeout: a peer that stops reading is cut
    /// off rather than holding our buffers. A displaced connection abandons
    /// a stuck write at once, so its successor need not wait for it. Most
    /// writes complete at once (the socket has room): the write is tried
    /// once first, and only one that must wait is boxed and gets the timer,
    /// so this stays cheap per frame and small in the session's future.
    async fn bounded<'a, W>(
        &'a mut self,
        op: impl FnOnce(&'a mut Connection<S>) -> W,
    ) -> Result<(), End>
    where
        W: Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>> + Unpin + 'a,
    {
        // Disjoint borrows: the write holds the connection, the rest stays
        // readable.
        let Session {
            conn,
            kick,
            auth,
            state,
            ..
        } = self;
        // Scoped, so the unboxed write is no part of this future's state
        // while it waits.
        let tried = {
            let mut write = op(conn);
            match (&mut write).now_or_never() {
                Some(done) => Ok(done),
                None => Err(Box::new(write)),
            }
        };
        let write = match tried {
            Ok(done) => Ok(done),
            Err(waiting) => tokio::select! {
                write = timeout(state.limits().connection.write_timeout(), waiting) => write,
                _ = kick.cancelled() => return Err(End::Gone),
            },
        };
        match write {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => {
                tracing::info!(user_id = %auth.user_id, "closing a socket that stopped reading");
                Err(End::Close(Close::STOPPED_READING))
            }
        }
    }

    /// Stores what we still hold while routing everything new to storage,
    /// then leaves the registry so a successor may drain, then closes the
    /// socket.
    async fn finish(mut self, end: End) {
        // Still registered while we hand back, so a successor that connects
        // now displaces us and waits for `finished` before it drains: what
        // we hold is older than anything it will read.
        self.presence.closing();
        let held = self.take_held();
        let pending = std::mem::take(&mut self.handoffs).collect::<Vec<()>>();
        futures::join!(self.state.relay().hand_back(held), pending);
        // Counted before leaving the registry, so anyone who sees the user
        // offline sees the metrics moved too.
        let metrics = self.state.metrics();
        metrics.connections.dec();
        let close = match end {
            End::Close(close) => Some(close),
            End::Gone => None,
        };
        let code = close.as_ref().map(|c| c.code.code());
        metrics.connection_closed(code);
        let conn_id = self.presence.conn_id();
        drop(self.presence);
        tracing::info!(
            conn_id,
            peer = %self.ledger.peer,
            user_id = %self.auth.user_id,
            auth = ?self.ledger.method,
            close_code = code.map_or_else(|| "none".to_owned(), |c| c.to_string()),
            close_reason = close.as_ref().map_or("peer went away", |c| &c.reason[..]),
            duration_ms = self.ledger.opened.elapsed().as_millis() as u64,
            sent = self.ledger.sent,
            received = self.ledger.received,
            "connection ended"
        );
        if let Some(close) = close {
            self.conn.close(close).await;
        }
    }
}

fn ping_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 3).max(Duration::from_millis(100))
}

fn protocol_close(err: &ProtocolError) -> Option<Close> {
    let close = err.close()?;
    tracing::debug!(error = %err, "closing on protocol error");
    Some(close)
}

fn log_request_error(what: &str, err: &RequestError) {
    if err.is_internal() {
        tracing::error!(error = %err, source = ?std::error::Error::source(err), "{what} failed");
    } else {
        tracing::debug!(error = %err, "{what} rejected");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn returned_size<F, Fut>(_: &F) -> usize
    where
        F: FnOnce(
            AppState,
            WebSocketStream<Plain>,
            Encoding,
            Option<(Authenticated, AuthMethod)>,
            SocketAddr,
            CancellationToken,
        ) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// The stream type a plain (non-TLS) connection is served on.
    type Plain = crate::connection::read_ahead::ReadAhead<tokio::net::TcpStream>;

    /// The session future is allocated for as long as the socket lives, so
    /// it bounds what an idle connection costs; keep it in check.
    #[test]
    fn the_session_future_stays_small() {
        let size = returned_size(&serve::<Plain>);
        assert!(size <= 6 * 1024, "the session future is {size} bytes");
    }
}
