//! Behind a TCP load balancer that sends the PROXY protocol header: the
//! relay takes the client the balancer names, so the per-address limits
//! hold per client, not for the balancer as a whole; a balancer's socket
//! without a header is dropped, and nobody else can name a client.

use std::net::SocketAddr;

use signal_relay::client::{Client, ClientError, ConnectOptions};
use signal_relay::proto::Status;
use signal_relay::testing::{TestApp, spawn_app_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::helpers::{Raw, WAIT, connect_to_from, exchange, loopback, metric, tcp_from};
use crate::tls::TestCertificates;

/// A TCP load balancer on 127.0.0.1 in front of the relay, as HAProxy with
/// `send-proxy`: each client's connection to the relay starts with a
/// version 1 header naming the client, then carries its bytes both ways.
struct Balancer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Balancer {
    async fn start(relay: SocketAddr) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut client, from)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut upstream = TcpStream::connect(relay).await.unwrap();
                    let header = format!(
                        "PROXY TCP4 {} {} {} {}\r\n",
                        from.ip(),
                        relay.ip(),
                        from.port(),
                        relay.port()
                    );
                    upstream.write_all(header.as_bytes()).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        Balancer { addr, task }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client connected through the balancer at `balancer` from `127.0.0.N`.
async fn connect_through(balancer: SocketAddr, n: u8) -> (Client, signal_relay::client::Events) {
    connect_to_from(&format!("ws://{balancer}/v1/websocket"), n).await
}

/// A real HAProxy in front of the relay (`.ci/run` installs it): TCP mode,
/// `send-proxy-v2` to the relay, and health checks of `/readyz` that carry
/// a `LOCAL` header (`check-send-proxy`), every 100 ms.
struct HaProxy {
    addr: SocketAddr,
    _process: tokio::process::Child,
    dir: std::path::PathBuf,
}

impl HaProxy {
    async fn start(relay: SocketAddr) -> HaProxy {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|probe| probe.local_addr())
            .unwrap();
        let dir = std::env::temp_dir().join(format!("relay-haproxy-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global\n  maxconn 256\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend relay\n  bind {addr}\n  default_backend relays\n\
             backend relays\n  option httpchk GET /readyz\n  timeout check 5s\n\
             \x20 server relay {relay} send-proxy-v2 check check-send-proxy inter 100ms\n"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let mut process = tokio::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy is installed (.ci/run installs it)");
        let deadline = tokio::time::Instant::now() + WAIT;
        while !signal_relay::testing::listening(addr).await {
            if let Some(exit) = process.try_wait().unwrap() {
                panic!("haproxy exited at start ({exit}): is {addr} taken?");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "haproxy did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        HaProxy {
            addr,
            _process: process,
            dir,
        }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The relay trusts PROXY headers from 127.0.0.1, the balancer's address.
async fn behind_a_balancer(adjust: impl FnOnce(&mut signal_relay::config::Config)) -> TestApp {
    spawn_app_with(|c| {
        c.proxy_protocol_from = "127.0.0.1".parse().unwrap();
        adjust(c);
    })
    .await
}

/// The relay drops `stream` without an answer: the end of the stream, or a
/// reset when what the socket sent was left unread.
async fn dropped_unanswered(stream: &mut TcpStream) {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("the socket is dropped");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    if let Err(err) = read {
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    }
}

async fn proxy_header_refusals(app: &TestApp) -> f64 {
    metric(
        app,
        r#"relay_upgrades_rejected_total{reason="proxy_header"}"#,
    )
    .await
}

fn status(err: ClientError) -> Status {
    match err {
        ClientError::Status { status, .. } => status,
        other => panic!("expected a status error, got {other}"),
    }
}

/// Every client comes through the balancer's one address, yet one client
/// spending its password attempts leaves the others theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_limits_hold_per_client_behind_a_balancer() {
    let app = behind_a_balancer(spend_passwords_fast).await;
    let balancer = Balancer::start(app.addr).await;
    password_limits_hold_per_client(&app, balancer.addr).await;
}

/// The same through a real HAProxy, which speaks version 2 and checks the
/// relay's health with `LOCAL` headers meanwhile: none is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_limits_hold_per_client_behind_haproxy() {
    let app = behind_a_balancer(spend_passwords_fast).await;
    let haproxy = HaProxy::start(app.addr).await;
    password_limits_hold_per_client(&app, haproxy.addr).await;
    assert_eq!(proxy_header_refusals(&app).await, 0.0);
}

fn spend_passwords_fast(c: &mut signal_relay::config::Config) {
    c.limits.auth.password_address_rate_per_sec = 0.001;
    c.limits.auth.password_address_burst = 2.0;
}

async fn password_limits_hold_per_client(app: &TestApp, balancer: SocketAddr) {
    let (owner, _e) = connect_through(balancer, 9).await;
    owner.register("alice", "password123").await.unwrap();

    for _ in 0..2 {
        let (c, _e) = connect_through(balancer, 2).await;
        let err = c.login("alice", "wrong password").await.unwrap_err();
        assert_eq!(status(err), Status::Unauthorized);
    }
    let (c, _e) = connect_through(balancer, 2).await;
    let err = c.login("alice", "password123").await.unwrap_err();
    assert_eq!(
        status(err),
        Status::RateLimited,
        "127.0.0.2 spent its burst"
    );

    let (c, _e) = connect_through(balancer, 3).await;
    c.login("alice", "password123").await.unwrap();
    assert_eq!(c.who_am_i().await.unwrap().username, "alice");
    assert_eq!(
        metric(app, r#"relay_rate_limited_total{limit="password_address"}"#).await,
        1.0
    );
}

/// A balancer's socket must start with the header (version 1 or 2); one
/// that does not is dropped unanswered. A header from anyone else is not
/// believed: it is just a malformed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_trusted_balancer_names_clients_and_it_must() {
    let app = behind_a_balancer(|_| {}).await;
    let probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

    let mut no_header = tcp_from(app.addr, 1).await;
    no_header.write_all(probe).await.unwrap();
    dropped_unanswered(&mut no_header).await;
    assert_eq!(proxy_header_refusals(&app).await, 1.0);

    // Version 2, as HAProxy's `send-proxy-v2`: 203.0.113.7:51234.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[203, 0, 113, 7, 127, 0, 0, 1]);
    v2.extend_from_slice(&51234u16.to_be_bytes());
    v2.extend_from_slice(&app.addr.port().to_be_bytes());
    v2.extend_from_slice(probe);
    let mut balancer = tcp_from(app.addr, 1).await;
    let answer = exchange(&mut balancer, &v2).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let spoof = [&b"PROXY TCP4 203.0.113.7 127.0.0.1 51234 80\r\n"[..], probe].concat();
    let mut stranger = tcp_from(app.addr, 2).await;
    let answer = exchange(&mut stranger, &spoof).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// The unauthenticated share is the named client's: a second silent socket
/// naming one client is refused (429), one naming another is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_shares_are_per_named_client() {
    let app = behind_a_balancer(|c| c.limits.connection.max_unauthenticated_per_address = 1).await;
    let header = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 40000 80\r\n");
    // Upgraded and not authenticated: it holds 203.0.113.7's share.
    let mut stream = tcp_from(app.addr, 1).await;
    stream
        .write_all(header("203.0.113.7").as_bytes())
        .await
        .unwrap();
    let silent = Raw::upgrade_on(stream, None).await;
    let mut same = tcp_from(app.addr, 1).await;
    let answer = exchange(&mut same, header("203.0.113.7").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    let mut other = tcp_from(app.addr, 1).await;
    let request = header("198.51.100.9") + "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let answer = exchange(&mut other, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(silent);
}

/// A client behind the balancer cannot name another client: its own PROXY
/// line reaches the relay after the balancer's header, as a request line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_the_balancer_cannot_name_another() {
    let app = behind_a_balancer(|_| {}).await;
    let balancer = Balancer::start(app.addr).await;
    let mut client = tcp_from(balancer.addr, 4).await;
    let request =
        b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let answer = exchange(&mut client, request).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// A balancer's socket that sends nothing is dropped at the handshake
/// timeout, counted with the refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_balancer_socket_is_dropped_in_time() {
    let app = behind_a_balancer(|c| c.limits.connection.handshake_timeout_secs = 1).await;
    let mut silent = tcp_from(app.addr, 1).await;
    dropped_unanswered(&mut silent).await;
    assert_eq!(proxy_header_refusals(&app).await, 1.0);
}

/// The header comes before TLS: a balancer passing TLS through to a relay
/// that terminates it (`--tls-cert`) still names the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_precedes_tls() {
    let certs = TestCertificates::new();
    let app = behind_a_balancer(|c| {
        c.tls.tls_cert = Some(certs.cert_path.clone());
        c.tls.tls_key = Some(certs.key_path.clone());
        c.limits.auth.password_address_rate_per_sec = 0.001;
        c.limits.auth.password_address_burst = 1.0;
    })
    .await;
    let balancer = Balancer::start(app.addr).await;
    let url = format!("wss://localhost:{}/v1/websocket", balancer.addr.port());
    let through = |n: u8| {
        let options = ConnectOptions {
            bind: Some(loopback(n)),
            ca_cert: Some(certs.ca_path.clone()),
            ..ConnectOptions::default()
        };
        let url = url.clone();
        async move { Client::connect_with(&url, options).await.unwrap() }
    };
    let (client, _e) = through(2).await;
    client.register("tls_user", "password123").await.unwrap();
    let (client, _e) = through(2).await;
    let err = client.login("tls_user", "password123").await.unwrap_err();
    assert_eq!(
        status(err),
        Status::RateLimited,
        "127.0.0.2 spent its one attempt"
    );
    let (client, _e) = through(3).await;
    client.login("tls_user", "password123").await.unwrap();
}
