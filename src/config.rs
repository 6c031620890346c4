//! Typed server configuration, layered: built-in defaults, then an optional
//! TOML file (`--config`), then environment variables, then command-line
//! flags. A bare `relay` runs against a local PostgreSQL with no set-up.
//! Every limit the server enforces lives here.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, ValueEnum};
use ipnet::IpNet;
use secrecy::SecretString;

/// Everything the `relay` binary can be told. Tests build it with
/// [`Config::for_tests`] and adjust fields directly.
#[derive(Debug, Clone, Parser)]
#[command(name = "relay", version, about = "Signal Protocol relay server")]
pub struct Config {
    /// TOML file of settings, keyed by flag name (`max_connections = 100`
    /// or `max-connections = 100`). Environment variables and flags win
    /// over it. Global, so an admin subcommand may take it after its name.
    #[arg(long, env = "RELAY_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// Address to listen on. Port 0 picks a free port.
    #[arg(long, env = "RELAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Load balancers that start each connection with a PROXY protocol
    /// header (HAProxy's, version 1 or 2) naming the client: addresses or
    /// networks, comma-separated (`10.0.0.0/8,192.0.2.7`), or `off`. A
    /// connection from one of them must carry the header, and the client
    /// it names is the address the per-address limits and the logs see.
    /// Anyone else is taken at its TCP address: only a balancer may name
    /// another.
    #[arg(long, env = "RELAY_PROXY_PROTOCOL_FROM", default_value = "off")]
    pub proxy_protocol_from: TrustedProxies,

    /// PostgreSQL connection URL. The database is created if missing.
    /// Wrapped as a secret because it may carry a password. Global, so an
    /// admin subcommand may take it after its name.
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        default_value = "postgres://postgres@localhost/relay",
        hide_env_values = true
    )]
    pub database_url: SecretString,

    /// Address of the admin endpoint (plain HTTP: /metrics, /healthz,
    /// /readyz), or `off`. Keep it off the public network: metrics tell
    /// more than clients need to know.
    #[arg(
        long,
        env = "RELAY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090",
        value_parser = parse_admin_listen
    )]
    pub admin_listen: AdminListen,

    /// Size of the PostgreSQL connection pool.
    #[arg(long, env = "RELAY_DB_POOL", default_value_t = 16)]
    pub db_pool: u32,

    /// Log format.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub tls: TlsConfig,

    #[command(flatten, next_help_heading = "Cluster")]
    pub cluster: ClusterConfig,

    #[command(flatten)]
    pub limits: Limits,
}

/// The longest any duration setting may be, in seconds (about ten years):
/// far beyond any sensible value, and far from where adding it to a clock
/// reading overflows, which a setting of `u64::MAX` did on every socket.
const MAX_SECS: u64 = 10 * 366 * 24 * 3600;
/// [`MAX_SECS`] for the settings in milliseconds.
const MAX_MS: u64 = MAX_SECS * 1000;

/// Cluster mode: several relays behind one load balancer, sharing one
/// PostgreSQL and one Redis. Off (a single node, no Redis needed) unless a
/// Redis URL is given. See docs/cluster.md.
#[derive(Debug, Clone, Args)]
pub struct ClusterConfig {
    /// Redis URL (e.g. redis://127.0.0.1:6379/0); turns cluster mode on.
    /// Wrapped as a secret because it may carry a password.
    #[arg(long, env = "RELAY_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<SecretString>,

    /// A stable name for this node, in logs and in the membership table.
    /// Default: the host name and the listening port. Each start is also a
    /// new incarnation, so a restarted node is never taken for its previous
    /// life.
    #[arg(long, env = "RELAY_NODE_ID")]
    pub node_id: Option<String>,

    /// How often a node writes its heartbeat (and checks its peers').
    #[arg(long, env = "RELAY_CLUSTER_HEARTBEAT_MS", value_parser = clap::value_parser!(u64).range(..=MAX_MS), default_value_t = 1000)]
    pub cluster_heartbeat_ms: u64,

    /// A node whose heartbeat is this old is declared dead: its users are
    /// released and sends waiting on it fail as retryable. A node paused
    /// for longer finds itself fenced out when it wakes, and exits.
    #[arg(long, env = "RELAY_CLUSTER_DEAD_AFTER_MS", value_parser = clap::value_parser!(u64).range(..=MAX_MS), default_value_t = 5000)]
    pub cluster_dead_after_ms: u64,

    /// How long a node taking over a user waits for the node that held
    /// them to close its socket and store what it held, before claiming
    /// the user anyway. Also each node's lease on its users: a node that
    /// cannot confirm its claims in PostgreSQL for this long stops
    /// delivering (see docs/cluster.md); it checks them three times per
    /// term (at most every 2 s).
    #[arg(long, env = "RELAY_CLUSTER_RELEASE_TIMEOUT_MS", value_parser = clap::value_parser!(u64).range(1000..=MAX_MS), default_value_t = 3000)]
    pub cluster_release_timeout_ms: u64,

