//! The cluster harness: a private `redis-server` on a free port, and real
//! `relay` processes (the binary under test) on one test database, with
//! clients choosing the node per connection as a load balancer would.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use signal_relay::client::{Client, Events};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Upper bound on waits that end as soon as their condition holds.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn free_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap()
}

async fn wait_for_port(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `redis-server` of the test's own, keeping nothing on disk, so a test
/// may kill, restart or pause it without disturbing anyone.
pub struct Redis {
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Redis {
    pub async fn start() -> Redis {
        let mut redis = Redis {
            addr: free_addr(),
            child: None,
        };
        redis.spawn().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    pub async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.addr.port().to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        wait_for_port(self.addr, "redis-server").await;
    }

    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("SIGKILL");
            child.wait().await.expect("reap");
        }
    }
}

/// One relay process.
pub struct Node {
    pub name: String,
    pub addr: SocketAddr,
    /// Its admin listener, for `/metrics`.
    pub admin: SocketAddr,
    db_url: String,
    redis_url: String,
    extra: Vec<(String, String)>,
    child: Option<Child>,
    /// It has listened once: its ports are its own from then on.
    started: bool,
}

impl Node {
    pub fn url(&self) -> String {
        format!("ws://{}/v1/websocket", self.addr)
    }

    /// Starts the node and waits until it listens. `free_addr` only finds
    /// ports that were free a moment ago: on a busy machine another process
    /// may take one first, and the node then exits at once ("address
    /// already in use"). A first start tries again on other ports; a
    /// restart keeps its ports (clients reconnect to them).
    pub async fn spawn(&mut self) {
        let first = self.child.is_none() && !self.started;
        for _ in 0..3 {
            self.start_process();
            if self.wait_listening().await {
                self.started = true;
                return;
            }
            assert!(first, "{} did not start again", self.name);
            self.addr = free_addr();
            self.admin = free_addr();
        }
        panic!("{} did not start", self.name);
    }

    /// Waits until the node accepts connections (`true`) or exits first.
    async fn wait_listening(&mut self) -> bool {
        let deadline = Instant::now() + WAIT;
        loop {
            if signal_relay::testing::listening(self.addr).await {
                return true;
            }
            if let Some(child) = &mut self.child
                && child.try_wait().expect("the relay's status").is_some()
            {
                self.child = None;
                return false;
            }
            assert!(Instant::now() < deadline, "{} did not start", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn start_process(&mut self) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_relay"));
        command
            .env("RELAY_LISTEN", self.addr.to_string())
            .env("RELAY_ADMIN_LISTEN", self.admin.to_string())
            .env("DATABASE_URL", &self.db_url)
            .env("RELAY_REDIS_URL", &self.redis_url)
            .env("RELAY_NODE_ID", &self.name)
            .env("RELAY_SEND_BURST", "100000")
            .env("RELAY_SEND_RATE", "100000")
            .env("RELAY_ARGON2_CONCURRENCY", "1")
            .env("RELAY_DB_POOL", "8")
            .env(
                "RUST_LOG",
                std::env::var("CLUSTER_LOG").unwrap_or("error".into()),
            );
        for (k, v) in &self.extra {
            command.env(k, v);
        }
        // Logs go to stdout: shown only when CLUSTER_LOG asks for them,
        // into one file per node (appended to across restarts) when
        // CLUSTER_LOG_DIR names a directory, as three nodes' lines
        // interleaved cannot be told apart.
        let logs = match std::env::var_os("CLUSTER_LOG_DIR") {
            Some(dir) if std::env::var_os("CLUSTER_LOG").is_some() => {
                let db = self.db_url.rsplit('/').next().unwrap_or_default();
                let db = db.split('?').next().unwrap_or_default();
                let path = std::path::Path::new(&dir).join(format!("{db}-{}.log", self.name));
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map(Stdio::from)
                    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
            }
            _ if std::env::var_os("CLUSTER_LOG").is_some() => Stdio::inherit(),
            _ => Stdio::null(),
        };
        let child = command
            .stdout(logs)
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the relay binary");
        self.child = Some(child);
    }

    /// The value of one series of its `/metrics`, e.g.
    /// `relay_cluster_forwards_total{result="routed"}`; 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.admin)
            .await
            .expect("the admin listener");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut text))
            .await
            .expect("metrics in time")
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // It may have died already (killed through its `Pid`).
            let _ = child.start_kill();
            child.wait().await.expect("reap");
        }
    }

    /// Kills the process if it runs, and starts it again: a new
    /// incarnation of the same node.
    pub async fn restart(&mut self) {
        self.kill9().await;
        self.spawn().await;
    }

    /// Signals the process without a `&mut` borrow, for a disruption
    /// running beside traffic that borrows the cluster.
    pub fn pid_handle(&self) -> Pid {
        Pid(self.child.as_ref().and_then(Child::id).expect("running") as i32)
    }

    /// Waits for the process to exit by itself; its exit code.
    pub async fn exited(&mut self) -> Option<i32> {
        let child = self.child.as_mut()?;
        let status = tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("the node exits")
            .expect("reap");
        self.child = None;
        status.code()
    }
}

