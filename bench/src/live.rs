//! The live-traffic generator: N pairs, A sending to B, against the relay
//! or the bare forwarder, closed-loop (a window of messages in flight per
//! pair, as fast as they complete) or open-loop (a fixed offered rate).
//!
//! Every payload starts with the time the message was *meant* to be sent
//! (nanoseconds since the run's epoch). In open loop that is the schedule,
//! not the moment the generator got round to it, so a stall anywhere
//! (server, socket, or generator) shows up in the latency of every message
//! it delayed: latency is corrected for coordinated omission.
//!
//! A message is complete when its protocol says so: for the relay, when the
//! sender is answered (which happens only after the recipient acked it); for
//! the forwarder, which has no answers, when B receives it; for the answered
//! forwarder, when B's answer reaches A. The closed-loop window counts
//! messages until complete.
//!
//! Open-loop pacing: tokio's timers have millisecond resolution, which
//! would add up to 1 ms of the generator's own lateness to every latency.
//! A dedicated thread ticks every `tick` (100 µs by default, or the mean
//! gap between messages if that is longer) with high-resolution sleeps and
//! wakes the sender tasks, which send everything that is due.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use futures::stream::SplitStream;
use futures::{FutureExt, SinkExt, StreamExt, TryStreamExt};
use signal_relay::client::{
    Acked, Client, ClientError, ConnectOptions, Encoding, Event, Events, Outgoing, Pipeline, Sent,
    Source,
};
use signal_relay::proto::SendOutcome;
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::{Kind, Metrics};
use crate::payload::{HEADER, intended_of, payload, payload_template};
use crate::raw_relay;
use crate::seed::Account;

/// Most ids in one ack (the relay's default RELAY_MAX_ACK_IDS).
pub const MAX_ACK_IDS: usize = 1000;

/// Open loop: unanswered messages per pair at most, by default.
pub const OPEN_MAX_IN_FLIGHT: usize = 128;

/// How messages are offered.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// At most `window` messages in flight per pair.
    Closed { window: usize },
    /// `rate` messages per second in total, spread evenly over the pairs.
    /// When the next message due is for a relay pair with `max_in_flight`
    /// messages unanswered, its sender group waits (and the latency of what
    /// that delays is charged, since it is measured from the schedule): the
    /// generator's memory stays bounded, and it stays below the relay's
    /// in-flight limit per connection. The baselines' sends wait on their
    /// writer's queue instead.
    Open {
        rate: f64,
        tick: Duration,
        max_in_flight: usize,
    },
}

/// What the pairs talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Relay,
    /// The relay, with every client speaking the `relay.v1.json`
    /// subprotocol: what the JSON encoding costs on top of protobuf.
    RelayJson,
    /// The relay, with every pair on bare sockets speaking the same
    /// protobuf frames as the client library ([`crate::raw_relay`]): the
    /// generator's CPU per message over this is the library's own cost.
    RelayRaw,
    /// Several relays in cluster mode (protobuf), each pair's sender on one
    /// node and its recipient on the next: every message crosses nodes.
    Cluster,
    Baseline,
    /// The forwarder, with B answering every message back to A through it:
    /// the relay's frames (one to the recipient, one back to the sender per
    /// message) and its completion rule, with none of its work.
    Answered,
}

impl Target {
    /// The relay target whose clients speak `encoding`.
    pub fn relay(encoding: Encoding) -> Target {
        match encoding {
            Encoding::Proto => Target::Relay,
            Encoding::Json => Target::RelayJson,
        }
    }

    /// Whether this is the relay (in either encoding), not a baseline.
    pub fn is_relay(self) -> bool {
        matches!(
            self,
            Target::Relay | Target::RelayJson | Target::RelayRaw | Target::Cluster
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Relay => "relay",
            Target::RelayJson => "relay_json",
            Target::RelayRaw => "relay_raw",
            Target::Cluster => "cluster",
            Target::Baseline => "baseline",
            Target::Answered => "answered",
        }
    }
}

type RawStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

