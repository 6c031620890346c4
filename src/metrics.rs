//! Prometheus metrics: one [`Metrics`] per server, so two servers in one
//! process (the tests) count apart, served as Prometheus text by the admin
//! endpoint.
//!
//! The hot path pays one relaxed atomic add per count: every labelled
//! series a hot path touches is resolved to its own counter once, here, and
//! histograms are lock-free bucket arrays ([`AtomicHistogram`]) rather than
//! `prometheus-client`'s mutex-guarded one. Values that are state rather
//! than events (queue depths, pool connections, process figures) are read
//! when scraped, from sources the server registers once it has them.
//!
//! The metric names are a contract with dashboards and alerts: see the
//! README's Operations section before renaming one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// How a request to authenticate was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AuthMethod {
    register,
    login,
    resume,
    bearer,
    basic,
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AuthResult {
    ok,
    /// Wrong password, unknown user, invalid or expired token.
    bad_credentials,
    /// Malformed: a username or password breaking the rules, a taken name.
    invalid,
    rate_limited,
    /// The server could not check now (Argon2 queue full, database down).
    unavailable,
    /// Our fault.
    error,
}

impl AuthResult {
    /// The result an authentication answer counts as.
    pub fn of(outcome: Result<(), &crate::protocol::RequestError>) -> Self {
        use crate::protocol::RequestError as E;
        match outcome {
            Ok(()) => AuthResult::ok,
            Err(E::Unauthorized(_)) => AuthResult::bad_credentials,
            Err(E::RateLimited { .. }) => AuthResult::rate_limited,
            Err(E::Unavailable(_)) => AuthResult::unavailable,
            Err(E::Internal(_)) => AuthResult::error,
            Err(
                E::BadRequest(_)
                | E::Forbidden(_)
                | E::NotFound(_)
                | E::Conflict(_)
                | E::PayloadTooLarge(_),
            ) => AuthResult::invalid,
        }
    }
}

/// What became of a `SendMessage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SendOutcome {
    delivered,
    queued,
    dropped,
    /// Answered with an error status (invalid, rate limited, unknown
    /// recipient, failed).
    rejected,
}

/// Which rate limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Limit {
    send,
    bundle,
    lookup,
    upload_keys,
    /// Password attempts from one client address.
    password_address,
    /// Wrong passwords against one account.
    password_account,
    /// One address's share of the Argon2 queue is waiting already.
    password_queue,
    inflight,
}

/// What became of a bundle fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FetchResult {
    ok,
    not_found,
    rejected,
    error,
}

/// What became of a unit of messages forwarded to another node (cluster
/// mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ForwardResult {
    /// The owner routed it.
    routed,
    /// The owner no longer had the recipient; the lane followed them.
    moved,
    /// Redis refused it, the owner died or did not answer in time: its
    /// senders were told to retry.
    failed,
}

/// How taking a user over from the node that held them went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum HandoffResult {
    /// The old node let go and said so.
    released,
    /// No answer within the release timeout, or the request could not be
    /// sent: claimed anyway.
    timed_out,
}

