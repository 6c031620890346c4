//! A connection's life: authenticate, take the user's registry slot
//! (displacing an older socket), drain stored messages, then serve requests
//! and live deliveries until the socket ends. On the way out, everything the
//! connection still held (live messages not yet acked or not yet written) is
//! stored before a successor may start draining, so nothing is lost.

use std::collections::VecDeque;
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
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

use super::slots::{Slot, Ticket};
use super::stop::{Registered, Stop};
use super::{Connection, Inbound};
use crate::auth::{self, Authenticated};
use crate::cmd::{AuthCommand, Command, Counted, Ctx, Done, Pending, Reply, send_message};
use crate::envelope;
use crate::messages::{
    Answers, Delivery, Drain, LiveDelivery, Outbound, Presence, Seat, SessionAnswer, Step, Unacked,
};
use crate::metrics::{AuthMethod, Limit};
use crate::protocol::proto::{ServerFrame, push};
use crate::protocol::{self, Close, Encoding, ProtocolError, RequestError};
use crate::state::AppState;

/// How a socket arrives at the handler.
pub enum Entry {
    /// Its upgrade request authenticated it (`Authorization` header).
    Authenticated {
        auth: Authenticated,
        method: AuthMethod,
        slot: Slot,
        /// When the socket arrived (before its credentials were checked).
        accepted: Instant,
    },
    /// It must authenticate with its first requests, holding this
    /// unauthenticated slot until it does.
    Unauthenticated(Ticket),
}

/// Serves one upgraded socket from `peer` to the end, in the `encoding` its
/// upgrade chose.
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
    entry: Entry,
    peer: SocketAddr,
    stop: Stop,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = Connection::new(ws, state.limits().connection.max_frame_bytes, encoding);
    let ledger = Box::new(Ledger {
        peer,
        method: match &entry {
            Entry::Authenticated { method, .. } => Some(*method),
            Entry::Unauthenticated(_) => None,
        },
        opened: Instant::now(),
        sent: 0,
        received: 0,
    });
    let admission = Box::pin(admit(state, conn, entry, ledger, stop.clone()));
    admission.then(|admitted| match admitted {
        Some(session) => Either::Left(session.run(stop)),
        None => Either::Right(std::future::ready(())),
    })
}

/// Authenticates the socket (unless the upgrade did) and takes the user's
/// seat. `None` when the socket ended first.
async fn admit<S>(
    state: AppState,
    mut conn: Connection<S>,
    entry: Entry,
    mut ledger: Box<Ledger>,
    stop: Stop,
) -> Option<Session<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (auth, slot, early, since) = match entry {
        Entry::Authenticated {
            auth,
            slot,
            accepted,
            ..
        } => (auth, slot, None, accepted),
        Entry::Unauthenticated(ticket) => {
            match authenticate(&state, &mut conn, ledger.peer, ticket, &stop).await {
                Ok(authenticated) => {
                    ledger.method = Some(authenticated.method);
                    (
                        authenticated.auth,
                        authenticated.slot,
                        authenticated.early,
                        authenticated.since,
                    )
                }
                // `None` still answers a close the peer sent (or one
                // tungstenite queued for a protocol violation).
                Err(close) => {
                    conn.close(close).await;
                    return None;
                }
            }
        }
    };
    tracing::debug!(user_id = %auth.user_id, "authenticated");
    let seat = match state.relay().connect(auth.user_id).await {
        Ok(seat) => seat,
        Err(err) => {
            tracing::warn!(user_id = %auth.user_id, error = %err, source = ?std::error::Error::source(&err), "cannot take the user's seat");
            conn.close(Some(Close::CANNOT_TAKE_SESSION)).await;
            return None;
        }
    };
    // Checked once seated: a `Logout{all}` that revoked this session after
    // it was looked up closes whatever holds the user's place after
    // revoking, so either it closed us just now, or we see it here.
    if state.auth().revoked_since(auth.user_id, since) {
        let _ = seat.close_reason.set(Close::SESSION_REVOKED);
        seat.kick.cancel();
    }
    ledger.opened = Instant::now();
    let mut session = Session::new(state, conn, auth, seat, slot, ledger);
    session.early = early;
    Some(session)
}

/// What a socket read. Boxed where it is kept: it is large, and rare.
type Read = Result<Option<Inbound>, ProtocolError>;