enum SendHalf {
    /// A relay client; its sends are answered in the sender task's
    /// [`RelayAnswers`], attached to it at the first send.
    Relay {
        client: Client,
        recipient: Uuid,
        source: Option<Source>,
    },
    Raw {
        tx: mpsc::Sender<WsMessage>,
    },
    /// A bare socket to the relay.
    RawRelay {
        tx: mpsc::Sender<WsMessage>,
        recipient: Bytes,
        /// Open loop: a permit per unanswered message, as many as the
        /// library's senders may have (closed loop: `None`, the window
        /// already counts them).
        gate: Option<Arc<Semaphore>>,
    },
}

enum RecvHalf {
    Relay {
        client: Client,
        events: Events,
    },
    Raw {
        stream: SplitStream<RawStream>,
        /// B's writer when B answers (the answered baseline), else unused:
        /// the socket lives with it.
        answer: RawWriter,
    },
    /// A bare socket to the relay, and the writer its acks go through.
    RawRelay {
        stream: SplitStream<RawStream>,
        acks: mpsc::Sender<WsMessage>,
    },
}

/// A raw socket's sending side: in the answered baseline, a queue to a
/// writer task; otherwise the idle half, kept so the socket stays open.
enum RawWriter {
    Queue(mpsc::Sender<WsMessage>),
    Idle {
        _sink: futures::stream::SplitSink<RawStream, WsMessage>,
    },
}

struct Pair {
    send: SendHalf,
    recv: RecvHalf,
    /// A's reading half where a bare socket reads its answers.
    answers: Option<Answers>,
}

/// Where A's answers arrive on a bare socket.
enum Answers {
    /// The answered baseline: B's answers, through the forwarder.
    Forwarded(SplitStream<RawStream>),
    /// The relay's responses to A's sends.
    Relay(SplitStream<RawStream>),
}

/// Pairs connecting at once.
const CONNECTING: usize = 32;

/// Connected pairs, ready to carry traffic.
pub struct Pairs {
    target: Target,
    pairs: Vec<Pair>,
}

/// Connects a relay client and authenticates it with its session token.
pub async fn connect_relay(url: &str, account: &Account) -> anyhow::Result<(Client, Events)> {
    connect_relay_as(url, account, Encoding::Proto).await
}

/// [`connect_relay`] speaking `encoding`.
pub async fn connect_relay_as(
    url: &str,
    account: &Account,
    encoding: Encoding,
) -> anyhow::Result<(Client, Events)> {
    let options = ConnectOptions {
        encoding,
        ..ConnectOptions::default()
    };
    let (client, events) = Client::connect_with(url, options)
        .await
        .with_context(|| format!("connect to {url}"))?;
    client
        .resume(&account.token)
        .await
        .context("resume with a seeded session token")?;
    Ok((client, events))
}

/// Waits for the push that says the recipient's stored queue is empty: only
/// then does the relay route live messages to it (before, it stores them).
pub async fn wait_queue_empty(events: &mut Events) -> anyhow::Result<()> {
    loop {
        match events.next().await {
            Some(Event::QueueEmpty) => return Ok(()),
            Some(_) => {}
            None => anyhow::bail!("the connection closed before the queue-empty push"),
        }
    }
}

impl Pairs {
    /// Connects `accounts.len() / 2` relay pairs speaking `encoding`:
    /// account 2i sends to 2i+1.
    pub async fn relay(
        url: &str,
        accounts: &[Account],
        encoding: Encoding,
    ) -> anyhow::Result<Pairs> {
        let urls = [url.to_owned()];
        Self::across(&urls, accounts, encoding, Target::relay(encoding)).await
    }

    /// Connects `accounts.len() / 2` protobuf pairs across the nodes of a
    /// cluster: pair i's sender on node i mod n, its recipient on node
    /// (i+1) mod n, so with two nodes or more no pair shares a node.
    pub async fn cluster(urls: &[String], accounts: &[Account]) -> anyhow::Result<Pairs> {
        Self::across(urls, accounts, Encoding::Proto, Target::Cluster).await
    }