    /// Longest a message forwarded to another node waits for its outcome
    /// before its sender is told to retry (UNAVAILABLE). Must exceed the
    /// ack timeout plus a store.
    #[arg(
        long,
        env = "RELAY_CLUSTER_FORWARD_TIMEOUT_MS",
        value_parser = clap::value_parser!(u64).range(..=MAX_MS),
        default_value_t = 20_000
    )]
    pub cluster_forward_timeout_ms: u64,

    /// Most items (forwards, answers, events) in one stream entry to a peer.
    #[arg(long, env = "RELAY_CLUSTER_BATCH", default_value_t = 256)]
    pub cluster_batch: usize,

    /// Most items waiting to be sent to one peer; beyond it, sends through
    /// that peer fail as retryable.
    #[arg(long, env = "RELAY_CLUSTER_QUEUE", default_value_t = 65_536)]
    pub cluster_queue: usize,

    /// Most messages waiting in one recipient's forwarding lane on this
    /// node; beyond it, sends to that recipient fail as retryable.
    #[arg(long, env = "RELAY_CLUSTER_LANE", default_value_t = 4096)]
    pub cluster_lane: usize,

    /// Entries kept in a node's inbox stream (trimmed approximately): what a
    /// node paused or disconnected from Redis can catch up on.
    #[arg(long, env = "RELAY_CLUSTER_INBOX_MAXLEN", default_value_t = 100_000)]
    pub cluster_inbox_maxlen: usize,
}

impl ClusterConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.cluster_heartbeat_ms.max(1))
    }
    pub fn dead_after(&self) -> Duration {
        Duration::from_millis(self.cluster_dead_after_ms)
    }
    pub fn release_timeout(&self) -> Duration {
        Duration::from_millis(self.cluster_release_timeout_ms)
    }
    pub fn forward_timeout(&self) -> Duration {
        Duration::from_millis(self.cluster_forward_timeout_ms)
    }
}

/// TLS is on when both a certificate chain and a key are given.
#[derive(Debug, Clone, Args, Default)]
pub struct TlsConfig {
    /// PEM certificate chain (see certs/README.md for a local one).
    #[arg(long, env = "RELAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key matching --tls-cert.
    #[arg(long, env = "RELAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Where the admin endpoint listens, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminListen(pub Option<SocketAddr>);

fn parse_admin_listen(value: &str) -> Result<AdminListen, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(AdminListen(None));
    }
    value
        .parse()
        .map(|addr| AdminListen(Some(addr)))
        .map_err(|err| format!("{err}: expected an address such as 127.0.0.1:9090, or off"))
}

/// The peers trusted to name the client of a connection in a PROXY header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Whether `peer` is one of them. An IPv4 peer of a dual-stack listener
    /// (`::ffff:a.b.c.d`) counts as its IPv4 address.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.0.iter().any(|net| net.contains(&peer))
    }
}

impl std::str::FromStr for TrustedProxies {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        parse_trusted_proxies(value)
    }
}

fn parse_trusted_proxies(value: &str) -> Result<TrustedProxies, String> {
    let value = value.trim();
    if value.is_empty() || value.eq_ignore_ascii_case("off") {
        return Ok(TrustedProxies::default());
    }
    value
        .split(',')
        .map(str::trim)
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map(ipv4_if_mapped)
                .map_err(|_| {
                    format!("{item:?}: expected an address or network such as 10.0.0.0/8, or off")
                })
        })
        .collect::<Result<_, _>>()
        .map(TrustedProxies)
}

/// Peers are matched in their IPv4 form, so an IPv4 network written in
/// IPv6 form (`::ffff:10.0.0.0/104`) is taken as the IPv4 one.
fn ipv4_if_mapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every bound the server enforces, grouped by the layer that enforces it
/// so each layer is handed only its own group. Durations are given in
/// seconds or milliseconds as the flag name says; flag and variable names
/// are the field names, so they are the same whatever the grouping.
#[derive(Debug, Clone, Args)]
pub struct Limits {
    #[command(flatten, next_help_heading = "Connections")]
    pub connection: ConnectionLimits,

    #[command(flatten, next_help_heading = "Messaging and storage")]
    pub messaging: MessagingLimits,

    #[command(flatten, next_help_heading = "Database workers")]
    pub reader: ReaderLimits,

    #[command(flatten, next_help_heading = "Authentication")]
    pub auth: AuthLimits,

    #[command(flatten, next_help_heading = "Rate limits")]
    pub rates: RateLimits,

    #[command(flatten, next_help_heading = "Pre-keys")]
    pub keys: KeyLimits,

    #[command(flatten, next_help_heading = "Sweeping and shutdown")]
    pub housekeeping: Housekeeping,
}