/// Frames a client pipelined behind an authentication still being checked,
/// in order, for whatever comes next to handle first. The socket is read on
/// while a check runs, because that is how a client that leaves is noticed
/// (its queued password check is then skipped), so what it sends meanwhile
/// is kept here: the first frame whatever its size (a key upload right
/// behind a login is legitimate), then up to `max_early_bytes` more. Past
/// that the socket is closed (1008) and the check withdrawn: a client
/// cannot make the relay stop watching its socket by sending more.
#[derive(Default)]
struct Early {
    reads: VecDeque<(Read, usize)>,
    /// What the frames held cost, each charged in [`Early::push`].
    bytes: usize,
}

impl Early {
    fn pop(&mut self) -> Option<Read> {
        let (read, cost) = self.reads.pop_front()?;
        self.bytes -= cost;
        Some(read)
    }

    /// Keeps `read`, `wire_len` bytes as received, if the budget allows;
    /// `false` if it does not. A frame is charged what holding it may cost:
    /// its received size (its `bytes` fields share that buffer) or its
    /// encoded size, whichever is larger, plus what its repeated fields
    /// decoded into, plus its own place here, so that empty frames are not
    /// free.
    ///
    /// The first frame is kept whatever its size on the wire, but not
    /// whatever it decoded into: an empty repeated entry is two bytes on
    /// the wire and a whole struct in memory (72 bytes for a Kyber key), so
    /// one frame of the largest size held about 19 MB until the check
    /// ended. A real key upload's entries take some 14 KB.
    fn push(&mut self, read: Read, wire_len: usize, budget: usize) -> bool {
        let (decoded, structs) = match &read {
            Ok(Some(Inbound::Frame(frame))) => {
                (prost::Message::encoded_len(frame), repeated_memory(frame))
            }
            _ => (0, 0),
        };
        let cost = wire_len.max(decoded) + structs + std::mem::size_of::<(Read, usize)>();
        if structs > budget || (!self.reads.is_empty() && self.bytes + cost > budget) {
            return false;
        }
        self.bytes += cost;
        self.reads.push_back((read, cost));
        true
    }
}

/// The memory a client frame's repeated fields decoded into, beyond the
/// bytes they share with the frame's buffer.
fn repeated_memory(frame: &protocol::proto::ClientFrame) -> usize {
    use protocol::proto::client_frame::Request;
    // Capacity, not length: decoding grows each vector as it pushes.
    fn held<T>(entries: &Vec<T>) -> usize {
        entries.capacity() * std::mem::size_of::<T>()
    }
    match &frame.request {
        Some(Request::UploadKeys(keys)) => {
            held(&keys.one_time_pre_keys) + held(&keys.kyber_pre_keys)
        }
        Some(Request::AckMessages(ack)) => held(&ack.message_ids),
        _ => 0,
    }
}

/// A socket that authenticated on its own.
struct SelfAuthenticated {
    auth: Authenticated,
    method: AuthMethod,
    slot: Slot,
    /// Frames the client sent while its authentication was being checked
    /// (pipelined), for the session to handle first.
    early: Option<Box<Early>>,
    /// When the request that authenticated it began to be checked.
    since: Instant,
}