    /// Connects `accounts.len() / 2` pairs of bare sockets to the relay at
    /// `url` ([`Target::RelayRaw`]): account 2i sends to 2i+1.
    pub async fn relay_raw(url: &str, accounts: &[Account]) -> anyhow::Result<Pairs> {
        let pairs: Vec<Pair> = futures::stream::iter(accounts.chunks_exact(2))
            .map(|two| async move {
                let (b_sink, b_stream) = raw_relay::connect(url, &two[1]).await?;
                let (a_sink, a_stream) = raw_relay::connect(url, &two[0]).await?;
                Ok::<_, anyhow::Error>(Pair {
                    send: SendHalf::RawRelay {
                        tx: raw_writer(a_sink),
                        recipient: raw_relay::user_id(two[1].user_id),
                        gate: None,
                    },
                    recv: RecvHalf::RawRelay {
                        stream: b_stream,
                        acks: raw_writer(b_sink),
                    },
                    answers: Some(Answers::Relay(a_stream)),
                })
            })
            .buffered(CONNECTING)
            .try_collect()
            .await?;
        Ok(Pairs {
            target: Target::RelayRaw,
            pairs,
        })
    }

    async fn across(
        urls: &[String],
        accounts: &[Account],
        encoding: Encoding,
        target: Target,
    ) -> anyhow::Result<Pairs> {
        anyhow::ensure!(!urls.is_empty(), "no relay to connect to");
        let n = urls.len();
        let pairs: Vec<Pair> = futures::stream::iter(accounts.chunks_exact(2).enumerate())
            .map(|(i, two)| async move {
                let (a_url, b_url) = (&urls[i % n], &urls[(i + 1) % n]);
                let (b, mut b_events) = connect_relay_as(b_url, &two[1], encoding).await?;
                wait_queue_empty(&mut b_events).await?;
                let (a, a_events) = connect_relay_as(a_url, &two[0], encoding).await?;
                // A receives nothing in this scenario but must not stall
                // its reader; dropping its events is fine (pushes are then
                // discarded by the client).
                drop(a_events);
                Ok::<_, anyhow::Error>(Pair {
                    send: SendHalf::Relay {
                        client: a,
                        recipient: two[1].user_id,
                        source: None,
                    },
                    recv: RecvHalf::Relay {
                        client: b,
                        events: b_events,
                    },
                    answers: None,
                })
            })
            .buffered(CONNECTING)
            .try_collect()
            .await?;
        Ok(Pairs { target, pairs })
    }

    /// Connects `n` pairs to the forwarder at `url` (`ws://host:port`),
    /// numbered from `base` (pair numbers must not repeat within a
    /// forwarder's life). With `answered`, B answers every message back to
    /// A (the [`Target::Answered`] baseline).
    pub async fn baseline(
        url: &str,
        base: usize,
        n: usize,
        write_buffer: Option<usize>,
        answered: bool,
    ) -> anyhow::Result<Pairs> {
        // The client library's socket settings, for the same per-frame costs.
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(write_buffer.unwrap_or(16 * 1024));
        let pairs: Vec<Pair> = futures::stream::iter(base..base + n)
            .map(|i| async move {
                let (b, _) = tokio_tungstenite::connect_async_with_config(
                    format!("{url}/b/{i}"),
                    Some(config),
                    true,
                )
                .await?;
                let (a, _) = tokio_tungstenite::connect_async_with_config(
                    format!("{url}/a/{i}"),
                    Some(config),
                    true,
                )
                .await?;
                let (a_sink, a_stream) = a.split();
                let (b_sink, b_stream) = b.split();
                Ok::<_, anyhow::Error>(Pair {
                    send: SendHalf::Raw {
                        tx: raw_writer(a_sink),
                    },
                    recv: RecvHalf::Raw {
                        stream: b_stream,
                        answer: match answered {
                            true => RawWriter::Queue(raw_writer(b_sink)),
                            false => RawWriter::Idle { _sink: b_sink },
                        },
                    },
                    answers: answered.then_some(Answers::Forwarded(a_stream)),
                })
            })
            .buffered(CONNECTING)
            .try_collect()
            .await?;
        Ok(Pairs {
            target: match answered {
                true => Target::Answered,
                false => Target::Baseline,
            },
            pairs,
        })
    }