/// What one socket may hold and how long it may take: the server's and the
/// connection handler's bounds.
#[derive(Debug, Clone, Args)]
pub struct ConnectionLimits {
    /// Most authenticated WebSocket connections held at once; more get
    /// HTTP 503 (sockets not yet authenticated have their own budget,
    /// `max_unauthenticated`).
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 25_000)]
    pub max_connections: usize,

    /// Largest WebSocket frame or message accepted, in bytes; a larger one
    /// closes the socket as too big.
    #[arg(long, env = "RELAY_MAX_FRAME_BYTES", default_value_t = 512 * 1024)]
    pub max_frame_bytes: usize,

    /// Per-socket read buffer: tungstenite allocates it with the socket and
    /// keeps it, so every idle connection holds one (its 128 KiB default
    /// would cost too much). It only needs to hold what one read takes from
    /// the read-ahead buffer in front of it (one syscall fills that, see
    /// `read_ahead_bytes`), so a typical message's worth is enough; larger
    /// frames grow it while they are read. 512 B instead of 4 KiB saved
    /// 3.5 KiB per idle connection at no measurable CPU (BENCHMARKS.md).
    #[arg(long, env = "RELAY_READ_BUFFER_BYTES", default_value_t = 512)]
    pub read_buffer_bytes: usize,

    /// Most bytes read from a socket per syscall. The buffer exists only
    /// while it holds unread data, so idle sockets do not pay for it.
    #[arg(long, env = "RELAY_READ_AHEAD_BYTES", default_value_t = 32 * 1024)]
    pub read_ahead_bytes: usize,

    /// Requests one connection may have in progress; reading pauses beyond.
    #[arg(long, env = "RELAY_MAX_INFLIGHT_REQUESTS", default_value_t = 256)]
    pub max_inflight_requests: usize,

    /// Most frames a connection handles, of those it has already received,
    /// before it flushes their answers. A burst shares one turn of the
    /// session loop and one flush; the bound keeps a fast sender's answers
    /// (and the connection's other work) from waiting behind many frames.
    #[arg(long, env = "RELAY_READ_BURST", value_parser = clap::value_parser!(u32).range(1..=1024), default_value_t = 16)]
    pub read_burst: u32,

    /// Close a socket that sent nothing (not even a pong) for this long.
    #[arg(long, env = "RELAY_IDLE_TIMEOUT_SECS", value_parser = clap::value_parser!(u64).range(..=MAX_SECS), default_value_t = 60)]
    pub idle_timeout_secs: u64,

    /// Close a socket whose pending write makes no progress for this long:
    /// a client that stopped reading.
    #[arg(long, env = "RELAY_WRITE_TIMEOUT_SECS", value_parser = clap::value_parser!(u64).range(..=MAX_SECS), default_value_t = 20)]
    pub write_timeout_secs: u64,

    /// Time from a new socket's arrival to finishing its TLS handshake and
    /// sending its whole HTTP request head; a request head still incomplete
    /// then is answered 408. Short, because an honest client sends its
    /// head at once, and a silent socket holds an unauthenticated slot.
    #[arg(long, env = "RELAY_HANDSHAKE_TIMEOUT_SECS", value_parser = clap::value_parser!(u64).range(..=MAX_SECS), default_value_t = 10)]
    pub handshake_timeout_secs: u64,

    /// Time from a new socket's arrival to its authentication (header or
    /// first request), password check included.
    #[arg(long, env = "RELAY_AUTH_TIMEOUT_SECS", value_parser = clap::value_parser!(u64).range(..=MAX_SECS), default_value_t = 30)]
    pub auth_timeout_secs: u64,

    /// Sockets not yet authenticated held at once, on top of
    /// `max_connections` (which counts authenticated ones): silent or slow
    /// sockets cannot take the slots of authenticated users. More get HTTP
    /// 503 at once; as many refused sockets as this may stay open a second
    /// after their answer (so closing does not reset it away), the rest are
    /// closed right after it.
    #[arg(long, env = "RELAY_MAX_UNAUTHENTICATED", default_value_t = 2_048)]
    pub max_unauthenticated: usize,

    /// Sockets not yet authenticated held at once from one client address
    /// (an IPv6 client by its /64); more get HTTP 429 at once. Generous,
    /// for clients behind one NAT reconnecting together.
    #[arg(
        long,
        env = "RELAY_MAX_UNAUTHENTICATED_PER_ADDRESS",
        default_value_t = 64,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_unauthenticated_per_address: u32,

    /// Connections the kernel may hold completed but not yet accepted
    /// (listen backlog; Linux caps it at net.core.somaxconn). Too small a
    /// queue drops handshakes during a reconnect storm, and each dropped one
    /// costs its client a one-second retransmission.
    #[arg(long, env = "RELAY_LISTEN_BACKLOG", default_value_t = 4_096)]
    pub listen_backlog: u32,
}