/// Which database work failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DbOp {
    /// The store writer's batches.
    store,
    /// The batched reader (session lookups, drain reads).
    read,
    /// Deleting acked messages.
    ack,
    /// The expiry sweep.
    sweep,
    /// The readiness probe.
    probe,
    /// Any other query made for a request.
    request,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AuthLabels {
    method: AuthMethod,
    result: AuthResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: SendOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabel {
    limit: Limit,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FetchLabel {
    result: FetchResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ForwardLabel {
    result: ForwardResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandoffLabel {
    result: HandoffResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabel {
    op: DbOp,
}

/// A close code, as text (`none` for a peer that vanished): a small, fixed
/// set of values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Hot counters and histograms are split into this many shards, each in
/// its own cache line; a thread always counts in the same one. With one
/// shared atomic, every message made the two cores pass its cache line back
/// and forth (the sender's core counts the send, the recipient's the ack),
/// which cost more than the rest of the counting together.
const SHARDS: usize = 8;

/// This thread's shard.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
    SHARD.with(|shard| *shard)
}

/// An atomic alone in its cache line (two, for adjacent-line prefetch).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

/// A counter for the per-message paths: a relaxed add to this thread's
/// shard, summed when scraped. Clones share one counter.
#[derive(Debug, Clone, Default)]
pub struct HotCounter {
    shards: Arc<[Padded; SHARDS]>,
}

impl HotCounter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.shards[shard()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

impl prometheus_client::metrics::TypedMetric for HotCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for HotCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// A histogram whose observations are two relaxed atomic adds in this
/// thread's shard and a short scan: no lock, no shared cache line. Values
/// are integers in a fixed unit (nanoseconds, items) and are shown divided
/// by `scale`. Clones share one histogram.
#[derive(Debug, Clone)]
pub struct AtomicHistogram {
    inner: Arc<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    /// Upper bounds of the buckets, in the histogram's unit, ascending.
    bounds: &'static [u64],
    /// Divides the unit into what is shown (1e9 for nanoseconds as seconds).
    scale: f64,
    shards: [HistogramShard; SHARDS],
}

#[derive(Debug)]
#[repr(align(128))]
struct HistogramShard {
    /// Observations per bucket (not cumulative); one more for +Inf.
    counts: Box<[AtomicU64]>,
    /// Sum of the observations, in the histogram's unit.
    sum: AtomicU64,
}

impl AtomicHistogram {
    fn new(bounds: &'static [u64], scale: f64) -> Self {
        let shard = || HistogramShard {
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        };
        AtomicHistogram {
            inner: Arc::new(Buckets {
                bounds,
                scale,
                shards: std::array::from_fn(|_| shard()),
            }),
        }
    }

    /// Records one observation, in the histogram's unit.
    pub fn observe(&self, value: u64) {
        let this = &self.inner;
        let bucket = this
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(this.bounds.len());
        let shard = &this.shards[shard()];
        shard.counts[bucket].fetch_add(1, Ordering::Relaxed);
        shard.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Observations per bucket, over all shards.
    fn counts(&self) -> Vec<u64> {
        let mut counts = vec![0; self.inner.bounds.len() + 1];
        for shard in &self.inner.shards {
            for (total, count) in counts.iter_mut().zip(shard.counts.iter()) {
                *total += count.load(Ordering::Relaxed);
            }
        }
        counts
    }

    /// How many observations were made.
    pub fn count(&self) -> u64 {
        self.counts().iter().sum()
    }

    /// Records a duration, for histograms kept in nanoseconds.
    pub fn observe_duration(&self, elapsed: Duration) {
        self.observe(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }
}

impl prometheus_client::metrics::TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let this = &self.inner;
        let counts = self.counts();
        let buckets: Vec<(f64, u64)> = this
            .bounds
            .iter()
            .map(|&b| b as f64 / this.scale)
            .chain(std::iter::once(f64::MAX))
            .zip(counts.iter().copied())
            .collect();
        let sum: u64 = this
            .shards
            .iter()
            .map(|s| s.sum.load(Ordering::Relaxed))
            .sum();
        encoder.encode_histogram::<NoLabelSet>(
            sum as f64 / this.scale,
            counts.iter().sum(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Nanosecond bounds from 100 µs to 10 s.
const LATENCY_BOUNDS: &[u64] = &[
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Messages per store batch.
const BATCH_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048];

/// A value read at scrape time.
type Source = Box<dyn Fn() -> i64 + Send + Sync>;

/// State read when scraped: queue depths and pool connections, whose
/// owners register a source once they exist.
#[derive(Default)]
struct Sampled {
    store_queue: OnceLock<Source>,
    argon2_queue: OnceLock<Source>,
    /// Password checks skipped because their requester had gone.
    argon2_abandoned: OnceLock<Box<dyn Fn() -> u64 + Send + Sync>>,
    /// Sockets not yet authenticated.
    unauthenticated: OnceLock<Source>,
    /// (idle, busy) pool connections.
    pool: OnceLock<Box<dyn Fn() -> (i64, i64) + Send + Sync>>,
    /// Cluster mode: (recipients with a lane here, units forwarded and
    /// not yet answered).
    cluster: OnceLock<Box<dyn Fn() -> (i64, i64) + Send + Sync>>,
}

impl std::fmt::Debug for Sampled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sampled")
    }
}

/// Reads [`Sampled`]'s sources when scraped.
#[derive(Debug)]
struct SampledCollector(Arc<Sampled>);

impl Collector for SampledCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64| {
            let metric = ConstGauge::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        let read = |source: &OnceLock<Source>| source.get().map_or(0, |f| f());
        let sampled = &self.0;
        gauge(
            &mut encoder,
            "relay_store_queue_depth",
            "Messages waiting for the store writer",
            read(&sampled.store_queue),
        )?;
        gauge(
            &mut encoder,
            "relay_argon2_queue_depth",
            "Password checks waiting for an Argon2 worker",
            read(&sampled.argon2_queue),
        )?;
        let abandoned = ConstCounter::new(sampled.argon2_abandoned.get().map_or(0, |f| f()));
        abandoned.encode(encoder.encode_descriptor(
            "relay_argon2_abandoned",
            "Password checks skipped because their socket had closed",
            None,
            abandoned.metric_type(),
        )?)?;
        gauge(
            &mut encoder,
            "relay_connections_unauthenticated",
            "Sockets open now that have not authenticated yet",
            read(&sampled.unauthenticated),
        )?;
        let (idle, busy) = sampled.pool.get().map_or((0, 0), |f| f());
        let mut family = encoder.encode_descriptor(
            "relay_db_pool_connections",
            "PostgreSQL pool connections by state",
            None,
            MetricType::Gauge,
        )?;
        for (state, value) in [("idle", idle), ("busy", busy)] {
            let labels = [("state", state)];
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
        if let Some(cluster) = sampled.cluster.get() {
            let (lanes, units) = cluster();
            gauge(
                &mut encoder,
                "relay_cluster_lanes",
                "Recipients with messages in a lane on this node (cluster mode)",
                lanes,
            )?;
            gauge(
                &mut encoder,
                "relay_cluster_units_in_flight",
                "Units forwarded to other nodes and not yet answered (cluster mode)",
                units,
            )?;
        }
        Ok(())
    }
}

/// The process's own figures, read from `/proc` when scraped (Linux).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let process = ProcessStats::read();
        let rss = ConstGauge::new(process.resident_bytes as i64);
        rss.encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            None,
            MetricType::Gauge,
        )?)?;
        let cpu = ConstCounter::new(process.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
        let fds = ConstGauge::new(process.open_fds as i64);
        fds.encode(encoder.encode_descriptor(
            "process_open_fds",
            "Number of open file descriptors",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// What the process metrics report.
struct ProcessStats {
    resident_bytes: u64,
    cpu_seconds: f64,
    open_fds: u64,
}

impl ProcessStats {
    /// Reads the figures; one that cannot be read is reported as zero.
    fn read() -> Self {
        // VmRSS is in kB; reading it needs no page-size lookup.
        let resident_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kb| kb * 1024);
        let cpu_seconds = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
            .map_or(0.0, |usage| {
                let seconds =
                    |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
                seconds(usage.user_time()) + seconds(usage.system_time())
            });
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as u64);
        ProcessStats {
            resident_bytes,
            cpu_seconds,
            open_fds,
        }
    }
}

/// Every metric the server keeps, resolved to the series each hot path
/// touches. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

/// The series. Fields are public so the hot paths reach their counter
/// with no lookup.
pub struct Inner {
    registry: Registry,
    sampled: Arc<Sampled>,
    /// Authenticated sockets open now.
    pub connections: Gauge,
    /// Authenticated sockets ever opened.
    pub connections_opened: Counter,
    connections_closed: Family<CodeLabel, Counter>,
    upgrades_rejected: Family<ReasonLabel, Counter>,
    auth: Family<AuthLabels, Counter>,
    /// `relay_messages_total`, one counter per outcome.
    pub messages_delivered: HotCounter,
    pub messages_queued: HotCounter,
    pub messages_dropped: HotCounter,
    pub messages_rejected: HotCounter,
    /// From a live message being sent to its recipient's ack.
    pub delivery_seconds: AtomicHistogram,
    /// Stored messages written to their recipient by a drain.
    pub messages_drained: HotCounter,
    /// Message ids acked by recipients (live or stored).
    pub acks: HotCounter,
    /// Delivery receipts sent for acked stored messages.
    pub receipts: HotCounter,
    /// How long one store batch took.
    pub store_batch_seconds: AtomicHistogram,
    /// Messages in one store batch.
    pub store_batch_size: AtomicHistogram,
    db_errors: Family<OpLabel, Counter>,
    rate_limited: Family<LimitLabel, Counter>,
    prekey_fetches: Family<FetchLabel, Counter>,
    /// `PreKeysLow` pushes sent.
    pub prekeys_low: Counter,
    cluster_forwards: Family<ForwardLabel, Counter>,
    cluster_handoffs: Family<HandoffLabel, Counter>,
    /// Items in batches Redis refused to take for a peer.
    pub cluster_undelivered: Counter,
}

impl std::ops::Deref for Metrics {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connections = Gauge::default();
        registry.register(
            "relay_connections",
            "Authenticated WebSocket connections open now",
            connections.clone(),
        );
        let connections_opened = Counter::default();
        registry.register(
            "relay_connections_opened",
            "Authenticated WebSocket connections opened",
            connections_opened.clone(),
        );
        let connections_closed = Family::<CodeLabel, Counter>::default();
        registry.register(
            "relay_connections_closed",
            "Authenticated WebSocket connections closed, by close code (none: the peer vanished)",
            connections_closed.clone(),
        );
        let upgrades_rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "relay_upgrades_rejected",
            "WebSocket upgrade requests refused, by reason",
            upgrades_rejected.clone(),
        );
        let auth = Family::<AuthLabels, Counter>::default();
        registry.register(
            "relay_auth",
            "Authentication attempts by method and result",
            auth.clone(),
        );
        let messages = Family::<OutcomeLabel, HotCounter>::default();
        registry.register(
            "relay_messages",
            "SendMessage requests answered, by outcome",
            messages.clone(),
        );
        let delivery_seconds = AtomicHistogram::new(LATENCY_BOUNDS, 1e9);
        registry.register(
            "relay_delivery_seconds",
            "Live deliveries: from the send to the recipient's ack",
            delivery_seconds.clone(),
        );
        let messages_drained = HotCounter::default();
        registry.register(
            "relay_messages_drained",
            "Stored messages delivered by a drain",
            messages_drained.clone(),
        );
        let acks = HotCounter::default();
        registry.register("relay_acks", "Message ids acked", acks.clone());
        let receipts = HotCounter::default();
        registry.register(
            "relay_receipts",
            "Delivery receipts sent for acked stored messages",
            receipts.clone(),
        );
        let store_batch_seconds = AtomicHistogram::new(LATENCY_BOUNDS, 1e9);
        registry.register(
            "relay_store_batch_seconds",
            "Time to store one batch of messages",
            store_batch_seconds.clone(),
        );
        let store_batch_size = AtomicHistogram::new(BATCH_BOUNDS, 1.0);
        registry.register(
            "relay_store_batch_size",
            "Messages per store batch",
            store_batch_size.clone(),
        );
        let db_errors = Family::<OpLabel, Counter>::default();
        registry.register(
            "relay_db_errors",
            "Failed database operations, by operation",
            db_errors.clone(),
        );
        let rate_limited = Family::<LimitLabel, Counter>::default();
        registry.register(
            "relay_rate_limited",
            "Requests refused by a rate limit",
            rate_limited.clone(),
        );
        let prekey_fetches = Family::<FetchLabel, Counter>::default();
        registry.register(
            "relay_prekey_fetches",
            "Pre-key bundle fetches, by result",
            prekey_fetches.clone(),
        );
        let prekeys_low = Counter::default();
        registry.register(
            "relay_prekeys_low",
            "PreKeysLow pushes sent",
            prekeys_low.clone(),
        );
        let cluster_forwards = Family::<ForwardLabel, Counter>::default();
        registry.register(
            "relay_cluster_forwards",
            "Units of messages forwarded to the node owning their recipient, by result (cluster mode)",
            cluster_forwards.clone(),
        );
        let cluster_handoffs = Family::<HandoffLabel, Counter>::default();
        registry.register(
            "relay_cluster_handoffs",
            "Users taken over from the node that held them, by result (cluster mode)",
            cluster_handoffs.clone(),
        );
        let cluster_undelivered = Counter::default();
        registry.register(
            "relay_cluster_undelivered",
            "Items for other nodes that Redis refused to take (cluster mode)",
            cluster_undelivered.clone(),
        );
        let build_info = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        build_info
            .get_or_create(&vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", env!("RELAY_GIT_COMMIT")),
            ])
            .set(1);
        registry.register(
            "relay_build_info",
            "The running build: always 1, labelled with version and commit",
            build_info,
        );
        let sampled = Arc::new(Sampled::default());
        registry.register_collector(Box::new(SampledCollector(sampled.clone())));
        registry.register_collector(Box::new(ProcessCollector));

        // Every label value exists from the start, so a dashboard sees a
        // zero rather than no series, and the hot paths find theirs made.
        let outcome = |outcome| messages.get_or_create(&OutcomeLabel { outcome }).clone();
        for limit in [
            Limit::send,
            Limit::bundle,
            Limit::lookup,
            Limit::upload_keys,
            Limit::password_address,
            Limit::password_account,
            Limit::password_queue,
            Limit::inflight,
        ] {
            let _ = rate_limited.get_or_create(&LimitLabel { limit });
        }
        for op in [
            DbOp::store,
            DbOp::read,
            DbOp::ack,
            DbOp::sweep,
            DbOp::probe,
            DbOp::request,
        ] {
            let _ = db_errors.get_or_create(&OpLabel { op });
        }
        for result in [
            ForwardResult::routed,
            ForwardResult::moved,
            ForwardResult::failed,
        ] {
            let _ = cluster_forwards.get_or_create(&ForwardLabel { result });
        }
        for result in [HandoffResult::released, HandoffResult::timed_out] {
            let _ = cluster_handoffs.get_or_create(&HandoffLabel { result });
        }
        Metrics {
            inner: Arc::new(Inner {
                registry,
                sampled,
                connections,
                connections_opened,
                connections_closed,
                upgrades_rejected,
                auth,
                messages_delivered: outcome(SendOutcome::delivered),
                messages_queued: outcome(SendOutcome::queued),
                messages_dropped: outcome(SendOutcome::dropped),
                messages_rejected: outcome(SendOutcome::rejected),
                delivery_seconds,
                messages_drained,
                acks,
                receipts,
                store_batch_seconds,
                store_batch_size,
                db_errors,
                rate_limited,
                prekey_fetches,
                prekeys_low,
                cluster_forwards,
                cluster_handoffs,
                cluster_undelivered,
            }),
        }
    }

    /// The whole registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    pub fn auth(&self, method: AuthMethod, result: AuthResult) {
        self.auth
            .get_or_create(&AuthLabels { method, result })
            .inc();
    }

    pub fn rate_limited(&self, limit: Limit) {
        self.rate_limited.get_or_create(&LimitLabel { limit }).inc();
    }

    pub fn prekey_fetch(&self, result: FetchResult) {
        self.prekey_fetches
            .get_or_create(&FetchLabel { result })
            .inc();
    }

    pub fn db_error(&self, op: DbOp) {
        self.db_errors.get_or_create(&OpLabel { op }).inc();
    }

    pub fn upgrade_rejected(&self, reason: &'static str) {
        self.upgrades_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A session ended with `code` (`None`: the peer vanished).
    pub fn connection_closed(&self, code: Option<u16>) {
        let code = code.map_or_else(|| "none".to_owned(), |c| c.to_string());
        self.connections_closed
            .get_or_create(&CodeLabel { code })
            .inc();
    }

    /// Where `relay_store_queue_depth` is read from.
    pub fn sample_store_queue(&self, source: impl Fn() -> i64 + Send + Sync + 'static) {
        let _ = self.sampled.store_queue.set(Box::new(source));
    }

    /// Where `relay_argon2_queue_depth` is read from.
    pub fn sample_argon2_queue(&self, source: impl Fn() -> i64 + Send + Sync + 'static) {
        let _ = self.sampled.argon2_queue.set(Box::new(source));
    }

    /// Where `relay_argon2_abandoned_total` is read from.
    pub fn sample_argon2_abandoned(&self, source: impl Fn() -> u64 + Send + Sync + 'static) {
        let _ = self.sampled.argon2_abandoned.set(Box::new(source));
    }

    /// Where `relay_connections_unauthenticated` is read from.
    pub fn sample_unauthenticated(&self, source: impl Fn() -> i64 + Send + Sync + 'static) {
        let _ = self.sampled.unauthenticated.set(Box::new(source));
    }

    pub fn cluster_forward(&self, result: ForwardResult) {
        self.cluster_forwards
            .get_or_create(&ForwardLabel { result })
            .inc();
    }

    pub fn cluster_handoff(&self, result: HandoffResult) {
        self.cluster_handoffs
            .get_or_create(&HandoffLabel { result })
            .inc();
    }

    /// Where `relay_cluster_lanes` and `relay_cluster_units_in_flight` are
    /// read from (cluster mode only: without it they are not reported).
    pub fn sample_cluster(&self, source: impl Fn() -> (i64, i64) + Send + Sync + 'static) {
        let _ = self.sampled.cluster.set(Box::new(source));
    }

    /// Where `relay_db_pool_connections` is read from: (idle, busy).
    pub fn sample_pool(&self, source: impl Fn() -> (i64, i64) + Send + Sync + 'static) {
        let _ = self.sampled.pool.set(Box::new(source));
    }
}