    /// Starts the traffic; it runs until [`Running::stop`].
    pub fn start(self, load: Load, size: usize, metrics: &Metrics) -> Running {
        let stop = CancellationToken::new();
        let target = self.target;
        let n = self.pairs.len().max(1);
        let mut tasks = Vec::new();
        let mut senders = Vec::new();
        let windows: Vec<Option<Arc<Semaphore>>> = self
            .pairs
            .iter()
            .map(|_| match load {
                Load::Closed { window } => Some(Arc::new(Semaphore::new(window.max(1)))),
                Load::Open { .. } => None,
            })
            .collect();
        for (i, mut pair) in self.pairs.into_iter().enumerate() {
            // A bare relay socket in open loop: its sends wait, as the
            // library's do, once the pair has `max_in_flight` unanswered.
            let mut answer_window = windows[i].clone();
            if let (Load::Open { max_in_flight, .. }, SendHalf::RawRelay { gate, .. }) =
                (load, &mut pair.send)
            {
                let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
                *gate = Some(permits.clone());
                answer_window = Some(permits);
            }
            // The window opens when a message is complete: for the
            // baseline at B's receipt, else at the sender's answer.
            let release = match target {
                Target::Baseline => windows[i].clone(),
                Target::Relay
                | Target::RelayJson
                | Target::RelayRaw
                | Target::Cluster
                | Target::Answered => None,
            };
            tasks.push(tokio::spawn(receive(
                pair.recv,
                release,
                metrics.clone(),
                stop.clone(),
            )));
            if let Some(answers) = pair.answers {
                tasks.push(tokio::spawn(receive_answers(
                    answers,
                    answer_window,
                    metrics.clone(),
                    stop.clone(),
                )));
            }
            senders.push((pair.send, windows[i].clone()));
        }
        let pacer_stop = Arc::new(AtomicBool::new(false));
        match load {
            Load::Closed { .. } => {
                for (i, (send, window)) in senders.into_iter().enumerate() {
                    let window = window.expect("closed loop has windows");
                    tasks.push(tokio::spawn(send_closed(
                        send,
                        window,
                        payload_template(size, i),
                        metrics.clone(),
                        stop.clone(),
                    )));
                }
            }
            Load::Open {
                rate,
                tick,
                max_in_flight,
            } => {
                // One sender task per generator thread, each with its share
                // of the pairs and of the rate.
                let groups = std::thread::available_parallelism()
                    .map_or(1, |n| n.get())
                    .min(n);
                let mut grouped: Vec<Vec<SendHalf>> = (0..groups).map(|_| Vec::new()).collect();
                for (i, (send, _)) in senders.into_iter().enumerate() {
                    grouped[i % groups].push(send);
                }
                let wakes: Vec<Arc<Notify>> =
                    (0..groups).map(|_| Arc::new(Notify::new())).collect();
                let thread_wakes = wakes.clone();
                let thread_stop = pacer_stop.clone();
                // Waking more often than messages are due only burns the
                // generator's CPU, which the server shares.
                let tick = tick.max(Duration::from_secs_f64(1.0 / rate.max(1e-3)));
                std::thread::spawn(move || {
                    while !thread_stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        for w in &thread_wakes {
                            w.notify_one();
                        }
                    }
                });
                let period_ns = groups as f64 * 1e9 / rate.max(1e-3);
                for (g, sends) in grouped.into_iter().enumerate() {
                    let offset = (period_ns * g as f64 / groups as f64) as u64;
                    // One task awaits every unanswered message of its
                    // pairs, thousands when the relay lags. Under tokio's
                    // cooperative budget it is made to yield after 128 of
                    // them and is re-polled spuriously; measured at 80k
                    // msg/s with 64 pairs, that made the generator, not the
                    // relay, the bottleneck (4 of 4 alternating runs fell
                    // to 45-64k msg/s with the generator at 117-126 % CPU;
                    // 0 of 4 without the budget). Its loop yields whenever nothing
                    // is ready, so it cannot starve the receivers.
                    tasks.push(tokio::spawn(tokio::task::unconstrained(send_open(
                        sends,
                        period_ns,
                        offset,
                        wakes[g].clone(),
                        max_in_flight,
                        size,
                        metrics.clone(),
                        stop.clone(),
                    ))));
                }
            }
        }
        Running {
            stop,
            pacer_stop,
            tasks,
        }
    }
}

