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

use crate::client::{AuthInfo, Client, Event, Events};
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
    let (server, registry) = start(listener, config.clone(), shutdown.clone()).await;
    TestApp {
        addr,
        url,
        config,
        db,
        db_name,
        shutdown,
        server: Some(server),
        registry,
    }
}

type ServerTask = JoinHandle<Result<(), server::ServerError>>;

async fn start(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> (ServerTask, Registry) {
    let built = server::Server::build(config)
        .await
        .unwrap_or_else(|e| panic!("server failed to start: {e}"));
    let registry = built.state().relay().registry().clone();
    (tokio::spawn(built.run(listener, shutdown)), registry)
}

impl TestApp {
    /// A connected, unauthenticated client.
    pub async fn connect(&self) -> (Client, Events) {
        Client::connect(&self.url)
            .await
            .expect("connect to test server")
    }

    /// Registers `username` (password `password123`) on a new connection.
    pub async fn register(&self, username: &str) -> (Client, Events, AuthInfo) {
        let (client, events) = self.connect().await;
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
        let (client, mut events, auth) = self.register(username).await;
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
        let (client, events) = self.connect().await;
        client.resume(token).await.expect("resume");
        (client, events)
    }

    /// Stops the server gracefully and starts a new one on the same database
    /// (on a new port), as an operator's restart would.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut config = self.config.clone();
        config.listen = "127.0.0.1:0".parse().expect("valid address");
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .expect("bind test listener");
        self.addr = listener.local_addr().expect("local addr");
        self.url = format!("ws://{}/v1/websocket", self.addr);
        self.shutdown = CancellationToken::new();
        let (server, registry) = start(listener, config, self.shutdown.clone()).await;
        self.server = Some(server);
        self.registry = registry;
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
        let name = self.db_name.clone();
        // Drop the database from a thread of its own: Drop cannot await, and
        // the test's runtime may be shutting down.
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
}
