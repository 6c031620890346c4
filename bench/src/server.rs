//! The processes under test: the relay (started by the bench as a child on a
//! fresh database, or an external one given by URL and pid) and the bare
//! WebSocket forwarder baseline (always a child: this same binary), and for
//! `--nodes N` (`live`, `connections`, `reconnect`) a cluster: N relays and
//! a private `redis-server`.
//!
//! Children are started with `--listen 127.0.0.1:0` and report the port they
//! bound in their log, so there is no race for a free port; the bench waits
//! for that line rather than polling the port. (`redis-server` cannot do
//! that, so it gets a port the kernel just handed out and released.)

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Executor, PgPool};

/// How to reach (or start) the relay. Shared by every scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Drive an already running relay at this URL instead of starting one
    /// (`ws://127.0.0.1:8080/v1/websocket`). Needs --database-url naming its
    /// database, for seeding accounts.
    #[arg(long, global = true)]
    pub server_url: Option<String>,

    /// Pid of the external relay, so its CPU and memory can be read from
    /// /proc. Without it, server CPU and memory are not reported.
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,

    /// PostgreSQL URL. When the bench starts the relay, a fresh database
    /// named after this one (plus a unique suffix) is created for the run
    /// and dropped afterwards; with --server-url it is the relay's own.
    #[arg(
        long,
        global = true,
        default_value = "postgres://postgres@localhost/relay_bench"
    )]
    pub database_url: String,

    /// The relay binary to start. Defaults to `relay` beside this binary
    /// (cargo builds both into the same target directory).
    #[arg(long, global = true)]
    pub relay_bin: Option<PathBuf>,

    /// Extra environment for the started relay, `NAME=VALUE`; repeatable.
    /// Applied after the bench's own raised limits, so it can override them.
    #[arg(long = "server-env", global = true, value_name = "NAME=VALUE")]
    pub server_env: Vec<String>,

    /// Keep the run's database instead of dropping it.
    #[arg(long, global = true)]
    pub keep_db: bool,
}

/// Limits the bench raises on a relay it starts: the defaults protect a
/// production server from one abusive client, and the generator is exactly
/// that, on purpose.
const RAISED_LIMITS: &[(&str, &str)] = &[
    ("RELAY_SEND_RATE", "1000000000"),
    ("RELAY_SEND_BURST", "1000000000"),
    ("RELAY_BUNDLE_RATE", "1000000000"),
    ("RELAY_BUNDLE_BURST", "1000000000"),
    ("RELAY_UPLOAD_KEYS_RATE", "1000000000"),
    ("RELAY_UPLOAD_KEYS_BURST", "1000000000"),
    ("RELAY_MAX_CONNECTIONS", "30000"),
    // One generator address opens thousands of sockets and logs in far
    // faster than people do. (`login --flood` measures with these raised,
    // the harder case for the Argon2 queue's fairness; pass --server-env
    // to measure with the defaults.)
    ("RELAY_MAX_UNAUTHENTICATED", "30000"),
    ("RELAY_MAX_UNAUTHENTICATED_PER_ADDRESS", "30000"),
    ("RELAY_PASSWORD_ADDRESS_RATE", "1000000000"),
    ("RELAY_PASSWORD_ADDRESS_BURST", "1000000000"),
    ("RELAY_ARGON2_QUEUE_PER_ADDRESS", "1024"),
    ("RUST_LOG", "info"),
];

/// A relay under test.
pub struct Relay {
    pub url: String,
    pub pid: Option<u32>,
    /// A pool on the relay's database: for seeding accounts and reading
    /// PostgreSQL's own counters.
    pub db: PgPool,
    child: Option<Child>,
    /// (admin URL, database name) of a database this run created.
    created_db: Option<(String, String)>,
    /// Where the started relay's log goes.
    pub log_path: Option<PathBuf>,
}

impl Relay {
    pub async fn start(args: &ServerArgs) -> anyhow::Result<Relay> {
        match &args.server_url {
            Some(url) => {
                let db = connect_db(&args.database_url).await?;
                Ok(Relay {
                    url: url.clone(),
                    pid: args.server_pid,
                    db,
                    child: None,
                    created_db: None,
                    log_path: None,
                })
            }
            None => Self::spawn(args).await,
        }
    }

    async fn spawn(args: &ServerArgs) -> anyhow::Result<Relay> {
        let db = FreshDb::name(args)?;
        let bin = relay_bin(args)?;
        let log_path = std::env::temp_dir().join(format!("relay-bench-{}.log", db.name));
        let (mut child, addr) = spawn_relay(&bin, &db.url, args, &[], &log_path)?;
        let pool = match connect_db(&db.url).await {
            Ok(pool) => pool,
            Err(err) => {
                // Not yet in a `Relay`, whose drop would stop it: left
                // running, it held its pool's connections after the bench
                // exited, and later runs met "too many clients".
                terminate(&mut child);
                if !args.keep_db {
                    drop_db(&db.admin, &db.name).await;
                }
                return Err(err);
            }
        };
        Ok(Relay {
            url: format!("ws://{addr}/v1/websocket"),
            pid: Some(child.id()),
            db: pool,
            child: Some(child),
            created_db: (!args.keep_db).then_some((db.admin, db.name)),
            log_path: Some(log_path),
        })
    }