/// The client library's writer for a raw socket: a queue and a task that
/// batches whatever is queued into one flush.
fn raw_writer(
    mut sink: futures::stream::SplitSink<RawStream, WsMessage>,
) -> mpsc::Sender<WsMessage> {
    let (tx, mut rx) = mpsc::channel::<WsMessage>(1024);
    tokio::spawn(async move {
        signal_relay::client::write_batched(&mut sink, &mut rx).await;
        let _ = sink.close().await;
    });
    tx
}

/// Traffic in progress.
pub struct Running {
    stop: CancellationToken,
    pacer_stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops sending, lets what is in flight finish (a few seconds at most),
    /// then closes the connections.
    pub async fn stop(self) {
        self.pacer_stop.store(true, Ordering::Relaxed);
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// How long senders and receivers keep going after the stop, for what is
/// in flight.
const GRACE: Duration = Duration::from_secs(3);

/// Ends [`GRACE`] after the stop: what a receiver races its reading with.
async fn after_grace(stop: &CancellationToken) {
    stop.cancelled().await;
    tokio::time::sleep(GRACE).await;
}

/// A sender task's relay answers, tagged (the pair's place in the task,
/// the message's intended send time).
type RelayAnswers = Pipeline<(usize, u64)>;

impl SendHalf {
    /// A bare relay socket in open loop with `max_in_flight` messages
    /// unanswered: its sender group stalls, as for the library's sends.
    fn gate_full(&self) -> bool {
        matches!(self, SendHalf::RawRelay { gate: Some(gate), .. } if gate.available_permits() == 0)
    }
}

/// Hands one message, pair `i`'s, to the transport. The relay's answer
/// comes out of `answers`.
async fn send_one(
    send: &mut SendHalf,
    answers: &mut RelayAnswers,
    i: usize,
    content: Bytes,
    intended: u64,
) -> Result<(), String> {
    match send {
        SendHalf::Relay {
            client,
            recipient,
            source,
        } => {
            let source = match source {
                Some(source) => *source,
                None => *source.insert(answers.attach(client).map_err(|e| format!("send: {e}"))?),
            };
            answers
                .send(source, Outgoing::new(*recipient, content), (i, intended))
                .await
                .map_err(|e| format!("send: {e}"))
        }
        SendHalf::Raw { tx } => tx
            .send(WsMessage::Binary(content))
            .await
            .map_err(|_| "send: forwarder connection closed".to_string()),
        SendHalf::RawRelay {
            tx,
            recipient,
            gate,
        } => {
            if let Some(gate) = gate {
                // The sender checked `gate_full` first; it alone takes
                // permits, so one is there.
                gate.try_acquire()
                    .map_err(|_| "send: no room under the in-flight limit".to_string())?
                    .forget();
            }
            tx.send(raw_relay::send_frame(recipient, content, intended))
                .await
                .map_err(|_| "send: relay connection closed".to_string())
        }
    }
}

fn record_answer(
    metrics: &Metrics,
    intended: u64,
    answer: Result<signal_relay::proto::Response, ClientError>,
) {
    match answer.and_then(Sent::try_from).map(|sent| sent.outcome) {
        Ok(SendOutcome::Delivered) => metrics.record_since(Kind::Answer, intended),
        Ok(other) => {
            // The live path failed (ack timeout or a full recipient queue);
            // the message went to storage instead.
            metrics.record_since(Kind::Answer, intended);
            metrics.error(format!("answer {other:?} instead of Delivered"));
        }
        Err(e) => metrics.error(format!("send: {e}")),
    }
}

async fn send_closed(
    mut send: SendHalf,
    window: Arc<Semaphore>,
    template: BytesMut,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut answers = RelayAnswers::new();
    let mut seq = 0u64;
    // Made once: a new wait each turn would register with the token's
    // shared lock, and deregister, once per message in every sender task.
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            Some(((_, intended), answer)) = answers.next() => {
                record_answer(&metrics, intended, answer);
                window.add_permits(1);
            }
            permit = window.acquire() => {
                let Ok(permit) = permit else { break };
                permit.forget();
                let intended = metrics.now_ns();
                seq += 1;
                let content = payload(&template, intended, seq);
                if let Err(e) = send_one(&mut send, &mut answers, 0, content, intended).await {
                    metrics.error(e);
                    break;
                }
                metrics.sent(1);
            }
        }
    }
    finish_answers(answers, &metrics).await;
}