/// Reads requests until one authenticates the socket, by the ticket's auth
/// deadline. `Err` carries the close, if the socket should be told why;
/// `None` answers only a close the peer sent or tungstenite queued.
async fn authenticate<S>(
    state: &AppState,
    conn: &mut Connection<S>,
    peer: SocketAddr,
    mut ticket: Ticket,
    stop: &Stop,
) -> Result<SelfAuthenticated, Option<Close>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = ticket.accepted + state.limits().connection.auth_timeout();
    let max_failures = state.limits().auth.max_auth_attempts;
    let mut failures = 0;
    let early_budget = state.limits().auth.max_early_bytes;
    let mut early = Early::default();
    let mut since = ticket.accepted;
    loop {
        let inbound = match early.pop() {
            Some(read) => read,
            None => tokio::select! {
                _ = stop.stopped() => return Err(Some(Close::SHUTTING_DOWN)),
                read = timeout_at(deadline, conn.read()) => match read {
                    Err(_) => return Err(Some(Close::AUTH_TIMEOUT)),
                    Ok(read) => read,
                },
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
            // Only a socket that will have a place once authenticated
            // costs a password check or a lookup.
            Ok(_) if !ticket.reserve() => {
                let err = RequestError::Unavailable(Close::SERVER_FULL.reason.to_string());
                if let Some(method) = method {
                    let result = Err(&err);
                    auth::record_attempt(
                        state.metrics(),
                        method,
                        username.as_deref(),
                        peer,
                        result,
                    );
                }
                let _ = conn.send(&protocol::error(request_id, &err)).await;
                return Err(Some(Close::SERVER_FULL));
            }
            Ok(command) => {
                since = Instant::now();
                let applying = timeout_at(deadline, command.apply(state, peer.ip()));
                match while_connected(conn, &mut early, early_budget, applying).await {
                    // The client left, or sent too much meanwhile: the
                    // check was withdrawn with the future (a queued
                    // password check is skipped).
                    Watched::Left => return Err(None),
                    Watched::Overflowed => return Err(Some(Close::TOO_MUCH_BEFORE_AUTH)),
                    Watched::Failed(err) => return Err(protocol_close(&err)),
                    Watched::Done(Err(_)) => return Err(Some(Close::AUTH_TIMEOUT)),
                    Watched::Done(Ok(outcome)) => outcome,
                }
            }
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
                return Ok(SelfAuthenticated {
                    auth,
                    method,
                    slot: ticket.authenticated(),
                    early: (!early.reads.is_empty()).then(|| Box::new(early)),
                    since,
                });
            }
            Err(err) => {
                ticket.unreserve();
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

/// How [`while_connected`] ended.
enum Watched<T> {
    Done(T),
    /// The peer left first; `work` was dropped unfinished.
    Left,
    /// The peer sent more than [`Early`] holds; `work` was dropped.
    Overflowed,
    /// The peer broke the protocol; `work` was dropped.
    Failed(ProtocolError),
}

/// Runs `work` while watching the socket, so that a peer that leaves (or
/// breaks the protocol, or sends too much) takes its work with it. Frames
/// read meanwhile (the client pipelined them) are kept in `early`, within
/// `budget`.
async fn while_connected<S, F>(
    conn: &mut Connection<S>,
    early: &mut Early,
    budget: usize,
    work: F,
) -> Watched<F::Output>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Future,
{
    let mut work = pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return Watched::Done(done),
            read = conn.read() => match read {
                Ok(Some(Inbound::Heartbeat)) => {}
                Ok(None) | Err(ProtocolError::Transport(_)) => return Watched::Left,
                Err(err) => return Watched::Failed(err),
                frame @ Ok(Some(Inbound::Frame(_))) => {
                    if !early.push(frame, conn.last_len(), budget) {
                        return Watched::Overflowed;
                    }
                }
            },
        }
    }
}

/// The next thing the socket said: first what it sent before
/// authentication finished, then what it sends now.
async fn next_read<S>(early: &mut Option<Box<Early>>, conn: &mut Connection<S>) -> Read
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(held) = early.as_mut() {
        let read = held.pop();
        if held.reads.is_empty() {
            *early = None;
        }
        if let Some(read) = read {
            return read;
        }
    }
    conn.read().await
}

/// Why the session loop ended.
enum End {
    /// The transport broke, or a write is stuck: nobody to tell.
    Gone,
    /// The peer closed (or ended the stream): answer its close frame.
    PeerClosed,
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
/// type, so a request in flight costs the set's one allocation for it (and
/// the command's, for work other than a send).
struct Tagged {
    /// Whose answers are counted, and how.
    counted: Counted,
    /// The request being answered.
    request_id: u64,
    /// The command's asynchronous rest.
    reply: Pending,
}

impl Future for Tagged {
    type Output = (Counted, u64, Result<Done, RequestError>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (counted, request_id) = (self.counted, self.request_id);
        Pin::new(&mut self.reply)
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
    /// Cancelled when someone closes us (displacement, revocation, an
    /// operator's cut-off).
    kick: CancellationToken,
    /// Why we were kicked. Set before `kick` is cancelled, so it is also
    /// how the session asks whether it was kicked without the token's lock
    /// (see [`Session::delivery_barred`]).
    close_reason: Arc<OnceLock<Close>>,
    /// Our registration: leaves the registry and lets a successor drain
    /// when dropped, at the end of `finish` or while unwinding from a panic.
    presence: Presence,
    /// Requests in flight, answered as they finish; but not the sends
    /// routed live, which are answered through `answers`.
    requests: FuturesUnordered<Tagged>,
    /// Answers to this connection's sends routed live, and their count.
    answers: Answers,
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
    /// When the session token expires: the socket closes then.
    expires: Instant,
    /// Frames read while authenticating, handled before any other (and
    /// under the same in-flight limit).
    early: Option<Box<Early>>,
    /// This socket's place among the authenticated; given back at the end.
    _slot: Slot,
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
        slot: Slot,
        ledger: Box<Ledger>,
    ) -> Self {
        let metrics = state.metrics();
        metrics.connections.inc();
        metrics.connections_opened.inc();
        let now = Instant::now();
        let expires = expiry_instant(auth.expires_at, now);
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
            answers: Answers::default(),
            handoffs: FuturesUnordered::new(),
            heard: false,
            last_heard: now,
            unflushed: false,
            expires,
            early: None,
            _slot: slot,
            state,
        }
    }