/// How messages move: their size and lifetime, the live path's queues and
/// the store writer's and drain's batches.
#[derive(Debug, Clone, Args)]
pub struct MessagingLimits {
    /// Largest message content, in bytes.
    #[arg(long, env = "RELAY_MAX_MESSAGE_BYTES", default_value_t = 96 * 1024)]
    pub max_message_bytes: usize,

    /// Longest time a message is kept queued; also the default TTL.
    #[arg(long, env = "RELAY_MAX_TTL_SECS", value_parser = clap::value_parser!(u64).range(..=MAX_SECS), default_value_t = 30 * 24 * 3600)]
    pub max_ttl_secs: u64,

    /// How long a live delivery waits for the recipient's ack before the
    /// message is stored and the sender told `queued`.
    #[arg(long, env = "RELAY_ACK_TIMEOUT_MS", value_parser = clap::value_parser!(u64).range(..=MAX_MS), default_value_t = 5_000)]
    pub ack_timeout_ms: u64,

    /// Frames queued for one connection before live messages overflow to
    /// storage.
    #[arg(long, env = "RELAY_OUTBOUND_QUEUE", default_value_t = 256)]
    pub outbound_queue: usize,

    /// Live messages written to one connection and not yet acked; beyond
    /// this the connection takes no more live messages, so they overflow to
    /// storage.
    #[arg(long, env = "RELAY_MAX_UNACKED", default_value_t = 1_024)]
    pub max_unacked: usize,

    /// Most message ids in one ack request.
    #[arg(long, env = "RELAY_MAX_ACK_IDS", default_value_t = 1_000)]
    pub max_ack_ids: usize,

    /// Recent client message ids remembered for idempotent retries of
    /// messages that were delivered live and never stored.
    #[arg(long, env = "RELAY_DEDUPE_CAPACITY", default_value_t = 100_000)]
    pub dedupe_capacity: usize,

    /// Messages sent to the store writer that may wait for it.
    #[arg(long, env = "RELAY_STORE_QUEUE", default_value_t = 16_384)]
    pub store_queue: usize,

    /// Most messages one store batch writes (one insert statement).
    #[arg(long, env = "RELAY_STORE_BATCH", default_value_t = 1_024)]
    pub store_batch: usize,

    /// Store writers: batches written at once, each on a dedicated
    /// connection.
    #[arg(long, env = "RELAY_STORE_WRITERS", default_value_t = 4)]
    pub store_writers: usize,

    /// Most stored messages one drain read returns. Each read is a round
    /// trip and a function call in PostgreSQL, so larger reads drain
    /// faster; what one read holds in memory is capped by
    /// `drain_batch_bytes` whatever this is.
    #[arg(long, env = "RELAY_DRAIN_BATCH", default_value_t = 2_048)]
    pub drain_batch: usize,

    /// Most content bytes one drain read holds beyond its first message
    /// (which is read whatever its size, so a read always progresses).
    #[arg(long, env = "RELAY_DRAIN_BATCH_BYTES", default_value_t = 1 << 20)]
    pub drain_batch_bytes: usize,
}

/// The dedicated connections that answer every reconnect's reads (session
/// lookup, drain read) in batches, and the deadline of every batch on a
/// dedicated connection (the readers' and the store writers').
#[derive(Debug, Clone, Args)]
pub struct ReaderLimits {
    /// Dedicated connections (beyond the pool) answering session lookups
    /// and drain reads in batches.
    #[arg(long, env = "RELAY_DB_READERS", default_value_t = 2)]
    pub db_readers: usize,

    /// Most session lookups or drain reads answered by one statement.
    #[arg(long, env = "RELAY_DB_READ_BATCH", default_value_t = 128)]
    pub db_read_batch: usize,

    /// Session lookups and drain reads that may wait for a reader
    /// connection; beyond this, connections wait for room.
    #[arg(long, env = "RELAY_DB_READ_QUEUE", default_value_t = 4_096)]
    pub db_read_queue: usize,

    /// Longest one batch of the readers or store writers may take on its
    /// dedicated connection, connecting included. Past it the batch fails
    /// and the connection is dropped: a connection to a database server
    /// that vanished (a failover, a lost NAT entry) would otherwise stall
    /// them until the kernel gives up, minutes later.
    #[arg(long, env = "RELAY_DB_BATCH_TIMEOUT_SECS", value_parser = clap::value_parser!(u64).range(..=MAX_SECS), default_value_t = 30)]
    pub db_batch_timeout_secs: u64,
}

/// Passwords and sessions.
#[derive(Debug, Clone, Args)]
pub struct AuthLimits {
    /// Failed authentication attempts allowed on one socket.
    #[arg(long, env = "RELAY_MAX_AUTH_ATTEMPTS", default_value_t = 5)]
    pub max_auth_attempts: u32,