/// Takes the answers still to come, for [`GRACE`] at most.
async fn finish_answers(mut answers: RelayAnswers, metrics: &Metrics) {
    let _ = tokio::time::timeout(GRACE, async {
        while let Some(((_, intended), answer)) = answers.next().await {
            record_answer(metrics, intended, answer);
        }
    })
    .await;
}

#[allow(clippy::too_many_arguments)]
async fn send_open(
    mut sends: Vec<SendHalf>,
    period_ns: f64,
    offset_ns: u64,
    wake: Arc<Notify>,
    max_in_flight: usize,
    size: usize,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let templates: Vec<BytesMut> = (0..sends.len())
        .map(|i| payload_template(size, i))
        .collect();
    let mut answers = RelayAnswers::new();
    // Unanswered messages per pair.
    let mut in_flight = vec![0usize; sends.len()];
    let start = metrics.now_ns() + offset_ns;
    let mut k = 0u64;
    // Made once, as in `send_closed`; the tick's wait is made again only
    // once it has fired, not on every answer.
    let mut stopped = std::pin::pin!(stop.cancelled());
    let mut ticked = std::pin::pin!(wake.notified());
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            Some(((i, intended), answer)) = answers.next() => {
                in_flight[i] -= 1;
                record_answer(&metrics, intended, answer);
            }
            _ = &mut ticked => ticked.set(wake.notified()),
        }
        // Send everything that is due, unless the next pair is at its limit.
        let now = metrics.now_ns();
        loop {
            let intended = start + (k as f64 * period_ns) as u64;
            if intended > now {
                break;
            }
            let i = (k % sends.len() as u64) as usize;
            if in_flight[i] >= max_in_flight || sends[i].gate_full() {
                // Counts stalls, not messages: the group resumes at the next
                // answer or tick.
                metrics.count("open_loop_sender_stalls", 1);
                break;
            }
            k += 1;
            let content = payload(&templates[i], intended, k);
            match send_one(&mut sends[i], &mut answers, i, content, intended).await {
                Ok(()) if matches!(sends[i], SendHalf::Relay { .. }) => in_flight[i] += 1,
                Ok(()) => {}
                Err(e) => metrics.error(e),
            }
            metrics.sent(1);
        }
    }
    finish_answers(answers, &metrics).await;
}

async fn receive(
    recv: RecvHalf,
    release: Option<Arc<Semaphore>>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    match recv {
        RecvHalf::Raw { mut stream, answer } => {
            let run = async {
                // The answered baseline acks as the relay's client does:
                // whatever arrived together in one frame, each message's
                // header (intended send time, sequence: 16 bytes, the size
                // of a message id) one after the other.
                let mut acks = BytesMut::new();
                while let Some(Ok(mut message)) = stream.next().await {
                    loop {
                        if let WsMessage::Binary(bytes) = &message {
                            if let Some(intended) = intended_of(bytes) {
                                metrics.record_since(Kind::Delivery, intended);
                            }
                            if let Some(w) = &release {
                                w.add_permits(1);
                            }
                            if matches!(answer, RawWriter::Queue(_)) && bytes.len() >= HEADER {
                                acks.extend_from_slice(&bytes[..HEADER]);
                            }
                        }
                        if acks.len() >= MAX_ACK_IDS * HEADER {
                            break;
                        }
                        match stream.next().now_or_never() {
                            Some(Some(Ok(next))) => message = next,
                            _ => break,
                        }
                    }
                    if let RawWriter::Queue(tx) = &answer
                        && !acks.is_empty()
                        && tx
                            .send(WsMessage::Binary(acks.split().freeze()))
                            .await
                            .is_err()
                    {
                        metrics.error("answer: forwarder connection closed".to_string());
                        break;
                    }
                }
            };
            tokio::select! {
                _ = run => {}
                _ = after_grace(&stop) => {}
            }
        }
        RecvHalf::RawRelay { stream, acks } => {
            tokio::select! {
                _ = raw_relay::receive_deliveries(stream, &acks, MAX_ACK_IDS, &metrics) => {
                    if !stop.is_cancelled() {
                        metrics.error("deliveries: the socket ended".to_string());
                    }
                }
                _ = after_grace(&stop) => {}
            }
        }
        RecvHalf::Relay { client, events } => {
            let run = receive_relay(&client, events, &metrics);
            tokio::select! {
                _ = run => {}
                _ = after_grace(&stop) => {}
            }
            client.close().await;
        }
    }
}