    /// Serves until the socket ends, then hands back what it held.
    async fn run(mut self, stop: Stop) {
        let end = self.serve(&stop).await;
        Box::pin(self.finish(end)).await;
    }

    async fn serve(&mut self, stop: &Stop) -> End {
        // Copied out rather than cloning `Limits`, which would then sit in
        // every idle connection's future.
        let idle_timeout = self.state.limits().connection.idle_timeout();
        let max_in_flight = self.state.limits().connection.max_inflight_requests;
        let read_burst = self.state.limits().connection.read_burst;
        // The loop's long-lived waits are made once: re-creating them would
        // register and deregister a waiter or a timer for each of them on
        // every frame. The stop and the kick are registered here and polled
        // again only once their flags (set before they fire) say they have:
        // polling them on every turn would take four locks, two of them
        // shared by every connection. The timers are polled each turn.
        let kick = self.kick.clone();
        let (stopped, kicked) = (pin!(stop.stopped()), pin!(kick.cancelled()));
        let (mut shutting_down, mut kicked) = (Registered::new(stopped), Registered::new(kicked));
        if shutting_down.register().await {
            return Box::pin(self.wind_down()).await;
        }
        if kicked.register().await {
            return End::Close(self.kicked_reason());
        }
        let ping_every = ping_interval(idle_timeout);
        // The heartbeat timer also fires when the session token expires.
        let next_tick = |expires: Instant| (Instant::now() + ping_every).min(expires);
        let mut ping = pin!(sleep_until(next_tick(self.expires)));
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
            let read_more = self.may_read(max_in_flight);
            let result = tokio::select! {
                _ = shutting_down.when(|| stop.is_stopped()) => return Box::pin(self.wind_down()).await,
                _ = kicked.when(|| self.close_reason.get().is_some()) => return End::Close(self.kicked_reason()),
                inbound = next_read(&mut self.early, &mut self.conn), if read_more => self.on_inbound_burst(inbound, max_in_flight, read_burst).await,
                // Guarded: polling an empty set still registers the waker,
                // an atomic swap on every turn of the loop.
                Some((counted, request_id, outcome)) = self.requests.next(), if !self.requests.is_empty() => self.on_reply(counted, request_id, outcome).await,
                routed = self.answers.next() => self.on_answer(routed).await,
                Some(item) = self.rx.recv(), if take_live => self.write_outbound(item).await,
                step = self.drain.step() => Box::pin(self.on_drain(step)).await,
                _ = &mut ack_timer, if ack_armed => {
                    ack_armed = false;
                    self.hand_off_expired();
                    Ok(())
                }
                // Guarded as `requests` is.
                Some(()) = self.handoffs.next(), if !self.handoffs.is_empty() => Ok(()),
                _ = &mut ping => {
                    if Instant::now() >= self.expires {
                        return End::Close(Close::SESSION_EXPIRED);
                    }
                    ping.as_mut().reset(next_tick(self.expires));
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
                    if let Err(end) = self.flush_socket().await {
                        return end;
                    }
                }
                routed = self.answers.next(), if self.answers.awaiting() > 0 => {
                    if let Err(end) = self.on_answer(routed).await {
                        return end;
                    }
                    if let Err(end) = self.flush_socket().await {
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

    /// Handles one thing the socket said. Its work is done before this
    /// returns; the future only finishes the answer's write, so it stays
    /// small in the session's future (see [`Session::write`]).
    fn on_inbound(
        &mut self,
        inbound: Result<Option<Inbound>, ProtocolError>,
    ) -> impl Future<Output = Result<(), End>> + Send + use<'_, S> {
        let replying = self.handle_inbound(inbound);
        async move {
            match replying {
                Ok(Some(replying)) => replying.await,
                Ok(None) => Ok(()),
                Err(end) => Err(end),
            }
        }
    }

    /// Handles `first`, then the frames the socket has already delivered
    /// behind it, up to `read_burst` in all and while the in-flight limit
    /// lets the loop read: a burst of frames then costs one turn of the loop
    /// (which polls every one of its waits) and one flush, not one each.
    async fn on_inbound_burst(
        &mut self,
        first: Read,
        max_in_flight: usize,
        read_burst: u32,
    ) -> Result<(), End> {
        self.on_inbound(first).await?;
        for _ in 1..read_burst {
            // A kicked session stops taking requests at once, as it would
            // at its next turn (the reason is set before the kick).
            if !self.may_read(max_in_flight) || self.close_reason.get().is_some() {
                break;
            }
            // Dropping a read that is not ready is safe (see
            // `Connection::read`), and the loop polls it again with its
            // waker before the task sleeps.
            let Some(next) = next_read(&mut self.early, &mut self.conn).now_or_never() else {
                break;
            };
            self.on_inbound(next).await?;
        }
        Ok(())
    }

    /// [`Session::on_inbound`]'s work: the answer to write, if one is due
    /// now.
    #[allow(clippy::type_complexity)]
    fn handle_inbound(
        &mut self,
        inbound: Result<Option<Inbound>, ProtocolError>,
    ) -> Result<Option<impl Future<Output = Result<(), End>> + Send + use<'_, S>>, End> {
        self.heard = true;
        let frame = match inbound {
            Ok(Some(Inbound::Frame(frame))) => frame,
            Ok(Some(Inbound::Heartbeat)) => return Ok(None),
            Ok(None) => return Err(End::PeerClosed),
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
                if self.in_flight() >= limit && !matches!(command, Command::AckMessages(_)) =>
            {
                let err = RequestError::RateLimited {
                    retry_after: Duration::from_millis(50),
                };
                self.state.metrics().rate_limited(Limit::inflight);
                Ok(Some(self.on_reply(counted, request_id, Err(err))))
            }
            Ok(command) => {
                let mut ctx = Ctx {
                    state: &self.state,
                    auth: &self.auth,
                    peer: self.ledger.peer.ip(),
                    conn_id: self.presence.conn_id(),
                    unacked: &mut self.unacked,
                    answers: &mut self.answers,
                    request_id,
                };
                // Many commands answer at once, or are done by the time they
                // are first asked: write those now rather than through the
                // set of requests in flight.
                let mut reply = match command.apply(&mut ctx) {
                    Reply::Ready(outcome) => {
                        return Ok(Some(self.on_reply(counted, request_id, outcome)));
                    }
                    Reply::Pending(pending) => pending,
                    Reply::Routed => return Ok(None),
                };
                match (&mut reply).now_or_never() {
                    Some(outcome) => Ok(Some(self.on_reply(counted, request_id, outcome))),
                    None => {
                        self.requests.push(Tagged {
                            counted,
                            request_id,
                            reply,
                        });
                        Ok(None)
                    }
                }
            }
            Err(err) => Ok(Some(self.on_reply(counted, request_id, Err(err)))),
        }
    }

    /// Answers a request. The answer is encoded and queued before this
    /// returns; the future only finishes the write, so nothing of the
    /// outcome stays in the session's future while it waits.
    fn on_reply(
        &mut self,
        counted: Counted,
        request_id: u64,
        outcome: Result<Done, RequestError>,
    ) -> impl Future<Output = Result<(), End>> + Send + use<'_, S> {
        counted.record(self.state.metrics(), &outcome);
        let (writing, close) = match outcome {
            Ok(Done { result, close }) => (self.write(&protocol::ok(request_id, result)), close),
            Err(err) => {
                log_request_error("request", &err);
                (self.write(&protocol::error(request_id, &err)), None)
            }
        };
        async move {
            writing.await?;
            match close {
                Some(close) => Err(End::Close(close)),
                None => Ok(()),
            }
        }
    }

    /// Answers a send routed live, now that its outcome is known.
    fn on_answer(
        &mut self,
        routed: SessionAnswer,
    ) -> impl Future<Output = Result<(), End>> + Send + use<'_, S> {
        let request_id = routed.request_id;
        self.on_reply(
            Counted::Send,
            request_id,
            send_message::answer_routed(routed),
        )
    }