    /// Bytes of requests a client may pipeline behind an authentication
    /// still being checked, beyond the first such request (held whatever
    /// its size on the wire), each charged its received or decoded size,
    /// whichever is larger, plus what its repeated fields decoded into
    /// (which the first request's may not exceed either), plus its place in
    /// the queue. The socket is read on during a
    /// check, to notice a client that leaves; one that sends more than this
    /// meanwhile is closed (1008) and its check withdrawn. The first
    /// frame's allowance comes back whenever the held frames run out, so
    /// one socket holds at most `max_auth_attempts` times (a frame plus
    /// this) over its attempts. A held frame's bytes fields share the
    /// buffer it was read into, which may be up to twice its size, so the
    /// memory held can reach about twice this.
    #[arg(long, env = "RELAY_MAX_EARLY_BYTES", default_value_t = 64 * 1024)]
    pub max_early_bytes: usize,

    /// Session token lifetime.
    #[arg(long, env = "RELAY_SESSION_TTL_SECS", value_parser = clap::value_parser!(u64).range(..=MAX_SECS), default_value_t = 30 * 24 * 3600)]
    pub session_ttl_secs: u64,

    /// Argon2 verifications run at once; the rest wait their turn.
    #[arg(long, env = "RELAY_ARGON2_CONCURRENCY", default_value_t = default_argon2_concurrency())]
    pub argon2_concurrency: usize,

    /// Argon2 jobs allowed to wait for a slot; beyond this, logins get
    /// `unavailable` rather than piling up.
    #[arg(long, env = "RELAY_ARGON2_QUEUE", default_value_t = 1024)]
    pub argon2_queue: usize,

    /// Argon2 jobs one client address may have waiting; beyond this its
    /// attempts are answered `rate limited`. Waiting jobs are served one
    /// address at a time, round robin, so one address cannot make another
    /// wait for more than a few hashes.
    #[arg(long, env = "RELAY_ARGON2_QUEUE_PER_ADDRESS", default_value_t = 4)]
    pub argon2_queue_per_address: usize,

    /// Password attempts (login, register, Basic header, delete-account)
    /// one client address may make per second, sustained. Every attempt
    /// counts, right or wrong: each costs an Argon2 hash.
    #[arg(long, env = "RELAY_PASSWORD_ADDRESS_RATE", default_value_t = 0.5)]
    pub password_address_rate_per_sec: f64,

    /// Burst of password attempts one client address may make at once.
    #[arg(long, env = "RELAY_PASSWORD_ADDRESS_BURST", default_value_t = 20.0)]
    pub password_address_burst: f64,

    /// Wrong password attempts one account may take per second, sustained,
    /// from all addresses together. A right password does not count, so
    /// an owner waits at most 1/rate (20 s) after guessing stops.
    #[arg(long, env = "RELAY_PASSWORD_ACCOUNT_RATE", default_value_t = 0.05)]
    pub password_account_rate_per_sec: f64,

    /// Burst of wrong password attempts one account may take at once.
    #[arg(long, env = "RELAY_PASSWORD_ACCOUNT_BURST", default_value_t = 10.0)]
    pub password_account_burst: f64,

    /// Token buckets in each of the two password tables (by address, by
    /// account). Fixed, so invented keys cannot grow memory (32 bytes each);
    /// keys that share a bucket share its limit.
    #[arg(long, env = "RELAY_PASSWORD_LIMIT_SLOTS", default_value_t = 65_536)]
    pub password_limit_slots: usize,

    /// Live sessions one user may hold. A login beyond it revokes the
    /// user's oldest session, so tokens from clients that never log out do
    /// not pile up.
    #[arg(
        long,
        env = "RELAY_MAX_SESSIONS_PER_USER",
        default_value_t = 20,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_sessions_per_user: u32,
}

/// Per-user token buckets on the requests that cost the server most.
#[derive(Debug, Clone, Args)]
pub struct RateLimits {
    /// Messages a sender may send per second, sustained.
    #[arg(long, env = "RELAY_SEND_RATE", default_value_t = 200.0)]
    pub send_rate_per_sec: f64,

    /// Burst of messages a sender may send at once.
    #[arg(long, env = "RELAY_SEND_BURST", default_value_t = 1_000.0)]
    pub send_burst: f64,

    /// Bundle fetches a requester may make per second, sustained.
    #[arg(long, env = "RELAY_BUNDLE_RATE", default_value_t = 5.0)]
    pub bundle_rate_per_sec: f64,

    /// Burst of bundle fetches a requester may make at once.
    #[arg(long, env = "RELAY_BUNDLE_BURST", default_value_t = 100.0)]
    pub bundle_burst: f64,

    /// User lookups a requester may make per second, sustained. A lookup
    /// consumes no key but, like a fetch, tells who exists: the same
    /// default as bundle fetches.
    #[arg(long, env = "RELAY_LOOKUP_RATE", default_value_t = 5.0)]
    pub lookup_rate_per_sec: f64,

    /// Burst of user lookups a requester may make at once.
    #[arg(long, env = "RELAY_LOOKUP_BURST", default_value_t = 100.0)]
    pub lookup_burst: f64,

