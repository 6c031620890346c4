//! Test support (feature `testing`): a real server on port 0 over its own
//! freshly created PostgreSQL database, for integration tests of this crate
//! and of the CLI and bench members.

use std::net::SocketAddr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};
use std::str::FromStr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::{self, AuthInfo, Client, Encoding, Event, Events};
use crate::config::Config;
use crate::messages::registry::Registry;
use crate::server;

/// Where test databases are created: `RELAY_TEST_DATABASE_URL`, or the
/// local PostgreSQL's maintenance database.
pub fn admin_url() -> String {
    std::env::var("RELAY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@localhost/postgres".into())
}

/// A running server with its own database. Dropping it stops the server
/// and drops the database.
pub struct TestApp {
    pub addr: SocketAddr,
    /// `ws://127.0.0.1:port/v1/websocket`
    pub url: String,
    /// The server's configuration (as started).
    pub config: Config,
    /// A pool on the test's database, for assertions on stored rows.
    pub db: PgPool,
    /// The database's name.
    pub db_name: String,
    /// Cancel to shut the server down.
    pub shutdown: CancellationToken,
    /// The server task; resolves when shutdown completes.
    pub server: Option<JoinHandle<Result<(), server::ServerError>>>,
    /// The admin endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: SocketAddr,
    /// The running server's registry: who is online, as the server sees it.
    /// Not the whole messaging front, whose store writers and reader would
    /// then outlive the server and hold its shutdown to the deadline.
    pub registry: Registry,
}