    /// Requests in flight: those awaiting their future, and the sends
    /// routed live awaiting their answer.
    fn in_flight(&self) -> usize {
        self.requests.len() + self.answers.awaiting()
    }

    /// Whether to read another frame. Reading goes on past the in-flight
    /// limit (new requests beyond it are refused, see `on_inbound`) so
    /// acks still get through: two clients that each wait on the other's
    /// acks must not stall.
    fn may_read(&self, max_in_flight: usize) -> bool {
        self.in_flight() < 2 * max_in_flight
    }

    /// Writes a live message or a push; like [`Session::on_reply`], the
    /// work is done before this returns.
    fn write_outbound(
        &mut self,
        item: Outbound,
    ) -> Writing<impl Future<Output = Result<(), End>> + Send + use<'_, S>> {
        match item {
            Outbound::Push(event) => {
                let frame = self.conn.encode(&protocol::push(*event));
                self.write_encoded(frame)
            }
            Outbound::Deliver(delivery) => {
                if delivery.message.is_expired(envelope::now_ms()) {
                    delivery.waiter.finish(Delivery::Dropped);
                    return Writing::Done(Some(Ok(())));
                }
                if let Some(close) = self.delivery_barred() {
                    // Stored with whatever else we hold as we finish, while
                    // this node still owns the user (or forwarded to the
                    // node that took them over).
                    let stored = self.state.relay().hand_back(vec![*delivery]);
                    self.handoffs.push(stored.boxed());
                    return Writing::Done(Some(Err(End::Close(close))));
                }
                let frame = self.conn.encode_deliver(&delivery.message);
                if !delivery.message.ephemeral {
                    // Ephemeral messages skip the queue order, so their
                    // sequence numbers say nothing about what was read.
                    self.drain.delivered_live(delivery.message.seq);
                }
                // The sender's wait runs from routing, not from this
                // write: time spent queued behind a slow socket counts.
                let deadline = delivery.routed_at + self.state.limits().messaging.ack_timeout();
                self.unacked.insert(delivery, deadline);
                self.ledger.received += 1;
                self.write_encoded(frame)
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
                    if let Some(close) = self.delivery_barred() {
                        // The rest stays stored, for the user's next socket.
                        return Err(End::Close(close));
                    }
                    let frame = self.conn.encode_deliver(message);
                    self.write_encoded(frame).await?;
                    self.ledger.received += 1;
                    self.state.metrics().messages_drained.inc();
                }
                Ok(())
            }
            Ok(Step::QueueEmpty) => {
                let writing =
                    self.write(&protocol::push(push::Event::QueueEmpty(Default::default())));
                writing.await
            }
            Ok(Step::Idle) => Ok(()),
            Err(err) => {
                tracing::error!(error = %err, source = ?std::error::Error::source(&err), "drain failed");
                Err(End::Close(Close::DRAIN_FAILED))
            }
        }
    }

    /// Why no more messages may be written to this socket, if so. Checked
    /// before each one, not only when the loop next looks: a node taking
    /// the user over waits for this socket to stop taking messages (it was
    /// closed, or this node's cluster lease ran out), and a write after
    /// that could pass a message the new node stored meanwhile.
    fn delivery_barred(&self) -> Option<Close> {
        // The reason is set before the kick is cancelled, and reading it
        // takes no lock (`is_cancelled` does).
        if let Some(reason) = self.close_reason.get() {
            return Some(reason.clone());
        }
        (!self.state.relay().may_deliver()).then_some(Close::LEASE_LAPSED)
    }

    /// Why we were closed.
    fn kicked_reason(&self) -> Close {
        self.close_reason.get().cloned().unwrap_or(Close::DISPLACED)
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
        let (conn, blocked) = self.split();
        blocked.start(conn.ping()).await
    }

    /// Queues a frame in the socket's write buffer; the loop flushes once
    /// it has written everything that is ready, so a burst of frames costs
    /// one syscall rather than one each.
    /// Queues a frame for the socket. Not `async`: the frame is encoded
    /// before this returns, so a caller that writes `let w =
    /// self.write(&frame); w.await` does not keep the frame (or whatever it
    /// was built from) in its state while the write waits, which would make
    /// every idle connection's future that much larger.
    fn write<'a>(
        &'a mut self,
        frame: &ServerFrame,
    ) -> Writing<impl Future<Output = Result<(), End>> + Send + use<'a, S>> {
        let frame = self.conn.encode(frame);
        self.write_encoded(frame)
    }

    /// [`Session::write`] of a frame the connection already encoded.
    fn write_encoded(
        &mut self,
        frame: WsMessage,
    ) -> Writing<impl Future<Output = Result<(), End>> + Send + use<'_, S>> {
        self.unflushed = true;
        let (conn, blocked) = self.split();
        blocked.start(conn.feed(frame))
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
            if !self.requests.is_empty()
                && let Some(Some((counted, request_id, outcome))) =
                    self.requests.next().now_or_never()
            {
                self.on_reply(counted, request_id, outcome).await?;
                progressed = true;
            }
            if let Some(routed) = self.answers.try_next() {
                self.on_answer(routed).await?;
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        self.unflushed = false;
        self.flush_socket().await
    }

    /// The connection, and what must go on while a write to it waits (see
    /// [`Blocked::start`]): disjoint borrows, so both can be used at once.
    fn split(&mut self) -> (&mut Connection<S>, Blocked<'_>) {
        let Session {
            conn,
            kick,
            auth,
            state,
            unacked,
            rx,
            handoffs,
            presence,
            ..
        } = self;
        let blocked = Blocked {
            state,
            unacked,
            rx,
            handoffs,
            presence,
            kick,
            user_id: auth.user_id,
        };
        (conn, blocked)
    }

    /// Flushes the socket, under the write timeout.
    fn flush_socket(&mut self) -> Writing<impl Future<Output = Result<(), End>> + Send + '_> {
        let (conn, blocked) = self.split();
        blocked.start(conn.flush())
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
        let (close, answer) = match end {
            End::Close(close) => (Some(close), true),
            End::PeerClosed => (None, true),
            End::Gone => (None, false),
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
        if answer {
            self.conn.close(close).await;
        }
    }
}