    /// Key uploads a user may make per second, sustained. Each upload
    /// verifies up to 102 signatures (about 6 ms of CPU).
    #[arg(long, env = "RELAY_UPLOAD_KEYS_RATE", default_value_t = 1.0)]
    pub upload_keys_rate_per_sec: f64,

    /// Burst of key uploads a user may make at once: enough to fill an
    /// empty key store 100 keys at a time.
    #[arg(long, env = "RELAY_UPLOAD_KEYS_BURST", default_value_t = 20.0)]
    pub upload_keys_burst: f64,
}

/// The pre-key directory.
#[derive(Debug, Clone, Args)]
pub struct KeyLimits {
    /// One-time pre-keys of each kind (EC, Kyber) kept per user; an upload
    /// that would exceed it is refused.
    #[arg(long, env = "RELAY_MAX_STORED_PRE_KEYS", default_value_t = 1_000)]
    pub max_stored_pre_keys: u32,

    /// Push "pre-keys low" when a fetch leaves fewer one-time keys than this.
    #[arg(long, env = "RELAY_PREKEY_LOW_THRESHOLD", default_value_t = 10)]
    pub prekey_low_threshold: u32,

    /// "Pre-keys low" is pushed once per owner until they upload keys; if
    /// they have not after this long, the next low fetch reminds them.
    #[arg(long, env = "RELAY_PREKEY_LOW_INTERVAL_SECS", value_parser = clap::value_parser!(u64).range(..=MAX_SECS), default_value_t = 600)]
    pub prekey_low_interval_secs: u64,
}

/// The background sweep, and how long shutdown may take.
#[derive(Debug, Clone, Args)]
pub struct Housekeeping {
    /// How often expired messages and sessions are swept.
    #[arg(long, env = "RELAY_SWEEP_INTERVAL_SECS", value_parser = clap::value_parser!(u64).range(..=MAX_SECS), default_value_t = 60)]
    pub sweep_interval_secs: u64,

    /// Rows deleted per sweep statement.
    #[arg(long, env = "RELAY_SWEEP_BATCH", default_value_t = 5_000)]
    pub sweep_batch: i64,

    /// After SIGINT/SIGTERM, how long in-flight work may take before exit.
    #[arg(long, env = "RELAY_SHUTDOWN_GRACE_SECS", value_parser = clap::value_parser!(u64).range(..=MAX_SECS), default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

fn default_argon2_concurrency() -> usize {
    // Leave at least one core to live traffic.
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1).max(1))
        .unwrap_or(1)
}

impl ConnectionLimits {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs)
    }
    pub fn auth_timeout(&self) -> Duration {
        Duration::from_secs(self.auth_timeout_secs)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
}

impl MessagingLimits {
    pub fn max_ttl(&self) -> Duration {
        Duration::from_secs(self.max_ttl_secs)
    }
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }
}

impl KeyLimits {
    pub fn prekey_low_interval(&self) -> Duration {
        Duration::from_secs(self.prekey_low_interval_secs)
    }
}

impl AuthLimits {
    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(self.session_ttl_secs)
    }
}

impl Housekeeping {
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_secs(self.sweep_interval_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML")]
    Toml {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("config file {path}: unknown setting {key:?}")]
    UnknownKey { path: String, key: String },
    #[error("config file {path}: setting {key:?} must be a string, number or boolean")]
    BadValue { path: String, key: String },
    #[error(transparent)]
    Invalid(#[from] clap::Error),
}

impl Config {
    /// Parses the process's arguments and environment, layered over the
    /// `--config` file if one is named.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    /// As [`Config::load`], for the given arguments.
    pub fn load_from<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Ok(load_layered::<Self, _, _>(args)?.value)
    }
}

/// A parsed command line and the effective settings it came to.
#[derive(Debug)]
pub struct Layered<P> {
    /// The parsed command line.
    pub value: P,
    /// Every setting's effective value and where it came from, in the
    /// order `--help` lists them, for `relay check-config`.
    pub settings: Vec<Setting>,
}

/// Where a setting's effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Env,
    Flag,
}

/// One setting as it will be used.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The field and TOML key name (`max_connections`).
    pub name: String,
    /// The `--help` heading it is listed under, if any.
    pub heading: Option<String>,
    /// The effective value as given (or defaulted), secrets masked; `None`
    /// when unset.
    pub value: Option<String>,
    /// Where the value came from.
    pub source: Source,
    /// The environment variable that sets it, if any.
    pub env: Option<String>,
}