/// A node's process id.
#[derive(Debug, Clone, Copy)]
pub struct Pid(i32);

impl Pid {
    fn signal(self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.0.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    pub fn kill9(self) {
        self.signal("KILL");
    }

    pub fn pause(self) {
        self.signal("STOP");
    }

    pub fn resume(self) {
        self.signal("CONT");
    }
}

/// One cluster at a time: each runs three debug-built relays, PostgreSQL
/// and Redis on the machine's two cores, and two at once starve each other
/// into timeouts that say nothing about the relay.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Three (or N) relays on one database and one Redis.
pub struct Cluster {
    /// Held for the cluster's life (see [`ONE_AT_A_TIME`]).
    _turn: tokio::sync::MutexGuard<'static, ()>,
    pub redis: Redis,
    pub nodes: Vec<Node>,
    pub db_name: String,
    /// The database every node uses.
    db_url: String,
}

impl Cluster {
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, &[]).await
    }

    /// `extra`: environment for every node (settings under test). The
    /// database does not exist yet: the nodes, starting together, create
    /// and migrate it.
    pub async fn start_with(n: usize, extra: &[(&str, &str)]) -> Cluster {
        let db_name = format!("test_cluster_{}", uuid::Uuid::new_v4().simple());
        let db_url = signal_relay::testing::database_url(&db_name);
        Self::start_on(n, db_name, db_url, extra).await
    }

    /// [`Cluster::start_with`] on the database at `db_url` (a private
    /// server's), named `db_name` for the clean-up on the shared server.
    pub async fn start_on(
        n: usize,
        db_name: String,
        db_url: String,
        extra: &[(&str, &str)],
    ) -> Cluster {
        let turn = ONE_AT_A_TIME.lock().await;
        let redis = Redis::start().await;
        let mut nodes: Vec<Node> = (1..=n)
            .map(|i| Node {
                name: format!("n{i}"),
                addr: free_addr(),
                admin: free_addr(),
                db_url: db_url.clone(),
                redis_url: redis.url(),
                extra: extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                child: None,
                started: false,
            })
            .collect();
        // All at once, as a deployment would.
        futures::future::join_all(nodes.iter_mut().map(Node::spawn)).await;
        Cluster {
            _turn: turn,
            redis,
            nodes,
            db_name,
            db_url,
        }
    }

    /// Registers a user through node `i` and closes that connection.
    pub async fn register(&self, i: usize, name: &str) -> User {
        let (client, _events) = Client::connect(&self.nodes[i].url()).await.unwrap();
        let auth = client.register(name, "password123").await.unwrap();
        client.close().await;
        User {
            id: auth.user_id,
            name: name.to_owned(),
            token: auth.token,
        }
    }

    /// The database every node uses.
    pub fn db_url(&self) -> String {
        self.db_url.clone()
    }

    /// Connects the user to node `i` (resuming their session).
    pub async fn connect(&self, i: usize, user: &User) -> (Client, Events) {
        connect(&self.nodes[i].url(), &user.token).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(child) = &mut node.child {
                let _ = child.start_kill();
            }
        }
        if let Some(child) = &mut self.redis.child {
            let _ = child.start_kill();
        }
        signal_relay::testing::drop_database(&self.db_name);
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: uuid::Uuid,
    pub name: String,
    pub token: Vec<u8>,
}

/// Connects and resumes through the first of `urls` (from `*at` on, in
/// turn) that accepts, as a client behind a load balancer would: a node
/// that is down is skipped, not waited for. Advances `*at` to the node
/// used.
pub async fn connect_any(urls: &[String], at: &mut usize, token: &[u8]) -> (Client, Events) {
    let deadline = Instant::now() + WAIT;
    loop {
        let url = &urls[*at];
        let attempt = async {
            let (client, events) = Client::connect(url).await.ok()?;
            client.resume(token).await.ok()?;
            Some((client, events))
        };
        if let Ok(Some(connected)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            return connected;
        }
        assert!(
            Instant::now() < deadline,
            "could not connect to any of {urls:?}"
        );
        *at = (*at + 1) % urls.len();
        // A retry delay while nodes restart, not a stand-in for
        // synchronisation.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Connects and resumes, retrying while the node is down or refuses.
pub async fn connect(url: &str, token: &[u8]) -> (Client, Events) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok((client, events)) = Client::connect(url).await
            && client.resume(token).await.is_ok()
        {
            return (client, events);
        }
        assert!(Instant::now() < deadline, "could not connect to {url}");
        // A retry delay while a node restarts, not a stand-in for
        // synchronisation.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