/// How a blocked write ended.
enum Waited {
    Written(Result<(), tokio_tungstenite::tungstenite::Error>),
    /// The connection was displaced: abandon the write.
    Kicked,
    /// The write timeout passed: the peer stopped reading.
    TimedOut,
}

/// A write under way ([`Session::bounded`]): finished at once (the socket
/// had room, nearly always), or waiting, boxed, so the session's future
/// holds only a pointer while it waits.
enum Writing<F> {
    /// `None` once taken.
    Done(Option<Result<(), End>>),
    Waiting(Pin<Box<F>>),
}

impl<F: Future<Output = Result<(), End>>> Future for Writing<F> {
    type Output = Result<(), End>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Unpin: both variants are (the future is boxed).
        match self.get_mut() {
            Writing::Done(done) => Poll::Ready(done.take().expect("polled after done")),
            Writing::Waiting(waiting) => waiting.as_mut().poll(cx),
        }
    }
}

/// What a session must keep doing while one of its writes is blocked, so
/// that the ack timeout holds whatever the recipient's socket does: nobody
/// else answers the senders of the live messages it holds.
///
/// The rule: when the write has been blocked until something the
/// connection holds may be due (the oldest unacked deadline, or the ack
/// timeout after the write blocked, since nothing queued was routed much
/// before that), the recipient is taken to have stopped reading. Written
/// messages whose ack is overdue are handed back, as ever, and from then
/// on as they fall due; everything still queued for the connection is
/// diverted to storage, switching the user to storage until the
/// connection has drained (see [`crate::messages::Relay::divert`]).
struct Blocked<'a> {
    state: &'a AppState,
    unacked: &'a mut Unacked,
    rx: &'a mut mpsc::Receiver<Outbound>,
    handoffs: &'a mut FuturesUnordered<BoxFuture<'static, ()>>,
    presence: &'a Presence,
    /// Cancelled when the connection is displaced: the write is abandoned.
    kick: &'a CancellationToken,
    /// For the log line of a socket cut off.
    user_id: uuid::Uuid,
}