    /// Stops a relay the bench started (SIGTERM, so it shuts down cleanly)
    /// and drops its database.
    pub async fn stop(mut self) {
        self.db.close().await;
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
        if let Some((admin, name)) = self.created_db.take() {
            drop_db(&admin, &name).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            terminate(child);
        }
    }
}

/// A database name of the run's own, beside --database-url's.
struct FreshDb {
    /// The new database's URL.
    url: String,
    /// The server's `postgres` database, to drop the new one from.
    admin: String,
    name: String,
}

impl FreshDb {
    fn name(args: &ServerArgs) -> anyhow::Result<FreshDb> {
        let base = PgConnectOptions::from_str(&args.database_url)
            .with_context(|| format!("invalid --database-url {}", args.database_url))?;
        let name = format!(
            "{}_{}_{:08x}",
            base.get_database().unwrap_or("relay_bench"),
            std::process::id(),
            rand::random::<u32>()
        );
        Ok(FreshDb {
            url: base.clone().database(&name).to_url_lossy().to_string(),
            admin: base.database("postgres").to_url_lossy().to_string(),
            name,
        })
    }
}

async fn drop_db(admin: &str, name: &str) {
    if let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(admin)
        .await
    {
        let _ = pool
            .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
            .await;
        pool.close().await;
    }
}