/// Parses `args` as `P` (the server's [`Config`], or a command line that
/// flattens it), layered over the `--config` file if one is named: defaults
/// < file < environment < flags.
pub fn load_layered<P, I, T>(args: I) -> Result<Layered<P>, ConfigError>
where
    P: FromArgMatches + CommandFactory,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let command = P::command();
    let matches = command.clone().try_get_matches_from(&args)?;
    let Some(path) = matches.get_one::<PathBuf>("config").cloned() else {
        let settings = settings(&command, &matches, &[]);
        return Ok(Layered {
            value: P::from_arg_matches(&matches)?,
            settings,
        });
    };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let table: toml::Table = text.parse().map_err(|source| ConfigError::Toml {
        path: shown.clone(),
        source,
    })?;
    // The file fills in only what neither the environment nor a flag
    // set: it is injected as flags placed before the real ones, for
    // settings still at their default.
    let mut layered = vec![args.first().cloned().unwrap_or_else(|| "relay".into())];
    let mut from_file = Vec::new();
    for (key, value) in &table {
        let id = key.replace('-', "_");
        let known = command
            .get_arguments()
            .any(|a| a.get_id() == id.as_str() && a.get_long().is_some());
        if !known || matches!(id.as_str(), "config" | "help" | "version") {
            return Err(ConfigError::UnknownKey {
                path: shown,
                key: key.clone(),
            });
        }
        // Only the environment and the flags outrank the file. A setting
        // with no default (the TLS files, the Redis URL) is unset, not at
        // its default, and must be taken from the file all the same.
        if matches!(
            matches.value_source(&id),
            Some(ValueSource::EnvVariable | ValueSource::CommandLine)
        ) {
            continue;
        }
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(ConfigError::BadValue {
                    path: shown,
                    key: key.clone(),
                });
            }
        };
        layered.push(format!("--{}", id.replace('_', "-")).into());
        layered.push(value.into());
        from_file.push(id);
    }
    layered.extend(args.into_iter().skip(1));
    let matches = command.clone().try_get_matches_from(layered)?;
    let settings = settings(&command, &matches, &from_file);
    Ok(Layered {
        value: P::from_arg_matches(&matches)?,
        settings,
    })
}

/// The effective value and source of every top-level setting of `command`.
/// Arguments that hide their environment values (the database URL) are
/// secrets: shown with [`mask_secret`].
fn settings(
    command: &clap::Command,
    matches: &clap::ArgMatches,
    from_file: &[String],
) -> Vec<Setting> {
    command
        .get_arguments()
        .filter(|arg| {
            arg.get_long().is_some() && !matches!(arg.get_id().as_str(), "help" | "version")
        })
        .map(|arg| {
            let id = arg.get_id().as_str();
            let value = matches
                .get_raw(id)
                .and_then(|mut raw| raw.next())
                .map(|raw| raw.to_string_lossy().into_owned())
                .map(|raw| {
                    if arg.is_hide_env_values_set() {
                        mask_secret(&raw)
                    } else {
                        raw
                    }
                });
            let source = match matches.value_source(id) {
                Some(ValueSource::EnvVariable) => Source::Env,
                Some(ValueSource::CommandLine) if from_file.iter().any(|f| f == id) => Source::File,
                Some(ValueSource::CommandLine) => Source::Flag,
                _ => Source::Default,
            };
            Setting {
                name: id.to_owned(),
                heading: arg.get_help_heading().map(str::to_owned),
                value,
                source,
                env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
            }
        })
        .collect()
}