impl<'a> Blocked<'a> {
    /// Runs a write with the write timeout: a peer that stops reading is
    /// cut off rather than holding our buffers. A displaced connection
    /// abandons a stuck write at once, so its successor need not wait for
    /// it. Most writes complete at once (the socket has room): the write is
    /// tried once, here, and only one that must wait is boxed, with what
    /// the session must keep doing while it waits, so this stays cheap per
    /// frame and nothing of it stays in the session's future.
    fn start<W>(self, mut write: W) -> Writing<impl Future<Output = Result<(), End>> + Send + 'a>
    where
        W: Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>> + Unpin + Send + 'a,
    {
        if let Some(done) = (&mut write).now_or_never() {
            return Writing::Done(Some(done.map_err(|_| End::Gone)));
        }
        Writing::Waiting(Box::pin(async move {
            let user_id = self.user_id;
            let written = match self.wait(write).await {
                Waited::Written(done) => done,
                Waited::Kicked => return Err(End::Gone),
                Waited::TimedOut => {
                    tracing::info!(user_id = %user_id, "closing a socket that stopped reading");
                    return Err(End::Close(Close::STOPPED_READING));
                }
            };
            written.map_err(|_| End::Gone)
        }))
    }

    async fn wait<W>(self, mut write: W) -> Waited
    where
        W: Future<Output = Result<(), tokio_tungstenite::tungstenite::Error>> + Unpin,
    {
        let blocked_at = Instant::now();
        let give_up = blocked_at + self.state.limits().connection.write_timeout();
        let mut divert_at = Some(blocked_at + self.state.limits().messaging.ack_timeout());
        loop {
            let due = match (self.unacked.next_deadline(), divert_at) {
                (Some(oldest), Some(divert)) => Some(oldest.min(divert)),
                (oldest, divert) => oldest.or(divert),
            };
            tokio::select! {
                written = &mut write => return Waited::Written(written),
                _ = self.kick.cancelled() => return Waited::Kicked,
                _ = sleep_until(give_up) => return Waited::TimedOut,
                _ = sleep_until(due.unwrap_or(give_up)), if due.is_some() => {
                    let expired = self.unacked.take_expired(Instant::now());
                    if !expired.is_empty() {
                        self.handoffs.push(self.state.relay().hand_back(expired).boxed());
                    }
                    if divert_at.take().is_some() {
                        let diverting = self.state.relay().divert(self.presence, self.rx);
                        self.handoffs.push(diverting.boxed());
                    }
                }
                Some(()) = self.handoffs.next() => {}
            }
        }
    }
}