/// Creates a fresh, empty database and returns its URL. Panics with a clear
/// message when PostgreSQL is unreachable: tests never skip silently.
pub async fn create_database() -> (String, String) {
    let admin = admin_url();
    let options = PgConnectOptions::from_str(&admin).expect("valid RELAY_TEST_DATABASE_URL");
    let mut conn = options.connect().await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at {admin} ({e}). Start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` \
             or point RELAY_TEST_DATABASE_URL at a server where this user may create databases."
        )
    });
    let name = format!("relay_test_{}", Uuid::new_v4().simple());
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create test database");
    let url = options.database(&name).to_url_lossy().to_string();
    (name, url)
}

/// Whether something listens on `addr`, for tests waiting for a process
/// they started. A connect to a local port nobody listens on can pick that
/// very port as its own and connect to itself (TCP simultaneous open):
/// taken for the process, it also held the port the process was about to
/// bind, which then failed with "address in use" (a cluster test met it).
pub async fn listening(addr: std::net::SocketAddr) -> bool {
    match tokio::net::TcpStream::connect(addr).await {
        Ok(stream) => stream.local_addr().is_ok_and(|local| local != addr),
        Err(_) => false,
    }
}

/// The URL of database `name` on the test server, which need not exist
/// yet (for tests of what creates it).
pub fn database_url(name: &str) -> String {
    let options = PgConnectOptions::from_str(&admin_url()).expect("valid RELAY_TEST_DATABASE_URL");
    options.database(name).to_url_lossy().to_string()
}

/// Starts a server with default limits on a fresh database.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts a server on a fresh database, after `adjust` tweaks the config.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    let (db_name, url) = create_database().await;
    let mut config = Config::for_tests(&url);
    // Tests create many users; keep Argon2 from serializing them all.
    config.limits.auth.argon2_concurrency = 4;
    // Every test client connects from 127.0.0.1, and a test registers and
    // logs in far faster than a person: the per-address limits (password
    // attempts, its share of the Argon2 queue, sockets not yet
    // authenticated) are raised, as the bench raises its rate limits.
    // Tests of those limits set their own.
    let auth = &mut config.limits.auth;
    auth.password_address_rate_per_sec = 1e9;
    auth.password_address_burst = 1e9;
    auth.argon2_queue_per_address = auth.argon2_queue;
    let connection = &mut config.limits.connection;
    connection.max_unauthenticated_per_address =
        u32::try_from(connection.max_unauthenticated).unwrap_or(u32::MAX);
    adjust(&mut config);
    spawn_on(config, db_name).await
}

/// Starts a server with `config` (whose database `db_name` exists).
pub async fn spawn_on(config: Config, db_name: String) -> TestApp {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .expect("bind test listener");
    let addr = listener.local_addr().expect("local addr");
    let scheme = if config.tls.tls_cert.is_some() {
        "wss"
    } else {
        "ws"
    };
    let host = if scheme == "wss" {
        "localhost".to_string()
    } else {
        addr.ip().to_string()
    };
    let url = format!("{scheme}://{host}:{}/v1/websocket", addr.port());
    let shutdown = CancellationToken::new();
    // Migrations run in server::run; connect the assertion pool after them
    // by running them here first (idempotent), so tests can query at once.
    let db_url = {
        use secrecy::ExposeSecret;
        config.database_url.expose_secret().to_owned()
    };
    let db = crate::storage::connect(&config.database_url, 4)
        .await
        .unwrap_or_else(|e| panic!("test database {db_url}: {e}"));
    let started = start(listener, config.clone(), shutdown.clone()).await;
    TestApp {
        server: Some(started.server),
        registry: started.registry,
        admin_addr: started.admin,
        addr,
        url,
        config,
        db,
        db_name,
        shutdown,
    }
}

type ServerTask = JoinHandle<Result<(), server::ServerError>>;

/// What a started server hands the test.
struct Started {
    server: ServerTask,
    registry: Registry,
    admin: SocketAddr,
}

async fn start(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Started {
    let built = server::Server::build(config, &shutdown)
        .await
        .unwrap_or_else(|e| panic!("server failed to start: {e}"));
    Started {
        registry: built.state().relay().registry().clone(),
        admin: built.admin_addr().expect("tests run the admin endpoint"),
        server: tokio::spawn(built.run(listener, shutdown)),
    }
}

impl TestApp {
    /// A connected, unauthenticated client.
    pub async fn connect(&self) -> (Client, Events) {
        self.connect_as(Encoding::Proto).await
    }

    /// A connected, unauthenticated client speaking `encoding`.
    pub async fn connect_as(&self, encoding: Encoding) -> (Client, Events) {
        let options = client::ConnectOptions {
            encoding,
            ..client::ConnectOptions::default()
        };
        Client::connect_with(&self.url, options)
            .await
            .expect("connect to test server")
    }

    /// Registers `username` (password `password123`) on a new connection.
    pub async fn register(&self, username: &str) -> (Client, Events, AuthInfo) {
        self.register_as(Encoding::Proto, username).await
    }

    /// [`TestApp::register`] on a connection speaking `encoding`.
    pub async fn register_as(
        &self,
        encoding: Encoding,
        username: &str,
    ) -> (Client, Events, AuthInfo) {
        let (client, events) = self.connect_as(encoding).await;
        let auth = client
            .register(username, "password123")
            .await
            .expect("register");
        (client, events, auth)
    }

    /// Registers `username` and waits for the queue-empty push: only from
    /// then on does the relay deliver to this connection live (before, a
    /// message to it is stored, and acking it from the queue sends its
    /// sender a RECEIPT). Panics on a delivery, which a new account cannot
    /// have, and after 30 s.
    pub async fn register_live(&self, username: &str) -> (Client, Events, AuthInfo) {
        self.register_live_as(Encoding::Proto, username).await
    }

    /// [`TestApp::register_live`] on a connection speaking `encoding`.
    pub async fn register_live_as(
        &self,
        encoding: Encoding,
        username: &str,
    ) -> (Client, Events, AuthInfo) {
        let (client, mut events, auth) = self.register_as(encoding, username).await;
        let live = async {
            loop {
                match events.next().await.expect("connection open") {
                    Event::QueueEmpty => break,
                    Event::PreKeysLow(_) => {}
                    Event::Deliver(envelope) => panic!("a new account got {envelope:?}"),
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), live)
            .await
            .expect("queue-empty push in time");
        (client, events, auth)
    }

    /// Reconnects with a session token.
    pub async fn resume(&self, token: &[u8]) -> (Client, Events) {
        self.resume_as(Encoding::Proto, token).await
    }

    /// [`TestApp::resume`] on a connection speaking `encoding`.
    pub async fn resume_as(&self, encoding: Encoding, token: &[u8]) -> (Client, Events) {
        let (client, events) = self.connect_as(encoding).await;
        client.resume(token).await.expect("resume");
        (client, events)
    }

    /// Stops the server gracefully and starts a new one on the same database
    /// (on a new port), as an operator's restart would.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test listener");
        self.addr = listener.local_addr().expect("local addr");
        self.url = format!("ws://{}/v1/websocket", self.addr);
        self.serve(listener).await;
    }

    /// Starts the server again after [`TestApp::stop`], on the same address
    /// and database, as a restarted relay process comes back: clients find
    /// it at the URL they had.
    pub async fn start_again(&mut self) {
        assert!(self.server.is_none(), "stop the server first");
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("bind the same address again");
        self.serve(listener).await;
    }

    async fn serve(&mut self, listener: tokio::net::TcpListener) {
        self.shutdown = CancellationToken::new();
        let started = start(listener, self.config.clone(), self.shutdown.clone()).await;
        self.server = Some(started.server);
        self.registry = started.registry;
        self.admin_addr = started.admin;
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server shut down cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        drop_database(&self.db_name);
    }
}

/// Drops a test database, waiting until it is gone. Blocking, on a thread
/// of its own, so it works from `Drop` (which cannot await) even while the
/// test's runtime shuts down.
pub fn drop_database(name: &str) {
    let name = name.to_owned();
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cleanup runtime");
        runtime.block_on(async move {
            if let Ok(pool) = PgPoolOptions::new()
                .max_connections(1)
                .connect(&admin_url())
                .await
            {
                let _ = pool
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await;
            }
        });
    })
    .join();
}

/// A PostgreSQL server of a test's own, on a free port, for tests that stop
/// and restart the database under a running relay. Stopped and removed on
/// drop.
pub struct PrivatePostgres {
    /// The server's data directory (and its socket directory).
    dir: std::path::PathBuf,
    /// Where PostgreSQL's programs are.
    bin: std::path::PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    /// Creates a cluster (trust authentication, user `postgres`) and starts
    /// it. Panics with what failed: tests never skip.
    pub fn start() -> Self {
        let bin = postgres_bin();
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("local addr").port()
        };
        let dir = std::env::temp_dir().join(format!("relay-pg-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the cluster directory");
        let pg = PrivatePostgres { dir, bin, port };
        pg.chown_to_postgres();
        pg.run(
            "initdb",
            &[
                "-A",
                "trust",
                "-U",
                "postgres",
                "-D",
                &pg.data(),
                "--no-sync",
            ],
        );
        pg.start_again();
        pg
    }

    /// `postgres://postgres@127.0.0.1:PORT/NAME`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server at once, as an outage would: every connection is
    /// terminated.
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log.display().to_string(),
                "-w",
                "start",
            ],
        );
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// PostgreSQL refuses to run as root: run its programs as `postgres`
    /// then.
    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut command = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            std::process::Command::new(&path)
        };
        let output = command
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn chown_to_postgres(&self) {
        if is_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&self.dir)
                .status()
                .expect("run chown");
            assert!(status.success(), "chown the cluster directory");
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let path = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "stop"];
        let _ = if is_root() {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&path)
                .args(args)
                .output()
        } else {
            std::process::Command::new(&path).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether this process runs as root (its effective user id is 0).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
    })
}

/// The directory of PostgreSQL's programs: `pg_config --bindir`, else the
/// newest Debian install.
fn postgres_bin() -> std::path::PathBuf {
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        && out.status.success()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if std::path::Path::new(&dir).join("initdb").exists() {
            return dir.into();
        }
    }
    let mut installed: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server programs (initdb, pg_ctl) are installed")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    installed.sort();
    installed
        .pop()
        .expect("PostgreSQL's server programs (initdb, pg_ctl) are installed")
}