/// A secret setting as it may be shown: a URL keeps everything but its
/// password (in the user-info part or a `password=` query parameter);
/// anything else is masked whole.
pub fn mask_secret(value: &str) -> String {
    const MASK: &str = "********";
    let Ok(mut url) = url::Url::parse(value) else {
        return MASK.to_owned();
    };
    if !url.has_host() {
        return MASK.to_owned();
    }
    if url.password().is_some() && url.set_password(Some(MASK)).is_err() {
        return MASK.to_owned();
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    MASK.to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

impl Config {
    /// The defaults, as if no flag or variable were given, pointed at
    /// `database_url` and an ephemeral port on loopback.
    pub fn for_tests(database_url: &str) -> Self {
        let mut config = Config::parse_from(["relay"]);
        config.database_url = SecretString::from(database_url.to_owned());
        config.listen = "127.0.0.1:0".parse().expect("valid address");
        config.admin_listen = AdminListen(Some(config.listen));
        config.tls = TlsConfig::default();
        config
    }
}

#[cfg(test)]
mod docs;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_are_addresses_and_networks_or_off() {
        let trusted = parse_trusted_proxies("10.0.0.0/8, 192.0.2.7,2001:db8::/32").unwrap();
        for yes in ["10.1.2.3", "192.0.2.7", "::ffff:10.9.9.9", "2001:db8::5"] {
            assert!(trusted.trusts(yes.parse().unwrap()), "{yes}");
        }
        for no in ["11.0.0.1", "192.0.2.8", "2001:db9::1", "127.0.0.1"] {
            assert!(!trusted.trusts(no.parse().unwrap()), "{no}");
        }
        assert_eq!(
            parse_trusted_proxies("off").unwrap(),
            TrustedProxies::default()
        );
        assert_eq!(
            parse_trusted_proxies(" ").unwrap(),
            TrustedProxies::default()
        );
        let mapped = parse_trusted_proxies("::ffff:10.0.0.0/104").unwrap();
        assert!(mapped.trusts("10.2.3.4".parse().unwrap()));
        assert!(mapped.trusts("::ffff:10.2.3.4".parse().unwrap()));
        assert!(!mapped.trusts("11.2.3.4".parse().unwrap()));
        assert!(!TrustedProxies::default().trusts("127.0.0.1".parse().unwrap()));
        let err = parse_trusted_proxies("10.0.0.0/8,localhost").unwrap_err();
        assert!(err.contains("\"localhost\""), "{err}");
        assert!(parse_trusted_proxies("10.0.0.0/33").is_err());
        let config = Config::load_from(["relay", "--proxy-protocol-from", "127.0.0.1"]).unwrap();
        assert!(
            config
                .proxy_protocol_from
                .trusts("127.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn file_fills_defaults_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("relay-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        std::fs::write(
            &path,
            "max-connections = 7\nidle_timeout_secs = 9\nlisten = \"127.0.0.1:9999\"\n",
        )
        .unwrap();
        let path = path.to_str().unwrap();
        let config =
            Config::load_from(["relay", "--config", path, "--idle-timeout-secs", "3"]).unwrap();
        assert_eq!(config.limits.connection.max_connections, 7, "from the file");
        assert_eq!(
            config.limits.connection.idle_timeout_secs, 3,
            "the flag wins"
        );
        assert_eq!(config.listen.port(), 9999);
        assert_eq!(
            config.limits.connection.max_frame_bytes,
            512 * 1024,
            "default kept"
        );
        assert_eq!(
            config.admin_listen,
            AdminListen(Some("127.0.0.1:9090".parse().unwrap())),
            "default kept"
        );
        let off = Config::load_from(["relay", "--admin-listen", "off"]).unwrap();
        assert_eq!(off.admin_listen, AdminListen(None));
        assert!(Config::load_from(["relay", "--admin-listen", "nowhere"]).is_err());

        // Settings without a default are taken from the file too (they
        // were dropped silently: a relay configured for TLS served plain
        // ws://, one configured for a cluster ran alone).
        let unset = dir.join("unset.toml");
        std::fs::write(
            &unset,
            "tls-cert = \"/etc/relay/cert.pem\"\ntls-key = \"/etc/relay/key.pem\"\n\
             redis-url = \"redis://127.0.0.1:6379/0\"\nnode-id = \"relay-7\"\n",
        )
        .unwrap();
        let config = Config::load_from(["relay", "--config", unset.to_str().unwrap()]).unwrap();
        assert_eq!(
            config.tls.tls_cert.as_deref(),
            Some(std::path::Path::new("/etc/relay/cert.pem"))
        );
        assert_eq!(
            config.tls.tls_key.as_deref(),
            Some(std::path::Path::new("/etc/relay/key.pem"))
        );
        assert_eq!(
            config
                .cluster
                .redis_url
                .as_ref()
                .map(|u| secrecy::ExposeSecret::expose_secret(u).to_owned()),
            Some("redis://127.0.0.1:6379/0".to_owned())
        );
        assert_eq!(config.cluster.node_id.as_deref(), Some("relay-7"));
        let flagged = Config::load_from([
            "relay",
            "--config",
            unset.to_str().unwrap(),
            "--node-id",
            "relay-8",
        ])
        .unwrap();
        assert_eq!(
            flagged.cluster.node_id.as_deref(),
            Some("relay-8"),
            "the flag wins"
        );

        // A duration that would overflow a clock reading is refused, not
        // a panic on every socket.
        for (flag, max) in [
            ("--handshake-timeout-secs", MAX_SECS),
            ("--cluster-forward-timeout-ms", MAX_MS),
        ] {
            assert!(Config::load_from(["relay", flag, &max.to_string()]).is_ok());
            let err = Config::load_from(["relay", flag, &u64::MAX.to_string()]).unwrap_err();
            assert!(err.to_string().contains(flag), "{err}");
        }

        std::fs::write(dir.join("bad.toml"), "no_such_setting = 1\n").unwrap();
        let bad = dir.join("bad.toml");
        let err = Config::load_from(["relay", "--config", bad.to_str().unwrap()]).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKey { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn secrets_keep_everything_but_the_password() {
        assert_eq!(
            mask_secret("postgres://relay:hunter2@db:5432/relay?sslmode=require"),
            "postgres://relay:********@db:5432/relay?sslmode=require"
        );
        assert_eq!(
            mask_secret("postgres://db/relay?user=relay&password=hunter2"),
            "postgres://db/relay?user=relay&password=********"
        );
        assert_eq!(
            mask_secret("postgres://relay@db/relay"),
            "postgres://relay@db/relay"
        );
        assert_eq!(mask_secret("not a url hunter2"), "********");
    }
}