fn relay_bin(args: &ServerArgs) -> anyhow::Result<PathBuf> {
    let bin = match &args.relay_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("relay"),
    };
    if !bin.exists() {
        bail!(
            "relay binary not found at {}; build it with `cargo build --release --bin relay` \
             or pass --relay-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// Starts the relay on `database_url` with the bench's raised limits, then
/// `extra` (cluster settings), then --server-env; returns it and the address
/// it listens on once it says so.
fn spawn_relay(
    bin: &std::path::Path,
    database_url: &str,
    args: &ServerArgs,
    extra: &[(&str, String)],
    log_path: &std::path::Path,
) -> anyhow::Result<(Child, String)> {
    let mut command = Command::new(bin);
    command
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--database-url")
        .arg(database_url)
        // Several relays may run at once (and an older relay ignores
        // a variable it does not know, where it would refuse a flag).
        .env("RELAY_ADMIN_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in RAISED_LIMITS {
        command.env(k, v);
    }
    for (k, v) in extra {
        command.env(k, v);
    }
    for kv in &args.server_env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--server-env {kv}: expected NAME=VALUE"))?;
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let addr = wait_for_line(&mut child, log_path, |line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = v.get("fields")?;
        if fields.get("message")?.as_str()? != "relay listening" {
            return None;
        }
        // Logged as `Some(127.0.0.1:port)`.
        let addr = fields.get("addr")?.as_str()?;
        Some(
            addr.trim_start_matches("Some(")
                .trim_end_matches(')')
                .to_owned(),
        )
    });
    match addr {
        Ok(addr) => Ok((child, addr)),
        Err(e) => {
            terminate(&mut child);
            Err(e.context("the relay did not start"))
        }
    }
}

/// Database connections per cluster node. Three nodes at the single
/// node's 16, beside it and the bench's own pools, would come close to
/// PostgreSQL's default of 100 connections; live delivery between
/// connected users does not touch the database. --server-env
/// RELAY_DB_POOL=… overrides it.
const CLUSTER_NODE_DB_POOL: &str = "8";

/// A cluster the bench starts: a private `redis-server` keeping nothing on
/// disk, and `n` relays on one fresh database, each with its own node id
/// and port.
pub struct Cluster {
    /// Each node's WebSocket URL, in node order.
    pub urls: Vec<String>,
    /// Each node's pid, in node order.
    pub pids: Vec<u32>,
    pub redis_pid: u32,
    /// Its port, for reading its command and byte counters.
    pub redis_port: u16,
    /// A pool on the cluster's database, for seeding its accounts.
    pub db: PgPool,
    nodes: Vec<Child>,
    redis: Option<Child>,
    created_db: Option<(String, String)>,
    /// Where each node's log goes, then redis's.
    pub log_paths: Vec<PathBuf>,
}

impl Cluster {
    pub async fn start(args: &ServerArgs, n: usize) -> anyhow::Result<Cluster> {
        let bin = relay_bin(args)?;
        let fresh = FreshDb::name(args)?;
        let mut cluster = Cluster {
            urls: Vec::new(),
            pids: Vec::new(),
            redis_pid: 0,
            redis_port: 0,
            // Creates the database with the relay's schema before any node
            // starts, so the nodes do not race to migrate it.
            db: connect_db(&fresh.url).await?,
            nodes: Vec::new(),
            redis: None,
            created_db: (!args.keep_db).then(|| (fresh.admin.clone(), fresh.name.clone())),
            log_paths: Vec::new(),
        };
        let redis_log = std::env::temp_dir().join(format!("relay-bench-{}-redis.log", fresh.name));
        let (redis, port) = start_redis(&redis_log)?;
        cluster.redis_pid = redis.id();
        cluster.redis_port = port;
        cluster.redis = Some(redis);
        let redis_url = format!("redis://127.0.0.1:{port}/0");
        for i in 1..=n {
            let log = std::env::temp_dir().join(format!("relay-bench-{}-node{i}.log", fresh.name));
            let extra = [
                ("RELAY_REDIS_URL", redis_url.clone()),
                ("RELAY_NODE_ID", format!("bench-node-{i}")),
                ("RELAY_DB_POOL", CLUSTER_NODE_DB_POOL.to_owned()),
            ];
            let (child, addr) = spawn_relay(&bin, &fresh.url, args, &extra, &log)?;
            cluster.urls.push(format!("ws://{addr}/v1/websocket"));
            cluster.pids.push(child.id());
            cluster.nodes.push(child);
            cluster.log_paths.push(log);
        }
        cluster.log_paths.push(redis_log);
        Ok(cluster)
    }

    /// Stops the nodes (SIGTERM), then redis, and drops the database.
    pub async fn stop(mut self) {
        self.db.close().await;
        self.terminate_all();
        if let Some((admin, name)) = self.created_db.take() {
            drop_db(&admin, &name).await;
        }
    }

    fn terminate_all(&mut self) {
        for mut node in self.nodes.drain(..) {
            terminate(&mut node);
        }
        if let Some(mut redis) = self.redis.take() {
            terminate(&mut redis);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.terminate_all();
    }
}

/// Starts `redis-server` on a free loopback port, with no snapshots and no
/// append-only file: the bench's Redis holds only what is in flight.
fn start_redis(log: &std::path::Path) -> anyhow::Result<(Child, u16)> {
    // A port the kernel just handed out and took back: free unless someone
    // else grabs it in the next instant, and then redis fails to start and
    // says so.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start redis-server (is it installed?)")?;
    let ready = wait_for_line(&mut child, log, |line| {
        line.contains("Ready to accept connections")
            .then(String::new)
    });
    match ready {
        Ok(_) => Ok((child, port)),
        Err(e) => {
            terminate(&mut child);
            Err(e.context("redis-server did not start"))
        }
    }
}

pub(crate) async fn connect_db(url: &str) -> anyhow::Result<PgPool> {
    // Through the library, so a database the bench creates gets the same
    // schema the relay expects (migrations are idempotent).
    signal_relay::storage::connect(&SecretString::from(url.to_owned()), 16)
        .await
        .with_context(|| format!("cannot open the relay's database at {url}"))
}

fn terminate(child: &mut Child) {
    // SIGTERM, not Child::kill's SIGKILL: the relay shuts down in order.
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let _ = child.wait();
}

/// Reads the child's stdout and stderr into `log` from background threads,
/// and returns the first value `find` extracts from a line. Fails if the
/// child exits or nothing is found within a minute.
fn wait_for_line(
    child: &mut Child,
    log: &std::path::Path,
    find: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
) -> anyhow::Result<String> {
    let (tx, rx) = mpsc::channel::<Option<String>>();
    let find = std::sync::Arc::new(find);
    let file = std::sync::Arc::new(std::sync::Mutex::new(
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?,
    ));
    let streams: Vec<Box<dyn std::io::Read + Send>> = vec![
        Box::new(child.stdout.take().expect("piped stdout")),
        Box::new(child.stderr.take().expect("piped stderr")),
    ];
    for stream in streams {
        let (tx, find, file) = (tx.clone(), find.clone(), file.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(found) = find(&line) {
                    let _ = tx.send(Some(found));
                }
                let _ = writeln!(file.lock().expect("log lock"), "{line}");
            }
            // The stream closed: the child is gone (or closed it).
            let _ = tx.send(None);
        });
    }
    drop(tx);
    let mut closed = 0;
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(found)) => return Ok(found),
            Ok(None) => {
                closed += 1;
                if closed == 2 {
                    let tail = std::fs::read_to_string(log).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(20).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    bail!(
                        "the child exited before it was ready; log {}:\n{}",
                        log.display(),
                        tail.join("\n")
                    );
                }
            }
            Err(_) => bail!("the child was not ready within 60 s; see {}", log.display()),
        }
    }
}

/// The bare forwarder baseline, as a child process of this binary.
pub struct Forwarder {
    /// `ws://127.0.0.1:port`
    pub url: String,
    pub pid: u32,
    child: Child,
}

impl Forwarder {
    /// `write_buffer`: see [`crate::forwarder::run`].
    pub fn start(write_buffer: Option<usize>) -> anyhow::Result<Forwarder> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["forwarder", "--listen", "127.0.0.1:0"]);
        if let Some(bytes) = write_buffer {
            command.args(["--write-buffer", &bytes.to_string()]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start the forwarder")?;
        let log = std::env::temp_dir().join(format!("relay-bench-forwarder-{}.log", child.id()));
        let addr = wait_for_line(&mut child, &log, |line| {
            line.strip_prefix("listening ").map(str::to_owned)
        })?;
        Ok(Forwarder {
            url: format!("ws://{addr}"),
            pid: child.id(),
            child,
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