/// The instant a session token expiring at `expires_at` (wall clock)
/// expires on the monotonic clock, seen from `now`.
fn expiry_instant(expires_at: chrono::DateTime<chrono::Utc>, now: Instant) -> Instant {
    // Past expiry: at once. Beyond any sane lifetime: a century, which
    // cannot overflow the clock.
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let left = (expires_at - chrono::Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    now + left.min(CENTURY)
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

    /// A frame held before authentication is charged what its repeated
    /// fields decoded into: the first frame too, which is otherwise kept
    /// whatever its size.
    #[test]
    fn held_frames_are_charged_what_they_decoded_into() {
        use crate::protocol::proto::{self, ClientFrame, client_frame::Request};
        let upload = |ec: Vec<proto::EcPreKey>, kyber: Vec<proto::SignedKyberPreKey>| {
            let frame = ClientFrame {
                request_id: 1,
                request: Some(Request::UploadKeys(proto::UploadKeys {
                    one_time_pre_keys: ec,
                    kyber_pre_keys: kyber,
                    ..Default::default()
                })),
            };
            let wire = prost::Message::encoded_len(&frame);
            (Ok(Some(Inbound::Frame(frame))), wire)
        };
        let budget = 64 * 1024;
        // Half a megabyte of empty Kyber entries: two bytes each on the
        // wire, a struct each in memory.
        let (flood, wire) = upload(Vec::new(), vec![Default::default(); 262_140]);
        assert!(wire <= 512 * 1024);
        assert!(!Early::default().push(flood, wire, budget));
        // A real upload behind a login: 100 keys of each kind.
        let ec = proto::EcPreKey {
            id: 1,
            public_key: vec![5; 33].into(),
        };
        let kyber = proto::SignedKyberPreKey {
            id: 1,
            public_key: vec![8; 1569].into(),
            signature: vec![0; 64].into(),
        };
        let (real, wire) = upload(vec![ec; 100], vec![kyber; 100]);
        let mut early = Early::default();
        assert!(
            early.push(real, wire, budget),
            "the first frame, whatever its size"
        );
        assert!(early.bytes > wire);
    }

    fn returned_size<F, Fut>(_: &F) -> usize
    where
        F: FnOnce(AppState, WebSocketStream<Plain>, Encoding, Entry, SocketAddr, Stop) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// The stream type a plain (non-TLS) connection is served on.
    type Plain = crate::connection::read_ahead::ReadAhead<tokio::net::TcpStream>;

    /// The session future is allocated for as long as the socket lives, so
    /// it bounds what an idle connection costs; keep it in check. (It was
    /// 5.4 KiB while answers and their frames were kept across the writes'
    /// awaits; see `Session::write`.)
    #[test]
    fn the_session_future_stays_small() {
        let size = returned_size(&serve::<Plain>);
        assert!(size <= 3584, "the session future is {size} bytes");
    }
}