/// A's reading half on a bare socket: each answer completes its message.
async fn receive_answers(
    answers: Answers,
    window: Option<Arc<Semaphore>>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut stream = match answers {
        Answers::Forwarded(stream) => stream,
        Answers::Relay(stream) => {
            tokio::select! {
                _ = raw_relay::receive_answers(stream, window.as_deref(), &metrics) => {
                    if !stop.is_cancelled() {
                        // Nothing will answer what is in flight: the sender
                        // must not wait for its window.
                        metrics.error("answers: the socket ended".to_string());
                        if let Some(w) = &window {
                            w.close();
                        }
                    }
                }
                _ = after_grace(&stop) => {}
            }
            return;
        }
    };
    let run = async {
        while let Some(Ok(message)) = stream.next().await {
            if let WsMessage::Binary(bytes) = message {
                if let Some(intended) = intended_of(&bytes) {
                    metrics.record_since(Kind::Answer, intended);
                }
                if let Some(w) = &window {
                    w.add_permits(1);
                }
            }
        }
    };
    tokio::select! {
        _ = run => {}
        _ = after_grace(&stop) => {}
    }
}

/// Receives deliveries, records their latency and acks them in batches:
/// whatever arrived together is acked in one request.
pub async fn receive_relay(client: &Client, mut events: Events, metrics: &Metrics) {
    // Each ack tagged with how many ids it asked for.
    let mut acks = Pipeline::<usize>::new();
    let source = match acks.attach(client) {
        Ok(source) => source,
        Err(e) => return metrics.error(format!("ack: {e}")),
    };
    let mut ids: Vec<Uuid> = Vec::new();
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            Some((asked, answer)) = acks.next() => {
                check_ack(metrics, asked, answer);
                continue;
            }
        };
        let Some(mut event) = event else { break };
        loop {
            if let Event::Deliver(envelope) = &event {
                if envelope.r#type == signal_relay::proto::EnvelopeType::Receipt as i32 {
                    metrics.count("receipts", 1);
                } else if let Some(intended) = intended_of(&envelope.content) {
                    metrics.record_since(Kind::Delivery, intended);
                }
                if let Ok(id) = Uuid::from_slice(&envelope.message_id) {
                    ids.push(id);
                }
            }
            if ids.len() >= MAX_ACK_IDS {
                break;
            }
            match events.next().now_or_never() {
                Some(Some(next)) => event = next,
                _ => break,
            }
        }
        if !ids.is_empty() {
            if let Err(e) = acks.ack(source, &ids, ids.len()).await {
                metrics.error(format!("ack: {e}"));
            }
            ids.clear();
        }
    }
    while let Some((asked, answer)) = acks.next().await {
        check_ack(metrics, asked, answer);
    }
}

fn check_ack(
    metrics: &Metrics,
    asked: usize,
    answer: Result<signal_relay::proto::Response, ClientError>,
) {
    match answer.and_then(Acked::try_from) {
        Ok(Acked { acked, unknown }) => {
            metrics.count("acked", acked.len() as u64);
            if !unknown.is_empty() || acked.len() != asked {
                metrics.error(format!("ack: {} ids unknown", unknown.len()));
            }
        }
        Err(e) => metrics.error(format!("ack: {e}")),
    }
}
